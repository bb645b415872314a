"""Soundness and completeness of the analysis on the whole zoo, checked by rule-free oracles
(DESIGN §3.2): a random group element exp(E λ) leaves the outputs unchanged, and span(E) equals the
joint null space of J(θ)·diag(θ) over many random θ."""
import pytest
import torch

import invariance_compiler as ic
from invariance_compiler.analyze import oracle
from invariance_compiler.tools.zoo import ZOO

from conftest import batch_like

def test_zoo_is_large_enough():
    assert len(ZOO) >= 20


@pytest.mark.parametrize("name", sorted(ZOO))
def test_random_group_element_preserves_outputs(name):
    model, x = ZOO[name]()
    report = ic.analyze(model, x)
    assert oracle.invariance_error(model, report, batch_like(x, 6), trials=3, scale=1.0) <= 1e-10


@pytest.mark.parametrize("name", sorted(ZOO))
def test_generators_span_the_numerical_null_space(name):
    model, x = ZOO[name]()
    report = ic.analyze(model, x)
    got = oracle.completeness(model, report, batch_like(x, 8))
    assert got["rank_E"] == report.num_generators          # generators are independent
    assert got["residual"] <= 1e-9                           # E lies in the null space (sound)
    assert got["null_dim"] == report.num_generators          # ... and fills it (complete)


def test_attention_gives_one_query_key_generator_per_dim_and_an_inert_key_bias():
    """q·kᵀ then softmax: +1 on the query rows (and bias), -1 on the key rows (and bias), per head
    dimension; the key bias is inert (softmax ignores a per-query shift)."""
    model, x = ZOO["mini_transformer"]()
    report = ic.analyze(model, x)
    d = model.proj.out_features
    qk = [g for g in report.generators if g.kind == "rescale" and not report.is_simple(g.index)]
    assert len(qk) == d
    for g in qk:
        (rows, coeffs), = [v for k, v in g.entries().items() if k == "qkv.weight"]
        q_rows, k_rows = set((rows[coeffs > 0] // d).tolist()), set((rows[coeffs < 0] // d).tolist())
        assert (len(q_rows), len(k_rows)) == (1, 1) and min(q_rows) < d <= min(k_rows) < 2 * d
        assert set(coeffs.abs().tolist()) == {1}
    assert report.inert_entries("qkv.bias").tolist() == list(range(d, 2 * d))


def test_float32_models_analyse_to_the_same_group():
    model, x = ZOO["resnet_basic"]()
    r32 = ic.analyze(model, x)
    r64 = ic.analyze(model.double(), tuple(t.double() for t in x))
    assert torch.equal(r32.generator_matrix(), r64.generator_matrix())

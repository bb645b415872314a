"""Counts the theory predicts: H = hidden units (MLP), = feature maps (plain CNN) (G-SGD Cor. 3.8);
Arch1's tied pairs and Arch2's per-unit scales (first paper §2); residual-stream classes across
blocks; rank(A) = m - H (G-SGD Thm 3.4)."""
import pytest
import torch

import invariance_compiler as ic
from invariance_compiler.tools.zoo import ZOO, mlp


@pytest.mark.parametrize("widths,bias", [([6, 8, 7, 3], True), ([5, 7, 4, 9, 3], False), ([3, 2, 3], True)])
def test_mlp_has_one_generator_per_hidden_unit(widths, bias):
    report = ic.analyze(mlp(widths, bias=bias))
    assert report.num_generators == sum(widths[1:-1])
    assert report.counts() == {"rescale": sum(widths[1:-1]), "normalize": 0, "inert": 0}
    assert report.num_params == sum(p.numel() for p in mlp(widths, bias=bias).parameters())


def test_plain_cnn_has_one_generator_per_feature_map():
    model, x = ZOO["cnn_nobias"]()
    assert ic.analyze(model, x).num_generators == 3 + 4


def test_arch1_ties_neighbouring_units_through_feature_max_pooling():
    model, x = ZOO["arch1"]()
    report = ic.analyze(model, x)
    assert report.num_generators == 4 + 4                     # 8 units per layer, pooled in pairs
    for g in report.generators:
        idx, sign = g.entries()[g.params[0]]
        rows = (idx // model[0].in_features).unique() if g.params[0] == "0.weight" else None
        if rows is not None:
            assert rows.tolist() in ([0, 1], [2, 3], [4, 5], [6, 7])   # (r_2k, r_2k+1) share a scale
            assert bool((sign == 1).all())


def test_arch2_has_per_unit_normalize_and_per_pair_rescale():
    model, x = ZOO["arch2"]()
    report = ic.analyze(model, x)
    assert report.counts() == {"rescale": 4 + 4, "normalize": 8 + 8, "inert": 0}
    norm = [g for g in report.generators if g.kind == "normalize" and g.params == ("0.weight",)]
    assert len(norm) == 8 and all(len(g.entries()["0.weight"][0]) == 6 for g in norm)   # one row each


def test_residual_stream_is_one_class_per_channel_across_blocks():
    model, x = ZOO["residual_mlp"]()
    report = ic.analyze(model, x)
    d = model.inp.out_features
    stream = [g for g in report.generators
              if {"inp.weight", "blocks.0.2.weight", "blocks.1.2.weight", "out.weight"} <= set(g.params)]
    assert len(stream) == d
    assert report.num_generators == d + sum(b[0].out_features for b in model.blocks)


def test_bias_feeding_only_batchnorm_is_inert_even_through_concatenation():
    model, x = ZOO["densenet"]()
    report = ic.analyze(model, x)
    inert = {g.params[0] for g in report.generators if g.kind == "inert"}
    assert inert == {"stem.bias", "dense.0.2.bias", "dense.1.2.bias"}
    # the transition conv's bias reaches the classifier through ReLU-free pooling, not a BN: not inert
    assert "trans.2.bias" not in inert


@pytest.mark.parametrize("name", ["mlp_nobias", "mlp_leaky", "cnn_nobias", "mlp"])
def test_structure_matrix_rank_is_m_minus_h(name):
    model, x = ZOO[name]()
    report = ic.analyze(model, x)
    A = report.structure_matrix().double()
    E = report.generator_matrix(dtype=torch.float64)
    assert torch.count_nonzero(A @ E) == 0                     # every path is orthogonal to every generator
    assert int(torch.linalg.matrix_rank(A)) == report.num_params - report.num_generators


def test_structure_matrix_counts_paths_of_a_straight_mlp():
    report = ic.analyze(mlp([3, 4, 2], bias=False))
    assert report.structure_matrix().shape == (3 * 4 * 2, report.num_params)


def test_structure_matrix_refuses_what_it_cannot_enumerate():
    with pytest.raises(ValueError, match="max_paths"):
        ic.analyze(mlp([20, 20, 20, 20, 3])).structure_matrix(max_paths=1000)
    model, x = ZOO["vgg_bn"]()
    with pytest.raises(ValueError, match="normalisers"):
        ic.analyze(model, x).structure_matrix()
    model, x = ZOO["residual_mlp"]()
    with pytest.raises(ValueError, match="cycle"):
        ic.analyze(model, x).structure_matrix()

"""Checks that need no rules (DESIGN §3.2), for tests and for users who want proof on their model.

- soundness: a random group element exp(E λ) leaves the outputs unchanged;
- completeness: span(E) equals the joint null space of J(θ_k)·diag(θ_k) over several random θ_k
  (J stacks ∂f(x)/∂θ over a batch). One draw is not enough: at a single θ the null space also holds
  non-diagonal and accidental invariances.
Both run on a float64 copy whose normalisers have a negligible eps (their symmetry is exact only as
eps -> 0) and use batch statistics without updating running ones."""
from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
import torch.nn as nn

__all__ = ["prepare", "invariance_error", "null_space", "completeness"]

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)
_EPS_NAMES = ("eps", "variance_epsilon", "epsilon", "layer_norm_eps", "norm_eps")


def prepare(model: nn.Module, eps: float = 1e-30) -> nn.Module:
    """A float64 copy with negligible normaliser eps (every float `eps`-like attribute, so functional
    normalisers that read one are covered), no running-statistics updates and no embedding
    padding_idx."""
    m = copy.deepcopy(model).double()
    for mod in m.modules():
        for attr in _EPS_NAMES:       # nn's norms, Hugging Face's RMSNorms and LayerNorms
            if isinstance(getattr(mod, attr, None), float):
                setattr(mod, attr, eps)
        if isinstance(mod, nn.Embedding):
            mod.padding_idx = None    # same forward; its backward zeroes that row's gradient, which
                                      # would look like an invariance to the Jacobian
        if isinstance(mod, nn.modules.batchnorm._NormBase) and mod.training:
            mod.track_running_stats, mod.running_mean, mod.running_var = False, None, None
    return m


def _flat_tensors(out):
    """Every floating-point tensor of a model's output (tuples, dicts, Hugging Face ModelOutputs)."""
    if isinstance(out, dict):
        out = list(out.values())
    leaves = torch.utils._pytree.tree_leaves(out)
    flat = [o for o in leaves if isinstance(o, torch.Tensor) and o.is_floating_point()]
    return torch.cat([o.reshape(-1) for o in flat])


def _outputs(model, inputs, kwargs=None):
    return _flat_tensors(model(*inputs, **(kwargs or {})))


@torch.no_grad()
def invariance_error(model: nn.Module, report, inputs, trials: int = 3, scale: float = 1.0,
                     seed: int = 0, *, kwargs: dict | None = None) -> float:
    """Largest relative change of the outputs under random group elements exp(E λ), λ ~ N(0, scale²)."""
    m = prepare(model)
    inputs, kwargs = _double(inputs), _double(kwargs or {})
    torch.manual_seed(seed)
    ref = _outputs(m, inputs, kwargs)
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for _ in range(trials):
        moved = copy.deepcopy(m)
        report.act(moved, torch.randn(report.num_generators, generator=gen, dtype=torch.float64) * scale)
        torch.manual_seed(seed)                      # dropout draws the same masks
        out = _outputs(moved, inputs, kwargs)
        worst = max(worst, float((out - ref).norm() / ref.norm().clamp_min(1e-300)))
    return worst


def _redraw(model: nn.Module, gen: torch.Generator):
    """Normal weights (std 1/sqrt(fan-in)), normaliser gains near 1, small biases: a unit that is
    dead on the whole batch would show up as an accidental invariance."""
    with torch.no_grad():
        for mod in model.modules():
            for name, p in mod.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
                if isinstance(mod, _NORMS) and name == "weight":
                    p.copy_(1.0 + 0.3 * noise)
                elif p.dim() > 1:
                    p.copy_(noise / math.sqrt(p[0].numel()))
                else:
                    p.copy_(0.1 * noise)


def _double(obj):
    return torch.utils._pytree.tree_map(
        lambda x: x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x, obj)


def null_space(model: nn.Module, inputs, draws: int | None = None, seed: int = 0,
               rtol: float = 1e-9, rows_per_param: float = 3.0, max_rounds: int = 8, *,
               kwargs: dict | None = None, more: Sequence[tuple] = ()):
    """Joint null space of J(θ_k)·diag(θ_k) over random θ_k and over the inputs (`inputs` with
    `kwargs`, then each (inputs, kwargs) of `more`: a direction must leave every one unchanged).
    With draws=None, rounds of draws (each giving rows_per_param x m rows, at least 6 draws) are
    added until a round leaves the dimension unchanged: a narrow layer makes each J low-rank, and
    invariances that hold only at one θ (an additive shift that a normaliser's zero mean hides,
    say) then need many draws to drop out. Returns (basis (m, d), singular values)."""
    m = prepare(model)
    cases = [(_double(a), _double(k or {})) for a, k in [(inputs, kwargs), *more]]
    names = [n for n, _ in m.named_parameters()]
    n_params = sum(p.numel() for p in m.parameters())
    with torch.no_grad():
        rows = sum(_outputs(m, a, k).numel() for a, k in cases)
    per_round = draws if draws is not None else max(6, math.ceil(rows_per_param * n_params / rows))
    gen = torch.Generator().manual_seed(seed)
    blocks, dims = [], []
    for _ in range(1 if draws is not None else max_rounds):
        for _ in range(per_round):
            _redraw(m, gen)
            theta = {n: p.detach().clone() for n, p in m.named_parameters()}
            scale = torch.cat([theta[n].reshape(-1) for n in names])
            for a, k in cases:
                jac = torch.func.jacrev(lambda params: _outputs_functional(m, params, a, k))(theta)
                J = torch.cat([jac[n].reshape(jac[n].shape[0], -1) for n in names], dim=1)   # (outputs, m)
                blocks.append(J * scale)
        M = torch.cat(blocks)
        if M.shape[0] < M.shape[1]:
            raise ValueError(f"null_space: {M.shape[0]} output rows for {M.shape[1]} parameters; use "
                             f"more draws or a larger batch so that draws x batch x outputs >= parameters")
        _, s, vh = torch.linalg.svd(M, full_matrices=True)
        rank = int((s > rtol * s.max()).sum())
        dims.append(n_params - rank)
        if len(dims) > 1 and dims[-1] == dims[-2]:
            break
    return vh[rank:].T, s


def _outputs_functional(model, params, inputs, kwargs):
    return _flat_tensors(torch.func.functional_call(model, params, inputs, kwargs))


def completeness(model: nn.Module, report, inputs, draws: int | None = None, *,
                 kwargs: dict | None = None, rtol: float = 1e-9, more: Sequence[tuple] = ()) -> dict:
    """Compare span(E) with the numerical null space (joint over `inputs` and the (inputs, kwargs)
    of `more`): dimensions, and the part of E outside it. rtol: singular values below rtol x the
    largest count as zero (raise it for models that compute in float32 inside a float64 model, as
    Hugging Face's RMSNorms do)."""
    basis, s = null_space(model, inputs, draws, kwargs=kwargs, rtol=rtol, more=more)
    E = report.generator_matrix(dtype=torch.float64)
    if E.shape[1]:
        outside = E - basis @ (basis.T @ E)
        residual = float(outside.norm() / E.norm())
        rank_E = int(torch.linalg.matrix_rank(E))
    else:
        residual, rank_E = 0.0, 0
    return {"null_dim": basis.shape[1], "H": report.num_generators, "rank_E": rank_E,
            "residual": residual}

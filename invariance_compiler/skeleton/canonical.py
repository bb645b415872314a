"""Canonical points of an orbit; each is a group action, so the function is unchanged (exactly,
up to rounding).

- fix_to: bring every fixed entry to |w_K| = value (signs kept): λ solves E_K λ = log value - log|w_K|,
  triangular in peel order.
- balance: the group element minimising Σ‖w‖² over the orbit, convex in the log-scales. Only rescale
  generators take part: along a normalize generator Σ‖w‖² decreases to 0 without a minimiser."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["fix_to", "balance", "typical_scales"]


@torch.no_grad()
def fix_to(report, skeleton, model: nn.Module, value: float = 1.0) -> torch.Tensor:
    """Act on `model` so that every K entry has magnitude `value`. Returns the log-scales used."""
    weights = dict(model.named_parameters())
    n = skeleton.num_classes
    lam = torch.zeros(report.num_generators + 1, dtype=torch.float64)   # last slot: no class
    logw = skeleton._values(weights, skeleton.fixed_param, skeleton.fixed_entry).abs().log()
    # consumer K: |w|·exp(-λ_c + λ_o) = value ; producer K: |w|·exp(λ_c - λ_o) = value
    own = torch.where(skeleton.consumer, logw - math.log(value), math.log(value) - logw)
    other = torch.where(skeleton.other < 0, report.num_generators, skeleton.other)
    for r in range(int(skeleton.fixed_round.max()) + 1 if n else 0):
        sel = (skeleton.fixed_round == r).nonzero().reshape(-1)
        lam[sel] = own[sel] + lam[other[sel]]
    lam = lam[:-1]
    report.act(model, lam)
    return lam


def balance(report, model: nn.Module, max_iter: int = 200, tol: float = 1e-10) -> torch.Tensor:
    """Act on `model` with the group element minimising Σ‖w‖² (rescale generators only); at the
    optimum every rescale class has as much squared weight entering as leaving it."""
    names = [n for n, _ in model.named_parameters()]
    w2 = {n: p.detach().to(torch.float64) ** 2 for n, p in model.named_parameters()}
    rescale = torch.tensor([g.kind == "rescale" for g in report.generators])
    lam = torch.zeros(int(rescale.sum()), dtype=torch.float64, requires_grad=True)
    full_idx = rescale.nonzero().reshape(-1)
    scale = sum(float(v.sum()) for v in w2.values())

    def objective():
        full = torch.zeros(report.num_generators, dtype=torch.float64).index_put((full_idx,), lam)
        return sum((w2[n] * torch.exp(2 * report.exponents(n, full))).sum() for n in names) / scale

    opt = torch.optim.LBFGS([lam], lr=1.0, max_iter=max_iter, tolerance_grad=tol,
                            tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        f = objective()
        f.backward()
        return f

    opt.step(closure)
    full = torch.zeros(report.num_generators, dtype=torch.float64)
    full[full_idx] = lam.detach()
    report.act(model, full)
    return full


def typical_scales(report, weights: dict, num_classes: int, max_iter: int = 100) -> torch.Tensor:
    """The log-scales λ* (num_classes,) of the plain classes that move `weights` to their orbit's
    typical-scale point, the units of the gspace module's coordinates (DESIGN §3.6b): every entry
    as near as the orbit allows to the size PyTorch's default initialisation gives its tensor,
    ρ = 1/√(3·fan_in) for a weight of two or more dims (kaiming-uniform's rms), 1 for a vector (a
    norm's gain), in the sense of the convex objective

        F(λ) = Σ_e [ w_e² exp(2 s_e) / ρ_e² − 2 s_e ],   s_e = λ_out(e) − λ_in(e),

    each of whose terms is least at w_e² exp(2 s_e) = ρ_e². Stationarity: for every class,
    Σ (w²/ρ² − 1) over its producers equals that over its consumers (a class with one side only:
    its entries' mean square is ρ²); with ρ constant this is the ℓ2-balanced point. Zero entries
    and additive parameters (biases, β) take no part; a class with no other entry keeps λ = 0.
    The minimiser moves with the orbit, λ*(g·w) = λ*(w) − log g, so a model and its rescaled
    copies reach one point, and a default-initialised model is near it already (λ* ≈ 0): SGD on
    its coordinates starts as SGD on its weights."""
    n = num_classes
    sq, cnt, cls_a, cls_b = [], [], [], []
    for name in report.param_names:
        w = weights[name]
        if not w.is_floating_point() or report.is_inert(name) or name in report.additive:
            continue
        inp, out = report.sides(name)
        if not bool((inp >= 0).any() or (out >= 0).any()):
            continue
        shape = w.shape
        rho2 = 1.0 / (3.0 * shape[1:].numel()) if len(shape) >= 2 else 1.0
        w2 = w.detach().to(torch.float64).square().reshape(-1) / rho2
        w2 = torch.where(torch.isfinite(w2), w2, 0.0)
        inert = report.inert_entries(name)
        if inert.numel():
            w2[inert] = 0.0
        k = (w2 > 0).to(torch.float64).view(shape)
        w2 = w2.view(shape)
        grid = torch.broadcast_shapes(inp.shape, out.shape)
        dims = [d for d, (g, sz) in enumerate(zip(grid, shape)) if g == 1 and sz > 1]
        if dims:
            w2, k = w2.sum(dims, keepdim=True), k.sum(dims, keepdim=True)
        sq.append(w2.expand(grid).reshape(-1)), cnt.append(k.expand(grid).reshape(-1))
        cls_a.append(torch.where(inp < 0, n, inp).expand(grid).reshape(-1))
        cls_b.append(torch.where(out < 0, n, out).expand(grid).reshape(-1))
    if not sq:
        return torch.zeros(n, dtype=torch.float64)
    S, K, A, B = torch.cat(sq), torch.cat(cnt), torch.cat(cls_a), torch.cat(cls_b)
    keep = (K > 0) & ((A < n) | (B < n))
    S, K, A, B = S[keep], K[keep], A[keep], B[keep]
    return _newton(S, K, A, B, n, max_iter)


def _newton(S, K, A, B, n: int, max_iter: int) -> torch.Tensor:
    """Minimise F(λ) = Σ S·exp(2d) − 2K·d, d = λ[B] − λ[A] (λ[n] = 0), by Newton's method: the
    Hessian (a weighted graph Laplacian, never formed) solved by preconditioned conjugate gradients,
    a backtracking line search. Runs to rounding, so that rescaled copies reach one point."""
    def scatter(t):       # Dᵀ t
        return torch.zeros(n + 1, dtype=torch.float64).index_add_(0, B, t).index_add_(0, A, -t)[:n]

    def degree(t):
        return torch.zeros(n + 1, dtype=torch.float64).index_add_(0, B, t).index_add_(0, A, t)[:n]

    free = (degree(K) > 0).to(torch.float64)
    lam = torch.zeros(n + 1, dtype=torch.float64)

    def value(lam):
        d = lam[B] - lam[A]
        e = S * torch.exp(2 * d)
        return e, float(e.sum() - 2 * (K * d).sum())

    e, f = value(lam)
    scale = float(K.sum())
    for _ in range(max_iter):
        g = scatter(2 * (e - K)) * free
        if float(g.abs().max()) <= 1e-13 * scale / max(n, 1) or not bool(torch.isfinite(g).all()):
            break
        h = 4 * e
        diag = torch.where(degree(h) > 0, degree(h), 1.0)

        def hv(v):
            vv = torch.cat([v * free, v.new_zeros(1)])
            return scatter(h * (vv[B] - vv[A])) * free + (1 - free) * v

        p, r = torch.zeros(n, dtype=torch.float64), -g
        z = r / diag
        d = z.clone()
        rz, r0 = float((r * z).sum()), float(r.norm())
        for _ in range(10 * n + 100):        # PCG on H p = -g
            hd = hv(d)
            alpha = rz / float((d * hd).sum())
            p += alpha * d
            r -= alpha * hd
            if float(r.norm()) <= 1e-12 * r0:
                break
            z = r / diag
            rz, rz_old = float((r * z).sum()), rz
            d = z + (rz / rz_old) * d
        t, slope = 1.0, float((g * p).sum())
        while t > 1e-12:                     # backtracking (F is convex)
            new = lam.clone()
            new[:n] += t * p * free
            e_new, f_new = value(new)
            if f_new <= f + 1e-4 * t * slope:
                break
            t *= 0.5
        else:
            break
        lam, e, f = new, e_new, f_new
    if not bool(torch.isfinite(lam).all()):
        raise FloatingPointError("typical_scales: the scale search diverged; compile with "
                                 "coordinates='paths' and report the model")
    return lam[:n] * free

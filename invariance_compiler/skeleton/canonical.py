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
    """Act on `model` so that every K entry (and every relation generator's fixed entry) has
    magnitude `value`. Returns the log-scales used."""
    n, weights = skeleton.num_classes, dict(model.named_parameters())
    lam = torch.zeros(report.num_generators, dtype=torch.float64)
    lam[:n] = _fixed_at(skeleton, weights, math.log(value))[:-1]
    lam[n: n + skeleton.num_relations] = _relations_at(skeleton, weights, lam[:n], math.log(value))
    report.act(model, lam)
    return lam


def _fixed_at(skeleton, weights: dict, log_value) -> torch.Tensor:
    """λ (num_classes + 1; the last slot, no class, 0) that brings every fixed entry K to
    |w_K| = exp(log_value) (a number, or one per class): E_K λ = log_value − log|w_K|, solved
    round by round in peel order (E_K is triangular with ±1 on its diagonal)."""
    n = skeleton.num_classes
    lam = torch.zeros(n + 1, dtype=torch.float64)
    logw = skeleton._values(weights, skeleton.fixed_param, skeleton.fixed_entry).abs().log()
    # consumer K: log|w| − λ_c + λ_other = log_value ; producer K: log|w| + λ_c − λ_other = log_value
    own = torch.where(skeleton.consumer, logw - log_value, log_value - logw)
    other = torch.where(skeleton.other < 0, n, skeleton.other)
    for r in range(int(skeleton.fixed_round.max()) + 1 if n else 0):
        sel = (skeleton.fixed_round == r).nonzero().reshape(-1)
        lam[sel] = own[sel] + lam[other[sel]]
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


def typical_scales(report, skeleton, weights: dict, sweeps: int = 30) -> torch.Tensor:
    """The log-scales λ* (one per plain class, then one per relation generator the skeleton
    quotients; report columns [0, num_simple + num_relations)) that move `weights` to their
    orbit's typical-scale point, the units of the gspace module's coordinates (DESIGN §3.6b): the
    group element whose weights are near the size PyTorch's default initialisation gives each
    tensor, ρ = 1/√(3·fan_in) (kaiming-uniform's rms) for a weight of two or more dims and 1 for a
    vector (a norm's gain).

    Start: every fixed entry K (and every relation generator's fixed entry) at its tensor's √3·ρ
    (the bound, near the largest entry: K is its class's largest candidate), one triangular solve
    in peel order, as `fix_to` with a value per tensor. Then `sweeps` damped Jacobi steps on the
    convex F(λ) = Σ_e [w_e² e^{2s_e}/ρ_e² − 2 s_e] (s_e = (Eλ)_e; zero entries and additive
    parameters take no part), whose minimiser has, per generator, Σ (w²/ρ² − 1) over the entries of
    exponent +1 equal to that over those of -1: each generator moves to the minimum of F along its
    own λ. The start moves with the orbit and every step reads only the moved weights, so
    λ*(g·w) = λ*(w) − log g after any number of steps: a model and its rescaled copies reach one
    point, in O(sweeps · channel pairs). A default-initialised model is near it (λ* ≈ 0), so SGD on
    its coordinates starts as SGD on its weights."""
    n, R = skeleton.num_classes, skeleton.num_relations
    N = n + R
    if N == 0:
        return torch.zeros(0, dtype=torch.float64)
    bound = torch.tensor([-0.5 * math.log(max(report.param_shapes[name][1:].numel(), 1))
                          if len(report.param_shapes[name]) >= 2 else 0.0 for name in skeleton.names] + [0.0],
                         dtype=torch.float64)                           # last: no parameter (-1)
    lam = torch.zeros(N + 1, dtype=torch.float64)                       # last slot: none
    lam[:n] = _fixed_at(skeleton, weights, bound[skeleton.fixed_param])[:n]
    lam[n:N] = _relations_at(skeleton, weights, lam[:n], bound[skeleton.relation_param])
    held = torch.cat([torch.where(skeleton.relation_param >= 0, n + torch.arange(R), N),
                      torch.tensor([N])])                              # relation -> slot (-1: none)
    blocks = [b for b in (_Block.of(report, skeleton.params[name], weights, n, N, held)
                          for name in report.param_names) if b]
    if not blocks:
        return lam[:N]
    # Per generator, Σ over its +1 entries of w²e^{2s}/ρ² = e^{2λ_c} · Σ w² e^{2(s − λ_c)}, and
    # the -1 entries' sums likewise: one product per tensor and side a sweep (matrix-vector
    # products for a Linear)
    kp, kc = torch.zeros(N + 1, dtype=torch.float64), torch.zeros(N + 1, dtype=torch.float64)
    for b in blocks:
        b.scatter(kp, kc, b.count, b.count, b.count)
    d = (kp - kc)[:N]
    for _ in range(sweeps):
        prod, cons = torch.zeros(N + 1, dtype=torch.float64), torch.zeros(N + 1, dtype=torch.float64)
        for b in blocks:
            b.scatter(prod, cons, *b.products(lam))
        prod, cons = (torch.exp(2 * lam) * prod)[:N], (torch.exp(-2 * lam) * cons)[:N]
        # the minimum along λ_c: prod·x − cons/x = kp − kc with x = e^{2δ}
        x = torch.where(prod > 0, (d + (d * d + 4 * prod * cons).sqrt()) / (2 * prod),
                        torch.where(cons > 0, cons / (-d).clamp_min(1e-300), 1.0))
        step = torch.where((prod > 0) | (cons > 0), 0.25 * x.log(), 0.0)    # half of δ: damped
        lam[:N] += torch.where(torch.isfinite(step), step, 0.0)
    return lam[:N]


def _relations_at(skeleton, weights: dict, lam: torch.Tensor, log_value) -> torch.Tensor:
    """(R,) the log-scale of each relation generator that brings its fixed entry, after the plain
    classes' λ, to |w| = exp(log_value) (a number, or one per relation generator; 0 for one not
    quotiented). Its fixed entry lies on it alone, with exponent ±1."""
    n = skeleton.num_classes
    inp, out, coef = skeleton.relation_sides()
    lam_ext = torch.cat([lam[:n], lam.new_zeros(1)])
    logw = skeleton._values(weights, skeleton.relation_param, skeleton.relation_entry).abs().log()
    return coef * (log_value - logw - (lam_ext[out] - lam_ext[inp]))


class _Block:
    """One multiplicative parameter on its channel grid: Σ w²/ρ² per channel pair (`w2`, in the
    weights' dtype: float64 for a whole model would double the work; the group scales a float32
    model's weights to float32 rounding anyway), the count of its non-zero entries, the class
    each pair consumes (`inp`) and produces (`out`), and the relation generator it lies on (`rel`,
    with exponent `coef`), compact (N: none). Dims of size 1 are dropped, so a Linear's or a 1x1
    conv's grid is a matrix (out, in) and its products are matrix-vector."""

    @staticmethod
    def of(report, ps, weights: dict, n: int, N: int, held: torch.Tensor):
        name, w = ps.name, weights[ps.name]
        if not w.is_floating_point() or report.is_inert(name) or name in report.additive:
            return None
        inp, out = ps.inp, ps.out                             # the report's sides, as the skeleton keeps them
        rel = held[ps.rel_col]                                # col -1 reads the last slot: none
        if not bool((inp >= 0).any() or (out >= 0).any() or (rel < N).any()):
            return None
        coef = torch.where(rel < N, ps.rel_coef, 0)
        shape = w.shape
        rho2 = 1.0 / (3.0 * shape[1:].numel()) if len(shape) >= 2 else 1.0
        w2 = w.detach().square().reshape(-1)
        w2 = torch.where(torch.isfinite(w2), w2, 0.0)
        inert = report.inert_entries(name)
        if inert.numel():
            w2[inert] = 0.0
        k = (w2 > 0).view(shape)
        w2 = w2.view(shape)
        grid = torch.broadcast_shapes(inp.shape, out.shape, rel.shape)
        dims = [d for d, (g, sz) in enumerate(zip(grid, shape)) if g == 1 and sz > 1]
        if dims:
            w2, k = w2.sum(dims, keepdim=True), k.sum(dims, keepdim=True)
        keep = [d for d, g in enumerate(grid) if g > 1]
        squeeze = lambda t: t.reshape([t.shape[d] for d in keep])
        return _Block(squeeze(w2 / rho2), squeeze(k.to(w2.dtype)), squeeze(torch.where(inp < 0, N, inp)),
                      squeeze(torch.where(out < 0, N, out)), squeeze(rel), squeeze(coef))

    def __init__(self, w2, count, inp, out, rel, coef):
        self.w2, self.count, self.inp, self.out, self.rel, self.coef = w2, count, inp, out, rel, coef
        self.matrix = w2.dim() == 2 and inp.shape[0] == 1 and out.shape[1] == 1 and rel.shape[1] == 1
        self.has_rel = bool((coef != 0).any())

    def products(self, lam: torch.Tensor):
        """Σ w² e^{2s} divided by the entry's own factor for each side: (to the produced class,
        to the consumed class, to the relation generator), summed over what `scatter` would sum
        (for a matrix: matrix-vector products), float64. The factors are divided by their largest
        before the product in the weights' dtype (no overflow), and it is multiplied back after."""
        a, b = -2 * lam[self.inp], 2 * lam[self.out]
        ma, mb = a.max(), b.max()
        ea, eb = (a - ma).exp().to(self.w2.dtype), (b - mb).exp().to(self.w2.dtype)
        f64 = torch.float64
        if not self.has_rel:
            if self.matrix:
                p, c = (self.w2 @ ea.reshape(-1)).unsqueeze(1), (eb.reshape(-1) @ self.w2).unsqueeze(0)
            else:
                p, c = self.w2 * ea, self.w2 * eb
            return p.to(f64) * ma.exp(), c.to(f64) * mb.exp(), None
        e = 2 * self.coef * lam[self.rel]
        me = e.max()
        ee = (e - me).exp().to(self.w2.dtype)
        if self.matrix:
            rows = (self.w2 @ ea.reshape(-1)).unsqueeze(1)
            p, c, r = rows * ee, ((eb * ee).reshape(-1) @ self.w2).unsqueeze(0), rows * eb
        else:
            p, c, r = self.w2 * ea * ee, self.w2 * eb * ee, self.w2 * ea * eb
        return p.to(f64) * (ma + me).exp(), c.to(f64) * (mb + me).exp(), r.to(f64) * (ma + mb).exp()

    def scatter(self, prod, cons, p, c, r):
        """Adds per-pair sums p to the class each pair produces, c to the class it consumes, r to
        its relation generator (as a producer where its exponent is +1, a consumer where -1)."""
        sides = [(prod, p, self.out), (cons, c, self.inp)]
        if self.has_rel:
            sides += [(prod, r * (self.coef > 0), self.rel), (cons, r * (self.coef < 0), self.rel)]
        for acc, v, cls in sides:
            v = v.expand(torch.broadcast_shapes(v.shape, cls.shape))
            dims = [d for d in range(v.dim()) if cls.shape[d] == 1 and v.shape[d] > 1]
            v = v.sum(dims, keepdim=True) if dims else v
            acc.index_add_(0, cls.expand(v.shape).reshape(-1), v.reshape(-1).to(acc.dtype))

"""FG-SGD (Ozay, "Fine-grained optimization of deep neural networks"): SGD on products of weight
manifolds.

Every weight that produces a class in the report (a Linear row, a conv filter: the classifier stays
Euclidean) is cut into component weights, by output channel (PO: rows), input channel (PI: column
slices) or input/output channel pair (PIO: one kernel each; needs kernels of more than one tap).
Components are split at random into `groups` groups per layer (a hypergeometric draw without
replacement, fixed at construction); a group is a product of manifolds: spheres, oblique
manifolds (unit columns) or Stiefel manifolds (orthonormal frames) of radius ℜ = γ/λ with the
geometric scaling γ = (b + b̂)^(-1/2) (b: fan-in, b̂: output channels; the paper multiplies b̂ by
the output positions, which the weight alone does not know) and λ = 1 (the paper's first epoch, or BN-normalised features);
rescale=False uses radius 1. One step (Algorithm 1):
    grad  = the Riemannian gradient on each component (tangent projection),
    R_g   = ‖grad‖ over the group,  τ_g = max(1, R_g²(2 + R_g)²)^½   (eq. 7, the sphere bound),
    w     ← retraction(w − (lr / τ_g)·grad)                          (eqs. 3-5, line 7-8).
Other parameters follow SGD with momentum. The constructor projects the weights onto their manifolds (the
paper's renormalisation; it changes the function of a network without normalisers)."""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn as nn

from ..analyze import analyze
from .manifold import row_groups
from .scaled import plain_model_only, run_closure, sgd_momentum_

__all__ = ["FGSGD"]


def _components(w: torch.Tensor, scheme: str) -> torch.Tensor:
    """(n, a, b) view-able layout of the components of a weight (out, in, *taps)."""
    out, inp = w.shape[0], w.shape[1]
    taps = w[0, 0].numel()
    if scheme == "PO":
        return w.reshape(out, inp, taps)
    if scheme == "PI":
        return w.transpose(0, 1).reshape(inp, out, taps)
    return w.reshape(out * inp, taps, 1)


def _assign(w: torch.Tensor, scheme: str, comps: torch.Tensor) -> None:
    """Write components back (the inverse of _components)."""
    if scheme == "PI":
        w.copy_(comps.reshape(w.shape[1], w.shape[0], *w.shape[2:]).transpose(0, 1))
    else:
        w.copy_(comps.reshape(w.shape))


class FGSGD(torch.optim.Optimizer):
    def __init__(self, model: nn.Module, lr: float = 0.1, manifold: str = "sphere", scheme: str = "PO",
                 groups: int = 1, rescale: bool = True, momentum: float = 0.0, seed: int = 0,
                 example_inputs: Any = None, report=None):
        if manifold not in ("sphere", "oblique", "stiefel"):
            raise ValueError(f"FGSGD: manifold must be 'sphere', 'oblique' or 'stiefel', got {manifold!r}")
        if scheme not in ("PI", "PO", "PIO"):
            raise ValueError(f"FGSGD: scheme must be 'PI', 'PO' or 'PIO', got {scheme!r}")
        if lr <= 0 or groups < 1 or not 0 <= momentum < 1:
            raise ValueError("FGSGD: need lr > 0, groups >= 1 and 0 <= momentum < 1")
        plain_model_only(model, "FGSGD")
        report = report if report is not None else analyze(model, example_inputs)
        named = dict(model.named_parameters())
        super().__init__(list(named.values()), dict(lr=lr, momentum=momentum))
        self.manifold, self.scheme = manifold, scheme
        gen = torch.Generator().manual_seed(seed)
        self._layers = {}                               # parameter -> (radius, group id per component)
        for name in row_groups(report):
            w = named[name]
            if scheme == "PIO" and w[0, 0].numel() == 1:
                raise ValueError(f"FGSGD: scheme 'PIO' makes one component per kernel, and {name} has "
                                 f"1-tap kernels; use 'PI' or 'PO' for it")
            n = _components(w.detach(), scheme).shape[0]
            perm = torch.randperm(n, generator=gen)          # hypergeometric draw into groups
            gid = torch.empty(n, dtype=torch.long)
            gid[perm] = torch.arange(n) % min(groups, n)
            fan_in, fan_out = w[0].numel(), w.shape[0]
            radius = math.sqrt(1.0 / (fan_in + fan_out)) if rescale else 1.0
            self._layers[w] = (radius, gid.to(w.device))
        with torch.no_grad():                               # the renormalisation onto the manifolds
            for w, (radius, _) in self._layers.items():
                comps = _components(w.detach(), scheme).clone()
                _assign(w, scheme, self._retract(comps, radius))

    def _retract(self, c: torch.Tensor, radius: float) -> torch.Tensor:
        """Nearest point of each component's manifold (normalisation; QR for Stiefel)."""
        if self.manifold == "sphere":
            norms = c.reshape(c.shape[0], -1).norm(dim=1).clamp_min(1e-30)
            return c * (radius / norms).reshape(-1, 1, 1)
        if self.manifold == "oblique":
            return c * (radius / c.norm(dim=1, keepdim=True).clamp_min(1e-30))
        tall = c.shape[1] >= c.shape[2]
        x = c if tall else c.transpose(1, 2)
        q, r = torch.linalg.qr(x)
        q = q * torch.sign(torch.diagonal(r, dim1=1, dim2=2)).unsqueeze(1)   # continuous choice
        return radius * (q if tall else q.transpose(1, 2))

    def _tangent(self, c: torch.Tensor, z: torch.Tensor, radius: float) -> torch.Tensor:
        """Projection of the Euclidean gradient z onto the tangent space at c."""
        if self.manifold == "sphere":
            u = c.reshape(c.shape[0], -1) / radius
            zz = z.reshape(z.shape[0], -1)
            return (zz - (zz * u).sum(1, keepdim=True) * u).reshape(z.shape)
        if self.manifold == "oblique":
            u = c / radius
            return z - (z * u).sum(1, keepdim=True) * u
        tall = c.shape[1] >= c.shape[2]
        x, g = (c, z) if tall else (c.transpose(1, 2), z.transpose(1, 2))
        x = x / radius
        xtg = x.transpose(1, 2) @ g
        t = g - x @ (0.5 * (xtg + xtg.transpose(1, 2)))
        return t if tall else t.transpose(1, 2)

    @torch.no_grad()
    def step(self, closure: Optional[Any] = None):
        loss = run_closure(closure)
        lr, mom = self.param_groups[0]["lr"], self.param_groups[0]["momentum"]
        for p in self.param_groups[0]["params"]:
            if p.grad is None:
                continue
            layer = self._layers.get(p)
            if layer is None:
                sgd_momentum_(p, self.state[p], lr, mom)    # Euclidean outside the manifolds
                continue
            radius, gid = layer
            c = _components(p.detach(), self.scheme).clone()
            g = self._tangent(c, _components(p.grad, self.scheme), radius)
            groups = int(gid.max()) + 1
            r2 = torch.zeros(groups, dtype=g.dtype, device=g.device).index_add_(
                0, gid, g.reshape(g.shape[0], -1).square().sum(1))
            R = r2.sqrt()
            tau = torch.clamp(R.square() * (2 + R).square(), min=1.0).sqrt()     # eq. 7
            moved = c - (lr / tau)[gid].reshape(-1, 1, 1) * g
            _assign(p, self.scheme, self._retract(moved, radius))
        return loss

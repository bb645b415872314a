"""The orthogonal matrices `rotate` folds in: a Hadamard matrix with random signs where the size is
a power of two (QuaRot's choice: it spreads every channel over all the others evenly), else a
random orthogonal matrix (Haar, from the QR of a Gaussian). A block under LayerNorm must fix the
all-ones vector: a Householder reflection then brings 1 back to itself. A block that must be a
rotation (RoPE's planes) has a column's sign flipped where the determinant is -1."""
from __future__ import annotations

import torch

__all__ = ["orthogonal"]


def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5


def _haar(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(1, dtype=torch.float64))


def orthogonal(n: int, kind: str, gen: torch.Generator, fix_ones: bool = False, proper: bool = False) -> torch.Tensor:
    """(n, n) float64 orthogonal Q, used as v -> v @ Q; with fix_ones, 1 @ Q = 1; with proper, a
    rotation (det +1: a RoPE plane's map must commute with RoPE's own rotations)."""
    if kind == "hadamard" and n & (n - 1) == 0:
        signs = torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1
        q = signs[:, None] * _hadamard(n)
    elif kind in ("hadamard", "random"):
        q = _haar(n, gen)
    else:
        raise ValueError(f"rotate: kind must be 'hadamard' or 'random', got {kind!r}")
    if fix_ones and n > 1:
        u = torch.full((n,), n ** -0.5, dtype=torch.float64)
        a = u @ q                                  # where Q sends 1/√n
        w = a - u
        if float(w.norm()) > 1e-12:                # reflect a back onto u: (I - 2wwᵀ) with w = (a - u)/|a - u|
            w = w / w.norm()
            q = q - 2 * torch.outer(q @ w, w)
    if proper and float(torch.linalg.det(q)) < 0:
        q = q.clone()
        q[:, 0] = -q[:, 0]
    return q

"""Host-side layout of a tensor group for the grouped kernels (built once per plan, device, dtype).

Each tensor is viewed as (G, R, S) with G·R = shape[0] (a 1-D tensor is (1, 1, n)). Its input class
then depends on the rows or on the columns of a block (never both), and so does its output class,
so a tile's denominator P_in·M is an outer product of two short vectors gathered from class-index
arrays (`n` = no class, where P_in and M are 1), and the per-class reduction of ICR is a row or a
column sum of the tile followed by one atomic add per row or column. G > 1 only where a class needs
it (grouped and depthwise convolutions); G = shape[0] with R = 1 always works, so every tensor fits.

Tiles: a program takes BS columns and up to ROWS rows of one block of one tensor; `tiles` maps a
program id to its tensor, `meta` holds each tensor's G, R, S, the offsets of its four class arrays
in `cls`, its first tile, its tile counts and whether its input class varies along rows. The fixed (K) and carrier (J) entries are few; they
get a second, sparse launch (`sparse_*`), ordered after the dense one on the stream."""
from __future__ import annotations

import math
import torch

BS, BR, ROWS, WARPS = 128, 8, 64, 4     # tile columns, rows per step, rows per program, warps
NF = 11                                 # meta fields per tensor


def tile_args() -> dict:
    """The launch constants the layouts were built with (benchmarks/tune_kernels.py varies them)."""
    return dict(BS=BS, BR=BR, ROWS=ROWS, num_warps=WARPS)


def _divisors(d: int) -> list[int]:
    return [g for g in range(1, d + 1) if d % g == 0]


def _factor(idx: torch.Tensor, n: int):
    """(rows (G·R,), cols (G·S,)) class arrays with idx[g, r, s] = the one that is not n; None if
    idx depends on both r and s."""
    G, R, S = idx.shape
    fill_r, fill_s = torch.full((G * R,), n), torch.full((G * S,), n)
    if bool((idx == n).all()):
        return fill_r, fill_s
    if bool((idx == idx[:, :, :1]).all()):
        return idx[:, :, 0].reshape(-1), fill_s
    if bool((idx == idx[:, :1, :]).all()):
        return fill_r, idx[:, 0, :].reshape(-1)
    return None


def block_view(inp: torch.Tensor, out: torch.Tensor, shape: torch.Size, n: int):
    """(G, R, S, in_r, in_c, out_r, out_c) for one tensor with compact class maps inp and out."""
    numel = math.prod(shape)
    splits = [(1, 1, numel)] if len(shape) <= 1 else [(g, shape[0] // g, numel // shape[0])
                                                      for g in _divisors(shape[0])]
    for G, R, S in splits:
        fi = _factor(inp.expand(shape).reshape(G, R, S), n)
        fo = _factor(out.expand(shape).reshape(G, R, S), n)
        if fi is not None and fo is not None:
            return G, R, S, *fi, *fo
    raise AssertionError("unreachable: R = 1 always factors")


FIELDS = ("meta", "cls", "tiles", "k_tensor", "k_idx", "k_in", "k_val",
          "j_tensor", "j_idx", "j_in", "j_out", "j_cls")


def build_group(plan, index: list[int], shapes: list) -> list[torch.Tensor]:
    """The layout (CPU tensors, in FIELDS order) of plan tensors `index` with their shapes. The
    sparse entries of all tensors: their tensor, flat index, classes and fixed value (K) or
    carrier class (J)."""
    n = plan.n
    meta, cls, tiles, off, start = [], [], [], 0, 0
    ks, js = [], []
    for t, (i, shape) in enumerate(zip(index, shapes)):
        G, R, S, *arrays = block_view(plan.buf("in", i).cpu(), plan.buf("out", i).cpu(), shape, n)
        offs = []
        for a in arrays:
            offs.append(off)
            cls.append(a)
            off += a.numel()
        rt, st = -(-R // ROWS), -(-S // BS)
        row_mode = int(bool((arrays[0] != n).any()))     # input class varies along rows
        meta.append([G, R, S, *offs, start, rt, st, row_mode])
        tiles.append(torch.full((G * rt * st,), t))
        start += G * rt * st
        k = plan.buf("fixed_idx", i)
        ks.append((torch.full_like(k, t), k, plan.buf("fixed_in", i), plan.buf("fixed_val", i)))
        j = plan.buf("carrier_idx", i)
        js.append((torch.full_like(j, t), j, plan.buf("carrier_in", i), plan.buf("carrier_out", i),
                   plan.buf("carrier_cls", i)))

    def cat(xs, dtype=torch.int32):
        return torch.cat([x.reshape(-1).cpu() for x in xs]).to(dtype) if xs else torch.zeros(0, dtype=dtype)
    return [torch.tensor(meta, dtype=torch.int64).reshape(-1, NF), cat(cls), cat(tiles),
            *[cat(col) for col in list(zip(*ks))[:3]], cat([k[3] for k in ks], plan.M.dtype),
            *[cat(col) for col in zip(*js)]]

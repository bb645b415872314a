"""Host-side layout of a tensor group for the grouped kernels (built once per plan, device, dtype).

Each tensor is viewed as (G, R, S) with G·R = shape[0] (a 1-D tensor is (1, 1, n)). Its input class
then depends on the rows or on the columns of a block (never both), and so does its output class,
so a tile's denominator P_in·M is an outer product of two short vectors gathered from class-index
arrays (`n` = no class, where P_in and M are 1), and the per-class reduction of ICR is a row or a
column sum of the tile followed by one atomic add per row or column. G > 1 only where a class needs
it (grouped and depthwise convolutions); G = shape[0] with R = 1 always works, so every tensor fits.

Tiles: a program takes BS columns and up to ROWS rows of one block of one tensor; `tiles` maps a
program id to its tensor, `meta` holds one row per tensor with the columns META names (G, R, S, the
offsets of its four class arrays in `cls`, its first tile, its tile counts and whether its input
class varies along rows). The fixed (K) and carrier (J) entries are few; they get a second, sparse
launch, ordered after the dense one on the stream.

The names are the contract: the Triton kernels read META's columns through common.py's constants,
the C++ step through the -D flags cpu.py derives from META, the Python side through Layout's fields.
A layout carries the Tiling it was built with, so a kernel always launches with its own tiles."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = ["META", "Group", "Layout", "TensorSlots", "Tiling", "block_view", "build_group"]

# the columns of a meta row, in order
META = ("G", "R", "S", "in_r", "in_c", "out_r", "out_c", "first_tile", "row_tiles", "col_tiles", "row_mode")


@dataclass(frozen=True)
class Tiling:
    """Launch constants: tile columns, rows per step, rows per program, warps
    (benchmarks/tune_kernels.py measured the defaults)."""
    BS: int = 128
    BR: int = 8
    ROWS: int = 64
    WARPS: int = 4

    def launch_args(self) -> dict:
        return dict(BS=self.BS, BR=self.BR, ROWS=self.ROWS, num_warps=self.WARPS)


class TensorSlots(NamedTuple):
    """What the kernels need of one tensor: its shape, compact class maps (`n`: no class), and its
    fixed (K) and carrier (J) entries with their classes."""
    shape: torch.Size
    inp: torch.Tensor
    out: torch.Tensor
    fixed_idx: torch.Tensor
    fixed_in: torch.Tensor
    fixed_val: torch.Tensor
    carrier_idx: torch.Tensor
    carrier_in: torch.Tensor
    carrier_out: torch.Tensor
    carrier_cls: torch.Tensor


class Layout(NamedTuple):
    """A tensor group as the kernels read it (tensors on the group's device; `tiling` what `meta`
    and `tiles` were cut with). K entries: tensor, flat index, input class, fixed value; J entries:
    tensor, flat index, input and output class, carrier."""
    meta: torch.Tensor            # (count, len(META)) int64
    cls: torch.Tensor             # int32 class arrays
    tiles: torch.Tensor           # int32 program -> tensor
    k_tensor: torch.Tensor
    k_idx: torch.Tensor
    k_in: torch.Tensor
    k_val: torch.Tensor
    j_tensor: torch.Tensor
    j_idx: torch.Tensor
    j_in: torch.Tensor
    j_out: torch.Tensor
    j_cls: torch.Tensor
    tiling: Tiling = Tiling()

    def tensors(self) -> list[torch.Tensor]:
        return list(self[:-1])

    def to(self, device) -> "Layout":
        return Layout(*(t.to(device) for t in self.tensors()), self.tiling)

    def op_args(self) -> tuple[list[torch.Tensor], list[int]]:
        """The record as a custom op's schema takes it: its tensors, the tiling's numbers."""
        return self.tensors(), list(dataclasses.astuple(self.tiling))

    @staticmethod
    def from_op_args(tensors: list[torch.Tensor], tiling: list[int]) -> "Layout":
        return Layout(*tensors, Tiling(*tiling))


class Group(NamedTuple):
    """A group of tensors as every backend of an op reads it: the PyTorch references its tensors'
    slots, the Triton kernels and the C++ step its layout; `n` classes (index n: no class)."""
    slots: list[TensorSlots]
    layout: Layout
    n: int


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


def build_group(group: list[TensorSlots], n: int, dtype: torch.dtype, tiling: Tiling = Tiling()) -> Layout:
    """The layout (CPU tensors) of a group of tensors; K values in `dtype`."""
    meta, cls, tiles, off, start = [], [], [], 0, 0
    ks, js = [], []
    for t, ts in enumerate(group):
        G, R, S, *arrays = block_view(ts.inp.cpu(), ts.out.cpu(), ts.shape, n)
        offs = []
        for a in arrays:
            offs.append(off)
            cls.append(a)
            off += a.numel()
        rt, st = -(-R // tiling.ROWS), -(-S // tiling.BS)
        row = dict(G=G, R=R, S=S, first_tile=start, row_tiles=rt, col_tiles=st,
                   row_mode=int(bool((arrays[0] != n).any())),       # input class varies along rows
                   **dict(zip(("in_r", "in_c", "out_r", "out_c"), offs)))
        meta.append([row[name] for name in META])
        tiles.append(torch.full((G * rt * st,), t))
        start += G * rt * st
        ks.append((torch.full_like(ts.fixed_idx, t), ts.fixed_idx, ts.fixed_in, ts.fixed_val))
        js.append((torch.full_like(ts.carrier_idx, t), ts.carrier_idx, ts.carrier_in, ts.carrier_out,
                   ts.carrier_cls))

    def cat(xs, dtype=torch.int32):
        return torch.cat([x.reshape(-1).cpu() for x in xs]).to(dtype) if xs else torch.zeros(0, dtype=dtype)
    k_cols, j_cols = list(zip(*ks)) or [()] * 4, list(zip(*js)) or [()] * 5
    return Layout(torch.tensor(meta, dtype=torch.int64).reshape(-1, len(META)), cat(cls), cat(tiles),
                  *[cat(col) for col in k_cols[:3]], cat(k_cols[3], dtype), *[cat(col) for col in j_cols],
                  tiling)

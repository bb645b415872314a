"""Pieces shared by the kernels: Triton where it is installed, locating a program's tile, the
tile's denominators, pointer tables.

Triton is imported with the kernels (each op's file holds its kernel beside its PyTorch reference);
where it is missing the kernels are plain functions that nothing launches. Triton reads
TRITON_INTERPRET when it is imported: set it before importing invariance_compiler."""
from __future__ import annotations

import os

import torch

from . import layout

try:
    import triton
    import triton.language as tl
except ImportError:                      # macOS, or no Triton: the PyTorch references only
    triton = tl = None

INTERPRETED = triton is not None and os.environ.get("TRITON_INTERPRET") == "1"


def jit(fn):
    return triton.jit(fn) if triton is not None else fn


def _constexpr(value):
    """A global that a kernel reads must be a constexpr."""
    return tl.constexpr(value) if tl is not None else value


# the meta row's columns by name (layout.META), as the constexpr globals the kernels read
NF = _constexpr(len(layout.META))
R_, S_, IN_R, IN_C, OUT_R, OUT_C, FIRST_TILE, ROW_TILES, COL_TILES, ROW_MODE = (
    _constexpr(layout.META.index(k))
    for k in ("R", "S", "in_r", "in_c", "out_r", "out_c", "first_tile", "row_tiles", "col_tiles", "row_mode"))

TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
            torch.float64: tl.float64} if tl is not None else {}


def dtypes(dtype: torch.dtype):
    """(storage, arithmetic) Triton dtypes: half types compute in fp32, fp64 in fp64."""
    return TL_DTYPE[dtype], tl.float64 if dtype == torch.float64 else tl.float32


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_small: dict = {}


def small_tensor(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A few host numbers as a device tensor, without a host sync (pinned, non-blocking copy) and
    cached: parameters, and mostly gradients, keep their addresses from step to step."""
    key = (values, dtype, device)
    t = _small.get(key)
    if t is None:
        if len(_small) > 256:
            _small.clear()
        t = torch.tensor(values, dtype=dtype)
        if device.type == "cuda":
            t = t.pin_memory().to(device, non_blocking=True)
        t = _small[key] = t
    return t


def sparse_grid(layout: layout.Layout) -> int:
    """Programs of the sparse launch over the K and J entries."""
    return -(-max(layout.k_idx.numel(), layout.j_idx.numel()) // SPARSE_BLOCK)


SPARSE_BLOCK = 128


def pointers(tensors) -> torch.Tensor:
    """The pointer table of `tensors` (int64, on their device)."""
    return small_tensor(tuple(t.data_ptr() for t in tensors), torch.int64, tensors[0].device)


@jit
def locate(tiles, meta):
    """Program -> (tensor t, its meta row, block g, R, S, row tile, column tile)."""
    t = tl.load(tiles + tl.program_id(0))
    m = meta + t * NF
    R = tl.load(m + R_)
    S = tl.load(m + S_)
    local = tl.program_id(0) - tl.load(m + FIRST_TILE)
    row_tiles = tl.load(m + ROW_TILES)
    col_tiles = tl.load(m + COL_TILES)
    g = local // (row_tiles * col_tiles)
    rem = local - g * (row_tiles * col_tiles)
    rt = rem // col_tiles
    return t, m, g, R, S, rt, rem - rt * col_tiles


@jit
def classes(cls, m, field, g, pos, length, mask, n):
    """Class ids at positions `pos` of block g from the class array at meta column `field`
    (IN_R, IN_C, OUT_R or OUT_C)."""
    return tl.load(cls + tl.load(m + field) + g * length + pos, mask=mask, other=n)


@jit
def denominator(p_in, M, cin, cout, ACC: tl.constexpr):
    """P_in[in] · M[out] (index n, 'no class', holds 1 in both)."""
    return tl.load(p_in + cin).to(ACC) * tl.load(M + cout).to(ACC)


@jit
def tensor_ptr(table, t, DT: tl.constexpr):
    return tl.load(table + t).to(tl.pointer_type(DT))


@jit
def add_by_class(reduced, acc, contrib, in_row, rmask, n, row_mode):
    """One row step of a tile's per-class reduction: flushed by row where the input class changes
    with the row, else summed in registers (acc) for `flush_columns` at the end."""
    if row_mode:
        tl.atomic_add(reduced + in_row, tl.sum(contrib, 1), mask=rmask & (in_row != n))
    else:
        acc += contrib
    return acc


@jit
def flush_columns(reduced, acc, in_col, cmask, n, row_mode):
    if not row_mode:
        tl.atomic_add(reduced + in_col, tl.sum(acc, 0), mask=cmask & (in_col != n))

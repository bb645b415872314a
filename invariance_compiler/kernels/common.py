"""Pieces shared by the kernels: locating a program's tile, the tile's denominators, pointer
tables. Imported only once Triton is wanted (see kernels/__init__.py)."""
import torch
import triton
import triton.language as tl

from . import layout

# the meta row's columns by name (layout.META); a global read inside a kernel must be a constexpr
NF = tl.constexpr(len(layout.META))
R_ = tl.constexpr(layout.META.index("R"))
S_ = tl.constexpr(layout.META.index("S"))
IN_R = tl.constexpr(layout.META.index("in_r"))
IN_C = tl.constexpr(layout.META.index("in_c"))
OUT_R = tl.constexpr(layout.META.index("out_r"))
OUT_C = tl.constexpr(layout.META.index("out_c"))
FIRST_TILE = tl.constexpr(layout.META.index("first_tile"))
ROW_TILES = tl.constexpr(layout.META.index("row_tiles"))
COL_TILES = tl.constexpr(layout.META.index("col_tiles"))
ROW_MODE = tl.constexpr(layout.META.index("row_mode"))

TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
            torch.float64: tl.float64}


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
    return triton.cdiv(max(layout.k_idx.numel(), layout.j_idx.numel()), SPARSE_BLOCK)


SPARSE_BLOCK = 128


def pointers(tensors) -> torch.Tensor:
    """The pointer table of `tensors` (int64, on their device)."""
    return small_tensor(tuple(t.data_ptr() for t in tensors), torch.int64, tensors[0].device)


@triton.jit
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


@triton.jit
def classes(cls, m, field, g, pos, length, mask, n):
    """Class ids at positions `pos` of block g from the class array at meta column `field`
    (IN_R, IN_C, OUT_R or OUT_C)."""
    return tl.load(cls + tl.load(m + field) + g * length + pos, mask=mask, other=n)


@triton.jit
def denominator(p_in, M, cin, cout, ACC: tl.constexpr):
    """P_in[in] · M[out] (index n, 'no class', holds 1 in both)."""
    return tl.load(p_in + cin).to(ACC) * tl.load(M + cout).to(ACC)


@triton.jit
def tensor_ptr(table, t, DT: tl.constexpr):
    return tl.load(table + t).to(tl.pointer_type(DT))


@triton.jit
def add_by_class(reduced, acc, contrib, in_row, rmask, n, row_mode):
    """One row step of a tile's per-class reduction: flushed by row where the input class changes
    with the row, else summed in registers (acc) for `flush_columns` at the end."""
    if row_mode:
        tl.atomic_add(reduced + in_row, tl.sum(contrib, 1), mask=rmask & (in_row != n))
    else:
        acc += contrib
    return acc


@triton.jit
def flush_columns(reduced, acc, in_col, cmask, n, row_mode):
    if not row_mode:
        tl.atomic_add(reduced + in_col, tl.sum(acc, 0), mask=cmask & (in_col != n))

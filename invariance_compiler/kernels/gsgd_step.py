"""The fused G-SGD step on stored weights (GSGD on CUDA tensors), in two passes, because the new
P_in depends on the carriers' gradients, which depend on a reduction over every tensor:
  1. reduce: reads ∂L/∂W and W once: reduced[a] = Σ_{entries reading a, not K} ∂L/∂W ⊙ W
     (W = V / (P_in·M), so this is ICR's Σ ∂L/∂V ⊙ V, the J entries' ∂L/∂c · c included) and the
     carriers' direct gradients ∂L/∂W_J / (P_in·M);
  (the carriers' O(H) update runs in PyTorch between the passes)
  2. update: reads ∂L/∂W, V and the momentum buffer once, writes V, the buffer and W:
     ∂L/∂V = ∂L/∂W / den_old, d = ∂L/∂V + wd·V, buf = mom·buf + d (buf = d on the first step),
     V -= lr·buf, W = V / den_new; then the K and J slots: W = fixed or c / den_new, V = buf = 0.
Memory traffic: 2 + 6 tensor passes (2 + 4 without momentum); torch's SGD(foreach) with momentum
makes about 8."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (IN_C, IN_R, OUT_C, OUT_R, ROW_MODE, SPARSE_BLOCK, acc_dtype, add_by_class, classes,
                     denominator, dtypes, flush_columns, locate, pointers, sparse_grid, small_tensor, tensor_ptr)
from .layout import Layout


@triton.jit
def _reduce_dense(tiles, meta, cls, g_ptrs, w_ptrs, reduced, n,
                  DT: tl.constexpr, ACC: tl.constexpr, BS: tl.constexpr, BR: tl.constexpr, ROWS: tl.constexpr):
    t, m, g, R, S, rt, st = locate(tiles, meta)
    gw_p = tensor_ptr(g_ptrs, t, DT)
    w_p = tensor_ptr(w_ptrs, t, DT)
    cols = st * BS + tl.arange(0, BS)
    cmask = cols < S
    in_col = classes(cls, m, IN_C, g, cols, S, cmask, n)
    acc = tl.zeros([BR, BS], ACC)
    row_mode = tl.load(m + ROW_MODE) != 0
    base = g.to(tl.int64) * R * S
    for r0 in range(rt * ROWS, tl.minimum(rt * ROWS + ROWS, R), BR):
        rows = r0 + tl.arange(0, BR)
        rmask = rows < R
        in_row = classes(cls, m, IN_R, g, rows, R, rmask, n)
        off = base + rows[:, None].to(tl.int64) * S + cols[None, :]
        mask = rmask[:, None] & cmask[None, :]
        contrib = tl.load(gw_p + off, mask=mask, other=0).to(ACC) * tl.load(w_p + off, mask=mask, other=0).to(ACC)
        acc = add_by_class(reduced, acc, contrib, in_row, rmask, n, row_mode)
    flush_columns(reduced, acc, in_col, cmask, n, row_mode)


@triton.jit
def _reduce_sparse(k_tensor, k_idx, k_in, nk, j_tensor, j_idx, j_in, j_out, j_cls, nj, p_in, M,
                   g_ptrs, w_ptrs, reduced, g_car, DT: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    off = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = off < nk                          # fixed entries are no coordinates: take them out
    t = tl.load(k_tensor + off, mask=mask, other=0)
    gw = tl.load(g_ptrs + t, mask=mask, other=0).to(tl.pointer_type(DT))
    w = tl.load(w_ptrs + t, mask=mask, other=0).to(tl.pointer_type(DT))
    idx = tl.load(k_idx + off, mask=mask, other=0)
    share = tl.load(gw + idx, mask=mask, other=0).to(ACC) * tl.load(w + idx, mask=mask, other=0).to(ACC)
    tl.atomic_add(reduced + tl.load(k_in + off, mask=mask, other=0), -share, mask=mask & (share != 0))
    mask = off < nj                          # carriers: their direct gradient
    t = tl.load(j_tensor + off, mask=mask, other=0)
    gw = tl.load(g_ptrs + t, mask=mask, other=0).to(tl.pointer_type(DT))
    den = denominator(p_in, M, tl.load(j_in + off, mask=mask, other=0), tl.load(j_out + off, mask=mask, other=0), ACC)
    g = tl.load(gw + tl.load(j_idx + off, mask=mask, other=0), mask=mask, other=0).to(ACC) / den
    tl.atomic_add(g_car + tl.load(j_cls + off, mask=mask, other=0), g, mask=mask)


@triton.jit
def _update_dense(tiles, meta, cls, p_old, p_new, M, g_ptrs, v_ptrs, b_ptrs, w_ptrs, n, hyper,
                  DT: tl.constexpr, ACC: tl.constexpr, MOMENTUM: tl.constexpr, FIRST: tl.constexpr,
                  BS: tl.constexpr, BR: tl.constexpr, ROWS: tl.constexpr):
    t, m, g, R, S, rt, st = locate(tiles, meta)
    lr = tl.load(hyper)                      # from memory: a scalar argument would be fp32
    mom = tl.load(hyper + 1)
    wd = tl.load(hyper + 2)
    gw_p = tensor_ptr(g_ptrs, t, DT)
    v_p = tensor_ptr(v_ptrs, t, DT)
    b_p = tensor_ptr(b_ptrs, t, DT)
    w_p = tensor_ptr(w_ptrs, t, DT)
    cols = st * BS + tl.arange(0, BS)
    cmask = cols < S
    in_col = classes(cls, m, IN_C, g, cols, S, cmask, n)
    out_col = classes(cls, m, OUT_C, g, cols, S, cmask, n)
    old_col = 1.0 / denominator(p_old, M, in_col, out_col, ACC)        # reciprocals: a multiply
    new_col = 1.0 / denominator(p_new, M, in_col, out_col, ACC)        # per entry, not a divide
    base = g.to(tl.int64) * R * S
    for r0 in range(rt * ROWS, tl.minimum(rt * ROWS + ROWS, R), BR):
        rows = r0 + tl.arange(0, BR)
        rmask = rows < R
        in_row = classes(cls, m, IN_R, g, rows, R, rmask, n)
        out_row = classes(cls, m, OUT_R, g, rows, R, rmask, n)
        old = (1.0 / denominator(p_old, M, in_row, out_row, ACC))[:, None] * old_col[None, :]
        new = (1.0 / denominator(p_new, M, in_row, out_row, ACC))[:, None] * new_col[None, :]
        off = base + rows[:, None].to(tl.int64) * S + cols[None, :]
        mask = rmask[:, None] & cmask[None, :]
        v = tl.load(v_p + off, mask=mask).to(ACC)
        d = tl.load(gw_p + off, mask=mask).to(ACC) * old + wd * v
        if MOMENTUM:
            if not FIRST:
                d += mom * tl.load(b_p + off, mask=mask).to(ACC)
            tl.store(b_p + off, d.to(DT), mask=mask)
        v -= lr * d
        tl.store(v_p + off, v.to(DT), mask=mask)
        tl.store(w_p + off, (v * new).to(DT), mask=mask)


@triton.jit
def _update_sparse(k_tensor, k_idx, k_val, nk, j_tensor, j_idx, j_in, j_out, j_cls, nj, p_new, M,
                   carriers, v_ptrs, b_ptrs, w_ptrs, DT: tl.constexpr, ACC: tl.constexpr,
                   MOMENTUM: tl.constexpr, BLOCK: tl.constexpr):
    off = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    for kind in tl.static_range(2):          # 0: fixed entries, 1: carriers
        if kind == 0:
            mask = off < nk
            t = tl.load(k_tensor + off, mask=mask, other=0)
            idx = tl.load(k_idx + off, mask=mask, other=0)
            val = tl.load(k_val + off, mask=mask, other=0).to(ACC)
        else:
            mask = off < nj
            t = tl.load(j_tensor + off, mask=mask, other=0)
            idx = tl.load(j_idx + off, mask=mask, other=0)
            c = tl.load(carriers + tl.load(j_cls + off, mask=mask, other=0), mask=mask, other=0).to(ACC)
            val = c / denominator(p_new, M, tl.load(j_in + off, mask=mask, other=0),
                                  tl.load(j_out + off, mask=mask, other=0), ACC)
        zero = tl.zeros([BLOCK], DT)
        tl.store(tl.load(w_ptrs + t, mask=mask, other=0).to(tl.pointer_type(DT)) + idx, val.to(DT), mask=mask)
        tl.store(tl.load(v_ptrs + t, mask=mask, other=0).to(tl.pointer_type(DT)) + idx, zero, mask=mask)
        if MOMENTUM:
            tl.store(tl.load(b_ptrs + t, mask=mask, other=0).to(tl.pointer_type(DT)) + idx, zero, mask=mask)


@torch.library.custom_op("invariance_compiler::gsgd_reduce", mutates_args=())
def gsgd_reduce_op(gws: list[torch.Tensor], ws: list[torch.Tensor], p_in: torch.Tensor, M: torch.Tensor,
                   num_carriers: int, layout: list[torch.Tensor], tiling: list[int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1: (reduced (n + 1,), the carriers' direct gradients), in the arithmetic dtype."""
    layout = Layout.from_op_args(layout, tiling)
    meta, cls, tiles, k_tensor, k_idx, k_in, k_val, j_tensor, j_idx, j_in, j_out, j_cls = layout.tensors()
    acc = acc_dtype(ws[0].dtype)
    reduced = torch.zeros(p_in.numel(), dtype=acc, device=p_in.device)
    g_car = torch.zeros(num_carriers, dtype=acc, device=p_in.device)
    DT, ACC = dtypes(ws[0].dtype)
    g_ptrs, w_ptrs = pointers(gws), pointers(ws)
    _reduce_dense[(tiles.numel(),)](tiles, meta, cls, g_ptrs, w_ptrs, reduced, n,
                                    DT=DT, ACC=ACC, **layout.tiling.launch_args())
    grid = sparse_grid(layout)
    if grid:
        _reduce_sparse[(grid,)](k_tensor, k_idx, k_in, k_idx.numel(), j_tensor, j_idx, j_in, j_out, j_cls,
                                j_idx.numel(), p_in, M, g_ptrs, w_ptrs, reduced, g_car,
                                DT=DT, ACC=ACC, BLOCK=SPARSE_BLOCK)
    return reduced, g_car


@gsgd_reduce_op.register_fake
def _(gws, ws, p_in, M, num_carriers, layout, tiling, n):
    acc = acc_dtype(ws[0].dtype)
    return p_in.new_empty(p_in.shape, dtype=acc), p_in.new_empty((num_carriers,), dtype=acc)


@torch.library.custom_op("invariance_compiler::gsgd_update", mutates_args=("vs", "bufs", "ws"))
def gsgd_update_op(gws: list[torch.Tensor], vs: list[torch.Tensor], bufs: list[torch.Tensor],
                   ws: list[torch.Tensor], p_old: torch.Tensor, p_new: torch.Tensor, M: torch.Tensor,
                   carriers: torch.Tensor, layout: list[torch.Tensor], tiling: list[int], n: int, lr: float, momentum: float,
                   weight_decay: float, first: bool) -> None:
    """Pass 2, in place on vs, bufs (momentum buffers; ignored when momentum == 0) and ws. Every
    tensor must be contiguous."""
    layout = Layout.from_op_args(layout, tiling)
    meta, cls, tiles, k_tensor, k_idx, k_in, k_val, j_tensor, j_idx, j_in, j_out, j_cls = layout.tensors()
    DT, ACC = dtypes(ws[0].dtype)
    v_ptrs, w_ptrs = pointers(vs), pointers(ws)
    b_ptrs = pointers(bufs) if momentum else v_ptrs
    _update_dense[(tiles.numel(),)](tiles, meta, cls, p_old, p_new, M, pointers(gws), v_ptrs, b_ptrs,
                                    w_ptrs, n, small_tensor((lr, momentum, weight_decay), acc_dtype(ws[0].dtype),
                                                            ws[0].device), DT=DT, ACC=ACC,
                                    MOMENTUM=momentum != 0, FIRST=first, **layout.tiling.launch_args())
    grid = sparse_grid(layout)
    if grid:
        _update_sparse[(grid,)](k_tensor, k_idx, k_val, k_idx.numel(), j_tensor, j_idx, j_in, j_out,
                                j_cls, j_idx.numel(), p_new, M, carriers, v_ptrs, b_ptrs, w_ptrs,
                                DT=DT, ACC=ACC, MOMENTUM=momentum != 0, BLOCK=SPARSE_BLOCK)


@gsgd_update_op.register_fake
def _(gws, vs, bufs, ws, p_old, p_new, M, carriers, layout, tiling, n, lr, momentum, weight_decay, first):
    return None


def gsgd_reduce(gws, ws, p_in, M, num_carriers, layout: Layout, n):
    """gsgd_reduce_op with the layout record."""
    return gsgd_reduce_op(gws, ws, p_in, M, num_carriers, *layout.op_args(), n)


def gsgd_update(gws, vs, bufs, ws, p_old, p_new, M, carriers, layout: Layout, n, lr, momentum, weight_decay, first):
    """gsgd_update_op with the layout record."""
    return gsgd_update_op(gws, vs, bufs, ws, p_old, p_new, M, carriers, *layout.op_args(), n, lr, momentum, weight_decay, first)

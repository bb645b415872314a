"""Weight allocation on a group of tensors: W = V / (P_in[in] · M[out]), then W_K = fixed values
and W_J = c / (P_in · M) at the carrier slots. The Triton kernel: one dense launch over every
tensor of the group, one sparse launch for the few K and J entries (ordered after it on the
stream); then its launcher, the PyTorch reference and the dispatch (`allocate`)."""
from __future__ import annotations

import torch
from .common import (jit, tl, IN_C, IN_R, OUT_C, OUT_R, SPARSE_BLOCK, classes, denominator, dtypes, locate,
                     pointers, sparse_grid, tensor_ptr)
from .cpu import cpu_passes
from .dispatch import use_triton
from .layout import Group, Layout, TensorSlots


@jit
def _wa_dense(tiles, meta, cls, p_in, M, v_ptrs, w_ptrs, n,
              DT: tl.constexpr, ACC: tl.constexpr, BS: tl.constexpr, BR: tl.constexpr, ROWS: tl.constexpr):
    t, m, g, R, S, rt, st = locate(tiles, meta)
    v = tensor_ptr(v_ptrs, t, DT)
    w = tensor_ptr(w_ptrs, t, DT)
    cols = st * BS + tl.arange(0, BS)
    cmask = cols < S
    d_col = denominator(p_in, M, classes(cls, m, IN_C, g, cols, S, cmask, n),
                        classes(cls, m, OUT_C, g, cols, S, cmask, n), ACC)          # [BS]
    base = g.to(tl.int64) * R * S
    for r0 in range(rt * ROWS, tl.minimum(rt * ROWS + ROWS, R), BR):
        rows = r0 + tl.arange(0, BR)
        rmask = rows < R
        d_row = denominator(p_in, M, classes(cls, m, IN_R, g, rows, R, rmask, n),
                            classes(cls, m, OUT_R, g, rows, R, rmask, n), ACC)      # [BR]
        off = base + rows[:, None].to(tl.int64) * S + cols[None, :]
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(v + off, mask=mask).to(ACC)
        tl.store(w + off, (x * ((1.0 / d_row)[:, None] * (1.0 / d_col)[None, :])).to(DT), mask=mask)


@jit
def _wa_sparse(k_tensor, k_idx, k_val, nk, j_tensor, j_idx, j_in, j_out, j_cls, nj, p_in, M, carriers, w_ptrs,
               v_ptrs, b_ptrs, DT: tl.constexpr, ACC: tl.constexpr, ZERO_V: tl.constexpr, MOMENTUM: tl.constexpr,
               BLOCK: tl.constexpr):
    """W on the K slots (their fixed values) and the J slots (c / (P_in·M)); with ZERO_V (the G-SGD
    step's update) V there is set to 0 too, and with MOMENTUM the momentum buffer."""
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
            val = c / denominator(p_in, M, tl.load(j_in + off, mask=mask, other=0),
                                  tl.load(j_out + off, mask=mask, other=0), ACC)
        tl.store(tl.load(w_ptrs + t, mask=mask, other=0).to(tl.pointer_type(DT)) + idx, val.to(DT), mask=mask)
        if ZERO_V:
            zero = tl.zeros([BLOCK], DT)
            tl.store(tl.load(v_ptrs + t, mask=mask, other=0).to(tl.pointer_type(DT)) + idx, zero, mask=mask)
            if MOMENTUM:
                tl.store(tl.load(b_ptrs + t, mask=mask, other=0).to(tl.pointer_type(DT)) + idx, zero, mask=mask)


@torch.library.custom_op("invariance_compiler::wa", mutates_args=())
def wa_op(vs: list[torch.Tensor], p_in: torch.Tensor, M: torch.Tensor, carriers: torch.Tensor,
          layout: list[torch.Tensor], tiling: list[int], n: int) -> list[torch.Tensor]:
    """The allocated weights of `vs` (a group of one dtype and device) with `layout` from
    layout.build_group."""
    L = Layout.from_op_args(layout, tiling)
    vs = [v.contiguous() for v in vs]
    ws = [torch.empty_like(v) for v in vs]
    DT, ACC = dtypes(vs[0].dtype)
    w_ptrs = pointers(ws)
    _wa_dense[(L.tiles.numel(),)](L.tiles, L.meta, L.cls, p_in, M, pointers(vs), w_ptrs, n,
                                DT=DT, ACC=ACC, **L.tiling.launch_args())
    grid = sparse_grid(L)
    if grid:
        _wa_sparse[(grid,)](L.k_tensor, L.k_idx, L.k_val, L.k_idx.numel(), L.j_tensor, L.j_idx, L.j_in, L.j_out,
                            L.j_cls, L.j_idx.numel(), p_in, M, carriers, w_ptrs, w_ptrs, w_ptrs, DT=DT, ACC=ACC,
                            ZERO_V=False, MOMENTUM=False, BLOCK=SPARSE_BLOCK)
    return ws


@wa_op.register_fake
def _(vs, p_in, M, carriers, layout, tiling, n):
    return [torch.empty_like(v, memory_format=torch.contiguous_format) for v in vs]


def launch(vs, p_in, M, carriers, layout: Layout, n):
    """wa_op with the layout record."""
    return wa_op(vs, p_in, M, carriers, *layout.op_args(), n)


def reference(vs, p_in, M, carriers, slots: list[TensorSlots], out=None) -> list[torch.Tensor]:
    """WA in PyTorch ops: differentiable (autograd through it is the ICR), or written into `out`."""
    ws = []
    for k, (v, s) in enumerate(zip(vs, slots)):
        den = p_in[s.inp] * M[s.out]
        carried = carriers[s.carrier_cls] / (p_in[s.carrier_in] * M[s.carrier_out])
        if out is None:
            # v / den is fresh: its slots are written in place (an index_put per slot kind would
            # copy the tensor each, and a tensor with no slots needs none)
            w = (v / den).contiguous()
            if s.fixed_idx.numel():
                w.view(-1).index_put_((s.fixed_idx,), s.fixed_val.to(v.dtype))
            if s.carrier_idx.numel():
                w.view(-1).index_put_((s.carrier_idx,), carried.to(v.dtype))
            ws.append(w)
        else:
            w = torch.div(v, den, out=out[k])
            w.view(-1)[s.fixed_idx] = s.fixed_val.to(w.dtype)
            w.view(-1)[s.carrier_idx] = carried.to(w.dtype)
            ws.append(w)
    return ws


def allocate(vs, p_in, M, carriers, group: Group) -> list[torch.Tensor]:
    """The weights of `vs`: Triton where dispatch says so, cpu_step.cpp's pass on fp32 / fp64 CPU
    tensors, else the reference."""
    if use_triton(vs[0]):
        return launch(list(vs), p_in, M, carriers, group.layout, group.n)
    fused = cpu_passes(group, [*vs, p_in, M, carriers]) if carriers is not None else None
    if fused is not None:
        return fused.wa(list(vs), p_in, M, carriers)
    return reference(vs, p_in, M, carriers, group.slots)

"""The inverse chain rule on a group of tensors, WA's backward: from ∂L/∂W,
    ∂L/∂V = ∂L/∂W / (P_in[in] · M[out])          (0 on the K and J slots),
    reduced[a] = Σ_{free e reading a} ∂L/∂V_e · V_e + Σ_{J entries reading a} ∂L/∂c · c,
    ∂L/∂c (direct) = ∂L/∂W_J / (P_in · M).
The dense launch reads ∂L/∂W and V once, writes ∂L/∂V, and reduces each tile's rows or columns
(whichever the input class varies along) in registers before one atomic add per row or column.
The sparse launch then moves the K and J slots' share out of ∂L/∂V and into the carriers.
Then its launcher, the PyTorch reference and the dispatch (`backward`)."""
from __future__ import annotations

import torch
from .common import (jit, tl, IN_C, IN_R, OUT_C, OUT_R, ROW_MODE, SPARSE_BLOCK, acc_dtype, add_by_class, classes,
                     denominator, dtypes, flush_columns, locate, pointers, sparse_grid, tensor_ptr)
from .cpu import cpu_passes
from .dispatch import use_triton
from .layout import Group, Layout, TensorSlots


@jit
def _icr_dense(tiles, meta, cls, p_in, M, g_ptrs, v_ptrs, gv_ptrs, reduced, n, DT: tl.constexpr, ACC: tl.constexpr,
               SCALE: tl.constexpr, BS: tl.constexpr, BR: tl.constexpr, ROWS: tl.constexpr):
    """∂L/∂V = ∂L/∂W / den into gv_ptrs and reduced[in] += ∂L/∂V ⊙ V. Without SCALE (the G-SGD
    step's reduce pass, v_ptrs pointing at W) only reduced[in] += ∂L/∂W ⊙ W, the same sum."""
    t, m, g, R, S, rt, st = locate(tiles, meta)
    gw_p = tensor_ptr(g_ptrs, t, DT)
    v_p = tensor_ptr(v_ptrs, t, DT)
    cols = st * BS + tl.arange(0, BS)
    cmask = cols < S
    in_col = classes(cls, m, IN_C, g, cols, S, cmask, n)
    if SCALE:
        gv_p = tensor_ptr(gv_ptrs, t, DT)
        d_col = denominator(p_in, M, in_col, classes(cls, m, OUT_C, g, cols, S, cmask, n), ACC)
    acc = tl.zeros([BR, BS], ACC)
    row_mode = tl.load(m + ROW_MODE) != 0
    base = g.to(tl.int64) * R * S
    for r0 in range(rt * ROWS, tl.minimum(rt * ROWS + ROWS, R), BR):
        rows = r0 + tl.arange(0, BR)
        rmask = rows < R
        in_row = classes(cls, m, IN_R, g, rows, R, rmask, n)
        off = base + rows[:, None].to(tl.int64) * S + cols[None, :]
        mask = rmask[:, None] & cmask[None, :]
        gv = tl.load(gw_p + off, mask=mask, other=0).to(ACC)
        if SCALE:
            d_row = denominator(p_in, M, in_row, classes(cls, m, OUT_R, g, rows, R, rmask, n), ACC)
            gv = gv * ((1.0 / d_row)[:, None] * (1.0 / d_col)[None, :])
            tl.store(gv_p + off, gv.to(DT), mask=mask)
        contrib = gv * tl.load(v_p + off, mask=mask, other=0).to(ACC)
        acc = add_by_class(reduced, acc, contrib, in_row, rmask, n, row_mode)
    flush_columns(reduced, acc, in_col, cmask, n, row_mode)


@jit
def _icr_sparse(k_tensor, k_idx, k_in, nk, j_tensor, j_idx, j_in, j_cls, nj, carriers,
                v_ptrs, gv_ptrs, reduced, g_car, DT: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    off = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    for kind in tl.static_range(2):          # 0: fixed entries (drop), 1: carriers (move to ∂L/∂c)
        if kind == 0:
            mask = off < nk
            t = tl.load(k_tensor + off, mask=mask, other=0)
            idx = tl.load(k_idx + off, mask=mask, other=0)
            cin = tl.load(k_in + off, mask=mask, other=0)
        else:
            mask = off < nj
            t = tl.load(j_tensor + off, mask=mask, other=0)
            idx = tl.load(j_idx + off, mask=mask, other=0)
            cin = tl.load(j_in + off, mask=mask, other=0)
        v = tl.load(v_ptrs + t, mask=mask, other=0).to(tl.pointer_type(DT))
        gv = tl.load(gv_ptrs + t, mask=mask, other=0).to(tl.pointer_type(DT))
        g = tl.load(gv + idx, mask=mask, other=0).to(ACC)
        x = tl.load(v + idx, mask=mask, other=0).to(ACC)
        share = -g * x                                       # the dense launch counted the slot
        if kind == 1:
            cc = tl.load(j_cls + off, mask=mask, other=0)
            tl.atomic_add(g_car + cc, g, mask=mask)
            share += g * tl.load(carriers + cc, mask=mask, other=0).to(ACC)
        tl.atomic_add(reduced + cin, share, mask=mask & (share != 0))
        tl.store(gv + idx, tl.zeros_like(g).to(DT), mask=mask)


@torch.library.custom_op("invariance_compiler::icr", mutates_args=())
def icr_op(gws: list[torch.Tensor], vs: list[torch.Tensor], p_in: torch.Tensor, M: torch.Tensor,
           carriers: torch.Tensor, layout: list[torch.Tensor], tiling: list[int], n: int) -> list[torch.Tensor]:
    """[∂L/∂V of each tensor..., reduced (n + 1,), ∂L/∂c direct (len(carriers),)], the last two in
    the arithmetic dtype."""
    L = Layout.from_op_args(layout, tiling)
    gws = [g.contiguous() for g in gws]
    vs = [v.contiguous() for v in vs]
    gvs = [torch.empty_like(v) for v in vs]
    acc = acc_dtype(vs[0].dtype)
    reduced = torch.zeros(p_in.numel(), dtype=acc, device=p_in.device)
    g_car = torch.zeros(carriers.numel(), dtype=acc, device=p_in.device)
    DT, ACC = dtypes(vs[0].dtype)
    v_ptrs, gv_ptrs = pointers(vs), pointers(gvs)
    _icr_dense[(L.tiles.numel(),)](L.tiles, L.meta, L.cls, p_in, M, pointers(gws), v_ptrs, gv_ptrs, reduced, n,
                                 DT=DT, ACC=ACC, SCALE=True, **L.tiling.launch_args())
    grid = sparse_grid(L)
    if grid:
        _icr_sparse[(grid,)](L.k_tensor, L.k_idx, L.k_in, L.k_idx.numel(), L.j_tensor, L.j_idx, L.j_in, L.j_cls,
                             L.j_idx.numel(), carriers, v_ptrs, gv_ptrs, reduced, g_car,
                             DT=DT, ACC=ACC, BLOCK=SPARSE_BLOCK)
    return gvs + [reduced, g_car]


@icr_op.register_fake
def _(gws, vs, p_in, M, carriers, layout, tiling, n):
    acc = acc_dtype(vs[0].dtype)
    return ([torch.empty_like(v, memory_format=torch.contiguous_format) for v in vs]
            + [p_in.new_empty(p_in.shape, dtype=acc), carriers.new_empty(carriers.shape, dtype=acc)])


def launch(gws, vs, p_in, M, carriers, layout: Layout, n):
    """icr_op with the layout record."""
    return icr_op(gws, vs, p_in, M, carriers, *layout.op_args(), n)


def reference(gws, vs, p_in, M, carriers, slots: list[TensorSlots]):
    """ICR in PyTorch ops: (∂L/∂V of each tensor, reduced (n + 1,), ∂L/∂c direct)."""
    reduced = torch.zeros_like(p_in)
    g_car = torch.zeros_like(carriers)
    gvs = []
    for s, v, gw in zip(slots, vs, gws):
        gw = torch.zeros_like(v) if gw is None else gw
        gv = (gw / (p_in[s.inp] * M[s.out])).contiguous()           # gw may come permuted
        flat = gv.view(-1)
        if s.fixed_idx.numel():
            flat[s.fixed_idx] = 0                                     # fixed: not functions of V
        if s.carrier_idx.numel():
            g_j = flat[s.carrier_idx].clone()                         # ∂L/∂c directly
            g_car.index_add_(0, s.carrier_cls, g_j)
            flat[s.carrier_idx] = 0                                   # J slots of V are unused
            reduced.index_add_(0, s.carrier_in, g_j * carriers[s.carrier_cls])   # the J entries
        contrib = gv * v                                              # = ∂L/∂W ⊙ W on free, non-J entries
        dims = [d for d in range(v.dim()) if s.inp.shape[d] == 1 and v.shape[d] > 1]
        col = contrib.sum(dim=dims, keepdim=True) if dims else contrib
        reduced.index_add_(0, s.inp.expand(col.shape).reshape(-1), col.reshape(-1))
        gvs.append(gv)
    return gvs, reduced, g_car


def backward(gws, vs, p_in, M, carriers, group: Group):
    """(∂L/∂V of each tensor, reduced (n + 1,) in p_in's dtype, ∂L/∂c direct): Triton where
    dispatch says so, else the reference."""
    if use_triton(vs[0]):
        gws = [torch.zeros_like(v) if g is None else g.contiguous() for v, g in zip(vs, gws)]
        *gvs, reduced, g_car = launch(gws, list(vs), p_in, M, carriers, group.layout, group.n)
        return gvs, reduced.to(p_in.dtype), g_car.to(carriers.dtype)
    fused = cpu_passes(group, [*vs, p_in, M, carriers]) if carriers is not None else None
    if fused is not None:
        gws = [torch.zeros_like(v) if g is None else g.contiguous() for v, g in zip(vs, gws)]
        if all([g.dtype is fused.dtype for g in gws]):
            return fused.icr(gws, list(vs), p_in, M, carriers)
    return reference(gws, vs, p_in, M, carriers, group.slots)

"""The fused G-SGD step on stored weights (GSGD on CUDA tensors), in two passes, because the new
P_in depends on the carriers' gradients, which depend on a reduction over every tensor:
  1. reduce: reads ∂L/∂W and W once: reduced[a] = Σ_{entries reading a, not K} ∂L/∂W ⊙ W
     (W = V / (P_in·M), so this is ICR's Σ ∂L/∂V ⊙ V, the J entries' ∂L/∂c · c included: ICR's
     dense kernel without its scaling) and the carriers' direct gradients ∂L/∂W_J / (P_in·M);
  (the carriers' O(H) update runs in PyTorch between the passes)
  2. update: reads ∂L/∂W, V and the momentum buffer once, writes V, the buffer and W:
     ∂L/∂V = ∂L/∂W / den_old, d = ∂L/∂V + wd·V, buf = mom·buf + d (buf = d on the first step),
     V -= lr·buf, W = V / den_new; then the K and J slots (WA's sparse kernel): W = fixed or
     c / den_new, V = buf = 0.
Memory traffic: 2 + 6 tensor passes (2 + 4 without momentum); torch's SGD(foreach) with momentum
makes about 8. Then the launchers, the PyTorch reference (`reference_step`, also the path for other
dtypes or where no C++ compiler works), and the dispatch (`GSGDStep`: Triton on CUDA, the fused C++
step of cpu.py on fp32 / fp64 CPU tensors, else the reference)."""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from . import icr, wa
from .cpu import cpu_step
from .common import (jit, tl, IN_C, IN_R, OUT_C, OUT_R, SPARSE_BLOCK, acc_dtype, classes, denominator, dtypes,
                     locate, pointers, sparse_grid, small_tensor, tensor_ptr)
from .dispatch import current_mode, use_triton
from .layout import Group, Layout


@jit
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


@jit
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


@torch.library.custom_op("invariance_compiler::gsgd_reduce", mutates_args=())
def gsgd_reduce_op(gws: list[torch.Tensor], ws: list[torch.Tensor], p_in: torch.Tensor, M: torch.Tensor,
                   num_carriers: int, layout: list[torch.Tensor], tiling: list[int],
                   n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1: (reduced (n + 1,), the carriers' direct gradients), in the arithmetic dtype."""
    L = Layout.from_op_args(layout, tiling)
    acc = acc_dtype(ws[0].dtype)
    reduced = torch.zeros(p_in.numel(), dtype=acc, device=p_in.device)
    g_car = torch.zeros(num_carriers, dtype=acc, device=p_in.device)
    DT, ACC = dtypes(ws[0].dtype)
    g_ptrs, w_ptrs = pointers(gws), pointers(ws)
    icr._icr_dense[(L.tiles.numel(),)](L.tiles, L.meta, L.cls, p_in, M, g_ptrs, w_ptrs, w_ptrs, reduced, n,
                                       DT=DT, ACC=ACC, SCALE=False, **L.tiling.launch_args())
    grid = sparse_grid(L)
    if grid:
        _reduce_sparse[(grid,)](L.k_tensor, L.k_idx, L.k_in, L.k_idx.numel(), L.j_tensor, L.j_idx, L.j_in,
                                L.j_out, L.j_cls, L.j_idx.numel(), p_in, M, g_ptrs, w_ptrs, reduced, g_car,
                                DT=DT, ACC=ACC, BLOCK=SPARSE_BLOCK)
    return reduced, g_car


@gsgd_reduce_op.register_fake
def _(gws, ws, p_in, M, num_carriers, layout, tiling, n):
    acc = acc_dtype(ws[0].dtype)
    return p_in.new_empty(p_in.shape, dtype=acc), p_in.new_empty((num_carriers,), dtype=acc)


@torch.library.custom_op("invariance_compiler::gsgd_update", mutates_args=("vs", "bufs", "ws"))
def gsgd_update_op(gws: list[torch.Tensor], vs: list[torch.Tensor], bufs: list[torch.Tensor],
                   ws: list[torch.Tensor], p_old: torch.Tensor, p_new: torch.Tensor, M: torch.Tensor,
                   carriers: torch.Tensor, layout: list[torch.Tensor], tiling: list[int], n: int, lr: float,
                   momentum: float, weight_decay: float, first: bool) -> None:
    """Pass 2, in place on vs, bufs (momentum buffers; ignored when momentum == 0) and ws. Every
    tensor must be contiguous."""
    L = Layout.from_op_args(layout, tiling)
    DT, ACC = dtypes(ws[0].dtype)
    v_ptrs, w_ptrs = pointers(vs), pointers(ws)
    b_ptrs = pointers(bufs) if momentum else v_ptrs
    _update_dense[(L.tiles.numel(),)](L.tiles, L.meta, L.cls, p_old, p_new, M, pointers(gws), v_ptrs, b_ptrs,
                                    w_ptrs, n, small_tensor((lr, momentum, weight_decay), acc_dtype(ws[0].dtype),
                                                            ws[0].device), DT=DT, ACC=ACC,
                                    MOMENTUM=momentum != 0, FIRST=first, **L.tiling.launch_args())
    grid = sparse_grid(L)
    if grid:                                 # W on the slots, V and the buffers 0 there
        wa._wa_sparse[(grid,)](L.k_tensor, L.k_idx, L.k_val, L.k_idx.numel(), L.j_tensor, L.j_idx, L.j_in, L.j_out,
                               L.j_cls, L.j_idx.numel(), p_new, M, carriers, w_ptrs, v_ptrs, b_ptrs,
                               DT=DT, ACC=ACC, ZERO_V=True, MOMENTUM=momentum != 0, BLOCK=SPARSE_BLOCK)


@gsgd_update_op.register_fake
def _(gws, vs, bufs, ws, p_old, p_new, M, carriers, layout, tiling, n, lr, momentum, weight_decay, first):
    return None


def launch_reduce(gws, ws, p_in, M, num_carriers, layout: Layout, n):
    """gsgd_reduce_op with the layout record."""
    return gsgd_reduce_op(gws, ws, p_in, M, num_carriers, *layout.op_args(), n)


def launch_update(gws, vs, bufs, ws, p_old, p_new, M, carriers, layout: Layout, n, lr, momentum, weight_decay,
                  first):
    """gsgd_update_op with the layout record."""
    return gsgd_update_op(gws, vs, bufs, ws, p_old, p_new, M, carriers, *layout.op_args(), n, lr, momentum,
                          weight_decay, first)


# ---- the PyTorch reference --------------------------------------------------------------------
class StepPlan(NamedTuple):
    """What the G-SGD step reads of an allocation plan: every allocated tensor as one group, M,
    the carriers' path constants (P_in = path_scale ⊙ [c, 1][path_root]), which tensors read a
    class, and `path_in` (P_in from the carriers; it raises, naming the classes, where one is
    zero or non-finite)."""
    group: Group
    M: torch.Tensor
    path_scale: torch.Tensor
    path_root: torch.Tensor
    scales_in: list[bool]
    path_in: Callable[[torch.Tensor], torch.Tensor]


def momentum_(d: torch.Tensor, buf: Optional[torch.Tensor], momentum: float, first: bool) -> torch.Tensor:
    """torch.optim.SGD's heavy-ball direction: buf = d on the first step, else mom·buf + d."""
    if not momentum:
        return d
    return buf.copy_(d) if first else buf.mul_(momentum).add_(d)


def carrier_step_(plan: StepPlan, c, reduced, g_car, p_old, lr, mom, wd, buf, first) -> None:
    """SGD on the carriers' path values from the per-class reduction Σ ∂L/∂V ⊙ V and their direct
    gradients (∂L/∂P_in = -reduced / P_in goes back to the carriers through path_in, O(H))."""
    g_p = ((-reduced.to(c.dtype) / p_old) * plan.path_scale).to(c.dtype)
    through = torch.zeros(c.numel() + 1, dtype=c.dtype, device=c.device).index_add_(0, plan.path_root, g_p)[:-1]
    d = g_car.to(c.dtype) + through
    d = d.add(c, alpha=wd) if wd else d
    c.add_(momentum_(d, buf, mom, first), alpha=-lr)


def reference_step(plan: StepPlan, gws, vs, bufs, ws, c, c_buf, lr, mom, wd, first) -> None:
    """The step in PyTorch ops, in place: V and the buffers with the reduction in one pass, the
    carriers, then W = WA(V)."""
    p_old = plan.path_in(c)
    reduced = torch.zeros_like(p_old)
    g_car = c.new_zeros(c.numel())
    r_old, r_out = 1.0 / p_old, 1.0 / plan.M
    for i, (s, gw, v) in enumerate(zip(plan.group.slots, gws, vs)):
        gv = gw * (r_old[s.inp] * r_out[s.out])                      # ∂L/∂V (V is 0 on the K and J slots)
        if plan.scales_in[i]:
            dims = [d for d in range(v.dim()) if s.inp.shape[d] == 1 and v.shape[d] > 1]
            col = gv * v
            col = col.sum(dim=dims, keepdim=True) if dims else col
            reduced.index_add_(0, s.inp.expand(col.shape).reshape(-1), col.reshape(-1))
        if s.carrier_idx.numel():                     # the carriers' direct gradient
            g = gw.reshape(-1)[s.carrier_idx] / (p_old[s.carrier_in] * plan.M[s.carrier_out])
            g_car.index_add_(0, s.carrier_cls, g)
            reduced.index_add_(0, s.carrier_in, g * c[s.carrier_cls])
        d = gv.add_(v, alpha=wd) if wd else gv
        v.add_(momentum_(d, bufs[i] if mom else None, mom, first), alpha=-lr)
        for idx in (s.fixed_idx, s.carrier_idx):      # fixed and carrier slots are no coordinates
            if idx.numel():
                v.view(-1)[idx] = 0
                if mom:
                    bufs[i].view(-1)[idx] = 0
    carrier_step_(plan, c, reduced, g_car, p_old, lr, mom, wd, c_buf, first)
    wa.reference(vs, plan.path_in(c), plan.M, c, plan.group.slots, out=ws)


# ---- dispatch ---------------------------------------------------------------------------------
class GSGDStep:
    """G-SGD's whole step on a plan's tensors, on the backend dispatch picks; `backend` says which
    ran last ('Triton', 'C++' or 'PyTorch')."""

    def __init__(self, plan: StepPlan):
        self.plan, self.backend = plan, None
        self._cpu = None                              # the fused CPU step, once built

    def __call__(self, gws, vs, bufs, ws, c, c_buf, lr, mom, wd, first) -> None:
        """In place on vs, bufs (momentum buffers, [] without momentum), ws, c and c_buf."""
        plan, lay, n = self.plan, self.plan.group.layout, self.plan.group.n
        if use_triton(ws[0]):
            self.backend, p_old = "Triton", plan.path_in(c)
            reduced, g_car = launch_reduce(gws, ws, p_old, plan.M, c.numel(), lay, n)
            carrier_step_(plan, c, reduced, g_car, p_old, lr, mom, wd, c_buf, first)
            launch_update(gws, vs, bufs, ws, p_old, plan.path_in(c), plan.M, c, lay, n, lr, mom, wd, first)
            return
        fused = cpu_step(plan, gws + vs + ws + bufs + [c, plan.M], self._cpu) if current_mode() == "auto" else None
        if fused is not None:
            self.backend, self._cpu = "C++", fused
            fused(gws, vs, bufs, ws, c, c_buf, lr, mom, wd, first)
        else:
            self.backend = "PyTorch"
            reference_step(plan, gws, vs, bufs, ws, c, c_buf, lr, mom, wd, first)

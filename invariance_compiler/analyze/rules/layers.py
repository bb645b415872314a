"""Layers with weights: each output channel starts a fresh class (+1 on its weight row and bias),
each input channel's class is divided out of the weight slice that reads it (-1 on the column, for
every spatial tap). A contraction of two activations (attention's q kᵀ, einsum, bmm) combines
exponents: its output is homogeneous only if λ_a + λ_b is the same along the contracted index."""
from __future__ import annotations

import string

import torch

from ..value import Value, compact
from . import _register, aten
from .elementwise import pin

__all__ = ["linear", "conv", "conv_transpose", "embedding", "contract"]



def _channel_out(ctx, rows: torch.Tensor, dim: int) -> Value:
    nd = len(ctx.real.shape)
    shape = [1] * nd
    shape[dim % nd] = rows.numel()
    return ctx.value(rows.view(shape))


def _is_param(w) -> bool:
    return isinstance(w, Value) and w.param is not None and w.ids is None


def _consume_with_constant_weight(ctx, x, weight, bias, dim):
    """A weight that is not a parameter: a constant one mixes the channels it reads (they merge);
    a scaled one is a contraction of two scaled tensors."""
    if isinstance(weight, Value) and weight.is_constant:
        rep = ctx.reduce(x, [dim])
        if bias is not None and not ctx.bind_bias(bias, rep.reshape(-1)[:1]):
            ctx.pin(x, bias, reason="bias is not a parameter")
            return ctx.constant()
        return ctx.value(rep)
    return pin(ctx, x, weight, bias)


def linear(ctx, x, weight, bias=None):
    if not _is_param(weight):
        if isinstance(weight, Value) and not weight.is_constant and bias is None:
            return contract(ctx, x, _transposed(ctx, weight), "...k,kj->...j")
        return _consume_with_constant_weight(ctx, x, weight, bias, -1)
    out_f = weight.shape[0]
    cols = ctx.channel_classes(x, -1)                        # (in,)
    rows = ctx.fresh(out_f)                                  # (out,)
    if not ctx.bind(weight, [(+1, rows.view(-1, 1)), (-1, cols.view(1, -1))]):
        return pin(ctx, x, weight, bias)
    ctx.bind_bias(bias, rows)
    return _channel_out(ctx, rows, -1)


def _transposed(ctx, w: Value) -> Value:
    ids = ctx.ids(w)
    return Value(torch.Size(tuple(w.shape)[::-1]), ids.t() if ids.dim() == 2 else ids)


def addmm(ctx, bias, a, b, beta=1, alpha=1):
    """bias + a @ b (a Linear written out by some exporters)."""
    if _is_param(b) and len(b.shape) == 2:
        cols = ctx.channel_classes(a, -1)
        rows = ctx.fresh(b.shape[1])
        if ctx.bind(b, [(-1, cols.view(-1, 1)), (+1, rows.view(1, -1))]):
            out = _channel_out(ctx, rows, -1)
            if _is_param(bias):
                ctx.bind_bias(bias, rows)
                return out
            return ctx.value(ctx.union(out, bias))
    out = contract(ctx, a, b, "ik,kj->ij")
    return ctx.value(ctx.union(out, bias))


def conv(ctx, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    cdim = len(x.shape) - (len(weight.shape) - 2) - 1        # 1 batched, 0 unbatched
    if not _is_param(weight):
        return _consume_with_constant_weight(ctx, x, weight, bias, cdim)
    c_out, c_in_g = weight.shape[:2]
    taps = (1,) * (len(weight.shape) - 2)
    ins = ctx.channel_classes(x, cdim)                       # (C_in,)
    group = torch.arange(c_out) // (c_out // groups)         # group of each output channel
    if groups == 1:
        cols = ins.view(1, -1)                                # every output channel reads all of them
    else:
        cols = compact(ins[group.view(-1, 1) * c_in_g + torch.arange(c_in_g).view(1, -1)])   # (C_out, C_in/g)
    rows = ctx.fresh(c_out)
    # cols is compact: (1, 1) when every input channel has one class (say, the pinned input)
    if not ctx.bind(weight, [(+1, rows.view(-1, 1, *taps)), (-1, cols.view(*cols.shape, *taps))]):
        return pin(ctx, x, weight, bias)
    ctx.bind_bias(bias, rows)
    return _channel_out(ctx, rows, cdim)


def conv_transpose(ctx, x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                   dilation=1):
    cdim = len(x.shape) - (len(weight.shape) - 2) - 1
    if not _is_param(weight):
        return _consume_with_constant_weight(ctx, x, weight, bias, cdim)
    c_in, c_out_g = weight.shape[:2]
    c_out = c_out_g * groups
    taps = (1,) * (len(weight.shape) - 2)
    ins = ctx.channel_classes(x, cdim)                       # (C_in,)
    rows = ctx.fresh(c_out)
    group = torch.arange(c_in) // (c_in // groups)
    outs = rows[group.view(-1, 1) * c_out_g + torch.arange(c_out_g).view(1, -1)]   # (C_in, C_out/g)
    if not ctx.bind(weight, [(-1, ins.view(-1, 1, *taps)), (+1, outs.view(c_in, c_out_g, *taps))]):
        return pin(ctx, x, weight, bias)
    ctx.bind_bias(bias, rows)
    return _channel_out(ctx, rows, cdim)


def convolution(ctx, x, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    if transposed:
        return conv_transpose(ctx, x, weight, bias, stride, padding, output_padding, groups, dilation)
    return conv(ctx, x, weight, bias, stride, padding, dilation, groups)


def embedding(ctx, weight, idx, *args, **kwargs):
    if not _is_param(weight):
        return pin(ctx, idx, weight)
    by_position = _rows_by_position(ctx, weight, idx)
    if by_position is not None:
        return by_position
    if _only_normalised_per_token(ctx.node, weight.shape[1]):
        # every reader divides each token's vector by its own norm, so each row of the table can
        # be scaled on its own (whichever rows an input reads): a class per row, and what the
        # readers see has scale 1
        rows = ctx.fresh(weight.shape[0])
        if not ctx.bind(weight, [(+1, rows.view(-1, 1))]):
            return pin(ctx, weight)
        return ctx.constant(tuple(ctx.real.shape))
    rows = ctx.fresh(weight.shape[1])                        # one class per embedding coordinate
    if not ctx.bind(weight, [(+1, rows.view(1, -1))]):
        return pin(ctx, weight)
    return _channel_out(ctx, rows, -1)


def _rows_by_position(ctx, weight, idx):
    """A fixed index that reads every row (a buffer of position ids, CLIP's arange): each row then
    feeds exactly the positions that read it, so it gets classes of its own, one per entry, and
    the positions' classes follow (CLIP's token 0, class embedding plus row 0, keeps its own scale
    under the LayerNorm). An index that misses rows (ids sliced to this input's length) or that
    the input decides keeps one class per coordinate: a row not read here may be read by
    another input."""
    known, (num, dim) = idx.known, weight.shape
    if known is None or known.numel() == 0 or num * dim > _PER_ENTRY_LIMIT:
        return None
    if int(known.min()) < 0 or int(known.max()) >= num or known.unique().numel() != num:
        return None
    cls = ctx.fresh(num * dim).view(num, dim)
    if not ctx.bind(weight, [(+1, cls)]):
        return pin(ctx, weight)
    return ctx.value(cls[known])


_PER_ENTRY_LIMIT = 1 << 22

_PER_TOKEN_NORMS = (aten.layer_norm.default, aten.rms_norm.default)


def _only_normalised_per_token(node, dim: int) -> bool:
    """Whether every user of `node` (an embedding's output) is a LayerNorm or RMSNorm over its last
    dim `dim` that reads it only as its input (not the graph output, no in-place op, nothing else:
    a residual stream that also reads the embedding keeps its scale)."""
    users = list(node.users) if node is not None else []
    return bool(users) and all(
        u.op == "call_function" and u.target in _PER_TOKEN_NORMS and u.args[0] is node
        and node not in u.args[2:] and list(u.args[1]) == [dim] for u in users)


def matmul(ctx, a, b):
    """x @ W with W a 2-D parameter is a Linear without bias; W @ x likewise along -2; anything else
    is a contraction."""
    if _is_param(b) and len(b.shape) == 2 and len(a.shape) >= 1:
        cols = ctx.channel_classes(a, -1)                    # x (..., in) @ W (in, out)
        rows = ctx.fresh(b.shape[1])
        if ctx.bind(b, [(-1, cols.view(-1, 1)), (+1, rows.view(1, -1))]):
            return _channel_out(ctx, rows, -1)
        return pin(ctx, a, b)
    if _is_param(a) and len(a.shape) == 2 and len(b.shape) >= 2:
        cols = ctx.channel_classes(b, -2)                    # W (out, in) @ x (..., in, n)
        rows = ctx.fresh(a.shape[0])
        if ctx.bind(a, [(+1, rows.view(-1, 1)), (-1, cols.view(1, -1))]):
            return _channel_out(ctx, rows, -2)
        return pin(ctx, a, b)
    na, nb = len(a.shape), len(b.shape)
    if na == 1 and nb == 1:
        return contract(ctx, a, b, "k,k->")
    if na == 1:
        return contract(ctx, a, b, "k,...kj->...j")
    if nb == 1:
        return contract(ctx, a, b, "...ik,k->...i")
    return contract(ctx, a, b, "...ik,...kj->...ij")


def einsum(ctx, equation, operands, path=None):
    if len(operands) != 2:
        if len(operands) == 1:
            return _einsum_one(ctx, equation, operands[0])
        return pin(ctx, *operands)
    return contract(ctx, operands[0], operands[1], equation.replace(" ", ""))


def _einsum_one(ctx, equation, x):
    """A one-operand einsum (a permute plus sums): the summed letters merge."""
    lhs, rhs = equation.replace(" ", "").split("->")
    if "..." in lhs:
        return pin(ctx, x)
    summed = [i for i, c in enumerate(lhs) if c not in rhs]
    ids = ctx.reduce(x, summed)
    kept = [c for c in lhs if c in rhs]
    ids = ids.reshape([ids.size(i) for i, c in enumerate(lhs) if c in rhs])
    return ctx.value(ids.permute([kept.index(c) for c in rhs]) if rhs else ids.reshape(()))


def contract(ctx, a, b, equation):
    """out = Σ over the letters missing from the output of a ⊗ b. A constant side merges the other
    side's classes along the contracted letters; two scaled sides give the output a fresh class per
    element with λ_out = λ_a + λ_b for every contracted index (a relation per element)."""
    lhs, out = equation.split("->")
    ea, eb = lhs.split(",")
    ia, ib = ctx.ids(a), ctx.ids(b)
    ea, eb, out = _expand_ellipsis(ea, len(a.shape), eb, len(b.shape), out)
    letters = sorted(set(ea) | set(eb), key=lambda c: (c not in out, (out + ea + eb).index(c)))
    A = _to_letters(ia, ea, letters)
    B = _to_letters(ib, eb, letters)
    summed = [i for i, c in enumerate(letters) if c not in out]
    a_const = a.param is None and a.is_constant
    b_const = b.param is None and b.is_constant
    if a_const or b_const:
        side = B if a_const else A
        res = ctx.reduce(Value(torch.Size(side.shape), side), summed) if summed else side
    else:
        shape = torch.broadcast_shapes(A.shape, B.shape)
        rshape = [1 if i in summed else s for i, s in enumerate(shape)]
        fresh = ctx.fresh(int(torch.Size(rshape).numel())).view(rshape)
        ctx.classes.relate([(1, fresh), (-1, A), (-1, B)])
        res = fresh
    res = res.reshape([res.size(i) for i in range(len(letters)) if i not in summed]) if summed else res
    return ctx.value(res)


def _expand_ellipsis(ea, na, eb, nb, out):
    free = [c for c in string.ascii_letters if c not in ea + eb + out]
    if "..." not in ea + eb + out:
        return ea, eb, out
    k = max(na - len(ea.replace("...", "")), nb - len(eb.replace("...", "")), 0)
    dots = "".join(free[:k])
    def sub(e, n):
        if "..." not in e:
            return e
        m = n - len(e.replace("...", ""))
        return e.replace("...", dots[k - m:] if m else "")
    return sub(ea, na), sub(eb, nb), out.replace("...", dots)


def _to_letters(ids, spec, letters):
    """ids (compact, one dim per letter of spec) laid out over `letters` (size 1 where absent)."""
    while ids.dim() < len(spec):
        ids = ids.unsqueeze(0)
    perm = [spec.index(c) for c in letters if c in spec]
    moved = ids.permute(perm)
    shape, k = [], 0
    for c in letters:
        if c in spec:
            shape.append(moved.size(k))
            k += 1
        else:
            shape.append(1)
    return moved.reshape(shape)


_register([aten.linear], linear)
_register([aten.addmm], addmm)
_register([aten.conv1d, aten.conv2d, aten.conv3d], conv)
_register([aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d], conv_transpose)
_register([aten.convolution, aten._convolution], convolution)
_register([aten.embedding], embedding)
_register([aten.matmul, aten.mm, aten.bmm], matmul)
_register([aten.einsum], einsum)

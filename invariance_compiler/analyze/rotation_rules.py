"""The rotation facet of each op (DESIGN §3.8): how an orthogonal map of a hidden space passes it.
A rule is `rule(walk, node)`, called whenever an input or the output of the node holds channels of
the space (analyze/rotations.py's Walk): it sets labels (walk.set), records folds (walk.record),
splits blocks (walk.refine) or raises NoGroup. They register in the op registry (analyze/rules),
beside each op's scaling rule and inertness facets."""
from __future__ import annotations

import operator

import torch
import torch.fx

from .inert import _as_list, _rerun
from .rotations import (NONE, NoGroup, as_tuple, constant_over_channels, full_labels, last_dim_labels,
                        packet, param_node, vector_labels, whole_instances)
from .rules import _register, aten, lookup, register_op

__all__ = ["same_channels", "rope", "rope_patterns", "register_library_ops"]


def _reg(targets, rule):
    """Register `rule(walk, node)` as the ops' rotation facet: called whenever an input or the
    output of the node holds channels of the space; it sets labels (walk.set), records folds
    (walk.record), or raises NoGroup."""
    _register(targets, rule, facet="rotation")


def same_channels(walk, node):
    """The rotation facet of ops whose output element i is a function of input element i alone and
    commutes with linear maps: to / clone / alias / contiguous / detach / dropout that drops nothing
    (a user's identity-like custom op too): labels pass both ways."""
    if packet(node) in (aten.dropout, aten.native_dropout, aten.feature_dropout):
        p, train = node.args[1], node.args[2] if len(node.args) > 2 else True
        if p and train:
            raise NoGroup(f"{node.name}: dropout in training mode scales channels at random")
    x = node.args[0]
    if x in walk.squares:
        walk.square(node)
        return
    if walk.get(x) is not None:
        walk.set(node, walk.get(x), walk.gain.get(x))
    elif walk.get(node) is not None:
        walk.set(x, walk.get(node), walk.gain.get(node))


_reg([aten._to_copy, aten.to, aten.clone, aten.alias, aten.contiguous, aten.detach, aten.lift_fresh_copy,
      aten.dropout, aten.feature_dropout, aten.type_as], same_channels)


def _movement(walk, node):
    """Views, transposes, expands, slices, splits, concatenation: the labels move with the op;
    backwards, each element of an input takes the label of what it became."""
    inputs = [a for a in node.all_input_nodes if isinstance(walk.shape_or_none(a), torch.Size)]
    if any(a in walk.squares for a in inputs):
        raise NoGroup(f"{node.name}: squares of the space move")
    known = {a: full_labels(walk, a, walk.get(a)) for a in inputs if walk.get(a) is not None}
    gains = [walk.gain[a] for a in known if a in walk.gain]
    gain = gains[0] if gains else None
    if gains and (len(gains) != len(known) or any(not torch.equal(g, gain) for g in gains)):
        raise NoGroup(f"{node.name}: a gain meets another map")
    if known:
        out = _rerun(node, known)
        walk.set(node, tuple(out) if isinstance(out, (list, tuple)) else out, gain)
    if walk.get(node) is None:
        return
    # backwards: which element of each input each output element is
    for a in inputs:
        numel = walk.shape(a).numel()
        src = _rerun(node, {a: torch.arange(numel).view(walk.shape(a))})
        lab = walk.get(node)
        src, lab = as_tuple(src), as_tuple(lab)
        back = torch.full((numel,), NONE, dtype=torch.long)
        for s, l in zip(src, lab):
            s, l = s.reshape(-1), l.expand(s.shape).reshape(-1)
            hit = s >= 0
            back[s[hit]] = l[hit]
        for s, l in zip(src, lab):                         # an element read twice: one label
            s, l = s.reshape(-1), l.expand(s.shape).reshape(-1)
            hit = s >= 0
            if not torch.equal(back[s[hit]], l[hit]):
                raise NoGroup(f"{node.name}: one element would hold two channels")
        walk.set(a, back.view(walk.shape(a)), walk.gain.get(node))


_reg([aten.view, aten._unsafe_view, aten.reshape, aten.flatten, aten.unflatten, aten.permute,
      aten.transpose, aten.t, aten.squeeze, aten.unsqueeze, aten.expand, aten.expand_as, aten.slice,
      aten.select, aten.narrow, aten.split, aten.split_with_sizes, aten.chunk, aten.unbind, aten.movedim,
      aten.cat, aten.concat, aten.stack, aten.view_as, aten.reshape_as, aten.repeat_interleave,
      aten.repeat], _movement)


def _getitem(walk, node):
    src = node.args[0]
    lab = walk.get(src)
    if isinstance(lab, tuple):
        walk.set(node, lab[node.args[1]], walk.gain.get(src))
    elif lab is not None:
        raise NoGroup(f"{node.name}: reads an element of a tensor of the space")
    if walk.get(node) is not None:
        # backwards into a multi-output movement op: its rule runs on the tuple
        shapes = [v.shape for v in src.meta["val"]]
        parts = [torch.full(s, NONE, dtype=torch.long) for s in shapes]
        parts[node.args[1]] = full_labels(walk, node, walk.get(node))
        walk.set(src, tuple(parts), walk.gain.get(node))


register_op(operator.getitem, rotation=_getitem)


def _layer(walk, node, x, w, pw, b, read_axis: int, write_axis: int, channels: int = -1):
    """A layer contracting x's channels (dim `channels`) with the parameter `pw` (read through the
    node `w`) and writing its own channels there, plus a bias b: a reader of x's channels (the fold
    on pw's `read_axis`, x's gain first) and a writer of the output's (pw's `write_axis`, and b)."""
    if walk.get(x) is not None and walk.get(node) is not None:
        raise NoGroup(f"{node.name}: a map from the space into itself")
    if x in walk.squares or any(walk.get(a) is not None for a in (w, b)):
        raise NoGroup(f"{node.name}: reads the space where it cannot be folded")
    for t, axis in ((x, read_axis), (node, write_axis)):
        if walk.get(t) is None:
            continue
        lab = vector_labels(node, full_labels(walk, t, walk.get(t)).movedim(channels, -1))
        whole_instances(walk, node, lab)
        if pw is None:
            raise NoGroup(f"{node.name}: its weight is computed, not a parameter")
        walk.record(node, pw, "vectors", axis=axis, labels=lab, gain=walk.gain.get(x) if t is x else None)
        if t is node and b is not None:
            if param_node(walk, b) is None:
                raise NoGroup(f"{node.name}: its bias is computed, not a parameter")
            walk.record(node, param_node(walk, b), "vectors", axis=0, labels=lab)


def _linear(walk, node):
    """linear(x, W, b), W (out, in)."""
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else None
    _layer(walk, node, x, w, param_node(walk, w), b, 1, 0)


def _addmm(walk, node):
    """addmm(b, x, W) = x @ W + b (GPT-2's Conv1D: W is (in, out))."""
    b, x, w = node.args[:3]
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        raise NoGroup(f"{node.name}: addmm with beta/alpha")
    _layer(walk, node, x, w, param_node(walk, w), b, 0, 1)


def _embedding(walk, node):
    w = node.args[0]
    if walk.get(w) is not None or walk.get(node.args[1]) is not None:
        raise NoGroup(f"{node.name}: the table or the indices hold channels of the space")
    if walk.get(node) is not None:
        lab = last_dim_labels(walk, node, walk.get(node))
        if param_node(walk, w) is None:
            raise NoGroup(f"{node.name}: the table is not a parameter")
        whole_instances(walk, node, lab)
        walk.record(node, param_node(walk, w), "vectors", axis=1, labels=lab)


def _conv(walk, node):
    """conv (groups 1), W (out, in, *kernel): channels along dim 1."""
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else None
    groups = node.args[-1] if packet(node) is aten.convolution else (node.args[6] if len(node.args) > 6 else 1)
    if groups != 1 or (packet(node) is aten.convolution and node.args[6]):
        raise NoGroup(f"{node.name}: a grouped or transposed convolution")
    _layer(walk, node, x, w, param_node(walk, w), b, 1, 0, channels=1)


_reg([aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution], _conv)
_reg([aten.linear], _linear)
_reg([aten.addmm], _addmm)
_reg([aten.embedding], _embedding)


def _add(walk, node):
    """a + b: both hold the same channels (the residual stream; a broadcast operand holds them
    where it varies), or the other operand is a parameter added as a bias (folded like a writer's)."""
    args = list(node.args[:2])
    if any(isinstance(a, torch.fx.Node) and a in walk.squares for a in args):
        raise NoGroup(f"{node.name}: adds squares of the space")
    tensors = [a for a in args if walk.shape_or_none(a) is not None]
    if len(tensors) < 2 and any(not isinstance(a, torch.fx.Node) and a != 0 for a in args):
        if walk.get(tensors[0]) is not None or walk.get(node) is not None:
            raise NoGroup(f"{node.name}: adds a constant to channels of the space")
        return
    gained = [t for t in tensors if walk.gain.get(t) is not None]
    if gained and len(tensors) == 2 and len(gained) == 1 and packet(node) is aten.add and \
            node.kwargs.get("alpha", 1) == 1:
        return _gain_and_bias(walk, node, gained[0], next(t for t in tensors if t is not gained[0]))
    if gained or walk.gain.get(node) is not None:
        raise NoGroup(f"{node.name}: adds a value whose gain would have to be folded")
    lab = walk.get(node)
    if lab is None:
        known = [walk.get(t) for t in tensors if walk.get(t) is not None]
        if not known:
            return
        lab = full_labels(walk, node, known[0])
        walk.set(node, lab)
    lab = full_labels(walk, node, lab)
    for t in tensors:
        shape = walk.shape(t)
        if (p := param_node(walk, t)) is not None:                # a bias, a position embedding
            last = last_dim_labels(walk, node, lab)
            whole_instances(walk, node, last)
            walk.record(node, p, "vectors", axis=len(shape) - 1, labels=last)
            continue
        lead = lab.dim() - len(shape)
        sub = lab
        for d in range(lab.dim()):
            if d < lead or shape[d - lead] == 1:
                if not bool((sub == sub.narrow(d, 0, 1)).all()):
                    raise NoGroup(f"{node.name}: a broadcast operand would hold several channels at once")
                sub = sub.narrow(d, 0, 1)
        walk.set(t, sub.reshape(shape).contiguous())


_reg([aten.add, aten.sub], _add)


def _gain_and_bias(walk, node, x, b):
    """x ⊙ γ + β, γ pending for the readers (a norm written out: F.rms_norm(x) * γ + β): as
    LayerNorm's own β, β becomes (β / γ)·T and the sum keeps x's labels and gain."""
    pb = param_node(walk, b)
    if pb is None or walk.get(b) is not None or len(walk.shape(b)) != 1:
        raise NoGroup(f"{node.name}: adds a value whose gain would have to be folded")
    lab = full_labels(walk, node, walk.get(x))
    walk.record(node, pb, "norm_bias", axis=0, labels=last_dim_labels(walk, node, lab), gain=walk.gain[x])
    walk.set(node, lab, walk.gain[x])


def _gain_of(walk, s):
    """A per-channel gain made of one parameter: γ (a norm's weight) or c + γ (Gemma's 1 + γ), through
    casts. Returns (parameter node, offset c, the gain's values) or None."""
    offset = 0.0
    node = s
    while isinstance(node, torch.fx.Node) and node.op == "call_function":
        p = packet(node)
        if p in (aten._to_copy, aten.to, aten.alias, aten.detach):
            node = node.args[0]
        elif p is aten.add and len(node.args) == 2 and isinstance(node.args[1], (int, float)) \
                and node.kwargs.get("alpha", 1) == 1:
            offset += float(node.args[1])
            node = node.args[0]
        else:
            return None
    if not (isinstance(node, torch.fx.Node) and node.op == "placeholder" and node.name in walk.captured.params):
        return None
    if len(_real_users(node)) != 1:
        return None                            # the gain is read elsewhere: it cannot be set to neutral
    value = walk.params[walk.captured.params[node.name]].detach().double() + offset
    return node, offset, value


def _real_users(node) -> list:
    """The users that compute something (torch.export adds dtype/device asserts)."""
    return [u for u in node.users if packet(u) is not aten._assert_tensor_metadata]


def _mul(walk, node):
    a, b = node.args[:2]
    if packet(node) is aten.mul and a is b and walk.get(a) is not None:
        if walk.gain.get(a) is not None:
            raise NoGroup(f"{node.name}: squares a value with a gain")
        walk.square(node)
        return
    labelled = [t for t in (a, b) if isinstance(t, torch.fx.Node) and (walk.get(t) is not None or t in walk.squares)]
    if len(labelled) != 1:
        if walk.get(node) is not None and not labelled:
            # backwards: x · s with s constant over the channels (a router's weight per token)
            lab = full_labels(walk, node, walk.get(node))
            full = [t for t in (a, b) if walk.shape_or_none(t) == lab.shape]
            rest = [t for t in (a, b) if t not in full[:1]]
            if walk.gain.get(node) is None and full and all(
                    not isinstance(t, torch.fx.Node) or constant_over_channels(walk, lab, walk.shape(t))
                    for t in rest) and (packet(node) is aten.mul or full[0] is a):
                walk.set(full[0], lab)
                return
            raise NoGroup(f"{node.name}: a product would have to hold channels of the space")
        if len(labelled) > 1:
            raise NoGroup(f"{node.name}: multiplies two tensors of the space")
        return
    x = labelled[0]
    if x in walk.squares:
        raise NoGroup(f"{node.name}: scales squares of the space")
    if packet(node) is aten.div and x is not a:
        raise NoGroup(f"{node.name}: divides by channels of the space")
    s = b if x is a else a
    lab = full_labels(walk, node, walk.get(x))
    gain = walk.gain.get(x)
    if not isinstance(s, torch.fx.Node) or constant_over_channels(walk, lab, walk.shape(s)):
        walk.set(node, lab, gain)
        return
    found = _gain_of(walk, s) if packet(node) is aten.mul else None
    if found is None:
        raise NoGroup(f"{node.name}: multiplies channels of the space by a per-channel tensor that is "
                      f"not a parameter (nothing to fold it into)")
    pnode, offset, value = found
    lab_last = last_dim_labels(walk, node, lab)
    if walk.shape(s)[-1] != lab_last.numel() or any(d != 1 for d in walk.shape(s)[:-1]):
        raise NoGroup(f"{node.name}: a gain that is not one value per channel")
    if bool((lab_last < 0).any()):
        raise NoGroup(f"{node.name}: a gain over channels in and out of the space")
    per_channel = torch.ones(walk.size, dtype=torch.float64)
    per_channel[lab_last] = value.reshape(-1)
    new = per_channel if gain is None else gain * per_channel
    walk.record(node, pnode, "neutral", value=1.0 - offset)
    walk.set(node, lab, new)


_reg([aten.mul, aten.div], _mul)


def _pow(walk, node):
    x, e = node.args[:2]
    if walk.get(x) is None:
        raise NoGroup(f"{node.name}: a power of channels of the space")
    if e != 2 or walk.gain.get(x) is not None:
        raise NoGroup(f"{node.name}: x**{e} of channels of the space")
    walk.square(node)


_reg([aten.pow], _pow)


def _reduce(walk, node):
    """sum/mean: of squares over whole blocks, invariant (the map must be orthogonal); of values
    over other dims, the labels stay."""
    x = node.args[0]
    shape = walk.shape(x)
    dims = node.args[1] if len(node.args) > 1 else None
    dims = list(range(len(shape))) if dims is None else [d % len(shape) for d in _as_list(dims)]
    keep = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
    if x in walk.squares:
        src = _square_source(walk, x)
        lab = full_labels(walk, x, walk.get(src))
        kept = [d for d in range(len(shape)) if d not in dims]
        moved = lab.permute(*kept, *dims).reshape(*[shape[d] for d in kept], -1)
        rows = moved.reshape(-1, moved.shape[-1])
        for r in rows.unique(dim=0):
            walk.refine(r)
        walk.orthogonal = True
        return                                                    # invariant: no labels
    lab = walk.get(x)
    if lab is None:                   # backwards: a sum over tokens or experts of vectors of the space
        out = full_labels(walk, node, walk.get(node))
        if walk.gain.get(node) is not None:
            raise NoGroup(f"{node.name}: a reduction would have to hold a gain")
        for d in sorted(dims) if not keep else []:
            out = out.unsqueeze(d)
        walk.set(x, out.expand(shape).contiguous())
        return
    full = full_labels(walk, x, lab)
    for d in dims:
        if not bool((full == full.narrow(d, 0, 1)).all()):
            raise NoGroup(f"{node.name}: sums channels of the space")
    out = full.narrow(dims[0], 0, 1) if dims else full
    for d in dims[1:]:
        out = out.narrow(d, 0, 1)
    if not keep:
        out = out.reshape([shape[d] for d in range(len(shape)) if d not in dims])
    walk.set(node, out.contiguous(), walk.gain.get(x))


def _square_source(walk, node):
    while node in walk.squares:
        if packet(node) is aten.pow or (packet(node) is aten.mul and node.args[0] is node.args[1]):
            return node.args[0]
        node = node.args[0]
    return node


_reg([aten.sum, aten.mean], _reduce)


def _layer_norm(walk, node):
    """layer_norm / rms_norm over the last dim: the map passes when it is orthogonal (and, for
    LayerNorm, fixes 1); its γ goes to the readers, its β becomes (β / γ)·T."""
    x = node.args[0]
    centred = packet(node) is aten.layer_norm
    w = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
    b = node.args[3] if centred and len(node.args) > 3 else node.kwargs.get("bias") if centred else None
    if len(node.args[1]) != 1:
        raise NoGroup(f"{node.name}: a norm over more than the last dim")
    if walk.get(x) is None or walk.gain.get(x) is not None:
        raise NoGroup(f"{node.name}: normalises a tensor with a gain, or its output alone is in the space")
    lab = full_labels(walk, x, walk.get(x))
    last = last_dim_labels(walk, x, lab)
    if bool((last < 0).any()):
        raise NoGroup(f"{node.name}: normalises channels in and out of the space")
    walk.refine(last)
    walk.orthogonal = True
    walk.centred = walk.centred or centred
    gain = None
    if w is not None:
        pw = param_node(walk, w)
        if pw is None or len(_real_users(pw)) != 1:
            raise NoGroup(f"{node.name}: its weight is computed or read elsewhere")
        value = walk.params[walk.captured.params[pw.name]].detach().double()
        gain = torch.ones(walk.size, dtype=torch.float64)
        gain[last] = value
        walk.record(node, pw, "neutral", value=1.0)
    if b is not None:
        pb = param_node(walk, b)
        if pb is None:
            raise NoGroup(f"{node.name}: its bias is computed")
        walk.record(node, pb, "norm_bias", axis=0, labels=last, gain=gain)
    walk.set(node, lab, gain)


_reg([aten.layer_norm, aten.rms_norm], _layer_norm)


def _sdpa(walk, node):
    """Attention is linear in its values, head by head: the values' channels split into one block
    per key/value head, and the output holds the block of the head each query head reads. Its
    scores q·kᵀ are unchanged when queries and keys get the same orthogonal map, per key/value
    head (a query head takes its key head's map under GQA): the output is then invariant."""
    q, k, v = node.args[:3]
    others = [a for a in list(node.args[3:]) + list(node.kwargs.values()) if isinstance(a, torch.fx.Node)]
    if any(walk.get(t) is not None or t in walk.squares for t in others) or q in walk.squares or k in walk.squares:
        raise NoGroup(f"{node.name}: the mask or squares hold channels of the space")
    if walk.get(q) is not None or walk.get(k) is not None:
        return _scores(walk, node, q, k, v)
    if walk.get(v) is None:
        raise NoGroup(f"{node.name}: its output alone would hold channels of the space")
    if walk.gain.get(v) is not None:
        raise NoGroup(f"{node.name}: values with a gain")
    lab = full_labels(walk, v, walk.get(v))
    if lab.dim() < 2 or not bool((lab == lab.narrow(-2, 0, 1)).all()):
        raise NoGroup(f"{node.name}: the values' channels vary along the sequence")
    heads = lab.narrow(-2, 0, 1)                                       # (..., Hkv, 1, dh)
    for r in heads.reshape(-1, heads.shape[-1]).unique(dim=0):
        walk.refine(r)
    out_shape = walk.shape(node)
    if heads.dim() >= 3 and heads.shape[-3] != out_shape[-3]:          # enable_gqa: query heads share
        heads = heads.repeat_interleave(out_shape[-3] // heads.shape[-3], dim=-3)
    walk.heads = True
    walk.set(node, heads.expand(out_shape).contiguous())


def _per_head(walk, t):
    """(..., H, dh) labels of q or k, which must not vary along the sequence."""
    lab = full_labels(walk, t, walk.get(t))
    if lab.dim() < 3 or not bool((lab == lab.narrow(-2, 0, 1)).all()):
        raise NoGroup(f"{t.name}: channels vary along the sequence")
    return lab.narrow(-2, 0, 1)                                        # (..., H, 1, dh)


def _scores(walk, node, q, k, v):
    if walk.get(v) is not None or walk.get(node) is not None:
        raise NoGroup(f"{node.name}: values and queries/keys in one space")
    if any(walk.gain.get(t) is not None for t in (q, k)):
        raise NoGroup(f"{node.name}: queries or keys with a gain")
    hq, hk = walk.shape(q)[-3], walk.shape(k)[-3]
    if hq % hk:
        raise NoGroup(f"{node.name}: {hq} query heads over {hk} key heads")
    if walk.get(k) is None:                                            # keys from the queries
        lq = _per_head(walk, q)
        lk = lq[..., :: hq // hk, :, :]
        if not torch.equal(lk.repeat_interleave(hq // hk, dim=-3), lq):
            raise NoGroup(f"{node.name}: the query heads of one key head would need different maps")
        walk.set(k, lk.expand(walk.shape(k)).contiguous())
        return
    lk = _per_head(walk, k)
    lq = lk.repeat_interleave(hq // hk, dim=-3)
    if walk.get(q) is None:
        walk.set(q, lq.expand(walk.shape(q)).contiguous())
    elif not torch.equal(_per_head(walk, q), lq):
        raise NoGroup(f"{node.name}: queries and keys would get different maps")
    for r in lk.reshape(-1, lk.shape[-1]).unique(dim=0):
        walk.refine(r)
    walk.orthogonal = walk.qk = True                                   # q·kᵀ = (qQ)·(kQ)ᵀ


_reg([aten.scaled_dot_product_attention], _sdpa)


def rope(walk, add):
    """x·cos + rotate_half(x)·sin (RoPE, as transformers writes it), one rule: it rotates each
    frequency plane (channel j with j + d/2) by an angle of the position, so a map passes it when it
    rotates each plane (SO(2) commutes with SO(2)). cos and sin are cat([f, f]) (checked on the
    graph by `_rope_patterns`), so both channels of a plane see one angle."""
    x, inner = walk.rope[add]
    if walk.get(x) is None and walk.get(add) is None:
        return
    if x in walk.squares or walk.gain.get(x) is not None or walk.gain.get(add) is not None:
        raise NoGroup(f"{add.name}: RoPE of squares or of a value with a gain")
    if any(walk.get(a) is not None for n in inner for a in n.all_input_nodes if a is not x and a not in inner):
        raise NoGroup(f"{add.name}: RoPE's angles depend on the space")
    if walk.get(x) is None:
        walk.set(x, full_labels(walk, add, walk.get(add)).contiguous())
        return
    lab = full_labels(walk, x, walk.get(x))
    h = lab.shape[-1] // 2
    planes = torch.stack([lab[..., :h], lab[..., h:]], dim=-1).reshape(-1, 2).unique(dim=0)
    if bool(((planes[:, 0] < 0) != (planes[:, 1] < 0)).any()):     # every head's vector, every token
        raise NoGroup(f"{add.name}: half of a RoPE plane in the space")
    for a, b in planes[planes[:, 0] >= 0].tolist():
        walk.refine(torch.tensor([a, b]))
    walk.proper = walk.orthogonal = True
    walk.set(add, lab.contiguous())


def rope_patterns(gm) -> dict:
    """{add node: (x, the nodes inside)} for every x·c + cat([-x[..., h:], x[..., :h]])·s in the
    graph whose c and s are cos/sin of cat([f, f]) and whose inner nodes have no other reader."""
    found = {}
    for add in gm.graph.nodes:
        if add.op != "call_function" or packet(add) is not aten.add or len(add.args) != 2 or \
                add.kwargs.get("alpha", 1) != 1 or not all(isinstance(a, torch.fx.Node) for a in add.args):
            continue
        muls = list(add.args)
        if any(packet(m) is not aten.mul or len(m.args) != 2 for m in muls):
            continue
        for straight, turned in (muls, muls[::-1]):
            cat = next((a for a in turned.args if isinstance(a, torch.fx.Node) and packet(a) is aten.cat), None)
            if cat is None:
                continue
            s_node = next(a for a in turned.args if a is not cat)
            half = _rotate_half(cat)
            if half is None:
                continue
            x, parts = half
            if x not in straight.args:
                continue
            c_node = next((a for a in straight.args if a is not x), None)
            if not (_doubled(c_node, aten.cos) and _doubled(s_node, aten.sin)):
                continue
            inner = {straight, turned, cat, *parts}
            if all(set(n.users) <= inner | {add} for n in inner):
                found[add] = (x, inner)
            break
    return found


def _rotate_half(cat):
    """(x, the slice/neg nodes) when cat is cat([-x[..., h:], x[..., :h]], -1) with h half x's last dim."""
    if len(cat.args[0]) != 2 or (cat.args[1] if len(cat.args) > 1 else 0) not in (-1,):
        if not (len(cat.args) > 1 and len(cat.args[0]) == 2 and
                cat.args[1] == len(cat.meta["val"].shape) - 1):
            return None
    neg, lo = cat.args[0]
    if not (isinstance(neg, torch.fx.Node) and packet(neg) is aten.neg and isinstance(lo, torch.fx.Node)):
        return None
    hi = neg.args[0]
    if packet(hi) is not aten.slice or packet(lo) is not aten.slice or hi.args[0] is not lo.args[0]:
        return None
    x = hi.args[0]
    d = x.meta["val"].shape[-1]
    last = (-1, len(x.meta["val"].shape) - 1)
    if hi.args[1] not in last or lo.args[1] not in last or d % 2:
        return None
    if tuple(lo.args[2:4]) != (0, d // 2) or hi.args[2] != d // 2 or hi.args[3] < d:
        return None
    return x, {neg, hi, lo}


def _doubled(node, fn) -> bool:
    """Whether `node` is fn(cat([f, f], -1)) up to casts, unsqueezes and scalar factors: both halves
    of the last dim hold the same values, whatever the positions."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function":
        p = packet(node)
        if p in (aten._to_copy, aten.to, aten.alias, aten.unsqueeze, aten.detach):
            node = node.args[0]
        elif p is aten.mul and len(node.args) == 2 and isinstance(node.args[1], (int, float)):
            node = node.args[0]
        elif p is fn:
            src = node.args[0]
            return (isinstance(src, torch.fx.Node) and packet(src) is aten.cat and len(src.args[0]) == 2
                    and src.args[0][0] is src.args[0][1]
                    and (src.args[1] if len(src.args) > 1 else 0) in (-1, len(src.meta["val"].shape) - 1))
        else:
            return False
    return False


def _matmul(walk, node):
    """P @ v with v holding the space along its last dim (attention written out): as _sdpa. Or the
    scores q @ kᵀ, with the space along q's last dim and kᵀ's rows: as _sdpa's scores."""
    a, b = node.args[:2]
    if a in walk.squares or b in walk.squares:
        raise NoGroup(f"{node.name}: contracts over squares of the space")
    if walk.get(a) is not None or (walk.get(b) is not None and not _rows_only(walk, b)):
        return _written_scores(walk, node, a, b)
    if walk.get(b) is None:
        raise NoGroup(f"{node.name}: its output alone would hold channels of the space")
    lab = full_labels(walk, b, walk.get(b))
    if lab.dim() < 2 or not bool((lab == lab.narrow(-2, 0, 1)).all()) or walk.gain.get(b) is not None:
        raise NoGroup(f"{node.name}: the channels vary along the contracted dim")
    rows = lab.narrow(-2, 0, 1)
    for r in rows.reshape(-1, rows.shape[-1]).unique(dim=0):
        walk.refine(r)
    walk.heads = True
    walk.set(node, rows.expand(walk.shape(node)).contiguous())


def _rows_only(walk, b) -> bool:
    """Whether b's labels vary along its last dim only (v of P @ v), not along the contracted one."""
    lab = full_labels(walk, b, walk.get(b))
    return lab.dim() >= 2 and bool((lab == lab.narrow(-2, 0, 1)).all())


def _written_scores(walk, node, q, kt):
    """q @ kᵀ, (..., H, S, d) @ (..., H, d, S'), both holding the space along d (kᵀ's rows): unchanged
    when q and k get the same orthogonal map per head. The keys are repeated to the query heads
    before (GQA), so each head's maps already agree; the scores hold nothing of the space."""
    if walk.get(node) is not None or any(walk.gain.get(t) is not None for t in (q, kt)):
        raise NoGroup(f"{node.name}: scores that hold the space, or queries/keys with a gain")
    if len(walk.shape(q)) < 3 or len(walk.shape(kt)) != len(walk.shape(q)):
        raise NoGroup(f"{node.name}: not per-head scores")
    if walk.get(q) is not None:
        lq = _per_head(walk, q)                                        # (..., H, 1, d)
        lk = lq.transpose(-1, -2)                                      # (..., H, d, 1)
        if walk.get(kt) is None:
            walk.set(kt, lk.expand(walk.shape(kt)).contiguous())
            return
        full = full_labels(walk, kt, walk.get(kt))
        if not bool((full == full.narrow(-1, 0, 1)).all()) or not torch.equal(full.narrow(-1, 0, 1), lk):
            raise NoGroup(f"{node.name}: queries and keys would get different maps")
    else:
        full = full_labels(walk, kt, walk.get(kt))
        if not bool((full == full.narrow(-1, 0, 1)).all()):
            raise NoGroup(f"{node.name}: the keys' channels vary along the sequence")
        lq = full.narrow(-1, 0, 1).transpose(-1, -2)
        walk.set(q, lq.expand(walk.shape(q)).contiguous())
    for r in lq.reshape(-1, lq.shape[-1]).unique(dim=0):
        walk.refine(r)
    walk.orthogonal = walk.qk = True                                   # q·kᵀ = (qQ)·(kQ)ᵀ


_reg([aten.matmul, aten.bmm], _matmul)


def _index_rows(walk, node):
    """x[idx] along the leading dim (a mixture of experts gathering its tokens): each row keeps its
    channels, when they do not vary from row to row."""
    x, indices = node.args[0], node.args[1]
    if len(indices) != 1 or indices[0] is None or walk.get(indices[0]) is not None:
        raise NoGroup(f"{node.name}: indexes channels of the space")
    if walk.get(x) is not None:
        lab = full_labels(walk, x, walk.get(x))
        if not bool((lab == lab.narrow(0, 0, 1)).all()):
            raise NoGroup(f"{node.name}: gathers rows that hold different channels")
        walk.set(node, lab.narrow(0, 0, 1).expand(walk.shape(node)).contiguous(), walk.gain.get(x))
    elif walk.get(node) is not None:
        lab = full_labels(walk, node, walk.get(node))
        if not bool((lab == lab.narrow(0, 0, 1)).all()):
            raise NoGroup(f"{node.name}: gathers rows that hold different channels")
        walk.set(x, lab.narrow(0, 0, 1).expand(walk.shape(x)).contiguous(), walk.gain.get(node))


_reg([aten.index], _index_rows)


def _grouped_mm(walk, node):
    """grouped_mm(x, W, offsets): x @ W[e] for the rows of expert e, W (E, in, out), a parameter
    (E, out, in) transposed as transformers stores its experts: a reader of x's channels and a writer
    of the output's, folded into the parameter's `in` or `out` axis."""
    x, w = node.args[0], node.args[1]
    transposed = isinstance(w, torch.fx.Node) and packet(w) is aten.transpose and \
        sorted(d % 3 for d in w.args[1:3]) == [1, 2]
    p = param_node(walk, w.args[0] if transposed else w)
    if p is None or len(walk.shape(p)) != 3:
        raise NoGroup(f"{node.name}: its weights are not one (E, ., .) parameter")
    _layer(walk, node, x, w, p, None, 2 if transposed else 1, 1 if transposed else 2)


_reg([aten._grouped_mm], _grouped_mm)


def register_library_ops() -> None:
    """Ops that other libraries define when they are imported (transformers' CPU grouped_mm)."""
    lib = getattr(torch.ops, "transformers", None)
    op = getattr(lib, "grouped_mm_fallback", None) if lib is not None else None
    if op is not None and lookup(op.default, "rotation") is None:
        _reg([op], _grouped_mm)


def _no_effect(walk, node):
    pass


_reg([aten._assert_tensor_metadata, aten.sym_size, aten.sym_numel, aten.sym_stride], _no_effect)

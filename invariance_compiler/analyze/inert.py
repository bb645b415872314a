"""Inert parameters, proven (DESIGN §3.2): a parameter entry is inert when the output does not depend
on it. Two proofs: no node reads it, or every place it is added (a bias of linear/conv/a normaliser,
an added parameter) starts a perturbation that dies before the output.

The perturbation δ an additive entry makes is followed forward through the ops that are linear in
it, as a compact pattern tensor: elements with the same id carry the same function of δ, -1 none.
Movement ops move the pattern exactly (the op runs on it); sums and contractions keep what they
can (a Linear keeps a perturbation that is constant over positions constant over positions; x - x'
with equal patterns cancels: PoolFormer's pooling minus identity); a
centring normaliser over dims along which the pattern is constant removes it (BatchNorm and
InstanceNorm per channel, LayerNorm over the normalised vector, GroupNorm per group), and so does a
softmax over a dim along which it is constant (a key bias: softmax ignores a per-query shift).
Anything else, or reaching the output, leaves the entry unproven: it stays in the group's algebra."""
from __future__ import annotations

import operator

import torch
import torch.fx

from ..trace import Captured
from .rules import _register, aten, lookup
from .value import compact

__all__ = ["prove_inert"]

NONE = -1
KILLED = "killed"


class _Fail(Exception):
    pass


def _packet(node):
    return getattr(node.target, "overloadpacket", node.target)


def prove_inert(captured: Captured, params: dict) -> dict[str, torch.Tensor]:
    """{parameter name: flat indices of its entries proven inert}."""
    gm = captured.gm
    order = list(gm.graph.nodes)
    masks: dict[str, torch.Tensor] = {}
    for ph in gm.graph.nodes:
        name = captured.params.get(ph.name)
        if ph.op != "placeholder" or name is None:
            continue
        p = params[name]
        if not (p.requires_grad and p.is_floating_point()):
            continue
        numel = p.numel()
        # a tied parameter has a placeholder per name: an entry must be proven through all of them
        proven = masks.setdefault(name, torch.ones(numel, dtype=torch.bool))
        for use, entries, slot in _terminal_uses(ph, numel, p.shape):
            if not bool(proven.any()):
                break
            budget = [_BISECTIONS, _HALVINGS]
            for bad in _unproven(gm, order, use, slot, entries, budget):
                proven[bad] = False
    return {name: m.nonzero().reshape(-1) for name, m in masks.items() if bool(m.any())}


_BISECTIONS = 64     # sweeps per use spent on telling inert entries from the others
_HALVINGS = 4        # of which blind halvings, after the ids were mixed: past a Linear every entry
                     # reaches every output, so halves rarely differ (a LayerNorm's β spent 64
                     # sweeps on them, half of ViT-B/16's analysis)


def _unproven(gm, order, use, slot, entries, budget):
    """Flat entries of this use whose perturbation is not proven to die. A sweep that fails where the
    raw entries arrive (their ids not yet mixed) is run again on the groups it tells apart: the
    entries that reached the failing op and those that did not, or, when they all did, the entries
    of each perturbed input (a qkv bias: its q and k parts meet in the logits; alone, the k part
    dies in the softmax). When the ids were mixed first, the entries are split in halves, a few
    times. All of it while the budget lasts; what is left unproven is not inert."""
    verdict, groups = _proven(gm, order, use, slot, entries)
    if verdict is True:
        return
    budget[0] -= 1
    flat = entries.reshape(-1)
    live = flat[flat >= 0]
    if verdict is _NOT_ADDITIVE or budget[0] <= 0 or live.numel() == 1:
        yield live
        return
    if groups is not None:
        reached = torch.cat(groups).unique()
        if bool(torch.isin(live, reached).all()):
            if len(groups) == 1:
                yield live            # every entry reaches the failing op, and alone
                return
            parts, seen = [], torch.zeros(0, dtype=torch.long)
            for g in groups:
                part = live[torch.isin(live, g) & ~torch.isin(live, seen)]
                seen = torch.cat([seen, part])
                parts.append(part)
        else:
            parts = [live[torch.isin(live, reached)], live[~torch.isin(live, reached)]]
    elif _splittable(use, slot, entries) and budget[1] > 0:
        budget[1] -= 1
        half = live.numel() // 2
        parts = [live[:half], live[half:]]
    else:
        yield live
        return
    for part in parts:
        if part.numel():
            sub = torch.where(torch.isin(flat, part), flat, NONE)
            yield from _unproven(gm, order, use, slot, sub.view(entries.shape), budget)


def _splittable(use, slot, entries) -> bool:
    return entries.dim() == 1


def _terminal_uses(ph, numel, shape):
    """(node, entry map of the argument, argument position) for every non-view op reading the
    parameter; the entry map says which parameter entry each element of the argument is."""
    stack = [(ph, torch.arange(numel).view(shape))]
    while stack:
        node, entries = stack.pop()
        for user in node.users:
            if user.op != "call_function":
                yield user, entries, None
                continue
            if user.target is operator.getitem:
                stack.append((user, entries[user.args[1]] if isinstance(entries, (list, tuple)) else entries))
                continue
            if lookup(user.target, "inert") is view_step and user.args and user.args[0] is node and \
                    _packet(user) not in (aten.cat, aten.concat, aten.stack):
                try:
                    moved = _rerun(user, {node: entries})
                except Exception:
                    yield user, entries, None
                    continue
                stack.append((user, moved))
                continue
            slots = [i for i, a in enumerate(user.args) if a is node]
            yield user, entries, (slots[0] if len(slots) == 1 and node not in user.kwargs.values() else None)


def _rerun(node, sub: dict):
    """Run node's op with some argument nodes replaced by integer pattern tensors, the others by
    their example values (shapes)."""
    def arg(a):
        if isinstance(a, torch.fx.Node):
            if a in sub:
                return sub[a]
            v = a.meta.get("val")
            if isinstance(v, torch.Tensor):
                return torch.full(v.shape, NONE, dtype=torch.long)
            return v
        if isinstance(a, (list, tuple)):
            return type(a)(arg(x) for x in a)
        return a
    target = node.target
    if _packet(node) in (aten.view, aten._unsafe_view):
        target = aten.reshape.default
    if _packet(node) in (aten._to_copy, aten.to, aten.type_as, aten.lift_fresh_copy, aten.detach, aten.alias):
        return sub[node.args[0]].clone()
    kwargs = {k: arg(v) for k, v in node.kwargs.items() if k not in ("dtype", "memory_format", "layout",
                                                                     "device", "pin_memory")}
    return target(*[arg(a) for a in node.args], **kwargs)


_NOT_ADDITIVE = "not additive"


def _proven(gm, order, use, slot, entries):
    """(verdict, groups): whether the perturbation of the parameter entries `entries` at argument
    `slot` of `use` dies (True / False, or _NOT_ADDITIVE when the use does not add the entries at
    all), and on failure the raw entries of each perturbed input of the failing op (None when some
    ids were mixed on the way)."""
    raw = torch.where(entries >= 0, entries + RAW, NONE)      # raw entry ids, apart from derived ones
    try:
        start = _start(use, slot, raw)
    except _Fail:
        return _NOT_ADDITIVE, None
    if start is KILLED:
        return True, None
    state = {use: start}
    for node in order[order.index(use) + 1:]:
        hit = [a for a in node.all_input_nodes if a in state]
        if not hit:
            continue
        try:
            if node.op == "output":
                raise _Fail
            res = _step(node, state)
        except Exception:             # _Fail, or an op our pattern trick cannot run: not proven
            return False, _raw_entries([state[a] for a in hit])
        if res is KILLED or res is None or (isinstance(res, torch.Tensor) and bool((res == NONE).all())):
            continue                  # nothing of the perturbation left here
        state[node] = res
    return True, None


RAW = 1 << 60       # raw entry e is id RAW + e; ids that sums and contractions derive are small


def _raw_entries(patterns):
    """The raw entries in each perturbed input's pattern, or None when some ids were mixed."""
    out = []
    for p in patterns:
        vals = [t.reshape(-1) for t in (p if isinstance(p, (list, tuple)) else [p]) if isinstance(t, torch.Tensor)]
        v = torch.cat(vals).unique() if vals else torch.zeros(0, dtype=torch.long)
        v = v[v != NONE]
        if not bool((v >= RAW).all()):
            return None
        out.append(v - RAW)
    return out


def _start(use, slot, entries):
    """The pattern at the output of the op where the entries are added (the op's `adds` facet)."""
    out = use.meta.get("val")
    if isinstance(out, (tuple, list)):
        out = out[0]
    rule = lookup(use.target, "adds")
    if not isinstance(out, torch.Tensor) or rule is None:
        raise _Fail
    return rule(use, slot, entries, out.dim())


def _lead(entries, nd):
    e = entries
    while e.dim() < nd:
        e = e.unsqueeze(0)
    return e


def _adds_linear(use, slot, entries, nd):                # linear(x, W, b): b at slot 2
    if slot == 2:
        return entries.reshape((1,) * (nd - 1) + (-1,))
    raise _Fail


def _adds_addmm(use, slot, entries, nd):                 # addmm(b, x, W): b at slot 0
    if slot == 0 and entries.dim() == 1:
        return entries.reshape((1,) * (nd - 1) + (-1,))
    raise _Fail


def _adds_channel(at):
    """conv's bias (slot 2), batch_norm's β (slot 2), group_norm's β (slot 3): one per channel."""
    def adds(use, slot, entries, nd):
        if slot == at:
            return _channel_pattern(entries, nd)
        raise _Fail
    return adds


def _adds_add(use, slot, entries, nd):                   # a + p, a - p
    if slot in (0, 1) and use.args[0] is not use.args[1]:
        return _lead(entries, nd)
    raise _Fail


def _adds_layer_norm(use, slot, entries, nd):            # layer_norm(x, shape, γ, β): β at slot 3
    if slot == 3:
        return _lead(entries, nd)
    raise _Fail


def _channel_pattern(entries, nd):
    shape = [1] * nd
    shape[1 if nd > 1 else 0] = entries.numel()
    return entries.reshape(shape)


def _constant_along(P, dims) -> bool:
    return all(P.size(d) == 1 for d in dims)


def _rows(P, dims):
    """Ids of P's slices along `dims` (equal slices, equal ids); the dims become size 1."""
    dims = [d % P.dim() for d in dims]
    if _constant_along(P, dims):
        return P
    keep = [d for d in range(P.dim()) if d not in dims]
    moved = P.permute(*keep, *dims)
    flat = moved.reshape(*moved.shape[:len(keep)], -1)
    if bool((flat == NONE).all()):
        return torch.full([P.size(d) if d in keep else 1 for d in range(P.dim())], NONE, dtype=torch.long)
    uniq, inv = flat.reshape(-1, flat.shape[-1]).unique(dim=0, return_inverse=True)
    none_row = (uniq == NONE).all(dim=1)
    ids = torch.where(none_row[inv], NONE, inv)
    return ids.reshape([P.size(d) if d in keep else 1 for d in range(P.dim())])


def _vary(P, shape, dims):
    """Make P's ids distinct along `dims` (sizes from `shape`): the perturbation is multiplied by
    something that varies there. Ids stay below RAW: (rank of P's id) x positions + position."""
    dims = [d % len(shape) for d in dims]
    P = P.reshape((1,) * (len(shape) - P.dim()) + tuple(P.shape))
    uniq, rank = P.reshape(-1).unique(return_inverse=True)
    rank = rank.view(P.shape)
    target = [shape[d] if d in dims else P.size(d) for d in range(len(shape))]
    idx = torch.zeros([shape[d] if d in dims else 1 for d in range(len(shape))], dtype=torch.long)
    for d in dims:
        view = [1] * len(shape)
        view[d] = shape[d]
        idx = idx * shape[d] + torch.arange(shape[d]).view(view)
    positions = idx.numel()
    out = rank.expand(target) * positions + idx.expand(target)
    return compact(torch.where(P.expand(target) == NONE, NONE, out))


def _step(node, state):
    """The pattern after `node` (the op's `inert` facet; getitem picks from a tuple)."""
    if node.target is operator.getitem:
        src = state[node.args[0]]
        if isinstance(src, (list, tuple)):
            return src[node.args[1]]
        raise _Fail
    rule = lookup(node.target, "inert")
    if rule is None:
        raise _Fail
    return rule(node, state)


def _perturbed(node, state):
    return [a for a in node.all_input_nodes if a in state]


def _first_only(node, state):
    """The pattern of the op's first argument, when it is the only perturbed input."""
    if _perturbed(node, state) != [node.args[0]]:
        raise _Fail
    return state[node.args[0]]


def view_step(node, state):
    """The `inert` facet of movement ops: the pattern moves exactly (the op runs on it)."""
    return _map(_rerun(node, {a: state[a].expand(a.meta["val"].shape) if isinstance(state[a], torch.Tensor)
                              else state[a] for a in _perturbed(node, state)}))


def _add_step(node, state):
    p, args, out = _packet(node), node.args, node.meta.get("val")
    parts = [state[a].expand(out.shape) for a in _perturbed(node, state)]
    if len(parts) == 1:
        return compact(parts[0].contiguous())
    if p is aten.sub and len(args) == 2 and node.kwargs.get("alpha", 1) == 1 and \
            torch.equal(parts[0], parts[1]) and args[0] is not args[1]:
        return KILLED             # equal ids: the same function of δ on both sides, x - x'
    pairs = torch.stack([x.reshape(-1) for x in parts], dim=1)
    _, inv = pairs.unique(dim=0, return_inverse=True)
    none = (pairs == NONE).all(dim=1)
    return compact(torch.where(none, NONE, inv).view(out.shape))


def _mul_step(node, state):
    p, args, out = _packet(node), node.args, node.meta.get("val")
    perturbed = _perturbed(node, state)
    other = [a for a in args if a not in perturbed]
    if len(perturbed) != 1 or (p is aten.div and args[0] not in perturbed):
        raise _Fail
    P = state[perturbed[0]]
    o = other[0] if other else None
    if isinstance(o, torch.fx.Node):
        oshape = o.meta["val"].shape
        lead = len(out.shape) - len(oshape)
        dims = [lead + i for i, s in enumerate(oshape) if s > 1]
        return _vary(P, out.shape, dims)
    return P


def _contract_last(arg):
    """addmm(b, x, W) (arg 1), linear(x, W) (arg 0): the perturbation of x, summed over its last dim."""
    def step(node, state):
        out = node.meta.get("val")
        x = node.args[arg]
        if _perturbed(node, state) != [x]:
            raise _Fail
        return _vary(_rows(state[x], [-1]), out.shape, [out.dim() - 1])
    return step


def _conv_step(node, state):
    args, out = node.args, node.meta.get("val")
    P = _first_only(node, state)
    padding = args[4] if len(args) > 4 else 0
    if not _constant_along(P, range(2, P.dim())) or (isinstance(padding, str) and padding != "valid") \
            or (not isinstance(padding, str) and any(_as_list(padding))):
        raise _Fail
    return _vary(_rows(P, [1]), out.shape, [1])


def _matmul_step(node, state):
    out = node.meta.get("val")
    perturbed = _perturbed(node, state)
    a, b = node.args[0], node.args[1]
    if len(perturbed) != 1 or a.meta["val"].dim() < 2 or b.meta["val"].dim() < 2:
        raise _Fail
    if b in perturbed:
        P = _rows(state[b].expand(b.meta["val"].shape), [-2])            # (..., 1, j)
        others = [d for d in range(out.dim()) if d != out.dim() - 1]
    else:
        P = _rows(state[a].expand(a.meta["val"].shape), [-1])            # (..., i, 1)
        others = [d for d in range(out.dim()) if d != out.dim() - 2]
    while P.dim() < out.dim():
        P = P.unsqueeze(0)
    return _vary(P, out.shape, others)


def _softmax_step(node, state):
    if len(_perturbed(node, state)) != 1:
        raise _Fail
    P = state[node.args[0]]
    return KILLED if _constant_along(P, [node.args[1] % P.dim()]) else _fail()


def _sdpa_step(node, state):
    if _perturbed(node, state) != [node.args[1]]:
        raise _Fail
    P = state[node.args[1]]
    return KILLED if _constant_along(P, [P.dim() - 2]) else _fail()


def _bn_step(node, state):
    P = _first_only(node, state)
    if _bn_training(node) and _constant_along(P, [d for d in range(P.dim()) if d != 1]):
        return KILLED
    raise _Fail


def _layer_norm_step(node, state):
    P = _first_only(node, state)
    if _constant_along(P, range(P.dim() - len(node.args[1]), P.dim())):
        return KILLED
    raise _Fail


def _group_norm_step(node, state):
    P = _first_only(node, state)
    if _constant_along(P, range(2, P.dim())) and P.size(1) == 1:
        return KILLED
    groups = node.args[1]
    if _constant_along(P, range(2, P.dim())) and P.size(1) > 1:
        g = P.reshape(P.size(0), groups, -1)
        if bool((g == g[:, :, :1]).all()):
            return KILLED
    raise _Fail


def _max_pool_step(node, state):
    P = _first_only(node, state)
    if _constant_along(P, range(2, P.dim())):
        return _map_first(P, node.meta.get("val"))
    raise _Fail


def _avg_pool_step(node, state):
    args = node.args
    P = _first_only(node, state)
    padding = args[3] if len(args) > 3 else 0
    include_pad = args[5] if len(args) > 5 else True
    divisor = args[6] if len(args) > 6 else None
    # the mean of a constant is that constant unless zero padding enters the count
    if _constant_along(P, range(2, P.dim())) and divisor is None and \
            (not any(_as_list(padding)) or not include_pad):
        return P
    raise _Fail


def _reduce_step(node, state):
    args = node.args
    P = _first_only(node, state)
    dims = args[1] if len(args) > 1 else None
    dims = list(range(P.dim())) if dims is None else [d % P.dim() for d in _as_list(dims)]
    keep = len(args) > 2 and args[2]
    R = _rows(P, dims)
    if not keep:
        R = R.reshape([R.size(d) for d in range(R.dim()) if d not in dims])
    return R


def _dropout_step(node, state):
    if node.args[2]:
        raise _Fail
    return state[node.args[0]]


_VIEWS = [aten.view, aten._unsafe_view, aten.reshape, aten.flatten, aten.unflatten, aten.permute,
          aten.transpose, aten.t, aten.numpy_T, aten.squeeze, aten.unsqueeze, aten.expand,
          aten.expand_as, aten.slice, aten.select, aten.narrow, aten.split, aten.split_with_sizes,
          aten.chunk, aten.unbind, aten.alias, aten.clone, aten.contiguous, aten._to_copy, aten.to,
          aten.detach, aten.lift_fresh_copy, aten.repeat, aten.movedim, aten.swapaxes, aten.flip,
          aten.roll, aten.pixel_shuffle, aten.pixel_unshuffle, aten.channel_shuffle, aten.tile,
          aten.cat, aten.concat, aten.stack, aten.view_as, aten.reshape_as, aten.type_as]
_CONV = [aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution]
_BN = [aten.batch_norm, aten._native_batch_norm_legit_functional, aten._native_batch_norm_legit,
       aten.native_batch_norm, aten.instance_norm]
_register(_VIEWS, view_step, "inert")
_register([aten.add, aten.sub], _add_step, "inert")
_register([aten.add, aten.sub], _adds_add, "adds")
_register([aten.mul, aten.div], _mul_step, "inert")
_register([aten.addmm], _contract_last(1), "inert")
_register([aten.addmm], _adds_addmm, "adds")
_register([aten.linear], _contract_last(0), "inert")
_register([aten.linear], _adds_linear, "adds")
_register(_CONV, _conv_step, "inert")
_register(_CONV, _adds_channel(2), "adds")
_register([aten.matmul, aten.bmm, aten.mm], _matmul_step, "inert")
_register([aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax], _softmax_step, "inert")
_register([aten.scaled_dot_product_attention], _sdpa_step, "inert")
_register(_BN, _bn_step, "inert")
_register(_BN, _adds_channel(2), "adds")
_register([aten.layer_norm], _layer_norm_step, "inert")
_register([aten.layer_norm], _adds_layer_norm, "adds")
_register([aten.group_norm], _group_norm_step, "inert")
_register([aten.group_norm], _adds_channel(3), "adds")
_register([aten.max_pool1d, aten.max_pool2d, aten.max_pool3d, aten.max_pool2d_with_indices,
           aten.adaptive_avg_pool1d, aten.adaptive_avg_pool2d, aten.adaptive_avg_pool3d,
           aten._adaptive_avg_pool2d, aten.adaptive_max_pool1d, aten.adaptive_max_pool2d,
           aten.adaptive_max_pool3d], _max_pool_step, "inert")
_register([aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d], _avg_pool_step, "inert")
_register([aten.sum, aten.mean], _reduce_step, "inert")
_register([aten.dropout], _dropout_step, "inert")


def _fail():
    raise _Fail


def _map_first(P, out):
    if isinstance(out, (tuple, list)):
        return (P, None)
    return P


def _map(res):
    if isinstance(res, (list, tuple)):
        return type(res)(compact(r) if isinstance(r, torch.Tensor) else r for r in res)
    return compact(res)


def _as_list(v):
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _bn_training(node) -> bool:
    p = _packet(node)
    if p is aten.batch_norm:
        return bool(node.args[5]) or node.args[3] is None
    if p is aten._native_batch_norm_legit and node.target._overloadname == "no_stats":
        return bool(node.args[3])
    if p is aten._native_batch_norm_legit_functional or p is aten._native_batch_norm_legit:
        return bool(node.args[5])
    if p is aten.native_batch_norm:
        return bool(node.args[5])
    if p is aten.instance_norm:
        return bool(node.args[5])
    return False

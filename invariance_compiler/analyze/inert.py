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
from .rules import aten
from .value import compact

__all__ = ["prove_inert"]

NONE = -1
KILLED = "killed"


class _Fail(Exception):
    pass


_VIEWS = {aten.view, aten._unsafe_view, aten.reshape, aten.flatten, aten.unflatten, aten.permute,
          aten.transpose, aten.t, aten.numpy_T, aten.squeeze, aten.unsqueeze, aten.expand,
          aten.expand_as, aten.slice, aten.select, aten.narrow, aten.split, aten.split_with_sizes,
          aten.chunk, aten.unbind, aten.alias, aten.clone, aten.contiguous, aten._to_copy, aten.to,
          aten.detach, aten.lift_fresh_copy, aten.repeat, aten.movedim, aten.swapaxes, aten.flip,
          aten.roll, aten.pixel_shuffle, aten.pixel_unshuffle, aten.channel_shuffle, aten.tile,
          aten.cat, aten.concat, aten.stack, aten.view_as, aten.reshape_as, aten.type_as}
_SOFTMAX = {aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax}
_POOLS = {aten.max_pool1d, aten.max_pool2d, aten.max_pool3d, aten.max_pool2d_with_indices,
          aten.adaptive_avg_pool1d, aten.adaptive_avg_pool2d, aten.adaptive_avg_pool3d,
          aten._adaptive_avg_pool2d, aten.adaptive_max_pool1d, aten.adaptive_max_pool2d,
          aten.adaptive_max_pool3d}
_AVG = {aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d}
_CONV = {aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution}
_BN = {aten.batch_norm, aten._native_batch_norm_legit_functional, aten._native_batch_norm_legit,
       aten.native_batch_norm, aten.instance_norm}


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
            if _packet(user) in _VIEWS and user.args and user.args[0] is node and \
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


def _real(a):
    if isinstance(a, torch.fx.Node):
        return a.meta.get("val")
    return a


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
    """The pattern at the output of the op where the entries are added."""
    p = _packet(use)
    out = use.meta.get("val")
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise _Fail
    nd = out.dim()
    if (p is aten.linear and slot == 2) or (p is aten.addmm and slot == 0 and entries.dim() == 1):
        return entries.reshape((1,) * (nd - 1) + (-1,))
    if p in _CONV and slot == 2:
        return _channel_pattern(entries, nd)
    if p in (aten.add, aten.sub) and slot in (0, 1) and use.args[0] is not use.args[1]:
        e = entries
        while e.dim() < nd:
            e = e.unsqueeze(0)
        return e
    if p in _BN and slot == 2:
        return _channel_pattern(entries, nd)
    if p is aten.group_norm and slot == 3:
        return _channel_pattern(entries, nd)
    if p is aten.layer_norm and slot == 3:
        e = entries
        while e.dim() < nd:
            e = e.unsqueeze(0)
        return e
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
    p = _packet(node)
    args = node.args
    perturbed = [a for a in node.all_input_nodes if a in state]
    out = node.meta.get("val")
    if node.target is operator.getitem:
        src = state[args[0]]
        if isinstance(src, (list, tuple)):
            return src[args[1]]
        raise _Fail
    if p in _VIEWS:
        return _map(_rerun(node, {a: state[a].expand(a.meta["val"].shape) if isinstance(state[a], torch.Tensor)
                                  else state[a] for a in perturbed}))
    if p in (aten.add, aten.sub):
        shapes = out.shape
        parts = [state[a].expand(shapes) for a in perturbed]
        if len(parts) == 1:
            return compact(parts[0].contiguous())
        if p is aten.sub and len(args) == 2 and node.kwargs.get("alpha", 1) == 1 and \
                torch.equal(parts[0], parts[1]) and args[0] is not args[1]:
            return KILLED             # equal ids: the same function of δ on both sides, x - x'

        pairs = torch.stack([x.reshape(-1) for x in parts], dim=1)
        _, inv = pairs.unique(dim=0, return_inverse=True)
        none = (pairs == NONE).all(dim=1)
        return compact(torch.where(none, NONE, inv).view(shapes))
    if p in (aten.mul, aten.div):
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
    if p is aten.addmm and args[1] in perturbed and len(perturbed) == 1:
        P = _rows(state[args[1]], [-1])
        return _vary(P, out.shape, [out.dim() - 1])
    if p is aten.linear and args[0] in perturbed and len(perturbed) == 1:
        P = _rows(state[args[0]], [-1])
        return _vary(P, out.shape, [out.dim() - 1])
    if p in _CONV and args[0] in perturbed and len(perturbed) == 1:
        P = state[args[0]]
        padding = args[4] if len(args) > 4 else 0
        if not _constant_along(P, range(2, P.dim())) or (isinstance(padding, str) and padding != "valid") \
                or (not isinstance(padding, str) and any(_as_list(padding))):
            raise _Fail
        return _vary(_rows(P, [1]), out.shape, [1])
    if p in (aten.matmul, aten.bmm, aten.mm) and len(perturbed) == 1:
        a, b = args[0], args[1]
        if a.meta["val"].dim() < 2 or b.meta["val"].dim() < 2:
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
    if p in _SOFTMAX and len(perturbed) == 1:
        P = state[args[0]]
        return KILLED if _constant_along(P, [args[1] % P.dim()]) else _fail()
    if p is aten.scaled_dot_product_attention and perturbed == [args[1]]:
        P = state[args[1]]
        return KILLED if _constant_along(P, [P.dim() - 2]) else _fail()
    if p in _BN and perturbed == [args[0]]:
        P = state[args[0]]
        training = _bn_training(node)
        if training and _constant_along(P, [d for d in range(P.dim()) if d != 1]):
            return KILLED
        raise _Fail
    if p is aten.layer_norm and perturbed == [args[0]]:
        P = state[args[0]]
        k = len(args[1])
        if _constant_along(P, range(P.dim() - k, P.dim())):
            return KILLED
        raise _Fail
    if p is aten.group_norm and perturbed == [args[0]]:
        P = state[args[0]]
        if _constant_along(P, range(2, P.dim())) and P.size(1) == 1:
            return KILLED
        groups = args[1]
        if _constant_along(P, range(2, P.dim())) and P.size(1) > 1:
            g = P.reshape(P.size(0), groups, -1)
            if bool((g == g[:, :, :1]).all()):
                return KILLED
        raise _Fail
    if p in _POOLS and perturbed == [args[0]]:
        P = state[args[0]]
        if _constant_along(P, range(2, P.dim())):
            return _map_first(P, out)
        raise _Fail
    if p in _AVG and perturbed == [args[0]]:
        P = state[args[0]]
        padding = args[3] if len(args) > 3 else 0
        include_pad = args[5] if len(args) > 5 else True
        divisor = args[6] if len(args) > 6 else None
        # the mean of a constant is that constant unless zero padding enters the count
        if _constant_along(P, range(2, P.dim())) and divisor is None and \
                (not any(_as_list(padding)) or not include_pad):
            return P
        raise _Fail
    if p in (aten.sum, aten.mean) and perturbed == [args[0]]:
        P = state[args[0]]
        dims = args[1] if len(args) > 1 else None
        dims = list(range(P.dim())) if dims is None else [d % P.dim() for d in _as_list(dims)]
        keep = len(args) > 2 and args[2]
        R = _rows(P, dims)
        if not keep:
            R = R.reshape([R.size(d) for d in range(R.dim()) if d not in dims])
        return R
    if p in (aten.dropout,) and not args[2]:
        return state[args[0]]
    raise _Fail


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

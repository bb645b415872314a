"""The orthogonal symmetries of a captured graph (DESIGN §3.8): hidden spaces whose every writer and
reader is accounted for, so that any orthogonal map of the space, folded into the weights, keeps
the function.

A space is found by a walk from a seed, the output channels of one writer (a Linear, an addmm, an
embedding) or the value heads of one attention: every tensor the walk reaches gets a label per
element, the channel of the space it holds (-1: none), and each op that touches a labelled tensor
must say, through its `rotation` facet in the op registry (the rules are in rotation_rules.py), how
the map passes it:

- movement ops move the labels exactly (the op runs on them), forwards and backwards;
- a Linear/addmm/embedding that produces labelled channels is a writer, one that reads them a
  reader: the map is folded into its weight (and a writer's bias);
- an add joins two labelled tensors (the residual stream), or makes the other operand labelled;
- x * s with s constant over the channels keeps x's labels; x * γ with γ a per-channel parameter
  (a norm's gain, Gemma's 1 + γ) is folded into every reader and set to neutral;
- x², then its sum or mean over whole blocks of the space, is invariant (the map is then
  orthogonal): RMSNorm; LayerNorm also needs the map to fix the all-ones vector (its mean);
- attention is linear in its values per head: the space splits into one block per head (one per
  key/value head under GQA, its query heads read the same block); its scores keep when queries and
  keys share a map, and RoPE (one pattern) passes the rotations of each frequency plane;
- anything else, the model's output included, means there is no group: the walk fails.

A space's group is the product of one group per block: O(n) (O(n) fixing 𝟙 under LayerNorm), GL(n)
where only linear maps touch it. Unlabelled tensors are invariant by construction: a rule either
carries the labels, proves invariance (the full reductions of squares) or fails."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx

from .rules import aten, lookup

__all__ = ["RotationSpace", "FoldAction", "find_spaces", "NoGroup", "Walk", "NONE", "packet", "as_tuple",
           "full_labels", "last_dim_labels", "vector_labels", "param_node", "whole_instances", "occurrences",
           "constant_over_channels"]

NONE = -1


@dataclass
class FoldAction:
    """What the map of a space does to one parameter at one of its uses.
    role: "vectors": the tensor's slices along `axis` are vectors of the space, v -> v·T (writers'
                     weights and biases, embeddings, readers' weights with `gain` folded first);
          "neutral": a gain, set to `value` (a norm's γ to 1, Gemma's γ to 0);
          "norm_bias": a LayerNorm's β becomes (β / gain)·T, the gain going to the readers."""
    param: str
    node: str                                 # the node that reads the parameter (its module: `module`)
    module: str
    role: str
    axis: int = 0
    labels: Optional[torch.Tensor] = None     # channel of the space per index along `axis`, -1: none
    gain: Optional[torch.Tensor] = None       # per channel of the space (float64), folded first
    value: float = 1.0


@dataclass
class RotationSpace:
    """One hidden space and its group: `blocks` lists the channels of each block (the group is the
    product of one group per block), `orthogonal` whether a norm or attention's scores need the
    map orthogonal (else GL), `centred` whether it must fix the all-ones vector of each block
    (LayerNorm), `proper` whether it must be a rotation (RoPE's frequency planes)."""
    kind: str                                 # "residual" | "head" | "qk" | "linear"
    size: int                                 # channels of the space
    blocks: list                              # list[list[int]]
    orthogonal: bool
    centred: bool
    actions: list                             # list[FoldAction]
    seed: str                                 # the node the walk started from
    module: str = ""                          # the module that node belongs to
    proper: bool = False                      # rotations only (det +1): RoPE's planes
    # LayerNorm as RMSNorm (centred spaces): the writers' nodes whose output must be centred, the
    # LayerNorm modules that then skip their mean, or why that cannot be done ("" when it can)
    writers: frozenset = frozenset()
    norms: tuple = ()
    centring: str = ""

    @property
    def dim(self) -> int:
        """The space's dimension (`size`)."""
        return self.size

    @property
    def params(self) -> list[str]:
        return sorted({a.param for a in self.actions})

    @property
    def group(self) -> str:
        sizes = sorted({len(b) for b in self.blocks})
        base = "SO" if self.proper else "O" if self.orthogonal else "GL"
        one = f"{base}({sizes[0]})" if len(sizes) == 1 else "/".join(f"{base}({s})" for s in sizes)
        tail = " fixing 1" if self.centred else ""
        return f"{one}{tail}" if len(self.blocks) == 1 else f"{len(self.blocks)} x {one}{tail}"


class NoGroup(Exception):
    """The walk met an op that does not pass the map: no group for this seed."""


def packet(node):
    return getattr(node.target, "overloadpacket", node.target)


# ---- the walk -------------------------------------------------------------------------------------
class Walk:
    """Labels of the tensors reached from one seed, and what the rules recorded."""

    def __init__(self, captured, params: dict, size: int, blocks: torch.Tensor, rope: Optional[dict] = None):
        self.captured, self.params = captured, params
        self.rope = rope or {}                 # RoPE's add node -> (its input x, the nodes inside)
        self.rope_of = {x: add for add, (x, _) in self.rope.items()}
        self.inside = {n for _, inner in self.rope.values() for n in inner}
        self.labels: dict = {}                 # node -> int64 labels (node's shape), or a tuple of them
        self.gain: dict = {}                   # node -> float64 gain per channel (pending for readers)
        self.squares: set = set()              # nodes holding squares of labelled values
        self.block = blocks.clone()            # channel -> block id
        self.size = size
        self.orthogonal = self.centred = False
        self.heads = self.qk = self.proper = False
        self.actions: dict = {}                # (node name, param) -> FoldAction
        self.queue: list = []

    # what rules call
    def shape(self, node) -> torch.Size:
        v = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
        if not isinstance(v, torch.Tensor):
            raise NoGroup(f"{node} has no tensor value")
        return v.shape

    def shape_or_none(self, node):
        v = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
        return v.shape if isinstance(v, torch.Tensor) else None

    def get(self, node):
        return self.labels.get(node) if isinstance(node, torch.fx.Node) else None

    def set(self, node, labels, gain=None) -> None:
        """Give `node` labels (and a pending gain). Labels it has already must agree with these;
        elements it had without a channel may get one (the keys' and the queries' parts of one
        fused projection arrive one after the other), and every rule runs again."""
        if not isinstance(node, torch.fx.Node):
            raise NoGroup("a constant would have to hold channels of the space")
        old = self.labels.get(node)
        if old is not None:
            if type(old) is not type(labels) or len(as_tuple(old)) != len(as_tuple(labels)) or \
                    not _same_gain(self.gain.get(node), gain):
                raise NoGroup(f"{node.name} would hold two different maps")
            merged = []
            for a, b in zip(as_tuple(old), as_tuple(labels)):
                a, b = torch.broadcast_tensors(a, b)
                if bool(((a >= 0) & (b >= 0) & (a != b)).any()):
                    raise NoGroup(f"{node.name} would hold two different maps")
                merged.append(torch.where(a >= 0, a, b).contiguous())
            if all(torch.equal(m, torch.broadcast_tensors(a, m)[0]) for m, a in zip(merged, as_tuple(old))):
                return                                          # nothing new
            labels = tuple(merged) if isinstance(old, tuple) else merged[0]
        elif not isinstance(labels, tuple) and bool((labels == NONE).all()):
            return
        self.labels[node] = labels
        if gain is not None:
            self.gain[node] = gain
        self.queue.append(node)
        self.queue.extend(node.users)
        if node in self.rope_of:                # RoPE's ops on x are one rule, at its add
            self.queue.append(self.rope_of[node])

    def square(self, node) -> None:
        if node not in self.squares:
            self.squares.add(node)
            self.queue.extend(node.users)

    def record(self, node, param_node, role: str, **kw) -> None:
        name = self.captured.params.get(param_node.name) if isinstance(param_node, torch.fx.Node) else None
        if name is None:
            raise NoGroup(f"{node.name} reads a tensor that is not a parameter where the map must be folded")
        self.actions[(node.name, name, role)] = FoldAction(name, node.name, _module(node), role, **kw)

    def refine(self, together: torch.Tensor) -> None:
        """Channels `together` (ids, -1 ignored) stay apart from all others: the blocks split."""
        ids = together[together >= 0].unique()
        if not ids.numel():
            return
        inside = torch.zeros(self.size, dtype=torch.bool)
        inside[ids] = True
        key = self.block * 2 + inside.long()
        self.block = torch.unique(key, return_inverse=True)[1]

    def blocks(self) -> list:
        return [(self.block == b).nonzero().reshape(-1).tolist() for b in self.block.unique()]


def as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _same_gain(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return torch.equal(a, b)


# ---- what rules read ------------------------------------------------------------------------------
def full_labels(walk, node, labels):
    return labels.expand(walk.shape(node)) if labels is not None else None


def last_dim_labels(walk, node, labels):
    """The labels along the last dim, which must not vary along any other."""
    return vector_labels(node, full_labels(walk, node, labels))


def vector_labels(node, full):
    flat = full.reshape(-1, full.shape[-1])
    if not bool((flat == flat[:1]).all()):
        raise NoGroup(f"{node.name}: the channels of the space vary along another dim than the last")
    return flat[0]


def param_node(walk, node):
    """The placeholder of a parameter, through dtype casts (or None)."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and \
            packet(node) in (aten._to_copy, aten.to, aten.alias, aten.detach):
        node = node.args[0]
    if isinstance(node, torch.fx.Node) and node.op == "placeholder" and node.name in walk.captured.params:
        return node
    return None


def occurrences(lab: torch.Tensor) -> torch.Tensor:
    """For each position of a label vector, how many earlier positions hold the same label (the
    instance it belongs to: GQA's query heads repeat their key head's channels)."""
    order = torch.argsort(lab, stable=True)
    ranked = lab[order]
    first = torch.ones_like(ranked, dtype=torch.bool)
    first[1:] = ranked[1:] != ranked[:-1]
    start = torch.cummax(torch.where(first, torch.arange(lab.numel()), 0), 0).values
    occ = torch.empty_like(lab)
    occ[order] = torch.arange(lab.numel()) - start
    return occ


def whole_instances(walk, node, lab):
    """A reader reads whole instances: the k-th occurrence of each channel forms instance k, and
    each instance's channels are a union of blocks (else the blocks split)."""
    live = lab >= 0
    if not bool(live.any()):
        return
    occ = occurrences(lab)
    for k in range(int(occ[live].max()) + 1):
        walk.refine(lab[(occ == k) & live])


def constant_over_channels(walk, lab_full, other_shape) -> bool:
    """Whether a factor of `other_shape` (broadcast against labels `lab_full`) is constant along
    every dim where the labels vary."""
    nd = lab_full.dim()
    shape = (1,) * (nd - len(other_shape)) + tuple(other_shape)
    for d in range(nd):
        if shape[d] != 1 and not bool((lab_full == lab_full.narrow(d, 0, 1)).all()):
            return False
    return True


# ---- driving the walks ----------------------------------------------------------------------------
def _run(walk: Walk, limit: int = 1_000_000) -> None:
    steps = 0
    while walk.queue:
        node = walk.queue.pop()
        steps += 1
        if steps > limit:
            raise NoGroup("the walk did not settle")
        _visit(walk, node)
    for node in list(walk.labels) + list(walk.squares):       # every rule once more, on the final labels
        _visit(walk, node)
        for u in node.users:
            _visit(walk, u)
    if walk.queue:
        _run(walk, limit)


def _visit(walk, node):
    if node.op == "output":
        if any(walk.get(a) is not None or a in walk.squares for a in node.all_input_nodes):
            raise NoGroup("the model's output holds channels of the space")
        return
    if node.op == "placeholder":
        if walk.get(node) is None:
            return
        if node.name not in walk.captured.params:
            raise NoGroup(f"the input or buffer {node.name} would hold channels of the space")
        lab = last_dim_labels(walk, node, walk.get(node))          # a parameter read as a vector of
        whole_instances(walk, node, lab)                             # the space (a class token)
        walk.record(node, node, "vectors", axis=len(walk.shape(node)) - 1, labels=lab)
        return
    if node.op != "call_function":
        raise NoGroup(f"{node.name}: {node.op}")
    if node in walk.inside:
        return                                   # its RoPE's add accounts for it
    if node in walk.rope:
        return rotation_rules.rope(walk, node)
    rule = lookup(node.target, "rotation")
    if rule is None:
        raise NoGroup(f"{node.name}: {node.target} has no rotation rule")
    rule(walk, node)


def _space(walk: Walk, seed) -> RotationSpace:
    blocks = walk.blocks()
    kind = "qk" if walk.qk else "head" if walk.heads else "residual" if walk.orthogonal else "linear"
    space = RotationSpace(kind, walk.size, blocks, walk.orthogonal, walk.centred,
                          list(walk.actions.values()), seed.name, _module(seed), walk.proper)
    if walk.centred:
        try:
            space.writers, space.norms = _centring(walk)
        except NoGroup as err:
            space.centring = str(err)
    return space


def _module(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _centring(walk: Walk) -> tuple[frozenset, tuple]:
    """Whether the space's mean can be taken out at its writers, so that its LayerNorms subtract
    nothing and become RMSNorms (SliceGPT's surgery), and then the whole O(n) applies. The "raw"
    tensors are those that hold the space before any norm: they are written by the writers
    (Linears, embeddings, parameters added in) and moved or summed by linear ops. The surgery keeps
    the function when each of them is read only by LayerNorms over the whole space and by ops
    that hold the space again (raw themselves), and each of those LayerNorms is an nn.LayerNorm
    module used only there (its class is what changes). Returns (the writers' nodes, the modules)."""
    raw, stack = set(), [n for n in walk.labels if _writes(walk, n)]
    while stack:
        n = stack.pop()
        if n in raw:
            continue
        raw.add(n)
        stack.extend(u for u in n.users if walk.get(u) is not None and packet(u) is not aten.layer_norm)
    norms = []
    for n in raw:
        if walk.gain.get(n) is not None:
            raise NoGroup(f"{n.name} scales the stream per channel before its LayerNorm")
        for u in n.users:
            if packet(u) is aten.layer_norm and u.args[0] is n:
                if not bool((last_dim_labels(walk, n, walk.get(n)) >= 0).all()) or \
                        walk.shape(n)[-1] != walk.size:
                    raise NoGroup(f"{u.name} normalises part of the space")
                norms.append(u)
            elif u not in raw and packet(u) is not aten._assert_tensor_metadata:
                raise NoGroup(f"{u.name} ({packet(u)}) reads the stream before any LayerNorm, so its "
                              f"mean matters there")
    modules = {}
    for u in norms:
        modules.setdefault(_module(u), []).append(u)
    for node in walk.captured.gm.graph.nodes:       # a module whose other calls are not on this stream
        if packet(node) is aten.layer_norm and _module(node) in modules and node not in norms:
            raise NoGroup(f"{_module(node)} also normalises another tensor ({node.name})")
    return frozenset(n.name for n in raw if _writes(walk, n)), tuple(sorted(modules))


def _writes(walk: Walk, node) -> bool:
    """Whether `node` writes the space: a writer's output, or a parameter read as its vectors."""
    return any(a.node == node.name and a.role == "vectors" for a in walk.actions.values()) and \
        walk.get(node) is not None


def find_spaces(captured, params: dict) -> tuple[list, dict]:
    """The spaces of a captured graph: (list of RotationSpace, {seed node: why no group}, the seeds
    whose walk reached the most tensors first)."""
    gm = captured.gm
    rotation_rules.register_library_ops()
    found, why, taken, reach = [], {}, set(), {}
    rope = rotation_rules.rope_patterns(gm)
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        p = packet(node)
        seeds = []
        if p in (aten.linear, aten.addmm, aten.embedding) and node.name not in taken:
            shape = node.meta["val"].shape
            seeds.append((node, torch.arange(shape[-1]).view((1,) * (len(shape) - 1) + (-1,)),
                          torch.zeros(shape[-1], dtype=torch.long)))
        if p in (aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution) and node.name not in taken:
            shape = node.meta["val"].shape                             # (N, C, *spatial)
            seeds.append((node, torch.arange(shape[1]).view(1, -1, *([1] * (len(shape) - 2))),
                          torch.zeros(shape[1], dtype=torch.long)))
        if p is aten.scaled_dot_product_attention:
            for t in (node.args[2], node.args[1]):                      # values, then keys
                if t.name in taken:
                    continue
                shape = t.meta["val"].shape                             # (B, Hkv, S, dh)
                heads, dh = shape[-3], shape[-1]
                lab = torch.arange(heads * dh).view(heads, 1, dh)
                lab = lab.view((1,) * (len(shape) - 3) + tuple(lab.shape))
                seeds.append((t, lab, torch.arange(heads * dh) // dh))
        for start, lab, blocks in seeds:
            walk = Walk(captured, params, int(lab.max()) + 1, blocks, rope)
            try:
                walk.set(start, lab.expand(start.meta["val"].shape).contiguous())
                _run(walk)
            except NoGroup as err:
                why[start.name], reach[start.name] = str(err), len(walk.labels)
                continue
            except Exception as err:                       # a rule met an op it cannot run on labels
                why[start.name], reach[start.name] = f"{type(err).__name__}: {err}", len(walk.labels)
                continue
            if not walk.actions:
                continue
            found.append(_space(walk, start))
            taken |= {n.name for n in walk.labels}
    # the walks that went furthest first: their reason is the one that matters (the stream's)
    return found, dict(sorted(why.items(), key=lambda kv: -reach[kv[0]]))


from . import rotation_rules  # noqa: E402  (the rules register as a side effect)

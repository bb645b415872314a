"""Graph rewriting: the traced graph with every parameter replaced by an allocated weight.

    v_conv_weight = self.v_conv_weight          # parameters: path values V (gspace) or free entries
    p_in = plan.path_in(v_carriers)             # P_in from the carriers' path values (gspace)
    allocate = self.allocate(p_in, v_carriers, v_conv_weight, ...)   # WA (ICR in backward)
    w_conv_weight = allocate[0]
    conv2d = torch.conv2d(x, w_conv_weight, ...)
    fc = plan.linear(conv2d, v_fc_weight, v_fc_bias, p_in, v_carriers, 3, 4)   # no W formed

Zero-padded Conv modules (and Linear ones in the fixed form) become their functional calls; any
other module that owns parameters (normalisers, custom leaves) is called through
torch.func.functional_call with its allocated weights, so its own semantics (train/eval, buffers)
stay in charge."""
from __future__ import annotations

import operator
import re

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["rewrite", "guard_reshapes", "expect_shape"]

_CONV = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


_RESHAPES = (torch.flatten, torch.reshape, torch.unflatten, "flatten", "view", "reshape", "unflatten")


def expect_shape(x: torch.Tensor, shape: tuple, where: str) -> torch.Tensor:
    """Guard before a reshape whose element map the analysis took from the example input."""
    if tuple(x.shape[1:]) != shape:
        raise ValueError(
            f"invariance_compiler: {where} reshapes a tensor of shape (N, {', '.join(map(str, shape))}) "
            f"in the example the module was compiled with, but got {tuple(x.shape)}: which entries "
            f"share a scale follows the example's layout, so the compiled symmetry may not hold for "
            f"this shape. Compile again with an example of the new shape "
            f"(compile_invariant(model, new_example)), or make the shape fixed before the reshape "
            f"(adaptive pooling).")
    return x


def guard_reshapes(gm: torch.fx.GraphModule) -> int:
    """Insert expect_shape before every flatten/view/reshape/unflatten that regroups non-batch dims
    (input of 3 or more dims, per the analysis values in node.meta). Returns the number of guards."""
    count = 0
    for node in list(gm.graph.nodes):
        mod = gm.get_submodule(node.target) if node.op == "call_module" else None
        if not (isinstance(mod, (nn.Flatten, nn.Unflatten)) or
                (node.op in ("call_function", "call_method") and node.target in _RESHAPES)):
            continue
        src = node.args[0] if node.args else None
        shape = getattr(src.meta.get("ic_value"), "shape", None) if isinstance(src, torch.fx.Node) else None
        if shape is None or len(shape) < 3:
            continue
        where = (f"module '{node.target}' ({type(mod).__name__})" if mod is not None else
                 f"node '{node.name}' ({getattr(node.target, '__name__', node.target)})")
        with gm.graph.inserting_before(node):
            guard = gm.graph.call_function(expect_shape, (src, tuple(shape[1:]), where))
        node.replace_input_with(src, guard)
        count += 1
    return count


def attr_name(prefix: str, param: str, taken: set) -> str:
    base = prefix + re.sub(r"\W", "_", param)
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def rewrite(gm: torch.fx.GraphModule, canonical: dict[int, str], planned: list[str], wa: list[int],
            linear: dict, v_attr: dict[str, str], form: str) -> torch.fx.Graph:
    """New graph: V get_attrs, P_in, one WA call, then gm's nodes reading the allocated weights.
    canonical: id(parameter) -> model parameter name; planned: the names of the allocation plan
    (wa: the positions allocated by WA; the rest are Linear weights used via allocate.linear);
    v_attr: model parameter name -> attribute holding its V (or free) tensor."""
    old, new = gm.graph, torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    weight: dict[str, torch.fx.Node] = {}
    for n in old.nodes:
        if n.op == "placeholder":
            env[n] = new.node_copy(n, lambda a: env[a])
    v_nodes = {name: new.create_node("get_attr", attr, name=attr) for name, attr in v_attr.items()}
    alloc = new.create_node("get_attr", "allocate", name="plan") if planned else None
    p_in = carriers = None
    if planned and form == "gspace":
        carriers = new.create_node("get_attr", "v_carriers", name="v_carriers")
        p_in = new.create_node("call_method", "path_in", (alloc, carriers), name="p_in")
    if wa:
        ws = new.call_module("allocate", (p_in, carriers, *[v_nodes[planned[i]] for i in wa]))
        for k, i in enumerate(wa):
            weight[planned[i]] = new.create_node("call_function", operator.getitem, (ws, k),
                                                 name="w_" + v_attr[planned[i]].split("_", 1)[1])
    for p, node in v_nodes.items():
        weight.setdefault(p, node)                        # nothing to allocate: the weight is V
    scaled = {p: planned.index(p) for p in planned if p in linear and form == "gspace"}

    for n in old.nodes:
        if n.op == "placeholder":
            continue
        if n.op == "get_attr":
            obj = fetch(gm, n.target)
            if isinstance(obj, nn.Parameter):
                env[n] = weight[canonical[id(obj)]]
                continue
        if n.op == "call_module":
            mod = gm.get_submodule(n.target)
            own = {k: canonical[id(p)] for k, p in mod.named_parameters(recurse=False)}
            if own.get("weight") in scaled:
                x = env[n.args[0]]
                bias = v_nodes[own["bias"]] if "bias" in own else None
                j = planned.index(own["bias"]) if own.get("bias") in planned else -1
                out = new.create_node("call_method", "linear",
                                      (alloc, x, v_nodes[own["weight"]], bias, p_in, carriers,
                                       scaled[own["weight"]], j),
                                      name=n.name)
                out.meta = dict(n.meta)
                env[n] = out
                continue
            if own:
                env[n] = _functional(new, n, mod, {k: weight[p] for k, p in own.items()}, env)
                continue
        env[n] = new.node_copy(n, lambda a: env[a])
    new.lint()
    return new


def fetch(gm, target):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _functional(g: torch.fx.Graph, n: torch.fx.Node, mod: nn.Module, weights: dict, env) -> torch.fx.Node:
    args = torch.fx.map_arg(n.args, lambda a: env[a])
    kwargs = torch.fx.map_arg(n.kwargs, lambda a: env[a])
    if type(mod) is nn.Linear and not kwargs:
        target, fargs = F.linear, (args[0], weights["weight"], weights.get("bias"))
    elif type(mod) in _CONV and mod.padding_mode == "zeros" and not kwargs:
        target, fargs = _CONV[type(mod)], (args[0], weights["weight"], weights.get("bias"), mod.stride,
                                           mod.padding, mod.dilation, mod.groups)
    else:
        target, fargs = torch.func.functional_call, (g.get_attr(n.target), weights, tuple(args), kwargs)
    out = g.create_node("call_function", target, fargs, name=n.name)
    out.meta = dict(n.meta)
    return out

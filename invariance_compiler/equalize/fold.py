"""Fold eval-mode BatchNorm into the convolution or Linear that feeds it (exactly, per output
channel): W' = W·γ/σ, b' = (b - μ)·γ/σ + β with σ = sqrt(running_var + eps); the BatchNorm module
becomes nn.Identity. Pairs are found in the torch.export graph: a conv/linear whose output only
a batch_norm reads, both with module parameters and running statistics."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from ..trace import capture, example_inputs_for

__all__ = ["fold_batchnorm"]

aten = torch.ops.aten
_LAYERS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.conv1d.padding,
           aten.conv2d.padding, aten.conv3d.padding, aten.linear.default}


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str, nn.Module]:
    """(parent, attribute, module) of the module that owns parameter or buffer `name`."""
    path = name.rsplit(".", 1)[0] if "." in name else ""
    parent_path, _, attr = path.rpartition(".")
    return model.get_submodule(parent_path), attr, model.get_submodule(path)


@torch.no_grad()
def fold_batchnorm(model: nn.Module, example_inputs: Any = None, example_kwargs: Optional[dict] = None
                   ) -> list[tuple[str, str]]:
    """Fold every eval-mode BatchNorm module that directly follows a Conv1d/2d/3d or Linear module
    into it, in place (the function is unchanged up to rounding). Returns the (layer, batchnorm)
    module names folded. The model must be in eval mode: folding uses the running statistics."""
    if model.training:
        raise ValueError("fold_batchnorm folds BatchNorm's running statistics, which only eval mode "
                         "uses: call model.eval() first")
    if example_inputs is None:
        args = () if example_kwargs else example_inputs_for(model)
    else:
        args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    cap = capture(model, args, example_kwargs)
    names = {**cap.params, **cap.buffers}
    folded = []
    for bn in cap.gm.graph.nodes:
        if bn.target is not aten.batch_norm.default or bn.args[5]:
            continue
        layer = bn.args[0]
        if not isinstance(layer, torch.fx.Node) or layer.target not in _LAYERS or len(layer.users) != 1:
            continue
        w_node = layer.args[1]
        stats = [a if isinstance(a, torch.fx.Node) else None for a in bn.args[1:5]]
        if not isinstance(w_node, torch.fx.Node) or w_node.name not in cap.params or \
                stats[2] is None or stats[3] is None or \
                any(s is not None and (s.name not in names or len(s.users) != 1) for s in stats) or \
                len(w_node.users) != 1:
            continue                         # a module used twice, or statistics that are not buffers
        w_name = cap.params[w_node.name]
        _, _, conv = _owner(model, w_name)
        parent, attr, norm = _owner(model, names[stats[2].name])
        if type(norm).forward is not nn.modules.batchnorm._BatchNorm.forward:
            continue                         # not a BatchNorm module, or a subclass with its own forward
        if not isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            continue
        eps = float(bn.args[7])
        scale = (norm.running_var.double() + eps).rsqrt()
        if norm.weight is not None:
            scale = scale * norm.weight.double()
        shift = -norm.running_mean.double() * scale
        if conv.bias is not None:
            shift = shift + conv.bias.double() * scale
        if norm.bias is not None:
            shift = shift + norm.bias.double()
        w = conv.weight
        w.copy_((w.double() * scale.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype))
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
        conv.bias.copy_(shift.to(conv.bias.dtype))
        setattr(parent, attr, nn.Identity())
        folded.append((w_name.rsplit(".", 1)[0], names[stats[2].name].rsplit(".", 1)[0]))
    return folded

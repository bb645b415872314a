"""Abstract values: which channel class each element of a tensor belongs to.

A class id is an integer. Each element of a traced tensor carries one: the element's log-scale under
the group is the log-scale of its class. Two ids are special: PIN (scale must stay 1: network inputs,
outputs, constants) and ZERO (the element is exactly zero, so any scale is fine). Ids are stored
*compact*: an int64 tensor with the real tensor's ndim, broadcastable to its shape, size 1 along every
dim on which the class does not change. A conv activation's map is (1, C, 1, 1), never (N, C, H, W).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["PIN", "ZERO", "Value", "ParamView", "compact", "pinned_ids"]

PIN = 0
ZERO = -1


@dataclass
class ParamView:
    """The value is (a data-moved view of) parameter `name`; `entries` maps each element to the
    parameter's flat entry index (None: the parameter itself, in its own shape)."""
    name: str
    entries: Optional[torch.Tensor] = None


@dataclass
class Value:
    shape: torch.Size
    ids: Optional[torch.Tensor]          # compact class ids; None until a raw parameter is used generically
    param: Optional[ParamView] = None
    known: Optional[torch.Tensor] = None  # the values, for an integer tensor that is the same at every call

    def full(self) -> torch.Tensor:
        """The ids as a stride-0 view of the real shape (no copy)."""
        return self.ids.expand(self.shape)

    @property
    def is_constant(self) -> bool:
        """Every element has scale 1 or is zero: a buffer, a literal, something pinned."""
        return self.ids is not None and bool((self.ids <= PIN).all())

    def __repr__(self):
        ids = "lazy" if self.ids is None else f"ids{tuple(self.ids.shape)}"
        par = f", param={self.param.name}" if self.param else ""
        return f"Value({tuple(self.shape)}, {ids}{par})"


def pinned_ids(ndim: int) -> torch.Tensor:
    return torch.zeros((1,) * ndim, dtype=torch.long)


def compact(ids: torch.Tensor) -> torch.Tensor:
    """Shrink every dim along which the ids do not change to size 1 (stride-0 dims for free)."""
    out = ids
    for d in range(out.dim()):
        if out.size(d) > 1 and (out.stride(d) == 0 or bool((out == out.narrow(d, 0, 1)).all())):
            out = out.narrow(d, 0, 1)
    # A narrow keeps the big storage alive; copy when we dropped most of it.
    if out.numel() < ids.numel() or out.stride() != out.contiguous().stride():
        out = out.contiguous().clone()
    return out

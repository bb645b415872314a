"""The original model's own API on the compiled module (DESIGN §4c): a user of transformers keeps
`cm.generate`, `cm.config`, `cm.save_pretrained` and `transformers.Trainer`.

The compiled module wraps a copy of the model without its parameters (codegen/module.py), so the
model's methods cannot run on the copy by themselves. `bound()` puts this module's weights into the
copy for the length of a `with` block (as functional_call does for one forward); `generate` runs in
it, `save_pretrained` writes the weights in the original coordinates. Other public attributes that
are not methods (`config`, `generation_config`, `main_input_name`, ...) are read from the copy, and
`forward` carries the model's signature, which Trainer reads to pick the batch's columns."""
from __future__ import annotations

import contextlib
import inspect

import torch
from torch.nn.utils.stateless import _reparametrize_module

__all__ = ["ModelAPI", "SignedForward"]


class SignedForward:
    """cm.forward with the original model's signature (inspect.signature reads __signature__)."""

    def __init__(self, owner):
        self.owner = owner
        try:
            self.__signature__ = inspect.signature(owner.model.forward)
        except (TypeError, ValueError):
            pass

    def __call__(self, *args, **kwargs):
        return type(self.owner).forward(self.owner, *args, **kwargs)


class ModelAPI:
    """Mixed into InvariantModule: the model's own methods, run on this module's weights."""

    @contextlib.contextmanager
    def bound(self, weights=None):
        """`cm.model` with this module's current weights in place (or `weights`: name -> tensor), for
        calling the model's own methods: `with cm.bound() as m: m.generate(...)`. Gradients flow
        to this module's parameters as in its forward."""
        ws = self._weights() if weights is None else weights
        with _reparametrize_module(self.model, ws, tie_weights=False, strict=False):
            yield self.model

    def generate(self, *args, **kwargs):
        """The model's own `generate` (transformers), with this module's weights."""
        if not hasattr(self.model, "generate"):
            raise AttributeError(f"{type(self.model).__name__} has no generate(); only transformers' "
                                 f"generative models do")
        with torch.no_grad():
            # as Parameters (sharing storage): transformers reads the model's device and dtype
            # from its parameters, and a forward may hand it none (every weight formed by WA)
            ws = {k: torch.nn.Parameter(v, requires_grad=False)
                  if k in self._aliases and not isinstance(v, torch.nn.Parameter) else v
                  for k, v in self._weights().items()}
            with self.bound(ws) as model:
                return model.generate(*args, **kwargs)

    def save_pretrained(self, save_directory, **kwargs):
        """The model's own `save_pretrained` (transformers), writing the weights in the original
        coordinates: `type(model).from_pretrained(save_directory)` loads this module's function."""
        if not hasattr(self.model, "save_pretrained"):
            raise AttributeError(f"{type(self.model).__name__} has no save_pretrained(); use "
                                 f"torch.save(cm.export_state_dict(), path)")
        plain = self.export_state_dict()
        # as Parameters, so that the copy has parameters again (save_pretrained reads their dtype)
        params = {k: torch.nn.Parameter(v, requires_grad=False) for k, v in plain.items() if k in self._aliases}
        with torch.no_grad(), self.bound(params) as model:
            return model.save_pretrained(save_directory, state_dict=plain, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)            # nn.Module: parameters, buffers, submodules
        except AttributeError:
            model = self.__dict__.get("_modules", {}).get("model")
            if model is None or name.startswith("_"):
                raise
        attr = getattr(model, name)                     # the model's own AttributeError if absent
        if inspect.ismethod(attr):
            raise AttributeError(
                f"{name} is a method of {type(model).__name__}, which needs this module's weights: "
                f"call it as `with cm.bound() as m: m.{name}(...)`")
        return attr

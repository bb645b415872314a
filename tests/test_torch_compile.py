"""torch.compile(cm, fullgraph=True) on both forms (DESIGN §4c): one graph with no break (fullgraph
raises on one), forward and gradients equal to eager. Eval mode: dropout's random stream differs
between compiled and eager code, and is not what this tests."""
import pytest
import torch

import invariance_compiler as ic
from conftest import zoo_or_hf
from invariance_compiler.codegen.module import ScaledLinear


def _first(out):
    return out if isinstance(out, torch.Tensor) else out[0]


def _run(net, args, kwargs):
    net.zero_grad(set_to_none=True)
    out = _first(net(*args, **kwargs))
    # a fixed random projection: the mean square of a LayerNorm's output (ViT's last state) is ~1
    # whatever the weights, and its gradient would be rounding noise
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype)
    (out * probe).sum().backward()
    return out.detach(), [p.grad.clone() for p in net.parameters() if p.grad is not None]


@pytest.mark.parametrize("form", ["gspace", "fixed"])
@pytest.mark.parametrize("name", ["mlp", "cnn_pool", "mini_transformer", "hf:llama", "hf:gpt2", "hf:bert",
                                  "hf:vit"])
def test_fullgraph_compile_gives_the_eager_result(name, form):
    model, args, kwargs = zoo_or_hf(name)
    cm = ic.compile_invariant(model, args, form=form, example_kwargs=kwargs).eval()
    torch._dynamo.reset()
    out_e, grads_e = _run(cm, args, kwargs)
    out_c, grads_c = _run(torch.compile(cm, fullgraph=True), args, kwargs)
    assert torch.allclose(out_c, out_e, rtol=1e-4, atol=1e-5)
    assert len(grads_c) == len(grads_e) > 0
    for a, b in zip(grads_c, grads_e):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("name", ["mlp", "hf:llama"])
def test_a_call_writes_nothing_into_modules(name):
    """The fast Linears get what they read through functional_call, not through attributes set per
    call (which hid the data flow and made dynamo guard on module state): after a forward and a
    backward every module of the copy has the attributes it had before, and its fast Linears refuse
    a call from outside the compiled module."""
    model, args, kwargs = zoo_or_hf(name)
    cm = ic.compile_invariant(model, args, example_kwargs=kwargs)
    fast = [m for m in cm.model.modules() if isinstance(m, ScaledLinear)]
    assert fast, "no Linear took the scaled-activation path"
    before = {id(m): (set(vars(m)), set(m._buffers), {k: id(b) for k, b in m._buffers.items()})
              for m in cm.model.modules()}
    _first(cm(*args, **kwargs)).square().mean().backward()
    after = {id(m): (set(vars(m)), set(m._buffers), {k: id(b) for k, b in m._buffers.items()})
             for m in cm.model.modules()}
    assert before == after
    with pytest.raises(RuntimeError, match="part of a compiled module"):
        fast[0](torch.zeros(1, fast[0].in_features))

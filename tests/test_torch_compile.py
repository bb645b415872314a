"""torch.compile(cm, fullgraph=True) on both forms (DESIGN §4c): one graph with no break (fullgraph
raises on one), forward and gradients equal to eager. Eval mode: dropout's random stream differs
between compiled and eager code, and is not what this tests."""
import pytest
import torch

import invariance_compiler as ic
from conftest import zoo_or_hf


def _first(out):
    return out if isinstance(out, torch.Tensor) else out[0]


def _run(net, args, kwargs):
    net.zero_grad(set_to_none=True)
    out = _first(net(*args, **kwargs))
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in net.parameters() if p.grad is not None]


@pytest.mark.parametrize("form", ["gspace", "fixed"])
@pytest.mark.parametrize("name", ["mlp", "cnn_pool", "mini_transformer", "hf:llama"])
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

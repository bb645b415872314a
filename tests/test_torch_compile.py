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


@pytest.mark.parametrize("name", ["mlp", "cnn_pool"])
def test_compiled_fixed_form_holds_its_entries(name):
    """Under torch.compile the fixed form writes its fixed entries into the parameters on every
    call and their gradient is zeroed by the hook the module has carried since it was built (a
    deep copy attaches it again; a compiled forward cannot): after AdamW's weight decay moved them,
    the compiled forward puts them back, and their gradient is exactly 0."""
    import copy
    model, args, kwargs = zoo_or_hf(name)
    cm = copy.deepcopy(ic.compile_invariant(model, args, form="fixed", example_kwargs=kwargs))
    plan = cm.allocate
    held = {n: (t.fixed_idx, t.fixed_val) for n, t in zip(cm.allocated, plan.tensors) if t.fixed_idx.numel()}
    assert held
    torch._dynamo.reset()
    compiled = torch.compile(cm, fullgraph=True)
    opt = torch.optim.AdamW(cm.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        _first(compiled(*args, **kwargs)).square().mean().backward()
        for n, (idx, val) in held.items():
            p = cm.parameter_of(n)
            assert torch.equal(p.detach().reshape(-1)[idx], val), n
            assert bool((p.grad.reshape(-1)[idx] == 0).all()), n
        opt.step()
    assert not all(torch.equal(cm.parameter_of(n).detach().reshape(-1)[idx], val) for n, (idx, val) in held.items())
    out = _first(compiled(*args, **kwargs))
    assert torch.allclose(out, _first(cm(*args, **kwargs)), rtol=1e-5, atol=1e-6)

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


@pytest.mark.parametrize("form", ["gspace", "fixed"])
@pytest.mark.parametrize("name", ["mlp", "cnn_pool"])
def test_compiled_modules_hold_their_entries_in_place(name, form):
    """Under torch.compile the entries a module holds constant (fixed entries; with scaled
    coordinates a fast layer's slots) are read from the parameters, not written (a graph that
    wrote into its inputs would invalidate what an earlier call saved for backward): every
    optimizer step writes back what its weight decay moved, and a compiled call refuses entries
    moved by hand until an eager call has written them back. Their gradient is exactly 0; two
    calls before one backward give the eager gradients."""
    import copy
    model, args, kwargs = zoo_or_hf(name)
    cm = copy.deepcopy(ic.compile_invariant(model, args, form=form, example_kwargs=kwargs))
    plan = cm.allocate
    held = {n: plan.held_slots(i) for i, n in enumerate(cm.allocated) if plan.held_slots(i) is not None}
    assert held

    def holds():
        for n, (idx, val) in held.items():
            p = cm.parameter_of(n)
            assert torch.equal(p.detach().reshape(-1)[idx], val.to(p.dtype)), n
            if p.grad is not None:
                assert bool((p.grad.reshape(-1)[idx] == 0).all()), n

    torch._dynamo.reset()
    compiled = torch.compile(cm, fullgraph=True)
    opt = torch.optim.AdamW(cm.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        _first(compiled(*args, **kwargs)).square().mean().backward()
        holds()
        opt.step()
        holds()
    out = _first(compiled(*args, **kwargs))
    assert torch.allclose(out, _first(cm(*args, **kwargs)), rtol=1e-5, atol=1e-6)

    grads = []
    for net in (compiled, cm):
        cm.zero_grad()
        (_first(net(*args, **kwargs)).square().mean() + _first(net(*args, **kwargs)).abs().mean()).backward()
        grads.append([p.grad.clone() for p in cm.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)

    name0, (idx, val) = next(iter(held.items()))
    with torch.no_grad():
        cm.parameter_of(name0).reshape(-1)[idx[0]] += 1.0
    with pytest.raises(RuntimeError, match="holds constant were changed"):
        compiled(*args, **kwargs)
    cm(*args, **kwargs)                                       # eager: writes them back
    holds()
    assert torch.allclose(_first(compiled(*args, **kwargs)), out, rtol=1e-5, atol=1e-6)

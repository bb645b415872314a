"""G-space: WA/ICR against autograd and gradcheck, the thesis's coordinates (Table 2.1, G-SGD
appendix 10.1), basis paths, G-SGD Theorem 4.1, and the G-SGD optimizer on plain weights."""
import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import invariance_compiler as ic
from invariance_compiler.codegen.allocate import reference
from invariance_compiler.skeleton import basis_paths
from invariance_compiler.tools.zoo import ZOO, mlp


def _vs(cm):
    return [cm.parameter_of(n) for n in cm.allocated]


@pytest.mark.parametrize("coordinates", ["scaled", "paths"])
@pytest.mark.parametrize("name", ["mlp", "resnet_basic", "densenet", "layerscale", "conv_transpose"])
def test_icr_equals_autograd_through_a_plain_allocation(name, coordinates):
    """(Scaled coordinates hold P_in and have no carriers; raw path values move P_in with them.)"""
    model, x = ZOO[name]()
    cm = ic.compile_invariant(model.double(), tuple(t.double() for t in x), scale_activations=False,
                              coordinates=coordinates)
    vs = [v.detach().clone().requires_grad_(True) for v in _vs(cm)]
    c = cm.allocate.carrier_values(cm._carriers()).detach().clone().requires_grad_(True)
    assert (c.numel() == 0) == (coordinates == "scaled")
    gws = [torch.randn_like(v) for v in vs]
    ours = cm.allocate(cm.allocate.path_in(c), c, *vs)
    ref = reference(cm.allocate, c, vs)
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, rtol=1e-14, atol=0)
    wrt = [c, *vs] if c.numel() else vs
    g_ours = torch.autograd.grad(ours, wrt, gws)
    g_ref = torch.autograd.grad(ref, wrt, gws)
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("coordinates", ["scaled", "paths"])
def test_icr_passes_gradcheck(coordinates):
    model, x = ZOO["residual_mlp"]()
    cm = ic.compile_invariant(model.double(), tuple(t.double() for t in x), scale_activations=False,
                              coordinates=coordinates)
    vs = tuple(v.detach().clone().requires_grad_(True) for v in _vs(cm))
    c = cm.allocate.carrier_values(cm._carriers()).detach().clone().requires_grad_(c_needed := coordinates == "paths")
    run = (lambda c, *v: cm.allocate(cm.allocate.path_in(c), c, *v)) if c_needed else \
        (lambda *v: cm.allocate(cm.allocate.path_in(c), c, *v))
    assert torch.autograd.gradcheck(run, (c, *vs) if c_needed else vs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["mlp", "residual_mlp", "mini_transformer", "cnn_pool"])
def test_scaled_activation_linears_equal_allocated_weights(name):
    """Linear layers that scale activations instead of forming W: same outputs, same gradients."""
    model, x = ZOO[name]()
    model = model.double()
    x = tuple(t.double() if t.is_floating_point() else t for t in x)
    fast = ic.compile_invariant(model, x)
    slow = ic.compile_invariant(model, x, skeleton=fast.skeleton, scale_activations=False)
    assert "plan.linear" in fast.code or name == "mini_transformer"
    assert torch.allclose(fast(*x), slow(*x), rtol=1e-12, atol=1e-14)
    fast(*x).square().sum().backward()
    slow(*x).square().sum().backward()
    for (n1, p1), (n2, p2) in zip(fast.named_parameters(), slow.named_parameters()):
        assert n1 == n2 and torch.allclose(p1.grad, p2.grad, rtol=1e-10, atol=1e-13), n1


def _conv_mix():
    """Convolutions of every kind the scaled path takes: 1d, 2d and 3d, stride, dilation, padding,
    with and without bias, before BatchNorm and before ReLU."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv1d(2, 3, 3, padding=1)
            self.c2 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
            self.c3 = nn.Conv2d(4, 5, 3, padding=2, dilation=2, bias=False)
            self.bn = nn.BatchNorm2d(5)
            self.c4 = nn.Conv3d(5, 3, (1, 2, 2))
            self.head = nn.Linear(3, 2)

        def forward(self, x):                                    # (B, 2, 36)
            h = F.relu(self.c1(x)).view(x.shape[0], 3, 6, 6)
            h = F.relu(self.bn(self.c3(F.relu(self.c2(h)))))
            h = F.relu(self.c4(h.unsqueeze(2))).mean((2, 3, 4))
            return self.head(h)
    torch.manual_seed(0)
    return Net(), (torch.randn(4, 2, 36),)


@pytest.mark.parametrize("name", ["conv_mix", "resnet_basic", "resnet_bottleneck", "conv_transpose", "unbatched"])
def test_scaled_convolutions_equal_allocated_weights(name):
    """Convolutions (groups 1) that scale their input per channel and their output per channel
    instead of forming W: the function and every gradient of the allocated weights (float64), in
    the same coordinates (same skeleton and chart)."""
    if name == "conv_mix":
        model, x = _conv_mix()
    elif name == "unbatched":                                    # a (C, H, W) input
        torch.manual_seed(0)
        model, x = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 3)), (torch.randn(2, 7, 7),)
    else:
        model, x = ZOO[name]()
    model, x = model.double(), tuple(t.double() for t in x)
    fast = ic.compile_invariant(model, x, scale_activations=True)
    slow = ic.compile_invariant(model, x, skeleton=fast.skeleton, scale_activations=False)
    convs = [m for m in fast.model.modules() if type(m).__name__.startswith("ScaledConv")]
    assert convs and "plan.conv(" in fast.code, "no convolution took the scaled path"
    assert not any(fast.allocated[i] in {f"{p}.weight" for p, _ in fast._fast.items()} for i in fast.allocate.wa)
    assert torch.equal(fast.allocate.path_scale, slow.allocate.path_scale), "the two modules' charts differ"
    out = fast(*x)
    assert torch.allclose(out, slow(*x), rtol=1e-12, atol=1e-14)
    assert torch.allclose(out, model(*x), rtol=1e-10, atol=1e-12)
    out.square().sum().backward()
    slow(*x).square().sum().backward()
    for (n1, p1), (n2, p2) in zip(fast.named_parameters(), slow.named_parameters()):
        assert n1 == n2 and torch.allclose(p1.grad, p2.grad, rtol=1e-10, atol=1e-13), n1


def test_scaled_convolutions_in_channels_last():
    """A gspace module moved to channels_last (its conv coordinates then non-contiguous, the
    input too) computes what the contiguous one does, gradients included."""
    torch.manual_seed(0)
    model, x = ZOO["resnet_basic"]()
    model, x = model.double(), tuple(t.double() for t in x)
    cm = ic.compile_invariant(model, x, scale_activations=True)
    last = copy.deepcopy(cm).to(memory_format=torch.channels_last)
    assert any(not p.is_contiguous() for p in last.parameters())
    xl = tuple(t.to(memory_format=torch.channels_last) for t in x)
    out, out_l = cm(*x), last(*xl)
    assert torch.allclose(out_l, out, rtol=1e-12, atol=1e-14)
    out.square().sum().backward()
    out_l.square().sum().backward()
    for (n1, p1), (n2, p2) in zip(cm.named_parameters(), last.named_parameters()):
        assert n1 == n2 and torch.allclose(p2.grad, p1.grad, rtol=1e-10, atol=1e-13), n1


def _scaled_convs(cm) -> list:
    return [m for m in cm.model.modules() if type(m).__name__.startswith("ScaledConv")]


class _Tokens(nn.Module):
    """Linear → BatchNorm (an inert bias) → ReLU → Linear over tokens, (B, T, d)."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.up, self.bn, self.down = nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.Linear(hidden, d)

    def forward(self, x):
        h = self.bn(self.up(x).transpose(1, 2)).transpose(1, 2)
        return self.down(F.relu(h))


def _activation_entries(model, fast_paths, x) -> dict:
    """Each layer's input and output entries in a call of the plain model on x (forward hooks)."""
    sizes, hooks = {}, []
    for path in fast_paths:
        def hook(mod, inp, out, path=path):
            sizes[path] = inp[0].numel() + out.numel()
        hooks.append(model.get_submodule(path).register_forward_hook(hook))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return sizes


def test_layers_form_w_eagerly_where_their_activations_outweigh_their_weight(monkeypatch):
    """scale_activations="auto" (the default): in an eager call a fast layer scales its activations
    only where its weight holds more entries than its input and output at that call, and
    otherwise gets W formed by WA (convolutions on 32x32 images, Linears over 64 tokens with an
    inert bias); a ResNet's late stage and an MLP's wide Linears scale, and so does an MLP's small
    head unless the batch is large: Linears that would need a WA call of their own form W only
    where their activations outweigh their weights by WA_CALL_ENTRIES in all. Under torch.compile every fast layer scales. The function is the original's and the
    gradients are those of the all-scaled module (float64, same coordinates), and a checkpoint of
    one choice loads into the other."""
    import invariance_compiler.codegen.allocate as A
    calls = []

    class Counted(A.ScaledProduct):
        @classmethod
        def apply(cls, *args):
            calls.append(1)
            return super().apply(*args)
    monkeypatch.setattr(A, "ScaledProduct", Counted)
    torch.manual_seed(0)
    small = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    late = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 4))
    wide = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4))
    # (model, the example, a larger call; fast layers forming W at the example and at the larger call)
    cases = [(small, torch.randn(2, 3, 32, 32), 8, (2, 3)), (late, torch.randn(2, 64, 2, 2), 64, (0, 0)),
             (_Tokens(16, 32), torch.randn(2, 64, 16), 4, (2, 2)), (wide, torch.randn(2, 64), 16, (0, 0)),
             (wide, torch.randn(2, 64), 4096, (0, 3))]
    for model, x, batch, formed in cases:
        model, x = model.double(), x.double()
        auto = ic.compile_invariant(model, (x,))
        forced = ic.compile_invariant(model, (x,), scale_activations=True, skeleton=auto.skeleton)
        fast = len(auto.allocate.fast)
        assert fast == len(forced.allocate.fast) == len(auto._fast)
        for call, n_formed in zip((x, torch.randn((batch,) + x.shape[1:], dtype=x.dtype)), formed):
            sizes = _activation_entries(model, auto._fast, call)
            weights = {p: model.get_submodule(p).weight.numel() for p in auto._fast}
            outweighed = [p for p in auto._fast if weights[p] <= sizes[p]]
            if not auto.allocate.wa and all(isinstance(model.get_submodule(p), nn.Linear) for p in outweighed) \
                    and sum(sizes[p] - weights[p] for p in outweighed) < A.WA_CALL_ENTRIES:
                outweighed = []                          # not worth a WA call of their own
            expected = len(outweighed)
            assert expected == n_formed
            calls.clear()
            out = auto(call)
            assert len(calls) == fast - n_formed                       # the others formed W
            assert torch.allclose(out, model(call), rtol=1e-10, atol=1e-12)
            calls.clear()
            forced(call)
            assert len(calls) == fast
            auto.zero_grad()
            forced.zero_grad()
            out.square().sum().backward()
            forced(call).square().sum().backward()
            for (n1, p1), (n2, p2) in zip(auto.named_parameters(), forced.named_parameters()):
                assert n1 == n2 and torch.allclose(p1.grad, p2.grad, rtol=1e-10, atol=1e-13), n1
        applied = []                                # compiled: every fast layer scales, one node each

        def backend(gm, example):
            applied.extend(n for n in gm.graph.nodes if str(n.target) == "autograd_function_apply")
            return gm.forward
        torch._dynamo.reset()
        out_c = torch.compile(auto, backend=backend, fullgraph=True)(x)
        assert len(applied) == fast + bool(auto.allocate.wa)
        assert torch.allclose(out_c, auto(x), rtol=1e-10, atol=1e-12)
        with torch.no_grad():
            for p in forced.parameters():
                p.mul_(1.0 + 0.01 * torch.rand_like(p))
        auto.load_state_dict(forced.state_dict())
        assert torch.allclose(auto(x), forced(x), rtol=1e-10, atol=1e-12)


def test_gpt2_conv1d_scales_its_activations():
    """transformers' Conv1D (GPT-2's projections, W stored (in, out)) takes the scaled path as a
    Linear does, transposed, c_attn included (its key bias has relation units of its own: the
    layer scales it by a constant ratio): the copy's layers stay Conv1D instances, the function is
    the original's and every gradient equals the all-WA module's (float64, same coordinates), and
    the module pickles (its layer class is made on first use)."""
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D
    from invariance_compiler.tools.hf_families import build
    model, args, kwargs = build("gpt2", dropout=False)
    model.eval()
    fast = ic.compile_invariant(model, args, example_kwargs=kwargs, scale_activations=True)
    slow = ic.compile_invariant(model, args, example_kwargs=kwargs, skeleton=fast.skeleton,
                                scale_activations=False)
    flipped = [m for m in fast.model.modules() if type(m).__name__ == "ScaledConv1D"]
    assert flipped and all(isinstance(m, Conv1D) for m in flipped)
    assert len(fast.allocate.is_transposed) == len(flipped)
    assert {p.rsplit(".", 1)[-1] for p in fast._fast} == {"c_attn", "c_proj", "c_fc"}
    assert any(n.startswith("b_scale_") and b is not None for n, b in fast.allocate.named_buffers())
    assert torch.equal(fast.allocate.path_scale, slow.allocate.path_scale)
    out = fast(*args, **kwargs).logits
    assert torch.allclose(out, model(*args, **kwargs).logits, rtol=1e-10, atol=1e-12)
    assert torch.allclose(out, slow(*args, **kwargs).logits, rtol=1e-12, atol=1e-14)
    out.square().sum().backward()
    slow(*args, **kwargs).logits.square().sum().backward()
    for (n1, p1), (n2, p2) in zip(fast.named_parameters(), slow.named_parameters()):
        assert n1 == n2 and torch.allclose(p1.grad, p2.grad, rtol=1e-10, atol=1e-13), n1
    buf = io.BytesIO()
    torch.save(fast, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    assert torch.allclose(back(*args, **kwargs).logits, out, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("form", ["gspace", "fixed"])
def test_scaled_convolutions_under_autocast_and_torch_compile(form):
    """The zoo's convolutions are small enough for "auto" to form W in an eager forward, so the
    suite's autocast tests of convolutional models run them through WA: here every convolution
    takes the scaled path. bf16 autocast: the output within bf16's tolerance of the plain model's,
    the gradients finite and within twice bf16's own error of fp32's; torch.compile with
    fullgraph: the eager output and gradients."""
    torch.manual_seed(0)
    model, x = ZOO["cnn_pool"]()
    cm = ic.compile_invariant(copy.deepcopy(model), x, form=form, scale_activations=True)
    assert form == "fixed" or _scaled_convs(cm)

    def grads(net, low):
        net.zero_grad()
        with torch.autocast("cpu", torch.bfloat16, enabled=low):
            out = net(*x)
        out.float().square().mean().backward()
        g = torch.cat([p.grad.reshape(-1) for p in net.parameters() if p.grad is not None])
        assert bool(torch.isfinite(g).all())
        return g

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    with torch.autocast("cpu", torch.bfloat16):
        assert rel(cm(*x), model(*x)) <= 2e-2
    assert rel(grads(cm, True), grads(cm, False)) <= 2 * rel(grads(model, True), grads(model, False)) + 1e-2
    torch._dynamo.reset()
    cm.zero_grad()
    out_e = cm(*x)
    out_e.square().sum().backward()
    grads_e = [p.grad.clone() for p in cm.parameters()]
    cm.zero_grad()
    out_c = torch.compile(cm, fullgraph=True)(*x)
    out_c.square().sum().backward()
    assert torch.allclose(out_c, out_e, rtol=1e-4, atol=1e-5)
    for a, p in zip(grads_e, cm.parameters()):
        assert torch.allclose(p.grad, a, rtol=1e-3, atol=1e-6)


def _graph_ops(out: torch.Tensor) -> set:
    seen, todo = set(), [out.grad_fn]
    while todo:
        f = todo.pop()
        if f is not None and f not in seen:
            seen.add(f)
            todo.extend(g for g, _ in f.next_functions)
    return {type(f).__name__ for f in seen}


@pytest.mark.parametrize("name", ["mlp", "residual_mlp", "cnn_pool", "vgg_bn"])
def test_fixed_form_holds_its_entries_in_place(name):
    """The fixed form's weights are its parameters, which hold the fixed entries in their own
    storage (no copy per forward: no index_put in the graph; single-use Linears run PyTorch's own
    F.linear): the outputs and gradients of the out-of-place allocation (scale_activations=False
    and the reference overwrite), in float64; the fixed entries' gradient is exactly 0 (a hook,
    attached again in a deep copy and after torch.load, which do not keep hooks); AdamW's weight
    decay moves them and the next forward puts them back, so both modules stay equal."""
    torch.manual_seed(0)
    model, x = ZOO[name]()
    model = model.double()
    x = tuple(t.double() for t in x)
    fast = ic.compile_invariant(model, x, form="fixed")
    slow = ic.compile_invariant(model, x, form="fixed", skeleton=fast.skeleton, scale_activations=False)
    plan = fast.allocate
    held = {n: t.fixed_idx for n, t in zip(fast.allocated, plan.tensors) if t.fixed_idx.numel()}
    assert held, "no tensor with fixed entries: the path under test would not run"
    assert ("F.linear(" in fast.code) == bool(plan.fast) and "plan.linear" not in fast.code
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in (fast, slow)]
    for _ in range(3):
        outs = []
        for m, o in zip((fast, slow), opts):
            o.zero_grad()
            out = m(*x)
            outs.append(out)
            out.square().sum().backward()
        ops = _graph_ops(outs[0])
        assert not {"ScaledProductBackward", "IndexPutBackward0", "WeightAllocationBackward"} & ops, ops
        assert torch.allclose(outs[0], outs[1], rtol=1e-12, atol=1e-14)
        for (n1, p1), (n2, p2) in zip(fast.named_parameters(), slow.named_parameters()):
            assert n1 == n2 and torch.allclose(p1.grad, p2.grad, rtol=1e-10, atol=1e-13), n1
        for n, idx in held.items():
            assert bool((fast.parameter_of(n).grad.reshape(-1)[idx] == 0).all()), n
        for o in opts:
            o.step()
    buf = io.BytesIO()
    torch.save(fast, buf)
    buf.seek(0)
    for other in (copy.deepcopy(fast), torch.load(buf, weights_only=False)):
        assert torch.allclose(other(*x), slow(*x), rtol=1e-12, atol=1e-14)
        other(*x).square().sum().backward()
        for n, idx in held.items():
            assert bool((other.parameter_of(n).grad.reshape(-1)[idx] == 0).all()), n


def test_fixed_form_in_channels_last():
    """cm.to(memory_format=torch.channels_last) makes the fixed form's conv parameters
    non-contiguous: their fixed entries (row-major flat indices) are then overwritten out of place
    and the hook zeroes their gradient through the same indices; the function is the original's."""
    torch.manual_seed(0)
    model, x = ZOO["vgg_bn"]()
    model, x = model.double(), tuple(t.double() for t in x)
    cm = ic.compile_invariant(model, x, form="fixed").to(memory_format=torch.channels_last)
    held = {n: t.fixed_idx for n, t in zip(cm.allocated, cm.allocate.tensors) if t.fixed_idx.numel()}
    assert any(not cm.parameter_of(n).is_contiguous() for n in held)
    out = cm(*x)
    assert torch.allclose(out, model(*x), rtol=1e-12, atol=1e-14)
    out.square().sum().backward()
    for n, idx in held.items():
        p = cm.parameter_of(n)
        assert bool((p.grad.reshape(-1)[idx] == 0).all()), n
        assert p.is_contiguous() or p.grad.abs().sum() > 0, n     # (a bias before BatchNorm has none)


def _bias_carried_mlp():
    """A row of zeros cannot carry its class: the bias does (the slots of a bias)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    with torch.no_grad():
        model[0].weight[0] = 0
        model[2].weight[1] = 0
    return model, (torch.randn(6, 3),)


@pytest.mark.parametrize("coordinates", ["scaled", "paths"])
@pytest.mark.parametrize("name", ["mlp", "residual_mlp", "bias_carried"])
def test_scaled_activation_linears_pass_gradcheck(name, coordinates):
    """The scaled Linear differentiates what it derives from P_in and the carriers by hand (raw path
    values; scaled coordinates hold P_in and have no carriers)."""
    model, x = _bias_carried_mlp() if name == "bias_carried" else ZOO[name]()
    model = model.double()
    x = tuple(t.double() for t in x)
    cm = ic.compile_invariant(model, x, coordinates=coordinates)
    assert "plan.linear" in cm.code
    plan = cm.allocate
    if name == "bias_carried" and coordinates == "paths":
        assert any(t.carrier_idx.numel() for t, n in zip(plan.tensors, cm.allocated) if n.endswith("bias"))
    names = [n for n, p in cm.named_parameters() if p.requires_grad]
    start = tuple(cm.get_parameter(n).detach().clone().requires_grad_(True) for n in names)
    # clones: the forward writes its slots into V's storage, which gradcheck's later calls would
    # change under the graph it differentiates
    run = lambda *ps: torch.func.functional_call(cm, {n: p.clone() for n, p in zip(names, ps)},
                                                 x).square().sum()
    assert torch.autograd.gradcheck(run, start, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["mlp", "residual_mlp", "mini_transformer", "bias_carried", "vgg_bn"])
def test_scaled_coordinates_hold_p_in(name):
    """With scaled coordinates P_in is a constant (DESIGN §3.6b): there are no carriers (their entries
    are coordinates in V like any other) and every weight is its coordinate times a constant, so the
    weights are affine in the parameters, every free entry moves and the K entries stay at their
    values; the fast Linears' precomputed scales are the general form's at that P_in (float64)."""
    torch.manual_seed(0)
    model, x = _bias_carried_mlp() if name == "bias_carried" else ZOO[name]()
    model = model.double()
    x = tuple(t.double() if t.is_floating_point() else t for t in x)
    cm = ic.compile_invariant(model, x)
    plan = cm.allocate
    assert not hasattr(cm, "v_carriers") and all(t.carrier_idx.numel() == 0 for t in plan.tensors)
    assert plan._p_in_held and not plan.path_in(cm._carriers()).requires_grad
    names = [n for n, p in cm.named_parameters() if p.requires_grad]
    start = {n: cm.get_parameter(n).detach().clone() for n in names}
    step = {n: torch.randn_like(t) for n, t in start.items()}

    def weights_at(t):
        with torch.no_grad():
            for n in names:
                cm.get_parameter(n).copy_(start[n] + t * step[n])
        return cm.weights()
    w0, w1, w2 = weights_at(0.0), weights_at(1.0), weights_at(2.0)
    moving = 0
    for n in w0:
        assert torch.allclose(w2[n] - w0[n], 2 * (w1[n] - w0[n]), rtol=1e-10, atol=1e-12), n
        moving += int((w1[n] != w0[n]).sum())
    assert moving == cm.num_free_parameters()               # every free entry moves, K entries do not
    if plan.fast:
        assert plan.lin_const is not None
        p_in, none = plan.path_in(cm._carriers()), cm._carriers()
        held = plan.linear_scales(p_in, none)
        const, plan.lin_const = plan.lin_const, None             # the general form, through P_in
        try:
            general = plan.linear_scales(p_in, none)
        finally:
            plan.lin_const = const
        for a, b in zip(held, general):
            assert torch.allclose(a, b, rtol=1e-13, atol=0)


def test_coordinates_and_gradients_of_a_straight_mlp_are_the_thesis_table():
    """Skeleton weights overwritten with 1 (G-SGD's initialisation): v_j = w_j (carrier, first layer), v_h = w_h (hidden-to-hidden
    entries into a class whose out-chain is 1), v_i = w_i·w_j (outgoing non-skeleton);
    ∂L/∂v_i = ∂L/∂w_i / w_j and ∂L/∂v_j = ∂L/∂w_j − Σ_i ∂L/∂v_i·w_i."""
    torch.manual_seed(0)
    model = mlp([3, 4, 2], bias=False).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    cm = ic.compile_invariant(model, x, fixed="overwrite", value=1.0, coordinates="paths")
    w = cm.weights()
    sk = cm.skeleton
    W1, W2 = w["0.weight"], w["2.weight"]                  # (4, 3), (2, 4)
    coords = cm.path_values()
    V1, V2 = coords["0.weight"], coords["2.weight"]
    for c in range(4):
        name, k = sk.fixed_of[c]
        assert name == "2.weight" and float(W2.reshape(-1)[k]) == 1.0
        _, j = sk.carrier_of[c]                               # carrier w_j = W1[c, j % 3]
        wj = W1.reshape(-1)[j]
        assert torch.allclose(V1[c], W1[c], rtol=1e-12)      # first layer: v = w (out-chain is 1)
        for o in range(2):
            if o * 4 + c != k:
                assert torch.allclose(V2[o, c], W2[o, c] * wj, rtol=1e-12)   # v_i = w_i · w_j
    # gradients
    y = torch.randint(0, 2, (5,))
    F.cross_entropy(cm(x), y).backward()
    plain = copy.deepcopy(model)
    with torch.no_grad():
        plain[0].weight.copy_(W1); plain[2].weight.copy_(W2)
    F.cross_entropy(plain(x), y).backward()
    G1, G2 = plain[0].weight.grad, plain[2].weight.grad
    for c in range(4):
        _, k = sk.fixed_of[c]
        _, j = sk.carrier_of[c]
        wj = W1.reshape(-1)[j]
        gvi = {o: G2[o, c] / wj for o in range(2) if o * 4 + c != k}
        for o, g in gvi.items():
            assert torch.allclose(cm.v_2_weight.grad[o, c], g, rtol=1e-10)
        expected = G1.reshape(-1)[j] - sum(g * W2[o, c] for o, g in gvi.items())
        assert torch.allclose(cm.v_carriers.grad[c], expected, rtol=1e-10)   # v_j's gradient


@pytest.mark.parametrize("name", ["mlp_nobias", "mlp_nonstraight", "cnn_nobias", "mlp_leaky"])
def test_basis_paths_are_independent_orthogonal_to_e_and_give_v(name):
    model, x = ZOO[name]()
    model = model.double()
    cm = ic.compile_invariant(model, tuple(t.double() for t in x), coordinates="paths")
    B = basis_paths(cm.report, cm.skeleton).double()
    E = cm.report.generator_matrix(dtype=torch.float64)
    m, h = E.shape
    assert B.shape == (m - h, m)
    assert int(torch.linalg.matrix_rank(B)) == m - h
    assert torch.count_nonzero(B @ E) == 0
    theta = torch.cat([w.reshape(-1) for w in cm.weights().values()])
    values = torch.stack([theta[row.bool()].prod() for row in B.double()])   # path values
    coords = cm.path_values()
    v = torch.cat([coords[n].reshape(-1)[~cm.skeleton.fixed_mask(n).reshape(-1)] for n in cm.report.param_names])
    assert torch.allclose(values, v, rtol=1e-12)


def test_v_to_w_to_v_round_trip():
    model, x = ZOO["vgg_bn"]()
    model = model.double()
    x = tuple(t.double() for t in x)
    cm = ic.compile_invariant(model, x)
    w = cm.weights()
    again = ic.compile_invariant(_load(model, w), x, skeleton=cm.skeleton)
    a, b = again.path_values(), cm.path_values()
    for n in cm.allocated:
        assert torch.allclose(a[n], b[n], rtol=1e-13, atol=0)


def _load(model, weights):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(weights[n])
    return m


def _equivalent_pair(name, seed=0):
    torch.manual_seed(seed)
    model, x = ZOO[name]()
    model = model.double()
    x = tuple(t.double() for t in x)
    report = ic.analyze(model, x)
    other = copy.deepcopy(model)
    report.act(other, torch.randn(report.num_generators, dtype=torch.float64))
    return model, other, x


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_theorem_4_1_equivalent_starts_stay_equivalent_in_gspace(opt):
    a, b, x = _equivalent_pair("mlp")
    y = torch.randint(0, 3, (x[0].shape[0],))
    ca = ic.compile_invariant(a, x)
    cb = ic.compile_invariant(b, x)                             # same coordinates, chosen on the orbit
    assert all(torch.equal(getattr(ca.skeleton, k), getattr(cb.skeleton, k)) for k in ca.skeleton._STATE)
    make = (lambda p: torch.optim.SGD(p, lr=0.05)) if opt == "sgd" else (lambda p: torch.optim.Adam(p, lr=1e-2))
    oa, ob = make(ca.parameters()), make(cb.parameters())
    pa, pb = copy.deepcopy(a), copy.deepcopy(b)
    sa, sb = torch.optim.SGD(pa.parameters(), lr=0.05), torch.optim.SGD(pb.parameters(), lr=0.05)
    for _ in range(50):
        for m, o in ((ca, oa), (cb, ob), (pa, sa), (pb, sb)):
            o.zero_grad()
            F.cross_entropy(m(*x), y).backward()
            o.step()
        assert torch.allclose(ca(*x), cb(*x), rtol=1e-8, atol=1e-10)
    assert (pa(*x) - pb(*x)).abs().max() > 1e-3                # plain SGD is not invariant


def test_gsgd_optimizer_matches_sgd_on_the_gspace_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    x = torch.randn(32, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (32,))
    cm = ic.compile_invariant(model, x, coordinates="paths")
    plain = _load(model, cm.weights())
    # lr 0.02 diverged from this start (loss 1.1 -> 30), where rounding grows without bound
    o1 = torch.optim.SGD(cm.parameters(), lr=2e-3, momentum=0.9, weight_decay=1e-3)
    o2 = ic.optim.GSGD(plain, lr=2e-3, momentum=0.9, weight_decay=1e-3, example_inputs=x, skeleton=cm.skeleton)
    start = float(F.cross_entropy(cm(x), y).detach())
    for _ in range(20):
        for m, o in ((cm, o1), (plain, o2)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
        assert torch.allclose(cm(x), plain(x), rtol=1e-9, atol=1e-11)
    assert float(F.cross_entropy(cm(x), y).detach()) < start
    for name, ps in cm.skeleton.params.items():               # skeleton weights never move
        k = ps.fixed_idx
        assert torch.equal(dict(plain.named_parameters())[name].detach().reshape(-1)[k],
                           cm.allocate.tensors[cm.allocated.index(name)].fixed_val
                           if name in cm.allocated else torch.zeros(0))


def test_zero_entries_are_never_fixed_or_carriers():
    torch.manual_seed(0)
    model = mlp([3, 4, 2], bias=False).double()
    with torch.no_grad():
        model[2].weight[0].zero_()                            # G-SGD would fix an outgoing weight here
        model[0].weight[:, 0].zero_()                         # ... and might carry on these
    cm = ic.compile_invariant(model)
    w = cm.weights()
    for c, (name, k) in enumerate(cm.skeleton.fixed_of):
        assert float(w[name].reshape(-1)[k]) != 0.0
        name, j = cm.skeleton.carrier_of[c]
        assert float(w[name].reshape(-1)[j]) != 0.0
    x = torch.randn(4, 3, dtype=torch.float64)
    assert torch.allclose(cm(x), model(x), rtol=1e-12)


def test_a_generator_with_only_zero_entries_is_a_clear_error():
    model = mlp([3, 4, 2], bias=False)
    with torch.no_grad():
        model[0].weight[1].zero_()
        model[2].weight[:, 1].zero_()
    with pytest.raises(RuntimeError, match="zero or non-finite"):
        ic.compile_invariant(model)


def test_a_carrier_reaching_zero_stops_with_a_message_not_nans():
    model = mlp([3, 4, 2], bias=False).double()
    cm = ic.compile_invariant(model, coordinates="paths")     # balanced carriers are log-magnitudes
    assert not bool(cm.skeleton.carrier_fixed[0])            # a free carrier: its value is a coordinate
    with torch.no_grad():
        cm.v_carriers[0] = 0.0
    with pytest.raises(FloatingPointError, match="carrier path value"):
        cm(torch.randn(2, 3, dtype=torch.float64))


def test_gsgd_with_nothing_to_allocate_is_sgd():
    """A single Linear has no hidden class: every parameter is its own path value."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    twin = copy.deepcopy(model)
    x = torch.randn(4, 3, dtype=torch.float64)
    opt = ic.optim.GSGD(model, lr=0.1, momentum=0.9, weight_decay=1e-3, example_inputs=(x,))
    ref = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    assert opt.allocated == []
    for _ in range(3):
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(a, b, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("scale_activations", [True, False])
def test_relation_slots_stay_constant_coordinates(scale_activations):
    """A relation generator's fixed entry is a constant coordinate (DESIGN §3.6c): its gradient is
    zero and AdamW's weight decay cannot move it; the module keeps the function after the steps
    (the exported weights give the module's output) and the weights it starts from are the
    model's own."""
    torch.manual_seed(0)
    model, x = ZOO["mini_transformer"]()
    model = model.double()
    x = tuple(t.double() if t.is_floating_point() else t for t in x)
    cm = ic.compile_invariant(model, x, scale_activations=scale_activations)
    sk = cm.skeleton
    assert sk.num_relations > 0 and bool((sk.relation_param >= 0).all())
    for n, w in cm.weights().items():
        assert torch.allclose(w, dict(model.named_parameters())[n].detach(), rtol=1e-12, atol=1e-15), n
    held = {n: ps.relation_idx for n, ps in sk.params.items() if ps.relation_idx.numel()}
    before = {n: cm.parameter_of(n).detach().reshape(-1)[i].clone() for n, i in held.items()}
    opt = torch.optim.AdamW(cm.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        cm(*x).square().mean().backward()
        for n, i in held.items():
            assert bool((cm.parameter_of(n).grad.reshape(-1)[i] == 0).all()), n
        opt.step()
    out = cm(*x)                      # a forward puts the held values back into V's storage
    for n, i in held.items():
        assert torch.equal(cm.parameter_of(n).detach().reshape(-1)[i], before[n]), n
    back = copy.deepcopy(model)
    back.load_state_dict(cm.export_state_dict())
    assert torch.allclose(back(*x), out, rtol=1e-10, atol=1e-12)


def test_gsgd_optimizer_matches_sgd_on_the_gspace_module_with_relation_generators():
    """The query/key generators quotiented in both (DESIGN §3.6c): the same iterates."""
    torch.manual_seed(0)
    model, x = ZOO["mini_transformer"]()
    model = model.double()
    x = tuple(t.double() if t.is_floating_point() else t for t in x)
    cm = ic.compile_invariant(model, x, coordinates="paths")
    assert int((cm.skeleton.relation_param >= 0).sum()) > 0
    plain = _load(model, cm.weights())
    o1 = torch.optim.SGD(cm.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-3)
    o2 = ic.optim.GSGD(plain, lr=1e-3, momentum=0.9, weight_decay=1e-3, example_inputs=x, skeleton=cm.skeleton)
    for _ in range(10):
        for m, o in ((cm, o1), (plain, o2)):
            o.zero_grad()
            m(*x).square().mean().backward()
            o.step()
        assert torch.allclose(cm(*x), plain(*x), rtol=1e-9, atol=1e-11)

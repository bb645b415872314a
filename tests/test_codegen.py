"""compile_invariant: function preservation, the emitted graph, the module contract (DESIGN §3.5-3.6)."""
import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import invariance_compiler as ic
from conftest import zoo_or_hf
from invariance_compiler.tools.zoo import ZOO, mlp


FORMS = ["gspace", "fixed"]


def _compare(model, cm, x):
    torch.manual_seed(1)
    ref = model(*x)
    torch.manual_seed(1)                          # dropout draws the same masks
    return float((cm(*x).detach() - ref.detach()).norm() / ref.detach().norm())


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", sorted(ZOO))
def test_both_forms_preserve_the_function_on_the_zoo(name, form):
    model, x = ZOO[name]()
    m64 = copy.deepcopy(model).double()
    x64 = tuple(t.double() if t.is_floating_point() else t for t in x)
    cm = ic.compile_invariant(m64, x64, form=form)
    assert not list(cm.model.parameters())            # the copy's weights all come from the allocation
    assert _compare(m64, cm, x64) <= 1e-10
    cm32 = ic.compile_invariant(model, x, form=form)
    assert _compare(model, cm32, x) <= 1e-5
    assert cm.num_free_parameters() == cm.report.num_params - cm.report.num_generators   # every one


def test_emitted_code_names_the_allocation_steps(monkeypatch):
    cm = ic.compile_invariant(mlp([3, 4, 2]), scale_activations=True)
    code = cm.code
    assert "carriers = ()" in code and "p_in = plan.path_in(carriers)" in code
    assert "carriers = v_carriers" in ic.compile_invariant(mlp([3, 4, 2]), coordinates="paths").code
    assert "model.0: plan.linear(x, v_0_weight, v_0_bias, scales[0], 0)" in code
    assert "aten.linear.default" in code and "aten.relu.default" in code     # the model's own forward
    # "auto": Linears this small scale, as a WA call of their own would cost more than it saves...
    assert "eagerly W formed" not in ic.compile_invariant(mlp([3, 4, 2])).code
    # ...unless their activations outweigh their weights by more (as a larger batch's would):
    # formed eagerly; compiled, they scale
    import invariance_compiler.codegen.allocate as A
    monkeypatch.setattr(A, "WA_CALL_ENTRIES", 0)
    auto = ic.compile_invariant(mlp([3, 4, 2])).code
    assert "model.2: F.linear(x, w_2_weight, v_2_bias)   # eagerly W formed (WA); compiled: " \
           "plan.linear(x, v_2_weight, v_2_bias, scales[1], 1), scaled" in auto
    assert "w_0_weight, w_0_bias, w_2_weight = plan(p_in, carriers, v_0_weight, v_0_bias" in auto
    slow = ic.compile_invariant(mlp([3, 4, 2]), scale_activations=False).code
    assert "w_0_weight, w_0_bias, w_2_weight = plan(p_in, carriers, v_0_weight, v_0_bias" in slow
    assert "plan.linear" not in slow


@pytest.mark.parametrize("form", FORMS)
def test_parameters_are_v_or_free_entries_and_fixed_values_are_buffers(form):
    model, x = ZOO["vgg_bn"]()
    cm = ic.compile_invariant(model, x, form=form)
    prefix = "v_" if form == "gspace" else "free_"
    names = [n for n, _ in cm.named_parameters()]
    assert names and all(n.startswith(prefix) for n in names)
    extra = sum(p.numel() for n, p in cm.named_parameters() if n == "v_carriers")   # paths: carriers
    assert sum(p.numel() for p in cm.parameters()) == cm.report.num_params + extra
    fixed = sum(b.numel() for n, b in cm.named_buffers() if n.startswith("allocate.tensors.") and n.endswith(".fixed_val"))
    assert fixed == cm.report.num_generators


@pytest.mark.parametrize("form", FORMS)
def test_export_state_dict_reproduces_the_function_in_the_original_class(form):
    model, x = ZOO["resnet_basic"]()
    model = model.double()
    x = tuple(t.double() for t in x)
    cm = ic.compile_invariant(model, x, form=form)
    opt = torch.optim.SGD(cm.parameters(), lr=0.05)
    for _ in range(3):                            # move away from the start first
        opt.zero_grad(); cm(*x).square().mean().backward(); opt.step()
    fresh = type(model)([type(b)(b.conv1.in_channels, b.conv2.out_channels, b.conv1.stride[0])
                         for b in model.layers], model.fc.in_features).double()
    fresh.load_state_dict(cm.export_state_dict())
    assert list(cm.export_state_dict()) == list(model.state_dict())
    if form == "fixed":
        assert torch.equal(fresh(*x), cm(*x))      # the same weights, the same ops: bit for bit
    else:                                          # gspace Linears scale activations instead of W
        assert torch.allclose(fresh(*x), cm(*x), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("form", FORMS)
def test_state_dict_save_load_pickle_and_deepcopy(form):
    model, x = ZOO["densenet"]()
    cm = ic.compile_invariant(model, x, form=form)
    buf = io.BytesIO()
    torch.save(cm.state_dict(), buf)
    buf.seek(0)
    other = ic.compile_invariant(model, x, form=form)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    other.load_state_dict(torch.load(buf, weights_only=True))
    ref = cm(*x)
    assert torch.equal(other(*x), ref)
    for clone in (pickle.loads(pickle.dumps(cm)), copy.deepcopy(cm)):
        assert isinstance(clone, ic.InvariantModule) and clone.form == form
        assert torch.equal(clone(*x), ref)
        assert clone.num_free_parameters() == cm.num_free_parameters()
        assert torch.equal(clone.export_state_dict()["fc.weight"], cm.export_state_dict()["fc.weight"])


def _copy_state(model):
    """What each module of the copy holds: its parameter, buffer and tensor attribute objects."""
    return {name: ({k: id(v) for k, v in m._parameters.items()}, {k: id(v) for k, v in m._buffers.items()},
                   {k: id(v) for k, v in vars(m).items() if isinstance(v, torch.Tensor)})
            for name, m in model.named_modules()}


@pytest.mark.parametrize("form", ["gspace", "fixed"])
def test_forward_puts_the_copy_back(form):
    # the forward swaps the weights into the copy for the call: the copy holds the same objects
    # as before after a call and after a call that fails inside the model, and a deep copy has
    # its own
    torch.manual_seed(0)
    model, x = ZOO["resnet_basic"]()
    model = model.double()
    x = tuple(t.double() for t in x)
    cm = ic.compile_invariant(model, x, form=form)
    before = _copy_state(cm.model)
    out = cm(*x)
    assert torch.allclose(out, model(*x), rtol=1e-10, atol=1e-12)
    assert _copy_state(cm.model) == before
    with pytest.raises(RuntimeError):
        cm(x[0][:, :1])                                  # fails inside the model's forward
    assert cm._guard is None
    assert _copy_state(cm.model) == before
    clone = copy.deepcopy(cm)
    with torch.no_grad():
        next(clone.parameters()).mul_(1.5)
    assert torch.equal(cm(*x), out) and not torch.equal(clone(*x), out)
    assert _copy_state(cm.model) == before


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop])
def test_any_torch_optimizer_trains_it_and_keeps_its_state(opt_cls):
    model, x = ZOO["mlp"]()
    y = torch.randint(0, 3, (x[0].shape[0],))
    cm = ic.compile_invariant(model, x)
    opt = opt_cls(cm.parameters(), lr=1e-3)
    first = None
    for step in range(30):
        opt.zero_grad()
        loss = F.cross_entropy(cm(*x), y)
        loss.backward()
        opt.step()
        first = first if first is not None else float(loss.detach())
    assert float(F.cross_entropy(cm(*x), y).detach()) < first
    if opt_cls is not torch.optim.SGD:
        steps = [int(s["step"]) for s in opt.state.values()]
        assert steps and all(s == 30 for s in steps)   # one optimizer, state kept across steps


def test_fixed_entries_stay_bit_for_bit_under_adamw_with_weight_decay():
    model, x = ZOO["cnn_pool"]()
    cm = ic.compile_invariant(model, x, form="fixed")
    before = cm.weights()
    opt = torch.optim.AdamW(cm.parameters(), lr=1e-2, weight_decay=0.5)
    for _ in range(1000):
        opt.zero_grad()
        cm(*x).square().mean().backward()
        opt.step()
    after = cm.weights()
    moved = False
    for name, ps in cm.skeleton.params.items():
        k = ps.fixed_idx
        assert torch.equal(after[name].reshape(-1)[k], before[name].reshape(-1)[k]), name
        moved |= not torch.equal(after[name], before[name])
    assert moved


@pytest.mark.parametrize("fixed", ["scale", "overwrite"])
def test_fixed_entries_are_brought_to_the_value(fixed):
    """'scale' moves along the orbit (|w_K| = value, the function kept); 'overwrite' sets them."""
    model, x = ZOO["mlp_nobias"]()
    model = model.double()
    x = tuple(t.double() for t in x)
    cm = ic.compile_invariant(model, x, form="fixed", fixed=fixed, value=1.0)
    w = cm.weights()
    for name, ps in cm.skeleton.params.items():
        got = w[name].reshape(-1)[ps.fixed_idx]
        assert torch.allclose(got.abs() if fixed == "scale" else got, torch.ones_like(got), rtol=1e-12), name
    if fixed == "scale":
        assert _compare(model, cm, x) <= 1e-12


def test_balance_equalises_squared_weight_in_and_out_of_every_rescale_class():
    from invariance_compiler.skeleton import balance
    model, x = ZOO["mlp_nonstraight"]()
    model = model.double()
    x = tuple(t.double() for t in x)
    with torch.no_grad():
        model[0].weight.mul_(30.0)                 # badly unbalanced start
        model[0].bias.mul_(30.0)
    ref = model(*x)
    report = ic.analyze(model, x)
    before = sum(float(p.detach().square().sum()) for p in model.parameters())
    balance(report, model)
    after = sum(float(p.detach().square().sum()) for p in model.parameters())
    assert torch.allclose(model(*x), ref, rtol=1e-10, atol=1e-12)
    assert after < before
    for g in report.generators:                    # stationarity: d/dλ Σ‖w‖² = 0
        total = 0.0
        for name, (idx, sign) in g.entries().items():
            w = dict(model.named_parameters())[name].detach().reshape(-1)[idx]
            total += float((sign * w.square()).sum())
        assert abs(total) <= 1e-6 * after


def test_torch_compile_matches_eager():
    model, x = ZOO["mlp"]()
    cm = ic.compile_invariant(model, x)
    compiled = torch.compile(cm, backend="aot_eager")
    ref = cm(*x)
    out = compiled(*x)
    assert torch.allclose(out, ref, rtol=1e-6, atol=1e-7)
    out.square().sum().backward()
    g_compiled = [p.grad.clone() for p in cm.parameters()]
    cm.zero_grad()
    ref.square().sum().backward()
    for a, b in zip(g_compiled, [p.grad for p in cm.parameters()]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bad_arguments_are_refused():
    model = mlp([3, 4, 2])
    with pytest.raises(ValueError, match="form must be"):
        ic.compile_invariant(model, form="G")
    with pytest.raises(ValueError, match="fixed must be"):
        ic.compile_invariant(model, fixed="zero")
    with pytest.raises(ValueError, match="scale_activations must be"):
        ic.compile_invariant(model, scale_activations="yes")


def test_frozen_parameters_are_constants_and_never_move():
    model = mlp([4, 6, 5, 3]).double()
    model[2].weight.requires_grad_(False)         # a frozen middle layer (its bias still trains)
    x = torch.randn(16, 4, dtype=torch.float64)
    report = ic.analyze(model, x)
    assert all("2.weight" not in g.params for g in report.generators)
    from invariance_compiler.analyze import oracle
    assert oracle.invariance_error(model, report, (x,)) <= 1e-10
    for form in FORMS:
        cm = ic.compile_invariant(model, x, form=form)
        assert torch.allclose(cm(x), model(x), rtol=1e-12)
        before = cm.weights()["2.weight"]
        opt = torch.optim.SGD([p for p in cm.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(5):
            opt.zero_grad()
            cm(x).square().sum().backward()
            opt.step()
        assert torch.equal(cm.weights()["2.weight"], before), form


@pytest.mark.parametrize("scale_activations", [True, False])
def test_running_statistics_and_eval_mode_match_the_export(scale_activations):
    """An inert bias (removed by the BatchNorm after it) does not change the training-mode output,
    but BatchNorm's running mean records it: the compiled module must carry its true value."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()
    x = torch.randn(16, 6, dtype=torch.float64)
    cm = ic.compile_invariant(model, x, form="gspace", scale_activations=scale_activations)
    ref = copy.deepcopy(model)
    cm(x), ref(x)
    assert torch.allclose(cm.state_dict()["model.1.running_mean"], ref.state_dict()["1.running_mean"], rtol=1e-12)
    opt = torch.optim.SGD(cm.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        cm(x).square().mean().backward()
        opt.step()
    back = copy.deepcopy(model)
    back.load_state_dict(cm.export_state_dict())
    cm.eval(), back.eval()
    assert torch.allclose(cm(x), back(x), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", ["mlp", "cnn_pool"])
def test_an_eager_call_writes_held_entries_back_without_invalidating_a_pending_graph(name, form):
    """The entries a module holds constant are written on every eager call, without a test (which
    on a GPU would wait for it) and without bumping the parameter's version: a graph waiting for
    its backward while an entry is moved through `.data` and another call writes it back gets the
    gradient it had (float64)."""
    model, x, _ = zoo_or_hf(name)
    model, x = model.double(), tuple(t.double() for t in x)
    cm = ic.compile_invariant(model, x, form=form, scale_activations=True)
    cm(*x).square().sum().backward()
    ref = [p.grad.clone() for p in cm.parameters()]
    plan = cm.allocate
    held = [(cm.parameter_of(n), plan.held_slots(i)) for i, n in enumerate(cm.allocated)
            if plan.held_slots(i) is not None]
    assert held
    cm.zero_grad()
    out = cm(*x)
    versions = [p._version for p, _ in held]
    for p, (idx, _) in held:
        p.data.view(-1)[idx] += 3.0
    again = cm(*x)
    assert [p._version for p, _ in held] == versions
    assert all(torch.equal(p.detach().view(-1)[idx], val.to(p.dtype)) for p, (idx, val) in held)
    assert torch.allclose(again, out, rtol=1e-12, atol=1e-12)
    out.square().sum().backward()
    for a, b in zip(ref, [p.grad for p in cm.parameters()]):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", FORMS)
def test_compiled_and_called_under_inference_mode(form):
    """Under torch.inference_mode the parameters are inference tensors, which have no version
    counter: the held entries are written all the same, and the function is the original's."""
    model, x, _ = zoo_or_hf("cnn_pool")
    with torch.inference_mode():
        cm = ic.compile_invariant(model, x, form=form)
        assert all(p.is_inference() for p in cm.parameters())
        assert torch.allclose(cm(*x), model(*x), rtol=1e-5, atol=1e-6)

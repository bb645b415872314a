"""Stop and resume: state dicts of the compiled module (or of a plain model under GSGD) and of
its optimizer, saved with torch.save and read with torch.load(weights_only=True), into objects
built from *other* weights (so another skeleton), continue exactly like an uninterrupted run."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F

import invariance_compiler as ic
from invariance_compiler.tools.zoo import ZOO


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _batches(x, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(x.shape, generator=g, dtype=x.dtype), torch.randint(0, 3, (x.shape[0],), generator=g))
            for _ in range(n)]


def _steps(model, opt, batches):
    for xb, yb in batches:
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()


OPTS = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.02, momentum=0.9, weight_decay=1e-3),
        "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3)}


@pytest.mark.parametrize("form", ["gspace", "fixed"])
@pytest.mark.parametrize("opt", sorted(OPTS))
def test_resumed_training_is_bit_for_bit_the_uninterrupted_run(form, opt):
    torch.manual_seed(0)
    model, (x,) = ZOO["resnet_basic"]()               # BatchNorm: running stats are state too
    batches = _batches(x, 6)
    straight = ic.compile_invariant(model, x, form=form)
    o = OPTS[opt](straight.parameters())
    _steps(straight, o, batches)

    first = ic.compile_invariant(model, x, form=form)
    o1 = OPTS[opt](first.parameters())
    _steps(first, o1, batches[:3])
    saved = _roundtrip({"model": first.state_dict(), "opt": o1.state_dict()})

    torch.manual_seed(123)                            # other weights: another skeleton
    other, _ = ZOO["resnet_basic"]()
    resumed = ic.compile_invariant(other, x, form=form)
    differs = any(not torch.equal(a.fixed_idx, b.fixed_idx)
                  for a, b in zip(resumed.skeleton.params.values(), first.skeleton.params.values()))
    resumed.load_state_dict(saved["model"])
    o2 = OPTS[opt](resumed.parameters())
    o2.load_state_dict(saved["opt"])
    _steps(resumed, o2, batches[3:])

    assert differs, "the test should resume into a module whose own skeleton was different"
    for (n, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), n
    for k, v in straight.export_state_dict().items():
        assert torch.equal(v, resumed.export_state_dict()[k]), k
    xt = torch.randn(4, *x.shape[1:])
    straight.eval(), resumed.eval()
    assert torch.equal(straight(xt), resumed(xt))


def test_gsgd_optimizer_resumes_bit_for_bit_on_a_plain_model():
    torch.manual_seed(0)
    model, (x,) = ZOO["mlp"]()
    batches = _batches(x, 6)

    a = copy.deepcopy(model)
    oa = ic.optim.GSGD(a, lr=0.05, momentum=0.9, weight_decay=1e-3, example_inputs=x)
    _steps(a, oa, batches)

    b = copy.deepcopy(model)
    ob = ic.optim.GSGD(b, lr=0.05, momentum=0.9, weight_decay=1e-3, example_inputs=x)
    _steps(b, ob, batches[:3])
    saved = _roundtrip({"model": b.state_dict(), "opt": ob.state_dict()})
    torch.manual_seed(7)
    c, _ = ZOO["mlp"]()                               # fresh weights, then the checkpoint
    c.load_state_dict(saved["model"])
    oc = ic.optim.GSGD(c, lr=0.05, momentum=0.9, weight_decay=1e-3, example_inputs=x)
    oc.load_state_dict(saved["opt"])
    _steps(c, oc, batches[3:])
    for (n, p), q in zip(a.named_parameters(), c.parameters()):
        assert torch.equal(p, q), n


def test_exported_weights_of_a_resumed_module_reproduce_it_in_the_original_class():
    torch.manual_seed(0)
    model, (x,) = ZOO["cnn_pool"]()
    model, x = model.double(), x.double()
    cm = ic.compile_invariant(model, x, form="gspace")
    _steps(cm, torch.optim.SGD(cm.parameters(), lr=0.05), _batches(x, 3))
    torch.manual_seed(5)
    fresh, _ = ZOO["cnn_pool"]()
    other = ic.compile_invariant(fresh.double(), x, form="gspace")
    other.load_state_dict(_roundtrip(cm.state_dict()))
    fresh.load_state_dict(_roundtrip(other.export_state_dict()))
    assert torch.allclose(fresh(x), cm(x), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("form", ["gspace", "fixed"])
def test_a_checkpoint_of_the_fx_graph_modules_loads(form):
    """tests/data/fx_module_checkpoints.pt was written by the compiled modules before the torch.export
    front end (a vgg_bn trained two steps, then eval): their buffers sat at the top level
    ("1.running_mean"); today's live under "model.". Loading it reproduces the saved module."""
    import os
    path = os.path.join(os.path.dirname(__file__), "data", "fx_module_checkpoints.pt")
    saved = torch.load(path, weights_only=True)
    model, _ = ZOO["vgg_bn"]()
    model = model.double()
    model.load_state_dict(saved["seed_state"])
    x = saved["x"]
    cm = ic.compile_invariant(model, x, form=form)
    cm.load_state_dict(saved[form]["state"])
    cm.eval()
    assert torch.allclose(cm(*x), saved[form]["eval_out"], rtol=1e-12, atol=1e-14)


def test_a_checkpoint_brings_its_chart_with_or_without_carriers():
    """Raw path values keep a carrier parameter, scaled coordinates none (their entries are in V):
    a module of either chart that loads the other's checkpoint becomes that module, parameters and
    function (float64)."""
    torch.manual_seed(0)
    model, x = ZOO["residual_mlp"]()
    model = model.double()
    x = tuple(t.double() for t in x)
    scaled = ic.compile_invariant(copy.deepcopy(model), x)
    paths = ic.compile_invariant(copy.deepcopy(model), x, coordinates="paths")
    assert not hasattr(scaled, "v_carriers") and paths.v_carriers.numel()
    with torch.no_grad():                                      # move both off their start
        for cm in (scaled, paths):
            for p in cm.parameters():
                p.mul_(1 + 0.1 * torch.randn_like(p))
    for saved, into in ((scaled, ic.compile_invariant(copy.deepcopy(model), x, coordinates="paths")),
                        (paths, ic.compile_invariant(copy.deepcopy(model), x))):
        into.load_state_dict(_roundtrip(saved.state_dict()))
        assert [n for n, _ in into.named_parameters()] == [n for n, _ in saved.named_parameters()]
        assert torch.allclose(into(*x), saved(*x), rtol=1e-12, atol=1e-14)
        into(*x).square().sum().backward()
        assert all(p.grad is not None for p in into.parameters() if p.numel())


@pytest.mark.parametrize("name", ["mini_transformer", "vgg_bn"])
def test_a_checkpoint_with_log_magnitude_carriers_loads(name):
    """tests/data/log_carrier_checkpoints.pt was written by gspace modules of commit dde826f (float64,
    two SGD steps, then eval), whose scaled coordinates trained the carriers as log-magnitudes with
    P_in moving. Today's modules hold P_in; loading one of those checkpoints adopts its chart (the
    plan's buffers), reproduces its outputs, and trains on."""
    import os
    path = os.path.join(os.path.dirname(__file__), "data", "log_carrier_checkpoints.pt")
    saved = torch.load(path, weights_only=True)[name]
    model, _ = ZOO[name]()
    model = model.double()
    model.load_state_dict(saved["seed_state"])
    x = saved["x"]
    cm = ic.compile_invariant(model, x)
    assert cm.allocate.lin_const is not None or not cm.allocate.fast          # today's chart
    cm.load_state_dict(saved["state"])
    assert cm.allocate.log_carriers and not cm.allocate._p_in_held
    cm.eval()
    assert torch.allclose(cm(*x), saved["eval_out"], rtol=1e-12, atol=1e-14)
    cm.train()
    before = cm(*x).detach()
    opt = torch.optim.SGD(cm.parameters(), lr=0.01)
    cm(*x).square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in cm.parameters() if p.grad is not None)
    opt.step()
    after = cm(*x).detach()
    assert torch.isfinite(after).all() and not torch.equal(after, before)


@pytest.mark.parametrize("form", ["gspace", "fixed"])
def test_a_checkpoint_with_relation_slots_resumes_bit_for_bit(form):
    """mini_transformer's query/key generators are quotiented (relation slots, their units in M):
    a module compiled from other weights (another skeleton) becomes the saved one."""
    def steps(cm, opt, n):
        for k in range(n):
            opt.zero_grad()
            cm(ids[k % 2]).square().mean().backward()
            opt.step()

    torch.manual_seed(0)
    model, (x,) = ZOO["mini_transformer"]()
    ids = [x, x.flip(0)]
    straight = ic.compile_invariant(model, (x,), form=form)
    assert int((straight.skeleton.relation_param >= 0).sum()) > 0
    o = OPTS["sgd"](straight.parameters())
    steps(straight, o, 6)
    first = ic.compile_invariant(model, (x,), form=form)
    o1 = OPTS["sgd"](first.parameters())
    steps(first, o1, 3)
    saved = _roundtrip({"model": first.state_dict(), "opt": o1.state_dict()})
    torch.manual_seed(123)
    resumed = ic.compile_invariant(ZOO["mini_transformer"]()[0], (x,), form=form)
    assert not all(torch.equal(getattr(resumed.skeleton, k), getattr(first.skeleton, k))
                   for k in first.skeleton._STATE)
    resumed.load_state_dict(saved["model"])
    o2 = OPTS["sgd"](resumed.parameters())
    o2.load_state_dict(saved["opt"])
    for k in range(3):                    # the same batches as straight's steps 3, 4, 5
        o2.zero_grad()
        resumed(ids[(k + 3) % 2]).square().mean().backward()
        o2.step()
    assert torch.equal(straight(x), resumed(x))

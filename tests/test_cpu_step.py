"""The fused C++ G-SGD step on CPU tensors (kernels/cpu_step.cpp) against the PyTorch path of
GSGD (kernels.mode('off')), both CPU: over odd shapes and every kind of layout (Linear, 1×1 and
grouped / depthwise convolutions, transposed convolutions, whose input class runs along rows,
BatchNorm's inert biases, concatenation), tensors whose scale moves with the carriers and tensors
whose scale does not (stepped in the last pass), momentum and weight decay, fp64 and fp32, large
tensors (several units per tensor, streaming stores, rows not 32-byte aligned, fixed and carrier
slots in a row's unaligned head, its vectors and its tail); the result does not depend on the
thread count; without a compiler GSGD warns once and keeps the PyTorch path."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import invariance_compiler as ic
from invariance_compiler import kernels
from invariance_compiler.kernels import cpu
from invariance_compiler.optim import GSGD
from invariance_compiler.tools.zoo import ZOO

from conftest import odd_model

pytestmark = pytest.mark.skipif(cpu.library() is None, reason="no C++ compiler with OpenMP here")


def wide_mlp():
    """1.1M-entry weight (8.8 MB in fp64): several units, streamed W, rows of 1100 entries."""
    return nn.Sequential(nn.Linear(16, 1000), nn.ReLU(), nn.Linear(1000, 1100), nn.ReLU(), nn.Linear(1100, 5))


MODELS = {"odd": lambda: (odd_model(), (torch.randn(2, 3, 6, 6),)),
          "wide_mlp": lambda: (wide_mlp(), (torch.randn(8, 16),)),
          **{k: ZOO[k] for k in ("mlp_nonstraight", "grouped_depthwise", "conv_transpose", "vgg_bn",
                                 "resnet_bottleneck", "densenet", "layernorm_mlp", "split_cat")}}


def gsgd(model, x, dtype, momentum=0.9, weight_decay=1e-3):
    model = copy.deepcopy(model).to(dtype)
    x = tuple(t.to(dtype) if t.is_floating_point() else t for t in x)
    lr = 1e-6     # a stable run: G-SGD from default init diverges at 1e-3 on some draws (|W| 1e6 in 3 steps)
    return model, x, GSGD(model, lr=lr, momentum=momentum, weight_decay=weight_decay, example_inputs=x)


def step_pairs(model, x, dtype, momentum, weight_decay, steps=3, setups=(("off", None), ("auto", None))):
    """Two GSGD runs stepped from the same state with the same gradients `steps` times (the
    state re-synced after each step, so that the comparison is of the step alone, not of a
    trajectory that may amplify rounding); yields each step's (params, optimizer state, optimizer)
    of both."""
    runs = [gsgd(model, x, dtype, momentum, weight_decay) for _ in setups]
    (m0, x0, o0) = runs[0]
    for _ in range(steps):
        o0.zero_grad()
        m0(*x0).pow(2).mean().backward()
        out = []
        for (m, _, o), (mode, threads) in zip(runs, setups):
            for p, q in zip(m.parameters(), m0.parameters()):
                p.grad = q.grad.clone()
            old = torch.get_num_threads()
            torch.set_num_threads(threads or old)
            try:
                with kernels.mode(mode):
                    o.step()
            finally:
                torch.set_num_threads(old)
            out.append(([p.detach().clone() for p in m.parameters()], copy.deepcopy(o.state_dict()["state"]), o))
        yield out
        for m, _, o in runs[1:]:
            m.load_state_dict(m0.state_dict())
            o.load_state_dict(copy.deepcopy(o0.state_dict()))     # not aliasing its tensors


def assert_close(a, b, rtol):
    for x, y in zip(a, b):
        assert x.shape == y.shape and bool(torch.isfinite(y).all())
        if y.numel() == 0:
            continue
        assert torch.allclose(x, y, rtol=rtol, atol=rtol * float(y.abs().max())), float((x - y).abs().max())


# fp64 on every model with and without momentum and weight decay (tolerance 1e-12, optimizer state
# too); fp32 where rounding differs (products taken in another order: 1e-5)
STEP_CASES = [(name, mom, wd, torch.float64) for name in MODELS for mom, wd in ((0.0, 0.0), (0.9, 1e-3))] + \
    [(name, 0.9, 1e-3, torch.float32) for name in ("odd", "wide_mlp", "conv_transpose", "grouped_depthwise")]


@pytest.mark.parametrize("name,momentum,weight_decay,dtype", STEP_CASES)
def test_fused_cpu_step_equals_the_pytorch_step(name, momentum, weight_decay, dtype):
    model, x = MODELS[name]()
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    for (ref_p, ref_s, _), (got_p, got_s, opt) in step_pairs(model, x, dtype, momentum, weight_decay):
        assert opt.backend == "C++" and all(p.dtype == dtype for p in got_p)   # it did run the fused step
        assert_close(got_p, ref_p, rtol)
        if dtype == torch.float64:
            assert got_s.keys() == ref_s.keys()
            for k in ref_s:
                assert got_s[k].keys() == ref_s[k].keys()
                assert_close([got_s[k][f] for f in ref_s[k]], [ref_s[k][f] for f in ref_s[k]], rtol)


@pytest.mark.parametrize("dtype,threads", [(torch.float32, 2), (torch.float64, 2), (torch.float32, 3)])
def test_the_result_does_not_depend_on_the_thread_count(dtype, threads):
    model, x = MODELS["wide_mlp"]()
    for (one, s1, _), (two, s2, _) in step_pairs(model, x, dtype, 0.9, 0.0, 2, (("auto", 1), ("auto", threads))):
        for a, b in zip(one, two):
            assert torch.equal(a, b)
        for k in s1:
            for f in s1[k]:
                assert torch.equal(s1[k][f], s2[k][f])


def test_half_precision_takes_the_pytorch_path_and_the_fused_step_wants_contiguous_tensors():
    model, x = MODELS["odd"]()
    plan_tensors = [torch.zeros(3, 4, dtype=torch.bfloat16)]
    assert cpu.cpu_step(None, plan_tensors) is None
    assert cpu.cpu_step(None, [torch.zeros(4, 3).t()]) is None
    for _, (_, _, opt) in step_pairs(model, x, torch.bfloat16, 0.9, 0.0, 1):
        assert opt.backend == "PyTorch"


def test_a_non_finite_carrier_raises_and_leaves_the_weights():
    model, x = MODELS["odd"]()
    model = model.double()
    x = tuple(t.double() for t in x)
    opt = GSGD(model, lr=0.05, example_inputs=x)
    model(*x).pow(2).mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    model[6].weight.grad[0, 0] = float("nan")           # reaches the carriers through the reduction
    with pytest.raises(FloatingPointError, match="zero or non-finite"):
        opt.step()
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a.detach(), b)


def test_the_library_is_built_once_and_without_a_compiler_gsgd_warns_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("IC_CACHE_DIR", str(tmp_path))
    cpu.library.cache_clear()
    try:
        assert cpu.library() is not None and len(list(tmp_path.glob("cpu_step-*.so"))) == 1
        cpu.library.cache_clear()

        def no_build(*args, **kwargs):
            raise AssertionError("built again")
        monkeypatch.setattr(cpu.subprocess, "run", no_build)
        assert cpu.library() is not None                # from the cache, no compiler run
        monkeypatch.undo()

        monkeypatch.setenv("IC_CACHE_DIR", str(tmp_path / "empty"))
        monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
        cpu.library.cache_clear()
        model, x = MODELS["odd"]()
        with pytest.warns(RuntimeWarning, match="could not be built.*CXX"):
            for (ref_p, _, _), (got_p, _, opt) in step_pairs(model, x, torch.float64, 0.9, 0.0, 2):
                assert opt.backend == "PyTorch"
                assert_close(got_p, ref_p, 0.0)             # the same PyTorch path
        with warnings.catch_warnings():
            warnings.simplefilter("error")              # one warning, not one per step
            list(step_pairs(model, x, torch.float64, 0.9, 0.0, 1))
    finally:
        monkeypatch.undo()
        cpu.library.cache_clear()


def test_an_empty_parameter_in_the_group():
    class WithEmpty(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.empty, self.b = nn.Linear(3, 4), nn.Parameter(torch.zeros(4, 0)), nn.Linear(4, 2)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.b(torch.cat([h, h @ self.empty], 1))

    model, x = WithEmpty(), (torch.randn(5, 3),)
    for (ref_p, _, _), (got_p, _, opt) in step_pairs(model, x, torch.float64, 0.9, 0.0, 2):
        assert "empty" in opt.allocated and opt.backend == "C++"
        assert_close(got_p, ref_p, 1e-12)


def test_the_profilers_pass_count_has_the_first_layer_in_one_pass():
    """An MLP's first layer reads the inputs, whose P_in is 1: the fused step steps it (weight and
    bias) in its last pass alone, 4 tensor passes; every other layer's input scale moves with the
    carriers, 5 passes (profile.fused_passes, the figure behind the profiler's GB/s)."""
    from invariance_compiler.tools.profile import fused_passes
    model = nn.Sequential(nn.Linear(7, 9), nn.ReLU(), nn.Linear(9, 6), nn.ReLU(), nn.Linear(6, 3))
    opt = GSGD(model, example_inputs=(torch.randn(2, 7),))
    first, total = 7 * 9 + 9, sum(p.numel() for p in model.parameters())
    assert fused_passes(opt) == round((4 * first + 5 * (total - first)) / total, 1)


def test_the_fused_step_holds_the_relation_generators_fixed_entries():
    """mini_transformer's query/key generators are quotiented (DESIGN §3.6c): the C++ step on its
    float32 weights gives SGD on the gspace module's iterates (paths coordinates)."""
    torch.manual_seed(0)
    model, x = ZOO["mini_transformer"]()
    cm = ic.compile_invariant(model, x, coordinates="paths")
    assert int((cm.skeleton.relation_param >= 0).sum()) > 0
    plain = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in plain.named_parameters():
            p.copy_(cm.weights()[n])
    o1 = torch.optim.SGD(cm.parameters(), lr=1e-3, momentum=0.9)
    o2 = ic.optim.GSGD(plain, lr=1e-3, momentum=0.9, example_inputs=x, skeleton=cm.skeleton)
    for _ in range(10):
        for m, o in ((cm, o1), (plain, o2)):
            o.zero_grad()
            m(*x).square().mean().backward()
            o.step()
    assert o2.backend == "C++"
    assert torch.allclose(cm(*x), plain(*x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["odd", "wide_mlp", "grouped_depthwise", "conv_transpose", "vgg_bn", "densenet",
                                  "split_cat", "mini_transformer"])
def test_fused_wa_and_icr_equal_the_reference(name, dtype):
    """The gspace module's WA and ICR in cpu_step.cpp's passes (what kernels/wa.py and icr.py run on
    fp32 / fp64 CPU tensors) against the PyTorch references: the weights, ∂L/∂V (0 on the K and J
    slots), the per-class reduction and the carriers' direct gradient, at carriers moved off the
    compile-time point and with a random ∂L/∂W."""
    from invariance_compiler.kernels import icr, wa
    torch.manual_seed(0)
    model, x = (MODELS | {"mini_transformer": ZOO["mini_transformer"]})[name]()
    model = copy.deepcopy(model).to(dtype)
    x = tuple(t.to(dtype) if t.is_floating_point() else t for t in x)
    # fp64 on raw path values: carriers, and P_in moving with them; fp32 on scaled coordinates
    # (neither: P_in held, the carriers' entries in V), whose values are well scaled for fp32 sums
    paths = dtype == torch.float64
    cm = ic.compile_invariant(model, x, scale_activations=False, coordinates="paths" if paths else "scaled")
    plan = cm.allocate
    grp = plan.group(plan.wa)
    vs = [plan.tensors[i].hold(cm.parameter_of(cm.allocated[i]).detach().clone()) for i in plan.wa]
    for v, t in zip(vs, grp.slots):        # V's K and J slots hold no coordinate: whatever is there is ignored
        slots = torch.cat([t.fixed_idx, t.carrier_idx])
        v.view(-1)[slots] = torch.randn(slots.numel(), dtype=dtype)
    c = plan.carrier_values(cm._carriers()).detach()
    c = c * (1 + 0.1 * torch.randn_like(c))
    p = plan.path_in(c).detach()
    fused = cpu.cpu_passes(grp, [*vs, p, plan.M, c])
    assert fused is not None and grp.layout.k_idx.numel() and bool(grp.layout.j_idx.numel()) == paths
    rtol = 1e-13 if dtype == torch.float64 else 1e-5
    assert_close(fused.wa(vs, p, plan.M, c), wa.reference(vs, p, plan.M, c, grp.slots), rtol)
    gws = [torch.randn_like(v) for v in vs]
    got, ref = fused.icr(gws, vs, p, plan.M, c), icr.reference(gws, vs, p, plan.M, c, grp.slots)
    assert_close(got[0], ref[0], rtol)
    # raw path values spread over orders of magnitude, and the per-class sums cancel: looser there
    sums = 1e-11 if paths else rtol
    assert_close([got[1][:-1], got[2]], [ref[1][:-1], ref[2]], sums)     # [-1]: no class, never read
    for g, t in zip(got[0], grp.slots):
        assert bool((g.reshape(-1)[torch.cat([t.fixed_idx, t.carrier_idx])] == 0).all())


@pytest.mark.parametrize("name", ["resnet_basic", "layerscale", "mini_transformer"])
def test_the_gspace_module_runs_the_fused_passes_and_keeps_its_result(name):
    """A float64 gspace module's forward and gradients are the same with the fused passes
    (kernels 'auto' on the CPU) as with the references (kernels 'off'); the fused passes ran."""
    torch.manual_seed(0)
    model, x = ZOO[name]()
    model = model.double()
    x = tuple(t.double() if t.is_floating_point() else t for t in x)
    cm = ic.compile_invariant(model, x, scale_activations=False)
    assert cm.allocate.wa
    ran = []
    real = cpu.CpuPasses.icr

    def counted(self, *args):
        ran.append(1)
        return real(self, *args)

    results = []
    for mode in ("auto", "off"):
        cm.zero_grad()
        with kernels.mode(mode), pytest.MonkeyPatch.context() as mp:
            mp.setattr(cpu.CpuPasses, "icr", counted)
            out = cm(*x)
            out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in cm.parameters() if p.grad is not None]))
        assert bool(ran) == (mode == "auto")
        ran.clear()
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-13, atol=1e-15)
    assert_close(results[0][1], results[1][1], 1e-11)

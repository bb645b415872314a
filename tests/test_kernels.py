"""The Triton kernels (WA, ICR, fused G-SGD step) against the PyTorch reference: on CUDA where
there is one, else under Triton's interpreter on CPU (kernels.mode('interpret'))."""
import copy

import pytest
import torch

import invariance_compiler as ic
from invariance_compiler import kernels
from invariance_compiler.codegen.forms import icr
from invariance_compiler.kernels.layout import block_view
from invariance_compiler.optim import GSGD
from invariance_compiler.tools.zoo import ZOO

from conftest import DEVICE, odd_model

MODE = "auto" if DEVICE == "cuda" else "interpret"
# every test that compares the kernels with the reference needs them: skip, never pass on the reference
needs_triton = pytest.mark.skipif(not kernels.triton_available(),
                                  reason="Triton is not installed (pip install triton; Linux only)")
# (dtype, atol, rtol): the kernels compute in fp32 (fp64 for fp64) and round once
DTYPES = [(torch.float64, 1e-12, 1e-12), (torch.float32, 1e-5, 1e-5),
          (torch.float16, 2e-3, 2e-3), (torch.bfloat16, 2e-2, 2e-2)]


def plan_and_values(model, x, dtype):
    x = tuple(t.double() for t in x)
    # raw path values: carriers and a P_in that moves with them (scaled coordinates hold P_in and
    # keep the carriers' entries in V, a subset of what the kernels do)
    cm = ic.compile_invariant(model.double(), x, scale_activations=False, coordinates="paths").to(
        dtype=dtype, device=DEVICE)
    plan = cm.allocate
    vs = [cm.parameter_of(cm.allocated[i]).detach() for i in plan.wa]
    return cm, plan, vs, plan.carrier_values(cm._carriers()).detach()


def close(a, b, atol, rtol):
    a, b = a.double(), b.double()
    return bool(((a - b).abs() <= atol + rtol * b.abs()).all()), float((a - b).abs().max())


@needs_triton
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_wa_and_icr_match_the_reference_on_odd_shapes(dtype, atol, rtol):
    cm, plan, vs, c = plan_and_values(odd_model(), (torch.randn(2, 3, 6, 6),), dtype)
    assert [tuple(v.shape) for v in vs][::2] == [(7, 3, 3, 3), (33, 7, 1, 1), (17, 33), (5, 17), (3, 5)]
    p_in = plan.path_in(c)
    gws = [torch.randn_like(v) for v in vs]
    with kernels.mode("off"):
        ref_w = plan(p_in, c, *vs)
        ref = icr(plan, p_in, c, vs, gws, plan.wa)
    with kernels.mode(MODE):
        assert kernels.use_triton(vs[0])
        got_w = plan(p_in, c, *vs)
        got = icr(plan, p_in, c, vs, gws, plan.wa)
    for a, b in zip(got_w, ref_w):
        assert close(a, b, atol, rtol)[0], close(a, b, atol, rtol)
    for a, b in zip(got[0], ref[0]):                                   # ∂L/∂V
        assert close(a, b, atol, rtol)[0], close(a, b, atol, rtol)
    n = plan.n                                                         # ∂L/∂P_in (class n: no class)
    scale = float(ref[1][:n].abs().max())
    assert close(got[1][:n], ref[1][:n], atol * scale * 10, rtol * 10)[0]
    assert close(got[2], ref[2], atol * float(ref[2].abs().max()) * 10, rtol * 10)[0]


@pytest.mark.parametrize("shape,inp,out,expect", [
    ((3, 5), (1, 5), (3, 1), (1, 3, 5)),                     # Linear: input class by column
    ((7, 3, 3, 3), (1, 3, 1, 1), (7, 1, 1, 1), (1, 7, 27)),  # conv
    ((4, 6, 3), (4, 1, 1), (1, 6, 1), (1, 4, 18)),           # conv-transpose: input class by row
    ((6, 2, 3, 3), "grouped", (6, 1, 1, 1), (3, 2, 18)),     # groups=3: blocks of 2 rows
    ((5,), None, (5,), (1, 1, 5)),                           # bias
])
def test_block_view_factors_every_layout(shape, inp, out, expect):
    n = 50
    full = torch.arange(torch.Size(shape).numel()).reshape(shape)
    if inp == "grouped":                       # input channel g·2 + i for output rows of group g
        inp_t = (torch.arange(6) // 2 * 2).reshape(6, 1, 1, 1) + torch.arange(2).reshape(1, 2, 1, 1)
    else:
        inp_t = torch.full((1,) * len(shape), n) if inp is None else torch.arange(torch.Size(inp).numel()).reshape(inp)
    out_t = 10 + torch.arange(torch.Size(out).numel()).reshape(out)
    G, R, S, in_r, in_c, out_r, out_c = block_view(inp_t, out_t, torch.Size(shape), n)
    assert (G, R, S) == expect
    # the factored class arrays give back every entry's classes
    g, r, s = [t.reshape(-1) for t in torch.meshgrid(torch.arange(G), torch.arange(R), torch.arange(S), indexing="ij")]
    pick = lambda rows, cols: torch.where(cols[g * S + s] != n, cols[g * S + s], rows[g * R + r])
    assert torch.equal(pick(in_r, in_c), inp_t.expand(shape).reshape(-1)[full.reshape(-1)])
    assert torch.equal(pick(out_r, out_c), out_t.expand(shape).reshape(-1)[full.reshape(-1)])


class _Count:
    """Counts the launches of a Triton kernel."""

    def __init__(self, fn):
        self.fn, self.launches = fn, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.fn[grid]


@needs_triton
def test_one_launch_per_group(monkeypatch):
    from invariance_compiler.kernels import icr as icr_mod, wa as wa_mod
    cm, plan, vs, c = plan_and_values(odd_model(), (torch.randn(2, 3, 6, 6),), torch.float32)
    assert len(vs) == 9 and len({v.dim() for v in vs}) == 3           # ≥ 5 tensors, 3 kinds
    with kernels.mode(MODE):
        counts = {k: _Count(getattr(m, k)) for m, k in
                  ((wa_mod, "_wa_dense"), (wa_mod, "_wa_sparse"), (icr_mod, "_icr_dense"), (icr_mod, "_icr_sparse"))}
        for k, cnt in counts.items():
            monkeypatch.setattr(wa_mod if k.startswith("_wa") else icr_mod, k, cnt)
        p_in = plan.path_in(c)
        plan(p_in, c, *vs)
        icr(plan, p_in, c, vs, [torch.randn_like(v) for v in vs], plan.wa)
    assert {k: cnt.launches for k, cnt in counts.items()} == dict.fromkeys(counts, 1)


@needs_triton
@pytest.mark.parametrize("name", ["cnn_pool", "resnet_basic", "grouped_depthwise", "conv_transpose1d",
                                  "vgg_bn", "embedding", "densenet", "mini_transformer"])
def test_gspace_module_with_kernels_equals_without(name):
    model, x = ZOO[name]()
    model = model.double()
    x = tuple(t.double() if t.is_floating_point() else t for t in x)
    cms = [ic.compile_invariant(model, x, scale_activations=False).to(DEVICE) for _ in range(2)]
    x = tuple(t.to(DEVICE) for t in x)
    outs = []
    for cm, m in zip(cms, ("off", MODE)):
        opt = torch.optim.SGD(cm.parameters(), lr=0.05, momentum=0.9)
        with kernels.mode(m):
            assert kernels.use_triton(next(cm.parameters())) == (m == MODE)          # the backend under test
            for _ in range(3):
                opt.zero_grad()
                y = cm(*x)
                y.pow(2).mean().backward()
                opt.step()
        outs.append((y.detach(), [p.detach().clone() for p in cm.parameters()]))
    assert torch.allclose(outs[0][0], outs[1][0], rtol=1e-10, atol=1e-12)
    for a, b in zip(outs[0][1], outs[1][1]):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@needs_triton
@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 1e-3)])
@pytest.mark.parametrize("name", ["cnn_pool", "resnet_basic", "conv_transpose", "mlp", "mini_transformer"])
def test_fused_gsgd_step_equals_the_reference_step(name, momentum, weight_decay):
    model, x = ZOO[name]()
    model = model.double().to(DEVICE)
    x = tuple((t.double() if t.is_floating_point() else t).to(DEVICE) for t in x)
    models = [copy.deepcopy(model) for _ in range(2)]
    opts = [GSGD(m, lr=0.05, momentum=momentum, weight_decay=weight_decay, example_inputs=x) for m in models]
    for _ in range(5):
        for m, opt, mode in zip(models, opts, ("off", MODE)):
            with kernels.mode(mode):
                assert kernels.use_triton(next(m.parameters())) == (mode == MODE)
                opt.zero_grad()
                m(*x).pow(2).mean().backward()
                opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        a, b = a.detach(), b.detach()
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9 * float(a.abs().max()))
    s0, s1 = opts[0].state_dict()["state"], opts[1].state_dict()["state"]
    assert s0.keys() == s1.keys()
    for k in s0:
        assert s0[k].keys() == s1[k].keys()
        for f in s0[k]:
            assert torch.allclose(s0[k][f], s1[k][f], rtol=1e-9, atol=1e-9 * float(s0[k][f].abs().max()))


@needs_triton
def test_custom_ops_pass_opcheck():
    cm, plan, vs, c = plan_and_values(odd_model(), (torch.randn(2, 3, 6, 6),), torch.float32)
    with kernels.mode(MODE):
        p_in = plan.path_in(c)
        lay, tiling = plan.group(plan.wa).layout.op_args()      # as the registered ops take the record
        gws = [torch.randn_like(v) for v in vs]
        checks = ("test_schema", "test_faketensor")
        step = kernels.gsgd_step
        torch.library.opcheck(kernels.wa.wa_op, (vs, p_in, plan.M, c, lay, tiling, plan.n), test_utils=checks)
        torch.library.opcheck(kernels.icr.icr_op, (gws, vs, p_in, plan.M, c, lay, tiling, plan.n),
                              test_utils=checks)
        ws = [v.clone() for v in vs]
        torch.library.opcheck(step.gsgd_reduce_op, (gws, ws, p_in, plan.M, c.numel(), lay, tiling, plan.n),
                              test_utils=checks)
        args = (gws, [v.clone() for v in vs], [torch.zeros_like(v) for v in vs], ws, p_in, p_in.clone(),
                plan.M, c, lay, tiling, plan.n, 0.1, 0.9, 0.0, True)
        torch.library.opcheck(step.gsgd_update_op, args, test_utils=checks)


def test_compile_invariant_and_gsgd_keep_the_models_device():
    model, x = ZOO["resnet_basic"]()
    model, x = model.double().to(DEVICE), tuple(t.double().to(DEVICE) for t in x)
    cm = ic.compile_invariant(model, x, scale_activations=False)
    assert {p.device.type for p in cm.parameters()} == {torch.device(DEVICE).type}
    assert torch.allclose(cm(*x), model(*x), rtol=1e-10, atol=1e-12)
    opt = GSGD(model, lr=0.01, example_inputs=x)
    model(*x).pow(2).mean().backward()
    opt.step()
    assert {p.device.type for p in model.parameters()} == {torch.device(DEVICE).type}


def test_gsgd_on_channels_last_weights_equals_gsgd_on_contiguous_ones():
    # every pass indexes tensors flat in row-major order: a channels_last weight is stepped in a
    # contiguous copy (before: the PyTorch path raised on `view` of a channels_last V, and V's
    # fixed slots were zeroed in a copy made by `reshape`, so they were not zero)
    model, x = ZOO["cnn_pool"]()
    model = model.double().to(DEVICE)
    x = tuple(t.double().to(DEVICE) for t in x)
    last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    assert not last[0].weight.is_contiguous()
    for mode in ("off", "auto", MODE):
        models = [copy.deepcopy(model), copy.deepcopy(last)]
        opts = [GSGD(m, lr=1e-3, momentum=0.9, example_inputs=x) for m in models]
        with kernels.mode(mode):
            for _ in range(2):
                for m, opt in zip(models, opts):
                    opt.zero_grad()
                    m(*x).pow(2).mean().backward()
                    opt.step()
        assert not models[1][0].weight.is_contiguous()              # the layout is kept
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_the_switch_is_read_at_use_and_the_context_manager_wins(monkeypatch):
    monkeypatch.setenv("IC_KERNELS", "off")
    assert kernels.current_mode() == "off"
    with kernels.mode("auto"):
        assert kernels.current_mode() == "auto"
    assert kernels.current_mode() == "off"
    monkeypatch.setenv("IC_KERNELS", "fast")
    with pytest.raises(ValueError, match="IC_KERNELS"):
        kernels.current_mode()


@needs_triton
def test_a_layout_launches_with_the_tiling_it_was_built_with():
    from invariance_compiler.kernels.layout import META, Tiling, build_group
    cm, plan, vs, c = plan_and_values(odd_model(), (torch.randn(2, 3, 6, 6),), torch.float64)
    p_in = plan.path_in(c)
    with kernels.mode("off"):
        ref = plan(p_in, c, *vs)
    with kernels.mode(MODE):
        for tiling in (Tiling(), Tiling(BS=32, BR=4, ROWS=8, WARPS=2)):
            lay = build_group([plan.tensor_slots(i) for i in plan.wa], plan.n, plan.M.dtype, tiling).to(DEVICE)
            S, cols = lay.meta[:, META.index("S")], lay.meta[:, META.index("col_tiles")]
            assert torch.equal(cols, -(-S // tiling.BS))            # tiles cut with its own BS
            got = kernels.wa.launch(vs, p_in, plan.M, c, lay, plan.n)
            for a, b in zip(got, ref):
                assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)

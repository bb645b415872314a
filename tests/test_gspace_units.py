"""The gspace module's scaled coordinates (DESIGN §3.6b): each is its weight at the orbit's
typical-scale point, a model and a rescaled copy compile to the same ones, and SGD on them trains a
default-initialised model at the plain model's learning rate (benchmarks/gspace_sgd.py has the
full grid of 12 runs; the tests run three of them on one seed, and the BatchNorm CNN at lr 0.1 and
0.03 on six)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import invariance_compiler as ic
from invariance_compiler.analyze import oracle
from invariance_compiler.tools.demo import PreNormMLP, digits, digits_cnn, mlp
from invariance_compiler.skeleton import typical_scales
from invariance_compiler.tools.zoo import ZOO


def _model(name):
    torch.manual_seed(0)
    model, x = ZOO[name]()
    model = oracle.prepare(model)                    # float64, negligible eps, no all-zero weight
    return model, tuple(t.double() if t.is_floating_point() else t for t in x)


def _full(report, lam):
    full = torch.zeros(report.num_generators, dtype=torch.float64)
    full[: lam.numel()] = lam
    return full


@pytest.mark.parametrize("name", ["mlp", "residual_mlp", "vgg_bn", "mini_transformer", "layerscale"])
def test_coordinates_are_the_weights_at_the_typical_scale_point(name):
    model, x = _model(name)
    cm = ic.compile_invariant(model, x)
    weights = {n: p.detach() for n, p in model.named_parameters()}
    lam = typical_scales(cm.report, cm.skeleton, weights)
    moved = copy.deepcopy(model)
    cm.report.act(moved, _full(cm.report, lam))
    mw = dict(moved.named_parameters())
    coords = cm.path_values()
    for n in cm.allocated:
        free = ~cm.skeleton.fixed_mask(n)
        assert torch.allclose(coords[n][free], mw[n].detach()[free], rtol=1e-10, atol=1e-14), n
    assert torch.allclose(cm(*x), model(*x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["vgg_bn", "mini_transformer", "resnet_bottleneck"])
def test_the_typical_scale_point_moves_with_the_orbit(name):
    """λ*(g·w) = λ*(w) − log g: the start (every K at its tensor's bound) and each Jacobi sweep read
    only the moved weights, so this holds after any number of sweeps, not only at convergence."""
    model, x = _model(name)
    report = ic.analyze(model, x)
    weights = {k: p.detach() for k, p in model.named_parameters()}
    sk = ic.skeleton.build_skeleton(report, weights)
    g = torch.randn(report.num_generators, dtype=torch.float64)
    quotiented = report.num_simple + report.num_relations
    g[quotiented:] = 0                                  # inert entries: no typical scale
    moved = copy.deepcopy(model)
    report.act(moved, g)
    a = typical_scales(report, sk, weights)
    b = typical_scales(report, sk, {k: p.detach() for k, p in moved.named_parameters()})
    assert a.numel() == quotiented and a.abs().max() > 1e-3
    assert torch.allclose(b + g[:quotiented], a, rtol=0, atol=1e-9)


def test_a_default_initialised_model_starts_near_its_typical_scale_point():
    torch.manual_seed(0)
    model = mlp((64, 128, 128, 128, 10))
    report = ic.analyze(model, torch.randn(2, 64))
    weights = {k: p.detach() for k, p in model.named_parameters()}
    lam = typical_scales(report, ic.skeleton.build_skeleton(report, weights), weights)
    assert float(lam.abs().max()) < 0.4 and float(lam.abs().mean()) < 0.1   # noise of a few entries


@pytest.mark.parametrize("name", ["mlp_nonstraight", "vgg_bn", "residual_mlp", "mini_transformer"])
def test_a_model_and_a_rescaled_copy_compile_to_the_same_coordinates(name):
    a, x = _model(name)
    report = ic.analyze(a, x)
    lam = torch.randn(report.num_generators, dtype=torch.float64)
    b = copy.deepcopy(a)
    report.act(b, lam)
    ca, cb = ic.compile_invariant(a, x), ic.compile_invariant(b, x)
    free = {}                  # the coordinates: not the entries held constant (an inert entry's
    for i, n in enumerate(ca.allocated):          # value is its representative's, any one will do)
        held = ca.allocate.held_slots(i)
        if held is not None:
            mask = torch.ones(ca.parameter_of(n).numel(), dtype=torch.bool)
            mask[held[0]] = False
            free[ca.parameter_names()[n]] = mask
    for (na, pa), (nb, pb) in zip(ca.named_parameters(), cb.named_parameters()):
        mask = free.get(na, torch.ones(pa.numel(), dtype=torch.bool))
        pa, pb = pa.detach().reshape(-1)[mask], pb.detach().reshape(-1)[mask]
        assert na == nb and torch.allclose(pa, pb, rtol=1e-9, atol=1e-12), na


def _final_loss(net, lr, x, y, steps):
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    batches = [b for _ in range(-(-steps * 64 // len(x))) for b in torch.randperm(len(x), generator=g).split(64)]
    for idx in batches[:steps]:                                # epochs of minibatches, as the benchmark
        opt.zero_grad()
        F.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        return F.cross_entropy(net(x), y).item()


MODELS = {"mlp3": lambda: mlp((64, 128, 128, 10)), "mlp5": lambda: mlp((64, 128, 128, 128, 128, 10)),
          "cnn_bn": digits_cnn, "prenorm": PreNormMLP}


@pytest.mark.parametrize("name, lr", [("mlp3", 0.1), ("mlp5", 0.03), ("prenorm", 0.03)])
def test_sgd_on_the_gspace_module_of_a_default_initialised_model_trains_at_the_plain_lr(name, lr):
    xtr, ytr, _, _ = digits()
    if name.startswith("cnn"):
        xtr = xtr.view(-1, 1, 8, 8)
    torch.manual_seed(0)
    model = MODELS[name]()
    start = F.cross_entropy(model(xtr), ytr).item()
    plain = _final_loss(copy.deepcopy(model), lr, xtr, ytr, 400)
    cm = ic.compile_invariant(copy.deepcopy(model), (xtr[:4],))
    gspace = _final_loss(cm, lr, xtr, ytr, 400)
    assert plain < start / 4                                   # the plain model trains at this lr
    assert gspace < start / 4 and gspace <= 1.5 * plain + 1e-3, (gspace, plain)


@pytest.mark.parametrize("lr", [0.1, 0.03])
def test_sgd_on_the_gspace_module_of_the_batchnorm_cnn(lr):
    """With momentum the BatchNorm CNN is at its edge of stability at lr 0.1, and chaotic at 0.03:
    one run's loss moves 3-8x with the seed and with rounding (the fixed form, the same quotient in
    weight coordinates, ends 1.56x above plain on seed 0 at lr 0.03), so the bound is on the
    geometric mean over seeds 0-5 and loose (1.55x and 1.35x here, 2 threads; the 1.5x of DESIGN
    §6 is held by benchmarks/gspace_sgd.py over 24 seeds).
    With P_in moving (the chart before 2026-12-07) the same test gives 2.34x at lr 0.1."""
    xtr, ytr, _, _ = digits()
    xtr = xtr.view(-1, 1, 8, 8)
    log_ratio = 0.0
    for seed in range(6):
        torch.manual_seed(seed)
        model = digits_cnn()
        start = F.cross_entropy(model(xtr), ytr).item()
        plain = _final_loss(copy.deepcopy(model), lr, xtr, ytr, 400)
        gspace = _final_loss(ic.compile_invariant(copy.deepcopy(model), (xtr[:4],)), lr, xtr, ytr, 400)
        assert plain < start / 4 and gspace < start / 4, (seed, plain, gspace)     # both train
        log_ratio += math.log(gspace / plain) / 6
    assert log_ratio < math.log(2.0), math.exp(log_ratio)   # loose: 24 seeds in the benchmark

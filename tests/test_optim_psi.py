"""PSI-SGD / PSI-SGDM (Yi et al.): Theorem 1, renormalisation, state round trip."""
import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import invariance_compiler as ic
from invariance_compiler.tools.zoo import ZOO

from conftest import train_steps


def _bn_net():
    """BN with a negligible eps: the PSI property is exact only as eps -> 0 (DESIGN §3.2)."""
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16, eps=1e-20), nn.ReLU(), nn.Linear(16, 16),
                         nn.BatchNorm1d(16, eps=1e-20), nn.ReLU(), nn.Linear(16, 3)).double()


def _psi_scaled(model, report, scale=2.0, seed=1):
    """T_a(W): a random positive scaling of every PSI vector (normalize generators only)."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    lam = torch.zeros(report.num_generators, dtype=torch.float64)
    for g in report.generators:
        if g.kind == "normalize":
            lam[g.index] = float(torch.randn((), generator=gen, dtype=torch.float64)) * scale
    report.act(other, lam)
    return other


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_theorem_1_scale_equivalent_starts_stay_equivalent(momentum):
    torch.manual_seed(0)
    a = _bn_net()
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 3, (32,))
    report = ic.analyze(a, (x,))
    assert report.counts()["normalize"] == 32
    b = _psi_scaled(a, report)
    assert torch.allclose(a(x), b(x), rtol=1e-12, atol=1e-13)    # equivalent start
    oa = ic.optim.PSISGD(a, lr=0.05, momentum=momentum, report=report)
    ob = ic.optim.PSISGD(b, lr=0.05, momentum=momentum, report=report)
    sa, sb = copy.deepcopy(a), copy.deepcopy(b)
    pa, pb = torch.optim.SGD(sa.parameters(), lr=0.05, momentum=momentum), \
        torch.optim.SGD(sb.parameters(), lr=0.05, momentum=momentum)
    for _ in range(50):
        for m, o in ((a, oa), (b, ob), (sa, pa), (sb, pb)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
        assert torch.allclose(a(x), b(x), rtol=1e-9, atol=1e-11)
    assert (sa(x) - sb(x)).abs().max() > 1e-2                    # plain SGD drifts apart


def test_update_is_norm_squared_times_gradient_on_psi_vectors_and_sgd_elsewhere():
    torch.manual_seed(0)
    model = _bn_net()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    opt = ic.optim.PSISGD(model, lr=0.1, example_inputs=(x,))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    F.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    after = dict(model.named_parameters())
    row_norm2 = before["0.weight"].square().sum(1, keepdim=True)          # rows feed BN channels
    assert torch.allclose(after["0.weight"], before["0.weight"] - 0.1 * row_norm2 * grads["0.weight"])
    for n in ("1.weight", "6.weight", "6.bias"):                         # no PSI: plain SGD
        assert torch.allclose(after[n], before[n] - 0.1 * grads[n])


def test_large_psi_vectors_are_renormalised_without_changing_the_function():
    torch.manual_seed(0)
    model = _bn_net()
    x = torch.randn(8, 6, dtype=torch.float64)
    with torch.no_grad():
        model[0].weight.mul_(1e5)
    ref = model(x)
    opt = ic.optim.PSISGD(model, lr=0.1, max_norm=1e4, example_inputs=(x,))
    for p in model.parameters():                 # a zero gradient: only the renormalisation acts
        p.grad = torch.zeros_like(p)
    opt.step()
    norms = model[0].weight.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), rtol=1e-6)
    assert torch.allclose(model(x), ref, rtol=1e-10, atol=1e-12)


def test_state_round_trip_continues_identically():
    torch.manual_seed(0)
    model, x = ZOO["vgg_bn"]()
    y = torch.randint(0, 3, (x[0].shape[0],))
    opt = ic.optim.PSISGD(model, lr=0.05, momentum=0.9, example_inputs=x)

    train_steps(model, opt, x, y, 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train_steps(model, opt, x, y, 3)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    other, _ = ZOO["vgg_bn"]()
    other.load_state_dict(ck["model"])
    o2 = ic.optim.PSISGD(other, lr=0.05, momentum=0.9, example_inputs=x)
    o2.load_state_dict(ck["opt"])
    train_steps(other, o2, x, y, 3)
    for (n, p), q in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(p, q), n


def test_figure_1_example_psi_sgd_is_blind_to_the_unbalanced_start(tmp_path):
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).parents[1] / "examples" / "reproduce_psi.py"
    spec = importlib.util.spec_from_file_location("reproduce_psi", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    curves = mod.run(steps=30, out_dir=str(tmp_path))
    psi_b, psi_u = curves[("PSI-SGD", "balanced")], curves[("PSI-SGD", "unbalanced")]
    assert max(abs(a - b) / a for a, b in zip(psi_b, psi_u)) < 1e-6          # Theorem 1 on digits
    sgd_b, sgd_u = curves[("SGD", "balanced")], curves[("SGD", "unbalanced")]
    assert abs(sgd_b[-1] - sgd_u[-1]) > 1e-2                                   # SGD sees the scale
    assert (tmp_path / "psi_figure1.png").stat().st_size > 0
    assert "| PSI-SGD | unbalanced |" in (tmp_path / "psi_figure1.md").read_text()


def test_psi_sgd_trains_a_compiled_fixed_form_module_and_its_fixed_entries_stay():
    torch.manual_seed(0)
    model = _bn_net()
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 3, (32,))
    cm = ic.compile_invariant(model, (x,), form="fixed")
    opt = ic.optim.PSISGD(cm, lr=0.05, momentum=0.9)
    assert len(opt._group_of) == 2                           # the two weights feeding a BN
    before = cm.weights()
    first = float(F.cross_entropy(cm(x), y).detach())
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(cm(x), y).backward()
        opt.step()
    assert float(F.cross_entropy(cm(x), y).detach()) < first
    after = cm.weights()
    for name, ps in cm.skeleton.params.items():
        assert torch.equal(after[name].reshape(-1)[ps.fixed_idx], before[name].reshape(-1)[ps.fixed_idx])
    with pytest.raises(ValueError, match="path values"):
        ic.optim.PSISGD(ic.compile_invariant(model, (x,)), lr=0.1)

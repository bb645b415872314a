"""SM and UN (Badrinarayanan et al., Table 1), B-SGD's start, and state round trips."""
import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import invariance_compiler as ic
from invariance_compiler.tools.zoo import ZOO

from conftest import train_steps


def test_sm_commutes_with_the_papers_reparametrisation():
    """W1 → α0·W1, W2 → β·W2 (β tied over max-pooled pairs), θ → θ·(1/α0)·β_s⁻¹ (eqs. 1-2)."""
    torch.manual_seed(0)
    model, x = ZOO["arch1"]()
    model = model.double()
    x = (torch.randn(16, 6, dtype=torch.float64),)
    y = torch.randint(0, 3, (16,))
    report = ic.analyze(model, x)
    layer1 = [g.index for g in report.generators if g.params[0] == "0.weight"]
    layer2 = [g.index for g in report.generators if g.params[0] == "3.weight"]
    assert len(layer1) == len(layer2) == 4
    lam = torch.zeros(report.num_generators, dtype=torch.float64)
    log_a0 = 0.7
    lam[layer1] = log_a0                                      # one α0 for the whole first layer
    lam[layer2] = log_a0 + torch.randn(4, dtype=torch.float64)  # α0·β_k per pooled pair
    other = report.act(copy.deepcopy(model), lam)
    assert torch.allclose(other(*x), model(*x), rtol=1e-12)
    oa, ob = ic.optim.SM(model, lr=0.05, report=report), ic.optim.SM(other, lr=0.05, report=report)
    for _ in range(5):
        for m, o in ((model, oa), (other, ob)):
            o.zero_grad()
            F.cross_entropy(m(*x), y).backward()
            o.step()
    expected = report.act(copy.deepcopy(model), lam)         # T(iterate) = iterate of T(start)
    for (n, p), q in zip(expected.named_parameters(), other.parameters()):
        assert torch.allclose(p, q, rtol=1e-10, atol=1e-12), n


def _digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float64) / 16.0
    return x, torch.tensor(d.target)


def test_un_keeps_unit_rows_and_lowers_the_loss_on_digits():
    torch.manual_seed(0)
    x, y = _digits()
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)).double()
    ref = model(x)
    opt = ic.optim.UN(model, lr=0.1, example_inputs=(x[:2],))
    assert torch.allclose(model(x), ref, rtol=1e-10, atol=1e-12)   # moved onto the manifold by a group action
    first = float(F.cross_entropy(model(x).detach(), y))
    for step in range(200):
        idx = torch.randint(0, x.shape[0], (100,))
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        for layer in (model[0], model[2]):
            norms = layer.weight.norm(dim=1)
            assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)
    assert float(F.cross_entropy(model(x).detach(), y)) < 0.5 * first


def test_sm_lowers_the_loss_on_digits():
    torch.manual_seed(0)
    x, y = _digits()
    model = ic.optim.balanced_init_(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).double())
    opt = ic.optim.SM(model, lr=0.1, example_inputs=(x[:2],))
    first = float(F.cross_entropy(model(x).detach(), y))
    for _ in range(200):
        idx = torch.randint(0, x.shape[0], (100,))
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    assert float(F.cross_entropy(model(x).detach(), y)) < 0.5 * first


def test_balanced_init_unit_normalises_filters_and_class_vectors():
    model = ic.optim.balanced_init_(nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4)))
    assert torch.allclose(model[0].weight.reshape(3, -1).norm(dim=1), torch.ones(3), atol=1e-6)
    assert torch.allclose(model[3].weight.norm(dim=1), torch.ones(4), atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda m, x: ic.optim.SM(m, lr=0.01, momentum=0.9, example_inputs=x),
    lambda m, x: ic.optim.UN(m, lr=0.01, momentum=0.9, example_inputs=x),
    lambda m, x: ic.optim.GSGD(m, lr=0.01, momentum=0.9, example_inputs=x),
    lambda m, x: ic.optim.FGSGD(m, lr=0.01, momentum=0.9, groups=2, example_inputs=x),
], ids=["SM", "UN", "GSGD", "FGSGD"])
def test_state_survives_save_and_load_mid_training(make):
    torch.manual_seed(0)
    model, x = ZOO["mlp"]()
    model = model.double()
    x = tuple(t.double() for t in x)
    y = torch.randint(0, 3, (x[0].shape[0],))
    opt = make(model, x)

    train_steps(model, opt, x, y, 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train_steps(model, opt, x, y, 3)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    other = copy.deepcopy(model)
    other.load_state_dict(ck["model"])
    o2 = make(other, x)
    other.load_state_dict(ck["model"])                       # UN's constructor acted on it
    o2.load_state_dict(ck["opt"])
    train_steps(other, o2, x, y, 3)
    for (n, p), q in zip(model.named_parameters(), other.parameters()):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-14), n

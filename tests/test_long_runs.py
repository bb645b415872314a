"""Long runs: 10 000 steps of G-SGD (SGD on the gspace module, and the GSGD optimizer on a plain
model) on a BatchNorm network, where weight-space SGD lets norms drift. The fixed skeleton entries
stay bit-for-bit, every value stays far inside float32's range, and the exported weights still
reproduce the module. G-space needs no re-normalisation: its coordinates are invariant and the fixed
entries pin the scale that a group action would otherwise move (PSISGD, on plain weights,
re-normalises above 1e4 as the third paper does)."""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import invariance_compiler as ic

STEPS = 10_000


def _net():
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.BatchNorm1d(8),
                         nn.ReLU(), nn.Linear(8, 3))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)


def _fixed_entries(skeleton, weights, report):
    return {n: weights[n].reshape(-1)[ps.fixed_idx].clone() for n, ps in skeleton.params.items()
            if ps.fixed_idx.numel() and not report.is_inert(n)}


def _in_range(tensors):
    for t in tensors:
        t = t.detach()
        assert bool(torch.isfinite(t).all())
        assert float(t.abs().max()) < 1e30
        nz = t.abs()[t != 0]
        assert nz.numel() == 0 or float(nz.min()) > 1e-30


def _train(model, opt, x, y):
    first = None
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    return first, loss.item()


def test_ten_thousand_steps_of_sgd_on_the_gspace_module():
    torch.manual_seed(0)
    model, (x, y) = _net(), _data()
    cm = ic.compile_invariant(model, x, form="gspace")
    fixed = _fixed_entries(cm.skeleton, cm.weights(), cm.report)
    assert fixed
    first, last = _train(cm, torch.optim.SGD(cm.parameters(), lr=0.05, momentum=0.9), x, y)
    assert last < 0.1 * first
    w = cm.weights()
    for n, f in fixed.items():
        assert torch.equal(w[n].reshape(-1)[cm.skeleton.params[n].fixed_idx], f), n
    _in_range(list(cm.parameters()) + list(w.values()))
    back = copy.deepcopy(model)
    back.load_state_dict(cm.export_state_dict())
    cm.eval(), back.eval()
    assert torch.allclose(back(x), cm(x), rtol=1e-4, atol=1e-5)      # float32 rounding only


def test_ten_thousand_steps_of_the_gsgd_optimizer_on_plain_weights():
    torch.manual_seed(0)
    model, (x, y) = _net(), _data()
    opt = ic.optim.GSGD(model, lr=0.05, momentum=0.9, example_inputs=x)
    fixed = _fixed_entries(opt.skeleton, dict(model.named_parameters()), opt.report)
    first, last = _train(model, opt, x, y)
    assert last < 0.1 * first
    w = dict(model.named_parameters())
    for n, f in fixed.items():
        assert torch.equal(w[n].detach().reshape(-1)[opt.skeleton.params[n].fixed_idx], f), n
    _in_range(w.values())
    _in_range(s["v"] for s in opt.state.values() if "v" in s)

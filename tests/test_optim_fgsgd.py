"""FG-SGD (Ozay): constraints kept on products of spheres / oblique / Stiefel manifolds, loss lowered
on digits, grouping schemes."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import invariance_compiler as ic


def _digits_images():
    from sklearn.datasets import load_digits
    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float64).unsqueeze(1) / 16.0, torch.tensor(d.target)


def _cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10)).double()


def _check(opt, model):
    """Every component is on its manifold (to 1e-6)."""
    from invariance_compiler.optim.fgsgd import _components
    for w, (radius, _) in opt._layers.items():
        c = _components(w.detach(), opt.scheme) / radius
        if opt.manifold == "sphere":
            n = c.reshape(c.shape[0], -1).norm(dim=1)
            assert torch.allclose(n, torch.ones_like(n), atol=1e-6)
        elif opt.manifold == "oblique":
            n = c.norm(dim=1)
            assert torch.allclose(n, torch.ones_like(n), atol=1e-6)
        else:
            x = c if c.shape[1] >= c.shape[2] else c.transpose(1, 2)
            gram = x.transpose(1, 2) @ x                       # orthonormal frames
            assert torch.allclose(gram, torch.eye(gram.shape[-1], dtype=gram.dtype).expand_as(gram), atol=1e-6)


@pytest.mark.parametrize("manifold,scheme", [("sphere", "PO"), ("sphere", "PI"), ("oblique", "PO"),
                                             ("stiefel", "PO"), ("stiefel", "PIO")])
def test_constraints_hold_for_200_steps_and_the_loss_drops_on_digits(manifold, scheme):
    torch.manual_seed(0)
    x, y = _digits_images()
    model = _cnn()
    opt = ic.optim.FGSGD(model, lr=0.5, manifold=manifold, scheme=scheme, groups=2,
                         rescale=False, example_inputs=(x[:2],))
    assert len(opt._layers) == 2                              # both convs; the classifier is Euclidean
    _check(opt, model)
    first = float(F.cross_entropy(model(x), y).detach())
    for _ in range(200):
        idx = torch.randint(0, x.shape[0], (100,))
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        _check(opt, model)
    assert float(F.cross_entropy(model(x), y).detach()) < 0.8 * first


def test_geometric_scaling_sets_the_radius():
    model = _cnn()
    opt = ic.optim.FGSGD(model, lr=0.1, example_inputs=(torch.randn(2, 1, 8, 8, dtype=torch.float64),))
    w = model[2].weight                                       # fan-in 4·9, 8 output channels
    radius, _ = opt._layers[w]
    assert radius == pytest.approx((36 + 8) ** -0.5)
    assert torch.allclose(w.detach().reshape(8, -1).norm(dim=1), torch.full((8,), radius, dtype=w.dtype))


def test_groups_partition_the_components_and_pio_refuses_one_tap_kernels():
    model = _cnn()
    opt = ic.optim.FGSGD(model, lr=0.1, scheme="PI", groups=3,
                         example_inputs=(torch.randn(2, 1, 8, 8, dtype=torch.float64),))
    _, gid = opt._layers[model[2].weight]
    assert gid.numel() == 4 and sorted(gid.unique().tolist()) == [0, 1, 2]
    mlp = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    with pytest.raises(ValueError, match="1-tap kernels"):
        ic.optim.FGSGD(mlp, scheme="PIO")


def test_manifold_optimizers_refuse_compiled_modules_with_the_reason():
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    cm = ic.compile_invariant(model, form="fixed")
    for cls in (ic.optim.FGSGD, ic.optim.UN):
        with pytest.raises(ValueError, match="fixed entries cannot move"):
            cls(cm)
    ic.optim.SM(cm, lr=0.1)                                   # row/column scaling works there

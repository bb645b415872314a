import os

import pytest
import torch
import torch.nn as nn

if not torch.cuda.is_available():        # kernel tests run Triton's interpreter on CPU tensors;
    os.environ.setdefault("TRITON_INTERPRET", "1")   # it must be set before triton is imported

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def batch_like(inputs, batch):
    """Fresh random inputs of the same kind with a given batch size (float64 data, int ids in range)."""
    out = []
    for t in inputs:
        if t.is_floating_point():
            out.append(torch.randn(batch, *t.shape[1:], dtype=torch.float64))
        else:
            out.append(torch.randint(0, int(t.max()) + 1, (batch, *t.shape[1:])))
    return tuple(out)


def train_steps(model, opt, x, y, steps):
    """`steps` optimizer steps of cross-entropy on a fixed batch."""
    import torch.nn.functional as F
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(*x), y).backward()
        opt.step()


def odd_model():
    """Weights 7×3×3×3, 33×7×1×1, 17×33, 5×17, 3×5 and their biases: conv, 1×1 conv, Linear."""
    return nn.Sequential(nn.Conv2d(3, 7, 3), nn.ReLU(), nn.Conv2d(7, 33, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(33, 17), nn.ReLU(),
                         nn.Linear(17, 5), nn.ReLU(), nn.Linear(5, 3))


def zoo_or_hf(name):
    """(model, args, kwargs): a zoo model, or "hf:<family>" from transformers' own classes (float32,
    no dropout; skips when transformers is missing)."""
    torch.manual_seed(0)
    if name.startswith("hf:"):
        hf = pytest.importorskip("invariance_compiler.tools.hf_families")
        model, args, kwargs = hf.build(name[3:], dropout=False)
        return model.float(), args, kwargs
    from invariance_compiler.tools.zoo import ZOO
    model, x = ZOO[name]()
    return model, x, {}

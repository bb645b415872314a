"""The README's first command: the demo runs end to end, trains, and writes what it says it writes."""
import copy
import importlib.util
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

import invariance_compiler as ic
from invariance_compiler.tools import demo


def test_demo_runs_end_to_end_and_writes_its_files(tmp_path, capsys):
    assert demo.main(str(tmp_path), epochs=1) == 0
    out = capsys.readouterr().out
    for f in ("training_curves.png", "training.md", "profile.md"):
        assert (tmp_path / f).stat().st_size > 0
        assert str(tmp_path / f) in out                       # it says where the files went
    rows = [r for r in (tmp_path / "training.md").read_text().splitlines() if r.startswith("| ") and "---" not in r]
    assert [r.split("|")[1].strip() for r in rows[1:]] == list(demo.OPTIMIZERS)
    for r in rows[1:]:
        loss, acc = float(r.split("|")[4]), float(r.split("|")[5].strip(" %"))
        assert math.isfinite(loss) and acc > 30               # one epoch already learns (chance: 10 %)
    assert "optimizer step alone" in (tmp_path / "profile.md").read_text()
    assert re.search(r"aten\.conv2d\.default\(.*[vw]_4_weight", out)   # the emitted code of one layer


def test_every_demo_optimizer_lowers_the_loss_from_the_shared_start():
    data = demo.digits()
    start = demo.he_skeleton_init(demo.mlp(), data[0][:2])
    with torch.no_grad():
        before = F.cross_entropy(start(data[0]), data[1]).item()
    for name in demo.OPTIMIZERS:
        net, opt = demo.build_run(name, copy.deepcopy(start), data[0][:2], 1e-3 if name == "G-Adam" else 1e-2)
        assert demo.train(net, opt, data, epochs=1)["train_loss"][-1] < 0.5 * before, name


def test_skeleton_init_sets_every_fixed_entry_to_one():
    x = torch.randn(2, 64)
    model = demo.he_skeleton_init(demo.mlp(bias=False), x)
    cm = ic.compile_invariant(model, x, form="fixed")
    w = dict(model.named_parameters())
    for name, ps in cm.skeleton.params.items():
        assert torch.equal(w[name].reshape(-1)[ps.fixed_idx], torch.ones(ps.fixed_idx.numel()))


def _example(name):
    path = os.path.join(os.path.dirname(__file__), "..", "examples", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_path_sgd_baseline_is_rescaling_invariant():
    """Path-SGD's defining property (Neyshabur et al. 2015): from two starts related by a hidden-unit
    rescaling, its iterates compute the same functions (float64, 5 steps)."""
    PathSGD = _example("reproduce_gsgd").PathSGD
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(5, 7, bias=False), nn.ReLU(), nn.Linear(7, 6, bias=False), nn.ReLU(),
                      nn.Linear(6, 3, bias=False)).double()
    b = copy.deepcopy(a)
    with torch.no_grad():                    # scale hidden units: in-weights × c, out-weights / c
        c1, c2 = torch.rand(7, dtype=torch.float64) * 4 + 0.1, torch.rand(6, dtype=torch.float64) * 4 + 0.1
        b[0].weight.mul_(c1[:, None]); b[2].weight.div_(c1[None, :])
        b[2].weight.mul_(c2[:, None]); b[4].weight.div_(c2[None, :])
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    start = a(x).detach()
    for m in (a, b):
        opt = PathSGD([m[0].weight, m[2].weight, m[4].weight], lr=0.05)
        for _ in range(5):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
    assert torch.allclose(a(x), b(x), rtol=1e-10, atol=1e-12)
    assert (a(x) - start).abs().max() > 1e-3             # it moved: not a no-op

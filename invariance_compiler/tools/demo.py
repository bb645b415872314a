"""`python -m invariance_compiler demo`: the tour a new user runs first (about a minute on 2 CPU cores).

  1. analyze a CNN and a ResNet-style model and print their reports;
  2. compile the CNN to both forms and print the emitted code of one layer;
  3. train an MLP on scikit-learn's digits (offline) with SGD, G-SGD, SGD on the gspace module,
     Adam on its raw path values (G-Adam) and SGD on the fixed-weight module, all from the same
     start; print a results table and write the curves as a PNG;
  4. run the kernel profiler (the PyTorch path on CPU, the Triton kernels on a GPU).

The data helpers (`digits`, `he_skeleton_init`, `train`) are shared with examples/."""
from __future__ import annotations

import copy
import os
import re
import statistics
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import analyze, compile_invariant, optim
from .zoo import resnet_basic


def digits(seed: int = 0, test: int = 360, dtype=torch.float32):
    """scikit-learn's 8x8 digits (1797 images, shipped with scikit-learn): standardised features
    (train statistics), a fixed random split. Returns (x_train, y_train, x_test, y_test)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the demo and examples need scikit-learn for the digits data: "
                          "pip install 'invariance_compiler[dev]' (or scikit-learn)") from e
    d = load_digits()
    x, y = torch.tensor(d.data, dtype=dtype), torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    xtr, xte = x[test:], x[:test]
    mu, sd = xtr.mean(0), xtr.std(0)
    sd = torch.where(sd > 0, sd, torch.ones_like(sd))     # a few border pixels are always 0
    return (xtr - mu) / sd, y[test:], (xte - mu) / sd, y[:test]


def he_skeleton_init(model: nn.Module, example, seed: int = 0) -> nn.Module:
    """G-SGD's initialisation (Meng et al., §5): He-normal weights, zero biases, and every fixed
    skeleton entry set to 1. In place; returns the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.zero_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = compile_invariant(model, example, form="fixed", fixed="overwrite")
    model.load_state_dict(cm.export_state_dict())
    return model


def train(net: nn.Module, opt: torch.optim.Optimizer, data, epochs: int, batch: int = 64, seed: int = 1,
          bar=None) -> dict:
    """Minibatch training with cross-entropy. Returns per-epoch train loss (full train set), test
    loss and accuracy, and the median wall time of one step."""
    xtr, ytr, xte, yte = data
    g = torch.Generator().manual_seed(seed)
    out = {"train_loss": [], "test_loss": [], "test_acc": [], "step_s": []}
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(xtr), generator=g).split(batch):
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(xtr[idx]), ytr[idx])
            loss.backward()
            opt.step()
            out["step_s"].append(time.perf_counter() - t)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        net.eval()
        with torch.no_grad():
            out["train_loss"].append(F.cross_entropy(net(xtr), ytr).item())
            logits = net(xte)
            out["test_loss"].append(F.cross_entropy(logits, yte).item())
            out["test_acc"].append((logits.argmax(1) == yte).float().mean().item())
    out["step_ms"] = 1e3 * statistics.median(out.pop("step_s"))
    return out


def digits_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(32, 10))


class PreNormMLP(nn.Module):
    """A pre-norm residual MLP for digits: h = Linear(x); h += Linear(ReLU(Linear(LayerNorm(h))))
    per block; logits = Linear(LayerNorm(h)) (a transformer's layout without attention)."""

    def __init__(self, d: int = 64, hidden: int = 128, blocks: int = 2, inputs: int = 64, classes: int = 10):
        super().__init__()
        self.inp = nn.Linear(inputs, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, hidden), nn.ReLU(),
                                                  nn.Linear(hidden, d)) for _ in range(blocks))
        self.norm, self.out = nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(self.norm(h))


def mlp(widths=(64, 128, 128, 10), bias: bool = True) -> nn.Module:
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(a, b, bias=bias)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers)


def layer_code(code: str, layer: str) -> str:
    """The lines of an emitted program that touch one layer's parameters or output."""
    pat = re.compile(rf"\b(?:v|free|w)_{layer}_|\b_{layer} = ")
    return "\n".join(line.split(";")[0] for line in code.splitlines() if pat.search(line))


def _section(title: str) -> None:
    print(f"\n{'=' * 4} {title} {'=' * max(4, 90 - len(title))}\n")


def _first(model_and_inputs):
    model, inputs = model_and_inputs          # the zoo gives a tuple of example inputs
    return model, inputs[0]


def run_analysis() -> None:
    _section("1. What the analysis finds")
    torch.manual_seed(0)
    for name, model, x in (("CNN for 8x8 digits", digits_cnn(), torch.randn(2, 1, 8, 8)),
                           ("ResNet-style (basic blocks, BatchNorm)", *_first(resnet_basic()))):
        print(f"-- {name}: {type(model).__name__}, example input {tuple(x.shape)}")
        print(analyze(model, x))
        print()


def run_compile() -> None:
    _section("2. Compiled: the emitted code of one layer")
    torch.manual_seed(0)
    model, x = digits_cnn(), torch.randn(2, 1, 8, 8)
    for form in ("gspace", "fixed"):
        cm = compile_invariant(model, x, form=form)
        err = (cm(x) - model(x)).abs().max().item()
        print(f"-- form={form!r}: {cm.num_free_parameters()} free parameters of {cm.report.num_params}, "
              f"max |output difference| {err:.1e}; the second convolution (layer '4'):")
        print(layer_code(cm.code, "4"))
        print()
    print("(print(cm.code) shows the whole program; examples/inspect_graph.py draws the class graph.)")


OPTIMIZERS = {   # name: (what it trains, how) - every run starts from the same weights
    "SGD": "torch.optim.SGD on the model",
    "G-SGD": "ic.optim.GSGD on the model (Meng et al., Algorithm 1)",
    "gspace SGD": "torch.optim.SGD on the gspace module (scaled coordinates)",
    "G-Adam": "torch.optim.Adam on the gspace module's raw path values",
    "fixed SGD": "torch.optim.SGD on the fixed-weight module",
}


def build_run(name: str, model: nn.Module, example, lr: float, momentum: float = 0.0):
    if name == "SGD":
        return model, torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    if name == "G-SGD":
        return model, optim.GSGD(model, lr=lr, momentum=momentum, example_inputs=example)
    if name == "gspace SGD":
        cm = compile_invariant(model, example, form="gspace")
        return cm, torch.optim.SGD(cm.parameters(), lr=lr, momentum=momentum)
    if name == "G-Adam":
        cm = compile_invariant(model, example, form="gspace", coordinates="paths")
        return cm, torch.optim.Adam(cm.parameters(), lr=lr)
    if name == "fixed SGD":
        cm = compile_invariant(model, example, form="fixed")
        return cm, torch.optim.SGD(cm.parameters(), lr=lr, momentum=momentum)
    raise ValueError(f"unknown optimizer {name!r}; one of {sorted(OPTIMIZERS)}")


def run_training(out_dir: str, epochs: int) -> str:
    _section("3. Training an MLP 64-128-128-10 on digits (1437 train / 360 test images)")
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    data = digits()
    start = he_skeleton_init(mlp(), data[0][:2])
    lrs = {"SGD": 0.01, "G-SGD": 0.01, "gspace SGD": 0.01, "G-Adam": 1e-3, "fixed SGD": 0.01}
    print("Same start for all five: He init with the skeleton entries at 1 (G-SGD's initialisation);\n"
          f"batch 64, {epochs} epochs, no momentum; learning rates {lrs}.\n")
    results = {}
    steps = epochs * -(-len(data[0]) // 64)
    for name in OPTIMIZERS:
        net, opt = build_run(name, copy.deepcopy(start), data[0][:2], lrs[name])
        bar = tqdm(total=steps, desc=f"{name:9s}", ncols=90, mininterval=0.5) if tqdm else None
        results[name] = train(net, opt, data, epochs, bar=bar)
        if bar is not None:
            bar.close()
    rows = ["| optimizer | what it trains | lr | final train loss | test accuracy | ms / step |",
            "|---|---|---|---|---|---|"]
    for name, r in results.items():
        rows.append(f"| {name} | {OPTIMIZERS[name]} | {lrs[name]:g} | {r['train_loss'][-1]:.4f} | "
                    f"{100 * r['test_acc'][-1]:.1f} % | {r['step_ms']:.2f} |")
    table = "\n".join(rows)
    print("\n" + table)
    png = os.path.join(out_dir, "training_curves.png")
    _plot(results, png, epochs)
    with open(os.path.join(out_dir, "training.md"), "w") as f:
        f.write(f"# Demo: MLP 64-128-128-10 on digits, {epochs} epochs, batch 64\n\n{table}\n\n"
                f"Time per step: median wall time of one forward+backward+step, this machine "
                f"({os.cpu_count()} cores, torch {torch.__version__}).\n")
    return png


def _plot(results: dict, png: str, epochs: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    ep = range(1, epochs + 1)
    for name, r in results.items():
        a.plot(ep, r["train_loss"], label=name)
        b.plot(ep, [100 * v for v in r["test_acc"]], label=name)
    a.set(yscale="log", xlabel="epoch", ylabel="training loss (full train set)", title="Training loss")
    b.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy (360 images)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("MLP 64-128-128-10 on scikit-learn digits, same start, batch 64")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def run_profile(out_dir: str) -> str:
    _section("4. The kernel profiler")
    from .profile import main as profile
    md = os.path.join(out_dir, "profile.md")
    gpu = torch.cuda.is_available()
    profile(["--rounds", "5", "--out", md] + ([] if gpu else ["--side", "512"]))
    return md


def main(out_dir: str = "out/demo", epochs: int = 20) -> int:
    t0 = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    print("invariance_compiler demo: find the rescaling symmetries of a model, compile them away,\n"
          "train with symmetry-aware optimizers, profile the kernels.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # the example models have no unknown ops; quiet notes
        run_analysis()
        run_compile()
        png = run_training(out_dir, epochs)
        md = run_profile(out_dir)
    _section("Files")
    for path in (png, os.path.join(out_dir, "training.md"), md):
        print(f"  {os.path.abspath(path)}")
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s")
    return 0

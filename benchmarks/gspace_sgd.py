"""SGD (momentum 0.9) on the gspace module of a default-initialised model, at the plain model's
learning rates (DESIGN §6: final loss <= 1.5x plain). scikit-learn's digits, batch 64, 400 steps.

    python benchmarks/gspace_sgd.py [--models mlp3,mlp5,cnn_bn,prenorm] [--lrs 0.1,0.03,0.01] [--seeds 3]
                                    [--cnn-seeds 24] [--forms plain,gspace,paths,fixed]

Prints the final train loss (full train set) of the plain model, the gspace module (scaled
coordinates, the default), the gspace module with G-SGD's raw path values (coordinates="paths")
and the fixed-weight module, all from the same start and the same batches, and gspace / plain:
the geometric mean over `seeds` initialisations (seeds 0, 1, ...), `cnn-seeds` for the BatchNorm
CNN: at lr 0.1 with momentum 0.9 it is at its edge of stability, one run's loss moves 3-8x with the
seed and with rounding, and three seeds do not separate the forms. 1 thread."""
from __future__ import annotations

import argparse
import copy
import math
import warnings

import torch
import torch.nn.functional as F

import invariance_compiler as ic
from invariance_compiler.tools.demo import PreNormMLP, digits, digits_cnn, mlp

MODELS = {"mlp3": lambda: mlp((64, 128, 128, 10)), "mlp5": lambda: mlp((64, 128, 128, 128, 128, 10)),
          "cnn_bn": digits_cnn, "prenorm": PreNormMLP}
FORMS = {"plain": None, "gspace": dict(form="gspace"), "paths": dict(form="gspace", coordinates="paths"),
         "fixed": dict(form="fixed")}


def final_loss(net, lr: float, data, steps: int = 400, batch: int = 64, seed: int = 1) -> float:
    """SGD(momentum 0.9) for `steps` minibatches; the full train set's loss at the end (inf when a
    step went non-finite or the allocation stopped on a carrier at zero)."""
    xtr, ytr = data
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    done = 0
    try:
        while done < steps:
            for idx in torch.randperm(len(xtr), generator=g).split(batch)[: steps - done]:
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(net(xtr[idx]), ytr[idx])
                if not torch.isfinite(loss):
                    return float("inf")
                loss.backward()
                opt.step()
                done += 1
        with torch.no_grad():
            out = F.cross_entropy(net(xtr), ytr).item()
    except FloatingPointError:
        return float("inf")
    return out if out == out else float("inf")


def compiled(model, example, kind):
    if FORMS[kind] is None:
        return copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ic.compile_invariant(copy.deepcopy(model), (example,), **FORMS[kind])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--lrs", default="0.1,0.03,0.01")
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--cnn-seeds", type=int, default=24)
    args = ap.parse_args()
    torch.set_num_threads(1)
    xtr, ytr, _, _ = digits()
    kinds = args.forms.split(",")
    print(f"| model | lr | {' | '.join(kinds)} | gspace / plain |")
    print("|---|---|" + "---|" * (len(kinds) + 1))
    for name in args.models.split(","):
        for lr in map(float, args.lrs.split(",")):
            logs = {k: 0.0 for k in kinds}
            seeds = args.cnn_seeds if name.startswith("cnn") else args.seeds
            for seed in range(seeds):
                torch.manual_seed(seed)
                model = MODELS[name]()
                x = xtr.view(-1, 1, 8, 8) if name.startswith("cnn") else xtr
                for k in kinds:
                    logs[k] += math.log(final_loss(compiled(model, x[:4], k), lr, (x, ytr), args.steps)) / seeds
            got = {k: math.exp(v) for k, v in logs.items()}
            ratio = got["gspace"] / got["plain"] if {"gspace", "plain"} <= set(got) else float("nan")
            print(f"| {name} | {lr:g} | " + " | ".join(f"{got[k]:.4g}" for k in kinds) + f" | {ratio:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()

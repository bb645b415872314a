"""SGD (momentum 0.9) on the gspace module of a default-initialised model, at the plain model's
learning rates (DESIGN §6: final loss <= 1.5x plain). scikit-learn's digits, batch 64, 400 steps.

    python benchmarks/gspace_sgd.py [--models mlp3,mlp5,cnn_bn,prenorm] [--lrs 0.1,0.03,0.01] [--seeds 3]
                                    [--forms plain,gspace,paths,fixed] [--carriers]

Prints the final train loss (full train set) of the plain model, the gspace module (scaled
coordinates, the default), the gspace module with G-SGD's raw path values (coordinates="paths")
and the fixed-weight module, all from the same start and the same batches, and gspace / plain:
the geometric mean over `seeds` initialisations (seeds 0, 1, ...; at lr 0.1 with momentum 0.9 a
BatchNorm CNN is at the edge of stability and one run's loss moves by 10x with the thread count).
1 thread."""
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


def path_in(cm) -> torch.Tensor:
    """The carriers' path values P_in of a gspace module's classes, now."""
    plan = cm.allocate
    with torch.no_grad():
        return plan.path_in(plan.carrier_values(cm.v_carriers))[:-1].clone()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--lrs", default="0.1,0.03,0.01")
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--carriers", action="store_true",
                    help="also print, per gspace run, how far its carriers' path values moved: the "
                         "range of log10 |P_in / P_in at the start| (a weight downstream of class c "
                         "trains at lr / P_in(c)^2 in its own units)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    xtr, ytr, _, _ = digits()
    kinds = args.forms.split(",")
    print(f"| model | lr | {' | '.join(kinds)} | gspace / plain |")
    print("|---|---|" + "---|" * (len(kinds) + 1))
    for name in args.models.split(","):
        for lr in map(float, args.lrs.split(",")):
            logs = {k: 0.0 for k in kinds}
            for seed in range(args.seeds):
                torch.manual_seed(seed)
                model = MODELS[name]()
                x = xtr.view(-1, 1, 8, 8) if name.startswith("cnn") else xtr
                for k in kinds:
                    net = compiled(model, x[:4], k)
                    start = path_in(net) if args.carriers and k == "gspace" else None
                    logs[k] += math.log(final_loss(net, lr, (x, ytr), args.steps)) / args.seeds
                    if start is not None:
                        moved = (path_in(net) / start).abs().log10()
                        print(f"  {name} lr {lr:g} seed {seed}: log10 |P_in / P_in(0)| from "
                              f"{float(moved.min()):.2f} to {float(moved.max()):.2f}", flush=True)
            got = {k: math.exp(v) for k, v in logs.items()}
            ratio = got["gspace"] / got["plain"] if {"gspace", "plain"} <= set(got) else float("nan")
            print(f"| {name} | {lr:g} | " + " | ".join(f"{got[k]:.4g}" for k in kinds) + f" | {ratio:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()

"""Command line: `python -m invariance_compiler [demo | analyze NAME... | equalize NAME... | zoo | profile]`."""
from __future__ import annotations

import argparse
import copy
import sys
import warnings

import torch

from . import analyze
from .tools.zoo import ZOO

def _show(name: str) -> None:
    model, x = ZOO[name]()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        report = analyze(model, x)
    print(f"== {name}: {type(model).__name__}, example input {tuple(x[0].shape)}")
    print(report)
    print()


def _equalize(name: str, objective: str, fold_bn: bool) -> None:
    from .equalize import equalize, fold_batchnorm, quantize_weights_, sqnr_db
    model, x = ZOO[name]()
    model.eval()
    with warnings.catch_warnings(record=True), torch.no_grad():
        warnings.simplefilter("always")
        folded = fold_batchnorm(model, x) if fold_bn else []
        before = quantize_weights_(copy.deepcopy(model), 8)(*x)
        eq = equalize(model, x, objective=objective)
        eq.folded = folded
        ref = model(*x)
        after = quantize_weights_(copy.deepcopy(model), 8)(*x)
    print(f"== {name}: {type(model).__name__}, objective {objective}")
    print(eq)
    print(f"int8 per-tensor output SQNR: {sqnr_db(ref, before):.1f} dB before, {sqnr_db(ref, after):.1f} dB after")
    print()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m invariance_compiler",
                                     description="Find the rescaling symmetries of PyTorch models.")
    sub = parser.add_subparsers(dest="cmd")
    d = sub.add_parser("demo", help="analyze, compile, train on digits, profile (default)")
    d.add_argument("--out", default="out/demo", help="where the table, the PNG and the profile go")
    d.add_argument("--epochs", type=int, default=20)
    p = sub.add_parser("analyze", help="analyze models of the built-in zoo")
    p.add_argument("names", nargs="+", choices=sorted(ZOO), metavar="NAME")
    e = sub.add_parser("equalize", help="equalize models of the zoo for per-tensor quantization")
    e.add_argument("names", nargs="+", choices=sorted(ZOO), metavar="NAME")
    e.add_argument("--objective", choices=["range", "l2"], default="range")
    e.add_argument("--fold-bn", action="store_true", help="fold eval-mode BatchNorm first")
    sub.add_parser("zoo", help="list the built-in example models")
    sub.add_parser("profile", help="profile the kernels and a G-SGD training step (--help for options)",
                   add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.cmd == "profile":
        from .tools.profile import main as profile
        return profile(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    torch.manual_seed(0)
    if args.cmd == "zoo":
        print("\n".join(sorted(ZOO)))
    elif args.cmd == "analyze":
        for name in args.names:
            _show(name)
    elif args.cmd == "equalize":
        for name in args.names:
            _equalize(name, args.objective, args.fold_bn)
    else:
        from .tools.demo import main as demo
        return demo(getattr(args, "out", "out/demo"), getattr(args, "epochs", 20))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command line: `python -m invariance_compiler [demo | analyze NAME... | zoo]`."""
from __future__ import annotations

import argparse
import sys
import warnings

import torch

from . import analyze
from .zoo import ZOO

DEMO = ["arch1", "arch2", "cnn_pool", "resnet_basic", "densenet", "mini_transformer"]


def _show(name: str) -> None:
    model, x = ZOO[name]()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        report = analyze(model, x)
    print(f"== {name}: {type(model).__name__}, example input {tuple(x[0].shape)}")
    print(report)
    print()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m invariance_compiler",
                                     description="Find the rescaling symmetries of PyTorch models.")
    sub = parser.add_subparsers(dest="cmd")
    sub.add_parser("demo", help="analyze several example models and print their reports (default)")
    p = sub.add_parser("analyze", help="analyze models of the built-in zoo")
    p.add_argument("names", nargs="+", choices=sorted(ZOO), metavar="NAME")
    sub.add_parser("zoo", help="list the built-in example models")
    sub.add_parser("profile", help="profile the kernels and a G-SGD training step (--help for options)",
                   add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.cmd == "profile":
        from .kernels.profile import main as profile
        return profile(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    torch.manual_seed(0)
    if args.cmd == "zoo":
        print("\n".join(sorted(ZOO)))
    elif args.cmd == "analyze":
        for name in args.names:
            _show(name)
    else:
        print("invariance_compiler demo: the positive rescaling group of a few architectures.\n"
              "Each table counts, per layer, the generators it produces: rescale (a unit's scale\n"
              "moves to the next layer), normalize (a normaliser absorbs it), inert (no effect).\n")
        for name in DEMO:
            _show(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())

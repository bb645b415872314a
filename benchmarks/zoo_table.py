"""The zoo at a glance: per model m, H by kind, the oracle's null-space dimension (completeness),
the soundness error of a random group element, and both compiled forms' function error (float64).

    PYTHONPATH=. python benchmarks/zoo_table.py      (about 30 s)
"""
import copy
import warnings

import torch

import invariance_compiler as ic
from invariance_compiler.analyze import oracle
from invariance_compiler.tools.zoo import ZOO


def main():
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    print("| model | m | H | rescale / normalize / inert | oracle null dim | soundness | gspace f64 | fixed f64 |")
    print("|---|---|---|---|---|---|---|---|")
    for name in sorted(ZOO):
        model, x = ZOO[name]()
        report = ic.analyze(model, x)
        xb = tuple(torch.randn(8, *t.shape[1:]) if t.is_floating_point()
                   else torch.randint(0, int(t.max()) + 1, (8, *t.shape[1:])) for t in x)
        null = oracle.completeness(model, report, xb)["null_dim"]
        sound = oracle.invariance_error(model, report, xb)
        m64 = copy.deepcopy(model).double()
        x64 = tuple(t.double() if t.is_floating_point() else t for t in x)
        errs = []
        for form in ("gspace", "fixed"):
            cm = ic.compile_invariant(m64, x64, form=form)
            torch.manual_seed(1)
            ref = m64(*x64).detach()
            torch.manual_seed(1)
            errs.append(float((cm(*x64).detach() - ref).norm() / ref.norm()))
        k = report.counts()
        print(f"| {name} | {report.num_params} | {report.num_generators} | {k['rescale']} / {k['normalize']} / "
              f"{k['inert']} | {null} | {sound:.1e} | {errs[0]:.1e} | {errs[1]:.1e} |")


if __name__ == "__main__":
    main()

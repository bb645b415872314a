"""The transformers families of invariance_compiler/tools/hf_families.py in one table: m, generators by kind, analysis
time, soundness, the oracle's null-space dimension against H (models up to 2000 parameters), and
both compiled forms' output errors in train and eval mode (float64).

    python benchmarks/transformers_table.py      # about 4 minutes on 2 cores
"""
import os
import sys
import time
import warnings

import torch
from invariance_compiler.tools.hf_families import build, BUILDERS, float64_norms, other_inputs
import invariance_compiler as ic
from invariance_compiler.analyze import oracle
warnings.simplefilter("ignore")
print("| model | m | H: rescale / normalize / inert (relation) | analyze | sound | oracle null dim / H | gspace train / eval | fixed train / eval |")
print("|---|---|---|---|---|---|---|---|")
def out(m, a, k):
    torch.manual_seed(1); return oracle._flat_tensors(m(*a, **k))
for name in BUILDERS:
    model, args, kw = build(name, dropout=False)
    t = time.time(); r = ic.analyze(model, args, kw); ta = time.time() - t
    err = oracle.invariance_error(model, r, args, kwargs=kw, trials=2)
    c = r.counts()
    orc = "-"
    if r.num_params <= 2000:      # the oracle as tests/test_transformers.py runs it
        got = oracle.completeness(float64_norms(model), r, args, kwargs=kw, more=other_inputs(name, kw))
        orc = f"{got['null_dim']} / {r.num_generators}"
    forms = []
    model, args, kw = build(name, dropout=True)
    for form in ("gspace", "fixed"):
        model.train()
        cm = ic.compile_invariant(model, args, form=form, example_kwargs=kw)
        e = []
        for tr in (True, False):
            model.train(tr); cm.train(tr)
            a, b = out(model, args, kw), out(cm, args, kw)
            e.append(float((a - b).abs().max() / a.abs().max()))
        forms.append(f"{e[0]:.0e} / {e[1]:.0e}")
    rel = r.num_generators - r.num_simple - c["inert"]
    print(f"| {name} | {r.num_params} | {c['rescale']} / {c['normalize']} / {c['inert']} ({rel}) | {ta:.2f} s | {err:.0e} | {orc} | {forms[0]} | {forms[1]} |", flush=True)

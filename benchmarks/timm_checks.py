"""timm's models as created, checked by hand (timm needs a CUDA build of torch, so it is not in
the test set-up; a separate venv with `torch==2.14.1 torchvision==0.29.1 timm` works on CPU):

    python benchmarks/timm_checks.py

1. models at their own initialisation compile and keep their function: ResNeXt-26ts (a grouped
   3x3 conv after SiLU), EVA-02 tiny (q/v biases at zero, cat with a zero key-bias buffer),
   ResNet-18, ViT-S/16 (float64, both forms, max relative output error);
2. torch.compile(cm, fullgraph=True) of ResNet-18 and ViT-S/16, both forms: one graph, forward and
   gradients against eager (relative errors);
3. the whole group quotiented: ViT-S/16 and EVA-02 (float64, negligible eps) and a copy moved by a
   random element of every generator (query/key pairs included) compile to one skeleton and the
   same coordinates, and stay equal over 5 SGD steps with momentum (relative gaps)."""
from __future__ import annotations

import warnings

import torch

import invariance_compiler as ic

MODELS = [("resnext26ts", {}, 64), ("eva02_tiny_patch14_224", {"img_size": 56}, 56),
          ("resnet18", {}, 64), ("vit_small_patch16_224", {"img_size": 64}, 64)]


def _run(net, x):
    net.zero_grad(set_to_none=True)
    out = net(x)
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in net.parameters() if p.grad is not None]


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def main():
    try:
        import timm
    except ImportError as e:
        print(f"skipped: {e} (timm needs a CUDA build of torch; see the docstring)")
        return
    warnings.simplefilter("ignore")
    print("| model | form | compiles | output rel. error (float64, eval) |")
    print("|---|---|---|---|")
    for name, kw, size in MODELS:
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=10, **kw).double().eval()
        x = torch.randn(2, 3, size, size, dtype=torch.float64)
        for form in ("gspace", "fixed"):
            try:
                cm = ic.compile_invariant(model, (x,), form=form).eval()
                with torch.no_grad():
                    print(f"| {name} | {form} | yes | {_rel(cm(x), model(x)):.1e} |", flush=True)
            except Exception as e:                       # noqa: BLE001 — the table says what failed
                print(f"| {name} | {form} | no: {type(e).__name__}: {str(e)[:120]} | |", flush=True)
    print("\n| model | form | torch.compile fullgraph | forward rel. error | worst gradient rel. error |")
    print("|---|---|---|---|---|")
    for name, kw, size in MODELS[2:]:
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=10, **kw).eval()
        x = torch.randn(2, 3, size, size)
        for form in ("gspace", "fixed"):
            cm = ic.compile_invariant(model, (x,), form=form).eval()
            torch._dynamo.reset()
            out_e, grads_e = _run(cm, x)
            out_c, grads_c = _run(torch.compile(cm, fullgraph=True), x)
            worst = max(_rel(a, b) for a, b in zip(grads_c, grads_e))
            print(f"| {name} | {form} | one graph | {_rel(out_c, out_e):.1e} | {worst:.1e} |", flush=True)
    print("\n| model | form | relation generators quotiented | same skeleton | coordinate gap | gap after 5 SGD steps |")
    print("|---|---|---|---|---|---|")
    for name, kw, size in (MODELS[3], MODELS[1]):
        _whole_group(timm.create_model(name, num_classes=10, **kw), name, size)


def _whole_group(model, name, size):
    from invariance_compiler.analyze import oracle
    torch.manual_seed(0)
    a = oracle.prepare(model).eval()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    report = ic.analyze(a, (x,))
    b = oracle.prepare(a).eval()
    report.act(b, torch.randn(report.num_generators, dtype=torch.float64) * 0.5)
    for form, fixed in (("gspace", "keep"), ("fixed", "scale")):
        ca, cb = (ic.compile_invariant(m, (x,), form=form, fixed=fixed) for m in (a, b))
        same = all(torch.equal(getattr(ca.skeleton, k), getattr(cb.skeleton, k)) for k in ca.skeleton._STATE)
        pb = dict(cb.named_parameters())
        coord = max(_rel(pb[k], p) for k, p in ca.named_parameters())
        for m in (ca, cb):
            opt = torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9)
            for _ in range(5):
                opt.zero_grad()
                m(x).square().mean().backward()
                opt.step()
        held = int((ca.skeleton.relation_param >= 0).sum())
        print(f"| {name} | {form} | {held} of {report.num_relations} | {same} | {coord:.1e} | "
              f"{_rel(cb(x).detach(), ca(x).detach()):.1e} |", flush=True)


if __name__ == "__main__":
    main()

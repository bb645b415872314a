"""One training step (forward, loss, backward, Adam) of the compiled modules over the plain model,
on models people train: transformers' GPT-2 and Llama (GQA), d 256, 4 layers, batch 4x64; timm's
ResNet-18 at 64x64, batch 8, and ViT-S/16 at 64x64, batch 8 (skipped when timm is missing: it
needs a CUDA build of torch, so it is not in the test set-up).

    python benchmarks/real_train_step.py [--models gpt2 llama resnet18 vit_s] [--modes eager compiled]
                                         [--repeats 20] [--threads 1]

Eager: the modules as they are. Compiled: torch.compile of each (the plain model compiled too, so
each ratio is against the plain model under the same compiler). Runs are interleaved (plain,
gspace, fixed, plain, ...) and each ratio is the median of the per-round ratios. Targets (issue
26): eager <= 1.15, compiled <= 1.05."""
from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

import invariance_compiler as ic
from train_step import interleaved

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=1024, n_embd=256, n_layer=4, n_head=4, n_positions=128, bos_token_id=0,
                     eos_token_id=0)
    return GPT2LMHeadModel(cfg), torch.randint(0, 1024, (4, 64)), 1024


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg), torch.randint(0, 1024, (4, 64)), 1024


def resnet18():
    import timm
    return timm.create_model("resnet18", num_classes=10), torch.randn(8, 3, 64, 64), 10


def vit_s():
    import timm
    return timm.create_model("vit_small_patch16_224", img_size=64, num_classes=10), torch.randn(8, 3, 64, 64), 10


MODELS = {"gpt2": ("GPT-2 d256 L4, batch 4x64", gpt2), "llama": ("Llama d256 L4 (GQA), batch 4x64", llama),
          "resnet18": ("timm ResNet-18, 64x64, batch 8", resnet18), "vit_s": ("timm ViT-S/16, 64x64, batch 8", vit_s)}


def loss_fn(out, target):
    logits = getattr(out, "logits", out)
    if logits.dim() == 3:                                   # language model: next-token targets
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), target[:, 1:].flatten())
    return F.cross_entropy(logits, target)


def step_fn(model, x, target):
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), target).backward()
        opt.step()
    return step


def bench(key: str, mode: str, repeats: int) -> list[str]:
    title, build = MODELS[key]
    torch.manual_seed(0)
    model, x, classes = build()
    model.train()
    target = x if x.dtype == torch.long else torch.randint(0, classes, (x.shape[0],))
    variants = {"plain": model}
    for form in ("gspace", "fixed"):
        t = time.perf_counter()
        variants[form] = ic.compile_invariant(model, (x[:1],), form=form)
        print(f"  {title}: compile_invariant {form} {time.perf_counter() - t:.1f} s", flush=True)
    if mode == "compiled":
        variants = {k: torch.compile(m) for k, m in variants.items()}
    # the warm-up calls also run torch.compile's compilation
    times = interleaved({k: step_fn(m, x, target) for k, m in variants.items()}, repeats)
    base = times["plain"]
    rows = []
    for form in ("gspace", "fixed"):
        ratio = statistics.median(a / b for a, b in zip(times[form], base))
        rows.append(f"| {title} | {mode} | {form} | {statistics.median(base) * 1e3:.1f} ms | "
                    f"{statistics.median(times[form]) * 1e3:.1f} ms | {ratio:.3f} |")
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    rows = []
    for key in args.models:
        for mode in args.modes:
            try:
                rows += bench(key, mode, args.repeats)
            except ImportError as e:
                print(f"  {MODELS[key][0]}: skipped ({e})", flush=True)
                break
    print(f"\n{args.threads} thread(s), Adam, torch {torch.__version__}\n")
    print("| model | mode | form | plain step | compiled module step | ratio (median of interleaved) |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

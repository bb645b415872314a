"""What `ic.rotate` finds, and what it buys for quantization.

    python benchmarks/rotate_table.py [--steps 3000] [--skip-coverage] [--skip-perplexity] [--sqnr]   # ~6 min, 2 cores

Part 1, coverage: for each transformers family (tiny configs, as the tests build them) the groups
the analysis proves: R1 (the residual stream), R2 (each attention's value/output heads), q/k
(one orthogonal map per key head; under RoPE, rotations of its frequency planes), beside the families
that QuaRot, SpinQuant, SliceGPT and llm-compressor support with their hand-written adapters
(from their READMEs and issue trackers, as issue 25 lists them).

Part 2, benefit: a byte-level Llama (transformers' own class; d 128, 4 layers, GQA) trained here on
the Python standard library's sources, then quantized with round-to-nearest: weights per output
channel, every Linear's input per token, symmetric. Validation perplexity for: no move, `equalize`
(SmoothQuant-style migration at the norms, calibrated on training batches), `rotate` (Hadamard; all
spaces, and the residual stream and value/output heads only), and `rotate` then `equalize`.
Deterministic (seed 0).

Part 3 (--sqnr, 20 s): `ic.rotate`'s R1 against QuaRot's R1 written out by hand for Llama (norm
gains folded into the readers, a Sylvester Hadamard matrix on the stream), on the "massive
activations" Llama the tests use (tools/hf_families.massive_model): logits SQNR of W8A8 and W8A4 RTN, seeds 0-2."""
from __future__ import annotations

import argparse
import copy
import math
import os
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import invariance_compiler as ic
from invariance_compiler.equalize.quant import fake_quantized

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# what each tool supports by hand (family -> groups), as their READMEs say
OTHERS = {
    "QuaRot": {"llama": "R1 R2, online R3 R4", "opt": "R1 R2, online R3 R4"},
    "SpinQuant": {"llama": "R1 R2, online R3 R4"},
    "SliceGPT": {"llama": "R1", "opt": "R1", "phi": "R1"},
    "llm-compressor": {"llama": "R1 R2, online R4", "mixtral": "(Llama's names: wrong)"},
}


def _families():
    import transformers as T
    from invariance_compiler.tools.hf_families import build
    out = {}
    for name in ("llama", "qwen2", "gpt2", "opt", "bert", "t5", "vit", "clip_vision", "swin"):
        out[name] = lambda name=name: build(name, dropout=False, dtype=torch.float32)[0:3]
    ids = torch.arange(16).view(2, 8)
    small = dict(vocab_size=16, hidden_size=8, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
                 max_position_embeddings=8)
    gqa = dict(small, num_key_value_heads=1, head_dim=4)
    out["mistral"] = lambda: (T.MistralForCausalLM(T.MistralConfig(**gqa)), (), {"input_ids": ids})
    out["gemma"] = lambda: (T.GemmaForCausalLM(T.GemmaConfig(**gqa)), (), {"input_ids": ids})
    out["gemma2"] = lambda: (T.Gemma2ForCausalLM(T.Gemma2Config(**gqa)), (), {"input_ids": ids})
    out["phi"] = lambda: (T.PhiForCausalLM(T.PhiConfig(**small)), (), {"input_ids": ids})
    out["mixtral"] = lambda: (T.MixtralForCausalLM(T.MixtralConfig(**gqa, num_local_experts=2)), (), {"input_ids": ids})
    return out


def coverage() -> str:
    rows = ["| family | ic.rotate R1 (residual) | ic.rotate R2 (values/outputs) | ic.rotate q/k | " +
            " | ".join(OTHERS) + " |", "|---|---|---|---|" + "---|" * len(OTHERS)]
    for name, make in _families().items():
        torch.manual_seed(0)
        model, args, kwargs = make()
        rot = ic.rotate(model.eval(), args, kwargs)
        res = [g for g in rot.groups if g.kind == "residual"]
        heads = [g for g in rot.groups if g.kind == "head"]
        qk = [g for g in rot.groups if g.kind == "qk"]
        r1 = f"{res[0].group}" if res else "none: " + _why_not(rot)
        if res and res[0].centred:              # and with SliceGPT's surgery
            model, args, kwargs = make()
            again = ic.rotate(model.eval(), args, kwargs, layernorm="rmsnorm")
            whole = [g.group for g in again.groups if g.kind == "residual"]
            r1 += f"; {whole[0]} with `layernorm=\"rmsnorm\"`" if again.rmsnorm else ""
        r2 = f"{len(heads)} x ({heads[0].group})" if heads else "none"
        r3 = f"{len(qk)} x ({qk[0].group})" if qk else "none"
        rows.append(f"| {name} | {r1} | {r2} | {r3} | " +
                    " | ".join(OTHERS[t].get(name, "—") for t in OTHERS) + " |")
    return "\n".join(rows)


def _why_not(rot) -> str:
    """Why the stream has no group: the token embedding's walk, else the one that went furthest."""
    whys = [w for seed, w in rot.why.items() if seed == "embedding"] or list(rot.why.values())
    return whys[0].split(":", 1)[-1].strip()[:70] if whys else "no writer"


# ---- part 2 ---------------------------------------------------------------------------------------
def _corpus(limit: int = 3_000_000) -> torch.Tensor:
    """Bytes of the standard library's .py sources (sorted, so the same text every time)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    data = bytearray()
    for path in sorted(lib.glob("*.py")):
        data += path.read_bytes()
        if len(data) >= limit:
            break
    return torch.tensor(list(data[:limit]), dtype=torch.long)


def _model():
    import transformers as T
    cfg = T.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        tie_word_embeddings=False)
    return T.LlamaForCausalLM(cfg)


def _batches(data, n, seq, batch, gen):
    for _ in range(n):
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen)
        yield torch.stack([data[s:s + seq] for s in starts])


def train(steps: int, seq: int = 128, batch: int = 16):
    torch.manual_seed(0)
    data = _corpus()
    split = int(0.95 * data.numel())
    train_data, val = data[:split], data[split:]
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(0)
    t = time.time()
    for step, ids in enumerate(_batches(train_data, steps, seq, batch, gen)):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    print(f"trained {steps} steps in {time.time() - t:.0f} s, last loss {loss.item():.3f}")
    return model.eval(), train_data, val


@torch.no_grad()
def perplexity(model, val, seq=128, n=16) -> float:
    ids = val[: n * seq].view(n, seq)
    logits = model(input_ids=ids).logits
    return math.exp(F.cross_entropy(logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1)).item())


def outliers(model, ids) -> float:
    """max |x| / median |x| of the residual stream entering the last layer's norm."""
    seen = {}
    h = model.model.layers[-1].input_layernorm.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    x = seen["x"].abs()
    return float(x.max() / x.median())


def benefit(steps: int) -> str:
    model, train_data, val = train(steps)
    gen = torch.Generator().manual_seed(1)
    calib = [{"input_ids": b} for b in _batches(train_data, 4, 128, 4, gen)]
    example = calib[0]
    moves = {"none": model}
    eq = copy.deepcopy(model)
    ic.equalize(eq, (), example, calibration=calib)
    moves["equalize"] = eq
    rot = copy.deepcopy(model)
    r = ic.rotate(rot, (), example)
    moves["rotate"] = rot
    r12 = copy.deepcopy(model)
    ic.rotate(r12, (), example, spaces=("residual", "head"))
    moves["rotate R1 + R2 only"] = r12
    both = copy.deepcopy(rot)
    ic.equalize(both, (), example, calibration=calib)
    moves["rotate + equalize"] = both
    print(r)
    print(f"residual stream max/median |x| before the last layer: {outliers(model, example['input_ids']):.1f}")
    schemes = [("FP32", None), ("W8A8", (8, 8)), ("W4A8", (4, 8)), ("W4A4", (4, 4))]
    rows = ["| move | " + " | ".join(s for s, _ in schemes) + " |", "|---|" + "---|" * len(schemes)]
    for name, m in moves.items():
        cells = [perplexity(m if bits is None else fake_quantized(m, *bits), val) for _, bits in schemes]
        rows.append(f"| {name} | " + " | ".join(f"{c:.3f}" if c < 1e4 else f"{c:.3g}" for c in cells) + " |")
    return "\n".join(rows)


# ---- part 3 ---------------------------------------------------------------------------------------
def _hand_r1(model, h: torch.Tensor) -> None:
    """QuaRot's R1 for transformers' Llama, by hand: gains into the readers, x -> x·H on the stream."""
    m = model.model
    with torch.no_grad():
        def into(readers, norm, rotate=True):
            for r in readers:
                w = r.weight.double() * norm.weight.double()
                r.weight.copy_(w @ h if rotate else w)
            norm.weight.fill_(1.0)
        for layer in m.layers:
            a, mlp = layer.self_attn, layer.mlp
            into([a.q_proj, a.k_proj, a.v_proj], layer.input_layernorm)
            into([mlp.gate_proj, mlp.up_proj], layer.post_attention_layernorm)
            for w in (a.o_proj, mlp.down_proj):
                w.weight.copy_(h.T @ w.weight.double())
        into([model.lm_head], m.norm)
        m.embed_tokens.weight.copy_(m.embed_tokens.weight.double() @ h)


def sqnr_table() -> str:
    from invariance_compiler.equalize.quant import sqnr_db
    from invariance_compiler.tools.hf_families import massive_model   # the tests' model
    rows = ["| seed | bits | none | hand-written R1 | ic.rotate R1 | ic.rotate (all spaces) |", "|---|---|---|---|---|---|"]
    for seed in range(3):
        model, ids = massive_model("llama", seed)
        hand, r1, every = (copy.deepcopy(model) for _ in range(3))
        _hand_r1(hand, _sylvester(128) / 128 ** 0.5)
        ic.rotate(r1, (), {"input_ids": ids}, spaces=("residual",))
        ic.rotate(every, (), {"input_ids": ids})
        with torch.no_grad():
            ref = model(input_ids=ids).logits
            for w, a in ((8, 8), (8, 4)):
                db = [sqnr_db(ref, fake_quantized(m, w, a)(input_ids=ids).logits) for m in (model, hand, r1, every)]
                rows.append(f"| {seed} | W{w}A{a} | " + " | ".join(f"{d:.1f} dB" for d in db) + " |")
    return "\n".join(rows)


def _sylvester(n: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix of order n (a power of two), entries ±1."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--skip-coverage", action="store_true")
    ap.add_argument("--skip-perplexity", action="store_true")
    ap.add_argument("--sqnr", action="store_true")
    a = ap.parse_args()
    if a.sqnr:
        print(sqnr_table())
    if not a.skip_coverage:
        print(coverage())
    if not a.skip_perplexity:
        print(benefit(a.steps))


if __name__ == "__main__":
    main()

"""Small instances of Hugging Face transformers' own model classes (random init, tiny configs,
nothing downloads): the closest thing to a user's model. Each builder gives (model, args, kwargs).
Text inputs use every token id and every position once, so that no embedding row is unused (an
unused row is an invariance of that input, not of the model)."""
from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers  # noqa: E402  (an ImportError without it: callers skip or say so)
T = transformers

V, P = 16, 8          # vocabulary, positions


def _ids(t=P):
    g = torch.Generator().manual_seed(0)
    return torch.randperm(V, generator=g)[: 2 * t].reshape(2, t) if 2 * t <= V else \
        torch.randint(0, V, (2, t), generator=g)


def _img(s=16):
    return torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(0))


def _quiet(cfg, dropout):
    if not dropout:
        for k, v in list(vars(cfg).items()):
            if ("dropout" in k or "drop_path" in k or k.endswith(("_drop", "_pdrop"))) and isinstance(v, float):
                setattr(cfg, k, 0.0)
    return cfg


def _text(cls, model_cls, dropout, **kw):
    return lambda: (model_cls(_quiet(cls(**kw), dropout)), (), {"input_ids": _ids(), "use_cache": False})


BUILDERS = {
    "bert": lambda d: (T.BertModel(_quiet(T.BertConfig(
        vocab_size=V, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=12,
        max_position_embeddings=P, type_vocab_size=1), d), add_pooling_layer=False), (),
        {"input_ids": _ids()}),
    "gpt2": lambda d: (T.GPT2LMHeadModel(_quiet(T.GPT2Config(
        vocab_size=V, n_embd=8, n_layer=1, n_head=2, n_positions=P, bos_token_id=0, eos_token_id=0), d)),
        (), {"input_ids": _ids(), "use_cache": False}),
    "llama": lambda d: (T.LlamaForCausalLM(_quiet(T.LlamaConfig(
        vocab_size=V, hidden_size=8, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=P, head_dim=4), d)), (),
        {"input_ids": _ids(), "use_cache": False}),
    "qwen2": lambda d: (T.Qwen2ForCausalLM(_quiet(T.Qwen2Config(
        vocab_size=V, hidden_size=8, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=P), d)), (), {"input_ids": _ids(), "use_cache": False}),
    "t5": lambda d: (T.T5Model(_quiet(T.T5Config(
        vocab_size=V, d_model=8, d_kv=4, d_ff=12, num_layers=1, num_decoder_layers=1, num_heads=2,
        relative_attention_num_buckets=4), d)), (),
        {"input_ids": _ids(), "decoder_input_ids": _ids(4), "use_cache": False}),
    "opt": lambda d: (T.OPTForCausalLM(_quiet(T.OPTConfig(
        vocab_size=V, hidden_size=8, ffn_dim=12, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=P, word_embed_proj_dim=8), d)), (), {"input_ids": _ids(), "use_cache": False}),
    "vit": lambda d: (T.ViTModel(_quiet(T.ViTConfig(
        hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=12, image_size=8,
        patch_size=4), d), add_pooling_layer=False), (_img(8),), {}),
    "clip_vision": lambda d: (T.CLIPVisionModel(_quiet(T.CLIPVisionConfig(
        hidden_size=8, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2, image_size=8,
        patch_size=4), d)), (_img(8),), {}),
    "resnet": lambda d: (T.ResNetModel(_quiet(T.ResNetConfig(
        embedding_size=4, hidden_sizes=[4, 6], depths=[1, 1], layer_type="basic"), d)), (_img(),), {}),
    "convnext": lambda d: (T.ConvNextModel(_quiet(T.ConvNextConfig(
        hidden_sizes=[4, 8], depths=[1, 1], num_stages=2, patch_size=2), d)), (_img(32),), {}),
    "swin": lambda d: (T.SwinModel(_quiet(T.SwinConfig(
        image_size=8, patch_size=2, embed_dim=4, depths=[1], num_heads=[2], window_size=2), d),
        add_pooling_layer=False), (_img(8),), {}),
    "mobilenet_v2": lambda d: (T.MobileNetV2Model(_quiet(T.MobileNetV2Config(
        image_size=16, depth_multiplier=0.05, min_depth=2, finegrained_output=False), d)), (_img(),), {}),
    "efficientnet": lambda d: (T.EfficientNetModel(_quiet(T.EfficientNetConfig(
        image_size=32, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128), d)), (_img(32),), {}),
    "regnet": lambda d: (T.RegNetModel(_quiet(T.RegNetConfig(
        embedding_size=4, hidden_sizes=[4, 8], depths=[1, 1], groups_width=2), d)), (_img(),), {}),
    "mobilevit": lambda d: (T.MobileViTModel(_quiet(T.MobileViTConfig(
        image_size=16, patch_size=2, hidden_sizes=[8, 8, 8], neck_hidden_sizes=[4, 4, 4, 4, 4, 4, 8],
        num_attention_heads=2, expand_ratio=1.0), d)), (_img(),), {}),
    "levit": lambda d: (T.LevitModel(_quiet(T.LevitConfig(
        image_size=64, patch_size=16, hidden_sizes=[8, 16, 16], num_attention_heads=[2, 2, 2],
        depths=[1, 1, 1], key_dim=[4, 4, 4], mlp_ratio=[2, 2, 2], attention_ratio=[1, 1, 1]), d)),
        (_img(64),), {}),
    "poolformer": lambda d: (T.PoolFormerModel(_quiet(T.PoolFormerConfig(
        hidden_sizes=[4, 8], depths=[1, 1], num_encoder_blocks=2, patch_sizes=[3, 3], strides=[2, 2],
        padding=[1, 1], pool_size=3), d)), (_img(),), {}),
}


def build(name: str, dropout: bool = True, dtype=torch.float64):
    """(model, args, kwargs) in train mode; dropout=False zeroes every dropout probability."""
    torch.manual_seed(0)
    model, args, kwargs = BUILDERS[name](dropout)
    cast = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    return model.to(dtype).train(), tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def other_inputs(name: str, kwargs: dict) -> list:
    """More inputs for the oracle's joint null space, where one example leaves parameters unread
    that other inputs read (not symmetries of the model): OPT's position rows 0 and 1 (read by a
    padded position, and by a mask entry -1: positions are cumsum(mask)·mask - 1 + 2), T5's
    decoder relative-attention bucket 3 (distances of 16 and more)."""
    if name == "opt":
        mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0], [1, 1, -1, 1, 1, 1, 1, 1]])
        return [((), {**kwargs, "attention_mask": mask})]
    if name == "t5":
        return [((), {**kwargs, "decoder_input_ids": _ids(17)})]
    return []


def float64_norms(model):
    """The model with its Hugging Face norms computing in the model's dtype: LlamaRMSNorm and
    T5LayerNorm cast to float32 and back, the only difference (for the oracle, whose rank would
    otherwise see float32 rounding)."""
    import types

    def forward(self, h):
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h
    for mod in model.modules():
        if type(mod).__name__ in ("LlamaRMSNorm", "Qwen2RMSNorm", "T5LayerNorm"):
            mod.forward = types.MethodType(forward, mod)
    return model


def massive_activations(model, channels, factor=20.0):
    """A few residual channels `factor` x larger (the writers' rows), the Linears that read them as
    much smaller (their columns): LLMs' "massive activations"."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("embed_tokens.weight"):
                p[:, channels] *= factor
            elif n.endswith(("o_proj.weight", "down_proj.weight")):
                p[channels, :] *= factor
            elif n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight",
                             "up_proj.weight", "lm_head.weight")):
                p[:, channels] /= factor


def massive_model(family: str, seed: int = 0):
    """A Llama or Qwen2 (d 128, 2 layers, GQA) with larger-than-default weights and massive
    activations, and its input ids (4 x 64). (tests/test_rotate.py, benchmarks/rotate_table.py --sqnr)"""
    cfg_cls, cls = {"llama": (T.LlamaConfig, T.LlamaForCausalLM), "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM)}[family]
    torch.manual_seed(seed)
    model = cls(cfg_cls(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 2.0 / p.shape[-1] ** 0.5)
    massive_activations(model, [3, 17])
    return model, torch.randint(0, 256, (4, 64))

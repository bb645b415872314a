"""ic.rotate and the rotation analysis (DESIGN §3.8) on transformers' own classes: the rotated
model computes the original function (float64), pre-norm decoders get a residual group, every
attention gets its value/output head groups and its query/key groups (RoPE's frequency planes under
RoPE), post-norm models and models that return the residual stream get
none, tied embeddings are untied only where the rotation needs it, and on a Llama/Qwen2 with
"massive activations" the rotation raises the SQNR of fake-quantized inference."""
import copy
import tempfile

import pytest
import torch
import torch.nn as nn

import invariance_compiler as ic

pytest.importorskip("transformers")
import transformers as T  # noqa: E402

from invariance_compiler.equalize.quant import fake_quantized, sqnr_db  # noqa: E402
from invariance_compiler.rotate import RMSLayerNorm  # noqa: E402
from invariance_compiler.tools.hf_families import build, float64_norms, massive_model  # noqa: E402

ATTENTION = ["bert", "clip_vision", "gpt2", "llama", "opt", "qwen2", "swin", "t5", "vit"]
PRE_NORM_DECODERS = {"gpt2", "llama", "opt", "qwen2"}
ROPE = {"llama", "qwen2"}
HIDDEN = 8


def _first(out):
    return out if isinstance(out, torch.Tensor) else out[0]


def _generic(model, seed=0):
    """Weights away from their special initial values (zero biases, unit gains)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return model


@pytest.mark.parametrize("kind", ["hadamard", "random"])
@pytest.mark.parametrize("name", ATTENTION)
def test_rotation_keeps_the_function(name, kind):
    model, args, kwargs = build(name, dropout=False)
    model = _generic(float64_norms(model)).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref = _first(model(*args, **kwargs)).detach()
    rot = ic.rotate(model, args, kwargs, kind=kind, seed=1, check=False)
    out = _first(model(*args, **kwargs)).detach()
    assert torch.allclose(out, ref, rtol=0, atol=1e-12 * float(ref.abs().max())), float((out - ref).abs().max())
    kinds = [g.kind for g in rot.groups]
    assert "head" in kinds                              # every attention: its value/output heads
    assert "qk" in kinds                                # and its queries/keys
    assert ("residual" in kinds) == (name in PRE_NORM_DECODERS)
    for g in rot.groups:
        assert sum(len(b) for b in g.blocks) == g.size
        if g.kind == "qk" and name in ROPE:             # RoPE: rotations of each frequency plane
            assert g.proper and {len(b) for b in g.blocks} == {2}
        elif g.kind == "qk":                            # one O(d_head) per key/value head
            assert g.orthogonal and not g.proper and {len(b) for b in g.blocks} == {g.size // len(g.blocks)} \
                and len(g.blocks) > 1
        if g.kind == "residual":
            assert g.size == HIDDEN and g.orthogonal and len(g.blocks) == 1
            assert g.centred == (name in ("gpt2", "opt"))  # LayerNorm: the map fixes 1
    moved = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert moved, "the rotation left every weight as it was"


def test_post_norm_and_base_models_get_no_residual_group():
    """BERT adds the gained LayerNorm output to the stream; LlamaModel returns the stream: neither
    can be rotated, and the analysis says where."""
    model, args, kwargs = build("bert", dropout=False)
    rot = ic.rotate(_generic(model).eval(), args, kwargs)
    assert "residual" not in [g.kind for g in rot.groups]
    assert any("gain" in why for why in rot.why.values())
    base = T.LlamaModel(T.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                                      max_position_embeddings=8)).double().eval()
    rot = ic.rotate(_generic(base), (), {"input_ids": torch.arange(16).view(2, 8)})
    assert sorted(g.kind for g in rot.groups) == ["head", "qk"]
    assert "output" in rot.why["embedding"]


def test_tied_embeddings_are_untied_only_where_needed():
    """GPT-2 ties lm_head to wte; the final LayerNorm's gain folds into lm_head, so the two uses need
    different values: lm_head gets its own parameter and the config says so. Llama (untied) and a
    head-only rotation untie nothing."""
    model, args, kwargs = build("gpt2", dropout=False)
    model = _generic(model).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    ref = model(*args, **kwargs).logits.detach()
    rot = ic.rotate(model, args, kwargs)
    assert rot.untied == [("transformer.wte.weight", "lm_head.weight")]
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert model.config.tie_word_embeddings is False
    assert torch.allclose(model(*args, **kwargs).logits, ref, atol=1e-12 * float(ref.abs().max()), rtol=0)
    with tempfile.TemporaryDirectory() as d:                  # save/load keeps them apart
        model.save_pretrained(d)
        again = T.GPT2LMHeadModel.from_pretrained(d, dtype=torch.float64).eval()
    assert torch.allclose(again(*args, **kwargs).logits, ref, atol=1e-12 * float(ref.abs().max()), rtol=0)
    llama, args, kwargs = build("llama", dropout=False)
    assert ic.rotate(_generic(float64_norms(llama)).eval(), args, kwargs).untied == []


def test_gemma_gains_one_plus_w_fold():
    """Gemma's RMSNorm multiplies by (1 + γ): the rotation folds 1 + γ into the readers, sets γ to 0,
    and unties the embedding Gemma ties to its head."""
    cfg = T.GemmaConfig(vocab_size=16, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=4, max_position_embeddings=8)
    model = _generic(T.GemmaForCausalLM(cfg).double().eval())
    ids = torch.arange(16).view(2, 8)
    ref = model(input_ids=ids).logits.detach()
    rot = ic.rotate(model, (), {"input_ids": ids})
    assert "residual" in [g.kind for g in rot.groups]
    assert float(model.model.norm.weight.detach().abs().max()) == 0.0
    # Gemma's norm computes in float32 inside the float64 model
    assert torch.allclose(model(input_ids=ids).logits, ref, atol=1e-5 * float(ref.abs().max()), rtol=0)


def test_an_op_without_a_rotation_rule_pins_the_space():
    """A ReLU on the stream: no group through it, whatever the rest of the graph allows."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            h = self.a(x)
            return self.c(torch.relu(h) + self.b(h))

    torch.manual_seed(0)
    net = Net().double()
    x = torch.randn(4, 6, dtype=torch.float64)
    rot = ic.rotate(net, (x,))
    assert rot.groups == [] and "relu" in rot.why["linear"]


def test_a_linear_bottleneck_admits_gl():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    ref = net(x).detach()
    rot = ic.rotate(net, (x,), kind="random")
    assert [(g.kind, g.size, g.group) for g in rot.groups] == [("linear", 4, "GL(4)")]
    assert torch.allclose(net(x), ref, atol=1e-12, rtol=0)
    # a CNN's linear bottleneck (a 1x1 conv straight into a 3x3 conv, as after BatchNorm folding)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Conv2d(4, 6, 3), nn.ReLU(),
                        nn.Flatten(), nn.Linear(6 * 6 * 6, 3)).double()
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    ref = cnn(x).detach()
    rot = ic.rotate(cnn, (x,), kind="random")
    assert [(g.kind, g.size, g.params) for g in rot.groups] == [("linear", 4, ["2.bias", "2.weight", "3.weight"])]
    assert torch.allclose(cnn(x), ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_rotation_raises_the_sqnr_of_quantized_inference(family):
    model, ids = massive_model(family)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        rotated = copy.deepcopy(model)
        rot = ic.rotate(rotated, (), {"input_ids": ids})
        qk = [g for g in rot.groups if g.kind == "qk"]               # two key heads: RoPE planes in each
        assert len(qk) == 2 and all(g.proper and len(g.blocks) == 32 for g in qk)
        assert len([g for g in rot.groups if g.kind == "residual"]) == 1
        assert torch.allclose(rotated(input_ids=ids).logits, ref, atol=1e-4 * float(ref.abs().max()), rtol=0)
        for wbits, abits in ((8, 8), (8, 4)):
            plain = sqnr_db(ref, fake_quantized(model, wbits, abits)(input_ids=ids).logits)
            rot = sqnr_db(ref, fake_quantized(rotated, wbits, abits)(input_ids=ids).logits)
            # seed 0: Llama +5.8 / +4.0 dB, Qwen2 +6.4 / +3.9 dB at W8A8 / W8A4 (docs/rotation.md)
            assert rot >= plain + 3.0, (family, wbits, abits, plain, rot)


def test_a_mixture_of_experts_stream_rotates():
    """Mixtral: the router reads the stream, each expert reads and writes it through transformers'
    grouped matmul over (E, out, in) parameters, the top-k combine sums what they write."""
    cfg = T.MixtralConfig(vocab_size=16, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=4, max_position_embeddings=8,
                          num_local_experts=2)
    model = _generic(T.MixtralForCausalLM(cfg).eval())      # float32: the grouped matmul wants it
    ids = torch.arange(16).view(2, 8)
    ref = model(input_ids=ids).logits.detach()
    rot = ic.rotate(model, (), {"input_ids": ids})
    res = [g for g in rot.groups if g.kind == "residual"]
    assert len(res) == 1 and {"model.layers.0.mlp.gate.weight", "model.layers.0.mlp.experts.gate_up_proj",
                              "model.layers.0.mlp.experts.down_proj"} <= set(res[0].params)
    assert torch.allclose(model(input_ids=ids).logits, ref, atol=1e-5 * float(ref.abs().max()), rtol=0)


def test_the_check_runs_in_train_mode_without_side_effects():
    """rotate's before/after check draws the same dropout masks both times and leaves the RNG and
    the buffers as they were."""
    model, args, kwargs = build("gpt2", dropout=True)                 # dropout 0.1 everywhere
    model = _generic(model).train()
    torch.manual_seed(5)
    state = torch.random.get_rng_state()
    rot = ic.rotate(model, args, kwargs)                              # would undo and raise on a mismatch
    assert "residual" not in [g.kind for g in rot.groups]             # dropout on the stream scales at random
    assert {"head", "qk"} <= {g.kind for g in rot.groups}             # attention's dropout is on P
    assert torch.equal(torch.random.get_rng_state(), state)


def test_a_wrong_rotation_rule_is_caught_and_undone():
    """A rule that lies (ReLU declared to pass any map) gives a group that changes the function:
    rotate's check sees it, restores every weight and says so."""
    from invariance_compiler.analyze.rotation_rules import same_channels
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    assert ic.rotate(net, (x,), check=False).groups == []                  # the truth: no group
    with ic.rules.registered(torch.ops.aten.relu, rotation=same_channels):
        with pytest.raises(RuntimeError, match="undone"):
            ic.rotate(net, (x,), kind="random")
    for n, p in net.named_parameters():
        assert torch.equal(p, before[n]), n


def test_spaces_chooses_what_rotates():
    model, args, kwargs = build("llama", dropout=False)
    model = _generic(float64_norms(model)).eval()
    ref = model(*args, **kwargs).logits.detach()
    v = model.model.layers[0].self_attn.v_proj.weight.detach().clone()
    rot = ic.rotate(model, args, kwargs, spaces=("qk",))
    assert [g.kind for g in rot.groups] == ["qk"]                       # found: residual, head, qk
    assert torch.equal(model.model.layers[0].self_attn.v_proj.weight, v)  # no residual or head map
    assert torch.allclose(model(*args, **kwargs).logits, ref, atol=1e-12 * float(ref.abs().max()), rtol=0)
    with pytest.raises(ValueError, match="spaces must be among"):
        ic.rotate(model, args, kwargs, spaces=("residul",))


@pytest.mark.parametrize("name", ["gpt2", "opt"])
def test_layernorm_as_rmsnorm_gives_the_whole_orthogonal_group(name, tmp_path):
    """layernorm="rmsnorm" (SliceGPT's surgery): the writers centre the stream, its LayerNorms become
    RMSLayerNorms, and the residual map is any orthogonal Q, not one fixing 1. The function is kept
    (float64), the analysis of the result finds the same group without the surgery (the rewritten
    norms are RMSNorms with a bias), and torch.save keeps the function."""
    model, args, kwargs = build(name, dropout=False)
    model = _generic(float64_norms(model)).eval()
    norms = sorted(n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm))
    ref = _first(model(*args, **kwargs)).detach()
    rot = ic.rotate(model, args, kwargs, seed=1, layernorm="rmsnorm", check=False)
    tol = 1e-12 * float(ref.abs().max())
    assert torch.allclose(_first(model(*args, **kwargs)), ref, rtol=0, atol=tol)
    (res,) = [g for g in rot.groups if g.kind == "residual"]
    assert not res.centred and res.group == f"O({HIDDEN})"
    assert sorted(rot.rmsnorm) == norms                 # every LayerNorm of these models reads the stream
    assert all(type(model.get_submodule(n)) is RMSLayerNorm for n in norms)
    emb = model.get_input_embeddings().weight.detach()
    assert float(emb.sum(-1).abs().max()) > 1e-3        # rotated after centring: not centred coordinates
    again = ic.rotate(model, args, kwargs, seed=2)      # check=True: the function again
    (res,) = [g for g in again.groups if g.kind == "residual"]
    assert res.group == f"O({HIDDEN})" and not again.rmsnorm
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert torch.allclose(_first(loaded(*args, **kwargs)), _first(model(*args, **kwargs)), rtol=0, atol=tol)


def test_layernorm_as_rmsnorm_only_where_the_mean_is_never_read():
    """A head that reads the stream without a norm sees its mean: the surgery would change the
    function, so the LayerNorms stay, the map fixes 1, and `why` says which node reads the mean."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.norm, self.head = nn.Embedding(10, 8), nn.LayerNorm(8), nn.Linear(8, 3)
            self.mlp = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 8))

        def forward(self, ids):
            h = self.emb(ids)
            h = h + self.mlp(self.norm(h))
            return self.head(h)

    torch.manual_seed(0)
    net = _generic(Net().double()).eval()
    ids = torch.randint(0, 10, (2, 5))
    ref = net(ids).detach()
    rot = ic.rotate(net, (ids,), seed=1, layernorm="rmsnorm")
    assert torch.allclose(net(ids), ref, rtol=0, atol=1e-12 * float(ref.abs().max()))
    (res,) = [g for g in rot.groups if g.kind == "residual"]
    assert res.centred and rot.rmsnorm == [] and type(net.norm) is nn.LayerNorm
    assert "before any LayerNorm" in rot.why[res.seed] and "linear" in rot.why[res.seed]


def test_written_out_attention_scores_give_the_qk_planes():
    """Gemma-2 writes its attention out (q @ kᵀ, a tanh soft-cap, softmax): the scores keep when
    queries and keys turn each RoPE plane by the same rotation, found through the matmul."""
    cfg = T.Gemma2Config(vocab_size=16, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=4, max_position_embeddings=8)
    model = _generic(T.Gemma2ForCausalLM(cfg).double().eval())
    ids = torch.arange(16).view(2, 8)
    ref = model(input_ids=ids).logits.detach()
    attn = model.model.layers[0].self_attn
    q0 = attn.q_proj.weight.detach().clone()
    rot = ic.rotate(model, (), {"input_ids": ids}, kind="random", seed=3, spaces=("qk",))
    (qk,) = rot.groups
    assert qk.proper and [len(b) for b in qk.blocks] == [2] * 4
    assert qk.params == ["model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.q_proj.weight"]
    # Gemma-2's norms and softmax run in float32 inside the float64 model
    assert torch.allclose(model(input_ids=ids).logits, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    moved = copy.deepcopy(model)                # keys turned, queries back as they were: not kept
    with torch.no_grad():
        moved.model.layers[0].self_attn.q_proj.weight.copy_(q0)
    assert not torch.allclose(moved(input_ids=ids).logits, ref, rtol=0, atol=1e-3 * float(ref.abs().max()))

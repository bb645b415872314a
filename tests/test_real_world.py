"""Models written the way people write them: in-place statements, subclasses of known modules that
change what they compute, gates, weight tying, nn.MultiheadAttention, SDPA with grouped-query
attention, SwiGLU, nn.LSTM. Each must analyse soundly (and, where the oracle is cheap, completely),
compile in both forms, and keep its function in train and eval mode."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import invariance_compiler as ic
from invariance_compiler.analyze import oracle


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.b2, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        h.relu_()                                  # result unused: the mutation is the effect
        g = self.b(h)
        F.relu(g, inplace=True)
        g = self.b2(g)
        g += h                                     # residual, in place
        g *= 0.5
        return self.c(g)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's pattern: a BatchNorm2d whose forward also applies an activation."""
    def forward(self, x):
        return F.silu(super().forward(x))


class LayerNorm2d(nn.LayerNorm):
    """timm's / torchvision's pattern: an nn.LayerNorm over the channels of an NCHW map."""
    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNet(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.c1, self.n, self.c2 = nn.Conv2d(2, 4, 3, padding=1), norm(4), nn.Conv2d(4, 3, 3, padding=1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(F.relu(self.c2(F.relu(self.n(self.c1(x))))).mean(dim=(2, 3)))


class GroupedAfterSiLU(nn.Module):
    """timm's ResNeXt pattern: a grouped 3x3 conv reading a SiLU (which pins its input), so every
    input channel of every group has one class (compact labels of size 1 meet the per-group view)."""
    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4)
        self.c2, self.c3 = nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Conv2d(4, 3, 1)

    def forward(self, x):
        return self.c3(F.relu(self.c2(F.silu(self.bn(self.c1(x))))))


class SplitBiasAttention(nn.Module):
    """EVA-02's attention (timm): the qkv bias is cat(q_bias, a zero buffer for k, v_bias), handed
    to F.linear with the fused weight; the biases start at zero. The bias is added to the output
    rows, so each entry must take its row's scale, whatever its value (at zero, any scale keeps it
    zero: a report that depended on that would change when the biases train)."""
    def __init__(self, d=4, heads=2, zero=True):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(d)), nn.Parameter(torch.zeros(d))
        if not zero:
            nn.init.normal_(self.q_bias), nn.init.normal_(self.v_bias)
        self.register_buffer("k_bias", torch.zeros(d), persistent=False)
        self.norm, self.proj = nn.LayerNorm(d), nn.Linear(d, 3)

    def forward(self, x):
        b, t, d = x.shape
        qkv = F.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
        q, k, v = qkv.view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        return self.proj(self.norm(h))


class EmbeddingNorm(nn.Module):
    """A token embedding read only by a per-token LayerNorm or RMSNorm: each row of the table has a
    scale of its own (the norm divides it out, token by token). With `residual`, the embedding also
    enters a residual stream, which keeps the rows' scales tied: no row generators then."""
    def __init__(self, norm=nn.LayerNorm, residual=False):
        super().__init__()
        self.residual = residual
        self.emb, self.norm = nn.Embedding(8, 6), norm(6)
        self.fc, self.out = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, ids):
        x = self.emb(ids)
        h = self.fc(self.norm(x))
        h = F.relu(h + x if self.residual else h)
        return self.out(h)


class Gated(nn.Module):
    """A module's own parameter used through a gate, and a raw weight used via F.linear."""
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 4) * 0.5)
        self.gate = nn.Parameter(torch.zeros(6))
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(F.relu(F.linear(x, self.w)) * torch.sigmoid(self.gate))


class Tied(nn.Module):
    def __init__(self, vocab=8, d=4):
        super().__init__()
        self.emb, self.mid, self.head = nn.Embedding(vocab, d), nn.Linear(d, d), nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(F.relu(self.mid(self.emb(idx))))


class PoolMixer(nn.Module):
    """PoolFormer's token mixer: pool(norm(x)) - norm(x) with count_include_pad=False, scaled by a
    LayerScale; the norm's β cancels (the mean of a constant is the constant): it is inert."""
    def __init__(self, c=3):
        super().__init__()
        self.stem, self.norm = nn.Conv2d(2, c, 1), nn.GroupNorm(1, c)
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.scale, self.head = nn.Parameter(torch.rand(c) + 0.5), nn.Linear(c, 2)

    def forward(self, x):
        h = self.stem(x)
        y = self.norm(h)
        h = h + self.scale[:, None, None] * (self.pool(y) - y)
        return self.head(h.mean((2, 3)))


class MHA(nn.Module):
    def __init__(self, d=4, heads=2):
        super().__init__()
        self.inp, self.att, self.out = nn.Linear(3, d), nn.MultiheadAttention(d, heads, batch_first=True), nn.Linear(d, 2)

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.att(h, h, h, need_weights=False)
        return self.out(F.relu(h + a)).sum(1)


class SDPA(nn.Module):
    """Grouped-query causal attention through F.scaled_dot_product_attention, SwiGLU MLP, RMSNorm."""
    def __init__(self, d=8, hq=4, hk=2):
        super().__init__()
        self.hq, self.hk, self.hd = hq, hk, d // hq
        self.emb = nn.Linear(3, d)
        self.q, self.k = nn.Linear(d, d, bias=False), nn.Linear(d, hk * self.hd, bias=False)
        self.v, self.o = nn.Linear(d, hk * self.hd, bias=False), nn.Linear(d, d, bias=False)
        self.norm = nn.RMSNorm(d)
        self.gate, self.up, self.down = nn.Linear(d, 6, bias=False), nn.Linear(d, 6, bias=False), nn.Linear(6, d, bias=False)
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        b, t, _ = x.shape
        h = self.emb(x)
        q = self.q(h).view(b, t, self.hq, self.hd).transpose(1, 2)
        k = self.k(h).view(b, t, self.hk, self.hd).transpose(1, 2)
        v = self.v(h).view(b, t, self.hk, self.hd).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        h = h + self.o(a.transpose(1, 2).reshape(b, t, -1))
        n = self.norm(h)
        h = h + self.down(F.silu(self.gate(n)) * self.up(n))
        return self.head(h).sum(1)


class LSTMHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.rnn, self.out = nn.Linear(3, 4), nn.LSTM(4, 5, batch_first=True), nn.Linear(5, 2)

    def forward(self, x):
        y, _ = self.rnn(F.relu(self.inp(x)))
        return self.out(y[:, -1])


class ClassToken(nn.Module):
    """CLIP's vision embeddings: a class token before the patches, learned positions read through
    a buffer of position ids, a LayerNorm per token. Token 0 (class embedding plus position row 0)
    has a scale of its own."""

    def __init__(self, tokens=4, dim=3, length=None):
        super().__init__()
        self.patch, self.cls = nn.Linear(2, dim), nn.Parameter(torch.randn(dim))
        self.pos = nn.Embedding(tokens + 1, dim)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 2)
        self.register_buffer("position_ids", torch.arange(tokens + 1).view(1, -1), persistent=False)

    def forward(self, x):                                          # x (B, T, 2) patches
        h = torch.cat([self.cls.expand(x.shape[0], 1, -1), self.patch(x)], dim=1)
        h = h + self.pos(self.position_ids[:, : h.shape[1]])
        return self.head(self.norm(h)).mean(1)


CASES = {
    "in_place": (InPlace, lambda: (torch.randn(8, 4),)),
    "batchnorm_act_subclass": (lambda: ConvNet(BatchNormAct2d), lambda: (torch.randn(4, 2, 5, 5),)),
    "layernorm_over_channels": (lambda: ConvNet(LayerNorm2d), lambda: (torch.randn(4, 2, 5, 5),)),
    "gate_and_f_linear": (Gated, lambda: (torch.randn(8, 4),)),
    "grouped_conv_after_silu": (GroupedAfterSiLU, lambda: (torch.randn(4, 2, 5, 5),)),
    "split_qkv_bias_at_zero": (SplitBiasAttention, lambda: (torch.randn(2, 5, 4),)),
    "split_qkv_bias_drawn": (lambda: SplitBiasAttention(zero=False), lambda: (torch.randn(2, 5, 4),)),
    "weight_tying": (Tied, lambda: (torch.arange(8).view(2, 4),)),
    "embedding_layernorm": (EmbeddingNorm, lambda: (torch.arange(8).view(2, 4),)),
    "embedding_rmsnorm": (lambda: EmbeddingNorm(nn.RMSNorm), lambda: (torch.arange(8).view(2, 4),)),
    "embedding_prenorm_residual": (lambda: EmbeddingNorm(residual=True), lambda: (torch.arange(8).view(2, 4),)),
    "multihead_attention": (MHA, lambda: (torch.randn(2, 5, 3),)),
    "sdpa_gqa_swiglu": (SDPA, lambda: (torch.randn(2, 5, 3),)),
    "lstm": (LSTMHead, lambda: (torch.randn(3, 4, 3),)),
    "pool_minus_identity": (PoolMixer, lambda: (torch.randn(4, 2, 5, 5),)),
    "class_token_positions": (ClassToken, lambda: (torch.randn(3, 4, 2),)),
}


def _case(name):
    torch.manual_seed(0)
    make, inputs = CASES[name]
    model = make().double().train()
    x = tuple(t.double() if t.is_floating_point() else t for t in inputs())
    return model, x


@pytest.mark.parametrize("name", sorted(CASES))
def test_sound_and_complete(name):
    model, x = _case(name)
    report = ic.analyze(model, x)
    assert oracle.invariance_error(model, report, x) <= 1e-10
    got = oracle.completeness(model, report, x)
    assert got["residual"] <= 1e-9 and got["rank_E"] == report.num_generators
    # aten.lstm has no rule: it pins, so the ReLU units feeding its input weights are not found
    missing = model.inp.out_features if name == "lstm" else 0
    # the zero k-bias is a buffer, a constant (scale 1): it pins k's rows, so the query/key pairs
    # that would scale with them (one per channel of k) are not found; sound, one buffer short
    if name.startswith("split_qkv_bias"):
        missing = model.k_bias.numel()
    assert got["null_dim"] == report.num_generators + missing, got


def test_an_embedding_read_only_by_a_norm_has_a_class_per_row():
    """Counts against theory: the 8 rows each get a normalize generator (they replace the one joint
    scale of the table's columns), so the LayerNorm model has 7 more generators than the same model
    with a residual read of the embedding; the oracle tests above say both are exact."""
    counts = {}
    for name in ("embedding_layernorm", "embedding_rmsnorm", "embedding_prenorm_residual"):
        model, x = _case(name)
        report = ic.analyze(model, x)
        rows = [g for g in report.generators if g.params == ("emb.weight",)]
        counts[name] = (len(rows), report.num_generators)
    assert counts["embedding_layernorm"][0] == counts["embedding_rmsnorm"][0] == 8
    assert counts["embedding_prenorm_residual"][0] == 0


@pytest.mark.parametrize("form", ["gspace", "fixed"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_compiled_forms_keep_the_function(name, form):
    model, x = _case(name)
    cm = ic.compile_invariant(model, x, form=form)
    for train in (True, False):
        model.train(train), cm.train(train)
        torch.manual_seed(1)
        ref = model(*x)
        torch.manual_seed(1)
        out = cm(*x)
        assert torch.allclose(out, ref, rtol=1e-10, atol=1e-12), ("train" if train else "eval")
    opt = torch.optim.SGD(cm.parameters(), lr=1e-2)   # and it trains
    cm.train()
    cm(*x).square().sum().backward()
    opt.step()


def test_pooling_minus_identity_makes_the_norm_bias_inert():
    model, x = _case("pool_minus_identity")
    report = ic.analyze(model, x)
    assert report.is_inert("norm.bias") and not report.is_inert("norm.weight")


def test_a_subclass_is_its_ops_not_its_parent():
    """BatchNormAct2d is a BatchNorm2d to isinstance, but the SiLU after it pins: its affine
    classes are not the plain BatchNorm's rescale classes."""
    plain, act = ic.analyze(*_case_model(nn.BatchNorm2d)), ic.analyze(*_case_model(BatchNormAct2d))
    assert plain.counts()["rescale"] == act.counts()["rescale"] + 4


def _case_model(norm):
    torch.manual_seed(0)
    return ConvNet(norm).double(), (torch.randn(4, 2, 5, 5, dtype=torch.float64),)


def test_in_place_ops_are_kept():
    """h.relu_() with its result unused still clamps h (it was dropped as dead code before)."""
    model, x = _case("in_place")
    report = ic.analyze(model, x)
    ops = {str(n.target) for n in report.graph.graph.nodes}
    assert any("relu" in o for o in ops)
    cm = ic.compile_invariant(model, x)
    assert torch.allclose(cm(*x), model(*x), rtol=1e-12)


def test_multihead_attention_parameters_are_not_called_inert():
    model, x = _case("multihead_attention")
    report = ic.analyze(model, x)
    d = model.att.embed_dim
    assert not report.is_inert("att.in_proj_weight") and not report.is_inert("att.out_proj.weight")
    assert report.inert_entries("att.in_proj_bias").tolist() == list(range(d, 2 * d))   # the key bias


def test_tied_weights_give_a_signed_relation_not_a_pin():
    """The embedding's classes meet the head's input classes through the shared weight: scaling an
    embedding coordinate by c scales the head's input column by c, so mid's output classes are
    the inverse of the embedding's (a rescale generator through the tie)."""
    model, x = _case("weight_tying")
    report = ic.analyze(model, x)
    assert report.num_generators >= model.mid.out_features
    assert oracle.invariance_error(model, report, x) <= 1e-10


def test_fixed_position_ids_give_token_zero_its_own_scale_only_when_they_read_every_row():
    torch.manual_seed(0)
    model = ClassToken(tokens=4).double()
    full = ic.analyze(model, (torch.randn(3, 4, 2, dtype=torch.float64),))
    short = ic.analyze(model, (torch.randn(3, 2, 2, dtype=torch.float64),))    # rows 3, 4 unread
    assert full.num_generators == short.num_generators + 1                      # token 0's scale
    # a row this input does not read may be read by a longer one: the short analysis holds there
    longer = (torch.randn(3, 4, 2, dtype=torch.float64),)
    assert oracle.invariance_error(model, short, longer) <= 1e-10


def _zero_head(m):
    nn.init.zeros_(m[-1].weight), nn.init.zeros_(m[-1].bias)


def _zero_layerscale(m):
    nn.init.zeros_(m.gamma)


def _zero_init_residual(m):                       # torchvision's zero_init_residual=True
    for name, mod in m.named_modules():
        if isinstance(mod, nn.BatchNorm2d) and name.endswith("bn2"):
            nn.init.zeros_(mod.weight)


@pytest.mark.parametrize("name, zero", [("mlp", _zero_head), ("layerscale", _zero_layerscale),
                                        ("resnet_basic", _zero_init_residual)])
def test_models_at_their_own_initialisation(name, zero):
    """Zero-initialised heads, LayerScale and residual BatchNorm gains: the report is the one of
    generic weights (E is structure, not values), and both forms compile and keep the function."""
    from invariance_compiler.tools.zoo import ZOO
    torch.manual_seed(0)
    model, x = ZOO[name]()
    model = model.double()
    x = tuple(t.double() if t.is_floating_point() else t for t in x)
    generic = ic.analyze(model, x).generator_matrix()
    zero(model)
    report = ic.analyze(model, x)
    assert torch.equal(report.generator_matrix(), generic)
    for form in ("gspace", "fixed"):
        cm = ic.compile_invariant(model, x, form=form)
        for train in (True, False):
            model.train(train), cm.train(train)
            with torch.no_grad():
                assert torch.allclose(cm(*x), model(*x), rtol=1e-10, atol=1e-12), (form, train)

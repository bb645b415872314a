"""Equalization for quantization on any graph (ic.equalize, Nagel et al. 2019): the model moves
along its rescaling orbit, so its function is unchanged (float64, negligible normaliser eps, train
and eval mode, zoo and transformers' own classes); at the fixed point every rescale class has as
large a producer as a consumer; folding eval-mode BatchNorm is exact; on a MobileNet-style CNN
trained on digits, per-tensor int8 weights lose no more accuracy after equalization, and add less
output noise."""
import copy

import pytest
import torch
import torch.nn as nn

import invariance_compiler as ic
from invariance_compiler.tools import demo
from invariance_compiler.analyze import oracle
from invariance_compiler.equalize import quantize_weights_, sqnr_db
from invariance_compiler.tools.zoo import ZOO, digits_mobilenet

pytest.importorskip("transformers")
from invariance_compiler.tools.hf_families import BUILDERS, build, float64_norms


def _outputs(model, args, kwargs, train):
    model.train(train)
    torch.manual_seed(1)                       # same dropout masks before and after
    with torch.no_grad():
        return oracle._flat_tensors(model(*args, **kwargs))


def _equalize_and_compare(model, args, kwargs, objective="range"):
    before = {t: _outputs(model, args, kwargs, t) for t in (True, False)}
    model.train()
    eq = ic.equalize(model, args, kwargs, objective=objective)
    for train, ref in before.items():
        scale = max(float(b.abs().max()) for b in ref)          # an output may be rounding noise
        for a, b in zip(_outputs(model, args, kwargs, train), ref):
            assert float((a - b).abs().max()) <= 1e-10 * scale, train
    return eq


def _doubles(x):
    return tuple(t.double() if t.is_floating_point() else t for t in x)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_equalize_keeps_the_function_and_balances_every_class(name):
    torch.manual_seed(0)
    model, x = ZOO[name]()
    model = oracle.prepare(model)              # float64, eps 1e-30, batch statistics
    eq = _equalize_and_compare(model, _doubles(x), {})
    assert eq.imbalance <= 1e-6                # max |log(r_producer / r_consumer)| at the fixed point
    assert eq.classes.numel() <= eq.report.num_simple
    assert bool(torch.isin(eq.float_producers, eq.classes).all())
    if name in ("mlp", "resnet_bottleneck", "mini_transformer"):     # it had work to do
        assert eq.classes.numel() > 0 and float((eq.before[:, 0] / eq.before[:, 1]).log().abs().max()) > 0.1
    if name == "resnet_bottleneck":            # BatchNorm's affine produces every class: kept in float
        assert eq.float_producers.numel() == eq.classes.numel()


@pytest.mark.parametrize("name", ["mlp_nonstraight", "resnet_bottleneck", "densenet"])
def test_the_l2_objective_is_the_balanced_point(name):
    torch.manual_seed(0)
    model, x = ZOO[name]()
    model = oracle.prepare(model)
    eq = _equalize_and_compare(model, _doubles(x), {}, objective="l2")
    again = ic.skeleton.balance(eq.report, copy.deepcopy(model))   # already at the minimiser
    assert float(again.abs().max()) <= 1e-4


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_equalize_keeps_the_function_of_transformers_models(name):
    model, args, kwargs = build(name, dropout=True)
    # float64 norms: the move includes the normalize classes, whose invariance Hugging Face's float32
    # RMSNorm keeps only to float32 rounding
    model = oracle.prepare(float64_norms(model))
    eq = _equalize_and_compare(model, args, kwargs)
    assert eq.imbalance <= 1e-6


def _ran_statistics(model, x):
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(*x)
    return model.eval()


@pytest.mark.parametrize("name", ["vgg_bn", "resnet_basic", "resnet_bottleneck", "conv1d_bn", "conv3d_bn", "arch2"])
def test_folding_batchnorm_is_exact(name):
    torch.manual_seed(0)
    model, x = ZOO[name]()
    model, x = _ran_statistics(model.double(), _doubles(x)), _doubles(x)
    ref = model(*x).detach()
    folded = ic.fold_batchnorm(model, x)
    assert folded and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert float((model(*x).detach() - ref).abs().max()) <= 1e-12 * float(ref.abs().max())


@pytest.mark.parametrize("name", ["resnet", "mobilenet_v2", "efficientnet", "regnet"])
def test_folding_batchnorm_in_transformers_convnets_is_exact(name):
    model, args, kwargs = build(name, dropout=False)
    model.eval()
    with torch.no_grad():
        ref = oracle._flat_tensors(model(*args, **kwargs))
    assert ic.fold_batchnorm(model, args, kwargs)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    with torch.no_grad():
        for a, b in zip(oracle._flat_tensors(model(*args, **kwargs)), ref):
            assert float((a - b).abs().max()) <= 1e-12 * float(b.abs().max())


def test_folding_wants_eval_mode_and_leaves_a_batchnorm_with_its_own_forward():
    class BatchNormAct(nn.BatchNorm2d):            # timm's BatchNormAct2d pattern
        def forward(self, x):
            return torch.relu(super().forward(x))

    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct(4), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2)).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="eval"):
        ic.fold_batchnorm(model, x)
    model = _ran_statistics(model, (x,))
    ref = model(x).detach()
    assert ic.fold_batchnorm(model, x) == [("2", "3")]
    assert isinstance(model[1], BatchNormAct)
    assert float((model(x).detach() - ref).abs().max()) <= 1e-12 * float(ref.abs().max())


def test_int8_accuracy_on_digits_does_not_drop_after_equalization():
    torch.manual_seed(0)
    data = demo.digits()
    net = digits_mobilenet()
    demo.train(net, torch.optim.Adam(net.parameters(), lr=3e-3), data, epochs=6)
    net.eval()
    assert len(ic.fold_batchnorm(net, data[0][:2])) == 5
    equalized = copy.deepcopy(net)
    eq = ic.equalize(equalized, data[0][:2])
    assert eq.classes.numel() == 16 * 4 + 32 * 2 and eq.imbalance <= 1e-6

    def accuracy(model, bits):
        m = quantize_weights_(copy.deepcopy(model), bits)
        return float((m(data[2]).argmax(1) == data[3]).float().mean())

    with torch.no_grad():
        ref = net(data[2])
        assert sqnr_db(ref, equalized(data[2])) > 100                    # the same function
        assert accuracy(equalized, 8) >= accuracy(net, 8)
        # int8 output noise against the float model (int4 and int6 are mixed: see the benchmark)
        q8 = [quantize_weights_(copy.deepcopy(m), 8)(data[2]) for m in (net, equalized)]
        assert sqnr_db(ref, q8[1]) > sqnr_db(ref, q8[0])


def test_with_calibration_a_layernorm_migrates_scale_as_smoothquant():
    """SmoothQuant (α = 0.5): at the linear layer after a LayerNorm, every input channel's largest
    activation equals its weight column's largest entry, and the function is unchanged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 6)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.logspace(-1, 1, 8, dtype=torch.float64) * torch.randn(8, dtype=torch.float64).sign())
        model[0].bias.normal_()
    batches = [torch.randn(16, 8, dtype=torch.float64) for _ in range(3)]
    ref = [model(b).detach() for b in batches]
    eq = ic.equalize(model, batches[0], calibration=batches, alpha=0.5)
    assert eq.float_producers.numel() == 8 and eq.imbalance <= 1e-9
    acts = torch.stack([model[0](b).detach().abs().amax(0) for b in batches]).amax(0)
    weights = model[1].weight.detach().abs().amax(0)
    assert torch.allclose(acts, weights, rtol=1e-9)
    for b, r in zip(batches, ref):
        assert torch.allclose(model(b), r, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["llama", "vit"])
def test_with_calibration_transformers_models_keep_their_function(name):
    model, args, kwargs = build(name, dropout=True)
    model = oracle.prepare(float64_norms(model))
    before = {t: _outputs(model, args, kwargs, t) for t in (True, False)}
    model.eval()
    eq = ic.equalize(model, args, kwargs, calibration=[args if args else kwargs])
    assert eq.float_producers.numel() > 0
    for train, ref in before.items():
        scale = max(float(b.abs().max()) for b in ref)
        for a, b in zip(_outputs(model, args, kwargs, train), ref):
            assert float((a - b).abs().max()) <= 1e-10 * scale, train


@pytest.mark.parametrize("name", ["group_instance_norm", "resnet_bottleneck", "vgg_bn", "functional_norms"])
def test_equalize_is_a_function_of_the_orbit(name):
    """equalize(g·A) = equalize(A) for a random g of every plain class, normalize classes
    (GroupNorm/InstanceNorm/BatchNorm with batch statistics) included: the iteration starts from
    the orbit's typical-scale point, not from where the model happens to be."""
    torch.manual_seed(0)
    model, x = ZOO[name]()
    model = oracle.prepare(model)
    x = _doubles(x if isinstance(x, tuple) else (x,))
    report = ic.analyze(model, x)
    kinds = [k for k, _ in report.generators._info]
    assert "normalize" in kinds
    g = torch.zeros(report.num_generators, dtype=torch.float64)
    g[:len(kinds)] = torch.randn(len(kinds), dtype=torch.float64)
    moved = copy.deepcopy(model)
    report.act(moved, g)
    ic.equalize(model, x)
    ic.equalize(moved, x)
    for (n, a), b in zip(model.named_parameters(), moved.parameters()):
        if a.dim() >= 2:                                    # the tensors quantization rounds
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12 * float(a.abs().max())), n
    with torch.no_grad():
        ref = model(*x)
        qa = quantize_weights_(copy.deepcopy(model))(*x)
        qb = quantize_weights_(copy.deepcopy(moved))(*x)
    assert abs(sqnr_db(ref, qa) - sqnr_db(ref, qb)) < 1e-6


@pytest.mark.parametrize("eps", [1e-6, 1e-30])
def test_a_normalize_class_moves_only_where_the_norms_eps_cannot_see_it(eps):
    """A Llama at transformers' initialisation (embeddings of std 0.02): its stream's scale is a
    normalize class, and RMSNorm's eps of 1e-6 is 0.25 % of the stream's mean square there, so
    moving it would change the logits by 6e-4: equalize leaves it (and says so), keeping the
    function to rounding. With a negligible eps it moves."""
    import transformers as T
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                        rms_norm_eps=eps)
    torch.manual_seed(0)
    model = float64_norms(T.LlamaForCausalLM(cfg).double().eval())
    ids = torch.randint(0, 64, (2, 16))
    ref = model(input_ids=ids).logits.detach()
    eq = ic.equalize(model, (), {"input_ids": ids})
    assert "normalize" in eq.report.simple_kinds
    assert eq.normalize_kept == (eps == 1e-6)
    assert float((model(input_ids=ids).logits - ref).abs().max()) <= 1e-10 * float(ref.abs().max())

"""Both compiled forms under torch.autocast (bf16 on CPU; DESIGN §4c): the forward matches the plain
model's autocast forward, and backward gives finite gradients that match the fp32 ones, both
within bf16 tolerance (relative error of the norm; bf16 keeps 8 bits, a matmul accumulates)."""
import copy

import pytest
import torch

import invariance_compiler as ic
from conftest import DEVICE, zoo_or_hf
from invariance_compiler import kernels

TRITON_MODE = "auto" if DEVICE == "cuda" else "interpret"

TOL = 5e-2


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _cases():
    out = [pytest.param(n, id=n) for n in ["mlp", "cnn_pool", "vgg_bn", "mini_transformer", "residual_mlp"]]
    return out + [pytest.param("hf:llama", id="hf-llama"), pytest.param("hf:gpt2", id="hf-gpt2")]


def _logits(out):
    return out if isinstance(out, torch.Tensor) else out[0]


def _grads(net, args, kwargs, low):
    net.zero_grad()
    with torch.autocast("cpu", torch.bfloat16, enabled=low):
        out = _logits(net(*args, **kwargs))
    out.float().square().mean().backward()
    grads = [p.grad.reshape(-1) for p in net.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and bool(torch.isfinite(g).all()) for g in grads)
    return torch.cat(grads)


@pytest.mark.parametrize("form", ["gspace", "fixed"])
@pytest.mark.parametrize("name", _cases())
def test_bf16_autocast_forward_and_backward(name, form):
    """bf16's own error is the yardstick: the plain model's bf16 gradients are 5-12 % (in norm) off
    its fp32 ones on these models; the compiled module's must be no further off than about that."""
    model, args, kwargs = zoo_or_hf(name)
    model.eval()
    cm = ic.compile_invariant(copy.deepcopy(model), args, form=form, example_kwargs=kwargs)
    cm.eval()
    with torch.autocast("cpu", torch.bfloat16):
        ref = _logits(model(*args, **kwargs))
        out = _logits(cm(*args, **kwargs))
    assert out.dtype == ref.dtype == torch.bfloat16
    assert _rel(out, ref) <= TOL
    assert all(p.dtype == torch.float32 for p in cm.parameters())         # master coordinates fp32
    plain_err = _rel(_grads(model, args, kwargs, True), _grads(model, args, kwargs, False))
    ours_err = _rel(_grads(cm, args, kwargs, True), _grads(cm, args, kwargs, False))
    assert ours_err <= 2 * plain_err + 1e-2, (ours_err, plain_err)


@pytest.mark.parametrize("form", ["gspace", "fixed"])
@pytest.mark.parametrize("name", ["mlp", "cnn_pool", "vgg_bn", "mini_transformer"])
def test_a_bf16_model_compiles_and_trains(name, form):
    model, x, _ = zoo_or_hf(name)
    model = model.to(torch.bfloat16)
    x = tuple(t.to(torch.bfloat16) if t.is_floating_point() else t for t in x)
    cm = ic.compile_invariant(model, x, form=form)
    assert {p.dtype for p in cm.parameters()} == {torch.bfloat16}
    assert _rel(cm(*x), model(*x)) <= 2e-2
    opt = torch.optim.SGD(cm.parameters(), lr=1e-2)
    start = float(cm(*x).float().square().mean())
    for _ in range(3):
        opt.zero_grad()
        cm(*x).float().square().mean().backward()
        opt.step()
    end = float(cm(*x).float().square().mean())
    assert torch.isfinite(torch.tensor(end)) and end < start


FP16_CASES = [("mini_transformer", "gspace", "auto"), ("mini_transformer", "fixed", "auto"),
              ("hf:llama", "gspace", "auto"), ("hf:llama", "fixed", "auto"), ("mini_transformer", "gspace", "triton")]


@pytest.mark.parametrize("name, form, backend", FP16_CASES, ids=["-".join(c).replace(":", "-") for c in FP16_CASES])
def test_fp16_autocast_with_grad_scaler(name, form, backend):
    """fp16 as it is trained on a GPU, with autocast and `torch.amp.GradScaler` on the CPU, and in
    the "triton" case with WA and ICR in the Triton kernels: on CUDA where there is a GPU, else
    on the CPU under Triton's interpreter. The unscaled gradients match the fp32 ones within fp16 tolerance; a
    scale that overflows reaches the coordinates' gradients as inf or nan, so the scaler skips that
    step and leaves every coordinate as it was; then steps lower the loss."""
    if backend == "triton" and not kernels.triton_available():
        pytest.skip("Triton is not installed")
    model, args, kwargs = zoo_or_hf(name)
    model.eval()
    cm = ic.compile_invariant(copy.deepcopy(model), args, form=form, example_kwargs=kwargs)
    cm.eval()
    device = DEVICE if backend == "triton" else "cpu"
    cm.to(device)
    args = tuple(a.to(device) for a in args)
    with kernels.mode("auto" if backend == "auto" else TRITON_MODE):
        if backend == "triton":
            assert cm.allocate.wa and kernels.use_triton(cm.parameter_of(cm.allocated[cm.allocate.wa[0]]))
        _train_fp16(cm, args, kwargs, device)


def _train_fp16(cm, args, kwargs, device):

    def loss():
        with torch.autocast(device, torch.float16):
            out = _logits(cm(*args, **kwargs))
        assert out.dtype == torch.float16
        return out.float().square().mean()

    opt = torch.optim.SGD(cm.parameters(), lr=1e-2)
    opt.zero_grad()
    _logits(cm(*args, **kwargs)).float().square().mean().backward()
    exact = torch.cat([p.grad.reshape(-1) for p in cm.parameters() if p.grad is not None])
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 12)
    opt.zero_grad()
    scaler.scale(loss()).backward()
    scaler.unscale_(opt)
    low = torch.cat([p.grad.reshape(-1) for p in cm.parameters() if p.grad is not None])
    assert low.dtype == torch.float32 and _rel(low, exact) <= TOL
    scaler.step(opt)
    scaler.update()

    before = [p.detach().clone() for p in cm.parameters()]
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 120)          # overflows fp16 at once
    opt.zero_grad()
    scaler.scale(loss()).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0 ** 120                               # the overflow was found
    assert all(torch.equal(a, p) for a, p in zip(before, cm.parameters()))  # and the step skipped

    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 12)
    start = float(loss())
    for _ in range(3):
        opt.zero_grad()
        scaler.scale(loss()).backward()
        scaler.step(opt)
        scaler.update()
    assert float(loss()) < start

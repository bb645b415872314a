"""Which coordinates make the BatchNorm CNN of gspace_sgd.py train at lr 0.1 (SGD, momentum 0.9,
digits, 400 steps of batch 64, 1 thread; final train loss, geometric mean over seeds 0..n-1):

    python benchmarks/bn_cnn_charts.py [--seeds 6] [--lrs 0.1]

  plain    the model as it is
  gspace   compile_invariant(form="gspace"), scaled coordinates (the default)
  fixed    compile_invariant(form="fixed"): the same quotient in weight coordinates
  entry    the plain model with only conv1's rows (the BatchNorm-normalised classes) through the
           fixed-entry chart: each row's largest entry held
  u        the same rows through the chart <u, w> = <u, w0>, u = w0 / |w0|
  norm     'norm carriers': each ReLU class's scale is the norm of its producers in path units
           (BatchNorm's (gamma, beta) pair, conv2's row and bias), its producers divided by it and
           its consumers multiplied by it; a null radial direction per class, as under BatchNorm;
           rows kept at norm --norm-scale

Every variant starts from the model's own function (checked). DESIGN §3.6b says what the figures
showed on 2026-12-07."""
from __future__ import annotations

import argparse
import copy
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from gspace_sgd import compiled, final_loss
from invariance_compiler.tools.demo import digits, digits_cnn


class RowChart(nn.Module):
    """digits_cnn with conv1's rows (9 weights and the bias per output channel) through the
    hyperplane chart <n, r> = <n, r0>: the entry k of each row solves it, so it is no coordinate."""

    def __init__(self, model: nn.Module, normal: str):
        super().__init__()
        self.m = copy.deepcopy(model)
        conv = self.m[0]
        r0 = torch.cat([conv.weight.detach().reshape(conv.out_channels, -1), conv.bias.detach()[:, None]], 1)
        k = r0.abs().argmax(1)
        n = F.one_hot(k, r0.shape[1]).to(r0.dtype) if normal == "entry" else r0 / r0.norm(dim=1, keepdim=True)
        self.register_buffer("n", n)
        self.register_buffer("k", n.abs().argmax(1))
        self.register_buffer("c", (n * r0).sum(1))
        self.r = nn.Parameter(r0.clone())
        self.shape = tuple(conv.weight.shape)
        del conv.weight, conv.bias

    def forward(self, x):
        nk = self.n.gather(1, self.k[:, None])[:, 0]
        rk = self.r.gather(1, self.k[:, None])[:, 0]
        solved = (self.c - ((self.n * self.r).sum(1) - nk * rk)) / nk
        rows = torch.where(F.one_hot(self.k, self.r.shape[1]).bool(), solved[:, None], self.r)
        conv = self.m[0]
        h = F.conv2d(x, rows[:, :-1].reshape(self.shape), rows[:, -1], padding=conv.padding)
        for layer in list(self.m)[1:]:
            h = layer(h)
        return h


def _rownorm(w, b):
    return torch.cat([w.reshape(w.shape[0], -1), b[:, None]], 1).norm(dim=1)


class NormCarriers(nn.Module):
    """digits_cnn (conv1, BN, ReLU, MaxPool, conv2, ReLU, AvgPool, Flatten, Linear) with norm carriers."""

    def __init__(self, model: nn.Module, scale: float):
        super().__init__()
        m = copy.deepcopy(model)
        self.conv1, bn, conv2, lin = m[0], m[1], m[4], m[8]
        self.bn = nn.BatchNorm2d(bn.num_features, affine=False)
        self.bn.load_state_dict({k: v for k, v in bn.state_dict().items() if not k.startswith(("weight", "bias"))})
        with torch.no_grad():
            n1 = torch.stack([bn.weight, bn.bias], 1).norm(dim=1)
            self.g, self.beta = nn.Parameter(bn.weight / n1), nn.Parameter(bn.bias / n1)
            w2 = conv2.weight * n1[None, :, None, None]
            n2 = _rownorm(w2, conv2.bias)
            self.w2 = nn.Parameter(w2 / n2[:, None, None, None] * scale)
            self.b2 = nn.Parameter(conv2.bias / n2 * scale)
            self.w3, self.b3 = nn.Parameter(lin.weight * n2[None, :]), nn.Parameter(lin.bias.clone())

    def forward(self, x):
        n1 = torch.stack([self.g, self.beta], 1).norm(dim=1)
        h = self.bn(self.conv1(x)) * (self.g / n1)[:, None, None] + (self.beta / n1)[:, None, None]
        h = F.max_pool2d(F.relu(h), 2)
        n2 = _rownorm(self.w2, self.b2)
        h = F.relu(F.conv2d(h, self.w2 / n2[:, None, None, None], self.b2 / n2, padding=1))
        return F.linear(F.adaptive_avg_pool2d(h, 1).flatten(1), self.w3, self.b3)


def variants(model, x, norm_scale: float) -> dict:
    out = {k: compiled(model, x[:4], k) for k in ("plain", "gspace", "fixed")}
    out.update(entry=RowChart(model, "entry"), u=RowChart(model, "u"), norm=NormCarriers(model, norm_scale))
    with torch.no_grad():
        ref = copy.deepcopy(model).eval()(x[:32])
        for k, net in out.items():
            got = copy.deepcopy(net).eval()(x[:32])
            assert torch.allclose(got, ref, atol=1e-5), (k, float((got - ref).abs().max()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--lrs", default="0.1")
    ap.add_argument("--norm-scale", type=float, default=1.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    xtr, ytr, _, _ = digits()
    x = xtr.view(-1, 1, 8, 8)
    for lr in map(float, args.lrs.split(",")):
        logs: dict = {}
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            for k, net in variants(digits_cnn(), x, args.norm_scale).items():
                logs[k] = logs.get(k, 0.0) + math.log(final_loss(net, lr, (x, ytr))) / args.seeds
        got = {k: math.exp(v) for k, v in logs.items()}
        print(f"lr {lr:g}: " + ", ".join(f"{k} {v:.4g} ({v / got['plain']:.2f}x)" for k, v in got.items()),
              flush=True)


if __name__ == "__main__":
    main()

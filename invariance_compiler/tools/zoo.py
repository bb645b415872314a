"""Example architectures: the test zoo (small enough for the numerical oracle) and the ResNet-50-shaped
model of the benchmarks. Each zoo entry builds (model, example_inputs)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ZOO", "mlp", "resnet50_like", "Bottleneck", "digits_mobilenet"]


def mlp(widths, bias=True, act=nn.ReLU):
    """nn.Sequential of Linear layers of the given widths with `act` between them."""
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def _img(c=2, s=8, b=2):
    return (torch.randn(b, c, s, s),)


class FeaturePool(nn.Module):
    """Arch1's max-pooling-sub-sampling across features: m_k = max(r_2k, r_2k+1)."""
    def forward(self, x):
        return F.max_pool1d(x.unsqueeze(1), 2).squeeze(1)


def arch1():
    return nn.Sequential(nn.Linear(6, 8, bias=False), nn.ReLU(), FeaturePool(),
                         nn.Linear(4, 8, bias=False), nn.ReLU(), FeaturePool(),
                         nn.Linear(4, 3, bias=False)), (torch.randn(4, 6),)


def arch2():
    return nn.Sequential(nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), FeaturePool(),
                         nn.Linear(4, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), FeaturePool(),
                         nn.Linear(4, 3, bias=False)), (torch.randn(4, 6),)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    def __init__(self, cin, mid, cout, stride=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


def resnet_basic():
    blocks = [BasicBlock(4, 4), BasicBlock(4, 6, stride=2)]
    return _ResNetSmall(blocks, 6), _img()


def resnet_bottleneck():
    blocks = [Bottleneck(4, 2, 8), Bottleneck(8, 2, 8)]
    return _ResNetSmall(blocks, 8), _img(s=6)


class _ResNetSmall(nn.Module):
    def __init__(self, blocks, width, in_ch=2, stem=4, num_classes=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU())
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DenseNet(nn.Module):
    def __init__(self, growth=2):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.dense = nn.ModuleList()
        c = 4
        for _ in range(2):
            self.dense.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, growth, 3, padding=1)))
            c += growth
        self.trans = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, 4, 1), nn.AvgPool2d(2))
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        x = self.stem(x)
        for layer in self.dense:
            x = torch.cat([x, layer(x)], dim=1)
        return self.fc(self.trans(x).flatten(1))


class Functional(nn.Module):
    """Parameters used through torch.nn.functional and tensor methods, no layer modules."""
    def __init__(self):
        super().__init__()
        self.cw = nn.Parameter(torch.randn(3, 2, 3, 3) * 0.3)
        self.cb = nn.Parameter(torch.randn(3) * 0.1)
        self.w1 = nn.Parameter(torch.randn(5, 3 * 4 * 4) * 0.2)
        self.b1 = nn.Parameter(torch.randn(5) * 0.1)
        self.w2 = nn.Parameter(torch.randn(5, 3) * 0.3)      # used as x @ w2

    def forward(self, x):
        x = torch.relu(F.conv2d(x, self.cw, self.cb, padding=1))
        x = F.max_pool2d(x, 2)
        x = x.view(x.size(0), -1)
        x = F.relu(F.linear(x, self.w1, self.b1))
        return x @ self.w2


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(F.relu(self.fc1(x)))))


class ResidualMLP(nn.Module):
    def __init__(self, d=6, hidden=5, blocks=2):
        super().__init__()
        self.inp = nn.Linear(4, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, d))
                                    for _ in range(blocks))
        self.out = nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        return self.out(F.relu(h))


class LayerScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.fc = nn.Linear(4, 6), nn.Linear(6, 6)
        self.gamma = nn.Parameter(torch.rand(6) + 0.5)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.gamma * self.fc(F.relu(h))
        return self.out(F.relu(h))


class SplitCat(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.fa, self.fb = nn.Linear(5, 8), nn.Linear(4, 3), nn.Linear(4, 3)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        a, b = F.relu(self.fc(x)).split(4, dim=1)
        return self.out(torch.cat([F.relu(self.fa(a)), F.relu(self.fb(b))], dim=1))


class EmbeddingBag(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.mlp = mlp([6, 5, 3])

    def forward(self, idx):
        return self.mlp(self.emb(idx).mean(dim=1))


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.ModuleList([nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 5), nn.Linear(5, 3)])

    def forward(self, x):
        x = F.gelu(self.l[0](x))
        x = F.relu(self.l[1](x))
        x = F.silu(self.l[2](x))
        x = torch.relu(self.l[3](x))
        return torch.sigmoid(self.l[4](x))


class TokenMixer(nn.Module):
    """MLP-Mixer style: a Linear across channels, then one across tokens (its weight entries each
    multiply every channel, so those classes merge)."""
    def __init__(self, tokens=4, d=5):
        super().__init__()
        self.chan, self.tok, self.out = nn.Linear(3, d), nn.Linear(tokens, tokens), nn.Linear(d, 2)

    def forward(self, x):                                     # (B, T, 3)
        h = F.relu(self.chan(x))                              # (B, T, d)
        h = F.relu(self.tok(h.transpose(1, 2))).transpose(1, 2)
        return self.out(h).sum(dim=1)


class MiniTransformer(nn.Module):
    def __init__(self, vocab=7, t=4, d=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(t, d) * 0.1)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 8), nn.Linear(8, d)
        self.head = nn.Linear(d, 3)

    def forward(self, idx):
        x = self.emb(idx) + self.pos
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-2, -1) / 2.0, dim=-1)
        x = x + self.proj(att @ v)
        x = x + self.fc2(F.relu(self.fc1(self.ln2(x))))
        return self.head(x[:, -1])


class ChannelOps(nn.Module):
    """Parameter-free channel mixing: a channel mean subtracted, a max over channels concatenated."""
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(5, 3, 3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        h = F.relu(self.c1(x))
        h = h - h.mean(dim=1, keepdim=True)
        h = torch.cat([h, h.amax(dim=1, keepdim=True)], dim=1)
        return self.fc(F.relu(self.c2(h)).mean(dim=(2, 3)))


class FunctionalNorms(nn.Module):
    """F.batch_norm / F.group_norm / F.layer_norm on raw parameters, tensor-method reshapes."""
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(4, 2, 3, 3) * 0.3)
        self.g1, self.b1 = nn.Parameter(torch.ones(4)), nn.Parameter(torch.zeros(4))
        self.w2 = nn.Parameter(torch.randn(4, 4, 3, 3) * 0.3)
        self.g2, self.b2 = nn.Parameter(torch.ones(4)), nn.Parameter(torch.zeros(4))
        self.w3, self.c3 = nn.Parameter(torch.randn(5, 4) * 0.3), nn.Parameter(torch.zeros(5))
        self.g3, self.b3 = nn.Parameter(torch.ones(5)), nn.Parameter(torch.zeros(5))
        self.head = nn.Linear(5, 3)
        self.eps = 1e-5

    def forward(self, x):
        h = F.conv2d(x, self.w1, padding=1)
        h = F.relu(F.batch_norm(h, None, None, self.g1, self.b1, training=True, eps=self.eps))
        h = F.relu(F.group_norm(F.conv2d(h, self.w2), 2, self.g2, self.b2, eps=self.eps))
        h = h.mean(dim=(-2, -1))
        h = F.layer_norm(F.linear(h, self.w3, self.c3), (5,), self.g3, self.b3, eps=self.eps)
        return self.head(F.relu(h))


def _seq(*mods):
    return nn.Sequential(*mods)


ZOO = {
    "mlp": lambda: (mlp([6, 8, 7, 3]), (torch.randn(4, 6),)),
    "mlp_nobias": lambda: (mlp([6, 8, 7, 3], bias=False), (torch.randn(4, 6),)),
    "mlp_nonstraight": lambda: (mlp([5, 7, 4, 9, 3]), (torch.randn(4, 5),)),
    "mlp_leaky": lambda: (mlp([5, 6, 7, 3], bias=False, act=lambda: nn.LeakyReLU(0.1)), (torch.randn(4, 5),)),
    "cnn_pool": lambda: (_seq(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 5, 3),
                              nn.ReLU(), nn.AvgPool2d(2, stride=1), nn.Flatten(), nn.Linear(20, 3)), _img(s=10)),
    "cnn_nobias": lambda: (_seq(nn.Conv2d(2, 3, 3, bias=False), nn.ReLU(), nn.Conv2d(3, 4, 3, bias=False),
                                nn.ReLU(), nn.Flatten(), nn.Linear(4 * 2 * 2, 3, bias=False)), _img(s=6)),
    "vgg_bn": lambda: (_seq(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                            nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                            nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)), _img()),
    "resnet_basic": resnet_basic,
    "resnet_bottleneck": resnet_bottleneck,
    "densenet": lambda: (DenseNet(), _img()),
    "grouped_depthwise": lambda: (_seq(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2), nn.ReLU(),
                                       nn.Conv2d(4, 4, 3, groups=4), nn.ReLU(), nn.Conv2d(4, 6, 1), nn.ReLU(),
                                       nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(6, 3)), _img()),
    "layernorm_mlp": lambda: (_seq(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 7), nn.LayerNorm(7),
                                   nn.ReLU(), nn.Linear(7, 3)), (torch.randn(4, 6),)),
    "mixed_activations": lambda: (Mixed(), (torch.randn(4, 5),)),
    "functional": lambda: (Functional(), _img()),
    "arch1": arch1,
    "arch2": arch2,
    "shared_param": lambda: (Shared(), (torch.randn(4, 6),)),
    "residual_mlp": lambda: (ResidualMLP(), (torch.randn(4, 4),)),
    "layerscale": lambda: (LayerScale(), (torch.randn(4, 4),)),
    "split_cat": lambda: (SplitCat(), (torch.randn(4, 5),)),
    "conv1d_bn": lambda: (_seq(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.MaxPool1d(2),
                               nn.Conv1d(4, 5, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool1d(2), nn.Flatten(),
                               nn.Linear(10, 3)), (torch.randn(2, 2, 11),)),
    "embedding": lambda: (EmbeddingBag(), (torch.randint(0, 10, (4, 5)),)),
    "conv_transpose": lambda: (_seq(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(),
                                    nn.ConvTranspose2d(4, 3, 2, stride=2), nn.ReLU(), nn.ZeroPad2d(1),
                                    nn.Conv2d(3, 2, 3)), _img(s=6)),
    "group_instance_norm": lambda: (_seq(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                                         nn.InstanceNorm2d(4, affine=True), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                         nn.Flatten(), nn.Linear(4, 3)), _img()),
    "token_mixer": lambda: (TokenMixer(), (torch.randn(3, 4, 3),)),
    "mini_transformer": lambda: (MiniTransformer(), (torch.randint(0, 7, (3, 4)),)),
    "channel_ops": lambda: (ChannelOps(), _img(s=6)),
    "functional_norms": lambda: (FunctionalNorms(), _img(s=6)),
    "conv3d_bn": lambda: (_seq(nn.Conv3d(1, 3, 2), nn.BatchNorm3d(3), nn.ReLU(), nn.MaxPool3d(2),
                               nn.Flatten(), nn.Linear(3 * 2 * 2 * 2, 2)), (torch.randn(2, 1, 5, 5, 5),)),
    "conv_transpose1d": lambda: (_seq(nn.Conv1d(2, 3, 3), nn.ReLU(), nn.ConvTranspose1d(3, 4, 3, stride=2, groups=1),
                                      nn.ReLU(), nn.AvgPool1d(3, stride=2, padding=1), nn.Conv1d(4, 3, 1),
                                      nn.ReLU(), nn.AdaptiveMaxPool1d(2), nn.Flatten(), nn.Linear(6, 2)),
                                 (torch.randn(2, 2, 7),)),
    "prelu": lambda: (_seq(nn.Linear(5, 6), nn.PReLU(6), nn.Linear(6, 6), nn.PReLU(), nn.Linear(6, 3)),
                      (torch.randn(4, 5),)),
}


def digits_mobilenet(width: int = 16) -> nn.Module:
    """A MobileNet-style CNN for scikit-learn's 8x8 digits (flat 64-vectors in): depthwise and
    pointwise convolutions with BatchNorm and ReLU (DFQ's setting; ReLU6 would break the scaling)."""
    def block(cin, cout, groups=1, k=1):
        return [nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                nn.ReLU()]
    w = width
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), *block(1, w, k=3), *block(w, w, groups=w, k=3),
                         *block(w, 2 * w), nn.MaxPool2d(2), *block(2 * w, 2 * w, groups=2 * w, k=3),
                         *block(2 * w, 2 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, 10))


def resnet50_like(blocks=(3, 4, 6, 3), width=64, num_classes=1000) -> nn.Module:
    """ResNet-50's layer shapes (stem 7x7/2 + max-pool, bottleneck stages of 3-4-6-3 blocks)."""
    layers, cin = [], width
    for i, n in enumerate(blocks):
        mid = width * 2 ** i
        for j in range(n):
            layers.append(Bottleneck(cin, mid, mid * 4, stride=2 if (j == 0 and i > 0) else 1))
            cin = mid * 4
    model = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                          nn.MaxPool2d(3, 2, 1), *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(cin, num_classes))
    return model


def resnet18_like(width=64, num_classes=1000) -> nn.Module:
    """ResNet-18's layer shapes (stem 7x7/2 + max-pool, basic-block stages of 2-2-2-2 blocks)."""
    layers, cin = [], width
    for i in range(4):
        for j in range(2):
            layers.append(BasicBlock(cin, width * 2 ** i, stride=2 if (j == 0 and i > 0) else 1))
            cin = width * 2 ** i
    return nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                         nn.MaxPool2d(3, 2, 1), *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(cin, num_classes))

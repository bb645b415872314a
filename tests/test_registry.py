"""One registry for what each op knows (analyze/rules): a user's entry reaches every analysis, the
scaling rule, the inertness proof and the rotation walk, and each analysis treats an op without
its facet as unknown (pin, not proven, no group)."""
import torch
import torch.nn as nn

import invariance_compiler as ic
from invariance_compiler.analyze.inert import view_step
from invariance_compiler.analyze.rotation_rules import same_channels


@torch.library.custom_op("ictest::same", mutates_args=())
def same(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@same.register_fake
def _(x):
    return torch.empty_like(x)


class ShiftThenNorm(nn.Module):
    """A scalar shift added before a LayerNorm dies in it (inert), if the proof can follow it
    through the custom op."""
    def __init__(self):
        super().__init__()
        self.fc, self.out, self.norm = nn.Linear(3, 4), nn.Linear(4, 2), nn.LayerNorm(4)
        self.shift = nn.Parameter(torch.randn(1))

    def forward(self, x):
        return self.out(self.norm(same(self.fc(x) + self.shift)))


class Bottleneck(nn.Module):
    """fc -> custom op -> fc: a linear bottleneck, GL(4), if the walk can follow the custom op."""
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.c(torch.relu(self.b(same(self.a(x)))))


def test_one_entry_reaches_every_analysis():
    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64)
    model = ShiftThenNorm().double()
    with torch.no_grad():
        model.norm.weight.normal_()
    with ic.rules.registered(torch.ops.ictest.same, ic.rules.passthrough):
        assert not ic.analyze(model, (x,)).is_inert("shift")           # no inert facet: unproven
    with ic.rules.registered(torch.ops.ictest.same, ic.rules.passthrough, inert=view_step):
        assert ic.analyze(model, (x,)).is_inert("shift")               # the proof follows it
    net = Bottleneck().double()
    ref = net(x).detach()
    with ic.rules.registered(torch.ops.ictest.same, ic.rules.passthrough):
        rot = ic.rotate(net, (x,))
    assert rot.groups == [] and "no rotation rule" in rot.why["linear"]
    with ic.rules.registered(torch.ops.ictest.same, ic.rules.passthrough, rotation=same_channels):
        rot = ic.rotate(net, (x,), kind="random")
    assert [(g.kind, g.group) for g in rot.groups] == [("linear", "GL(4)")]
    assert torch.allclose(net(x), ref, atol=1e-12, rtol=0)
    # the entry is gone after the block: every facet
    assert ic.rules.lookup(torch.ops.ictest.same.default, "rotation") is None


def test_facets_are_checked():
    import pytest
    with pytest.raises(TypeError, match="unknown facet"):
        ic.rules.register_op(torch.ops.ictest.same, rotaton=same_channels)

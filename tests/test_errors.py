"""Bad input gets a message that names the culprit and the fix."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import invariance_compiler as ic


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:                           # data-dependent control flow
            return x
        return -x


class WithGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.gate, self.out = nn.Linear(3, 4), Gate(), nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.gate(self.fc(x)))


def test_data_dependent_control_flow_names_the_source_line_and_the_ways_out():
    with pytest.raises(ic.TraceFailure) as err:
        ic.analyze(WithGate())
    msg = str(err.value)
    assert "test_errors.py" in msg and "if x.sum() > 0" in msg          # the line that failed
    assert "control flow depends on tensor values" in msg
    assert "torch.library.custom_op" in msg and "ic.register_rule(" in msg


@torch.library.custom_op("ictest::scaled_relu", mutates_args=())
def scaled_relu(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x) * 2.0


@scaled_relu.register_fake
def _(x):
    return torch.empty_like(x)


class WithCustomOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.out(scaled_relu(self.fc(x)))


def test_a_custom_op_without_a_rule_pins_and_a_registered_rule_is_used():
    with pytest.warns(ic.SymmetryWarning, match="ictest.scaled_relu.default"):
        report = ic.analyze(WithCustomOp())
    assert report.num_generators == 0             # pinned: fc's units cannot scale through it
    model = WithCustomOp()
    with ic.rules.registered(torch.ops.ictest.scaled_relu, ic.rules.passthrough):
        with warnings.catch_warnings():
            warnings.simplefilter("error", ic.SymmetryWarning)
            report = ic.analyze(model)
    assert report.num_generators == 4             # positively homogeneous: fc's four units rescale
    from invariance_compiler.analyze import oracle
    assert oracle.invariance_error(model, report, (torch.randn(5, 3),)) <= 1e-10
    with pytest.raises(TypeError, match="ATen or torch.library op"):
        ic.register_rule(nn.ReLU, ic.rules.passthrough)


class Lgamma(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.lgamma(self.a(x))               # no rule: pinned
        return self.c(F.relu(self.b(h)))


def test_unknown_op_is_pinned_and_listed_in_one_warning():
    with pytest.warns(ic.SymmetryWarning) as record:
        report = ic.analyze(Lgamma())
    assert len(record) == 1
    msg = str(record[0].message)
    assert "aten.lgamma.default" in msg and "ic.register_rule(torch.ops.<ns>.<op>, ic.rules.passthrough)" in msg
    assert report.num_generators == 4             # only b's units: a's are pinned by the unknown op
    assert all(g.params == ("b.weight", "b.bias", "c.weight") for g in report.generators)
    assert report.unknown_ops and "aten.lgamma.default" in str(report)


def test_registered_rule_replaces_the_warning():
    with ic.rules.registered(torch.ops.aten.lgamma, ic.rules.pin):
        with warnings.catch_warnings():
            warnings.simplefilter("error", ic.SymmetryWarning)
            report = ic.analyze(Lgamma())
    assert report.num_generators == 4 and not report.unknown_ops
    with pytest.warns(ic.SymmetryWarning):        # the block's rule is gone again
        ic.analyze(Lgamma())


def test_empty_model_is_refused():
    with pytest.raises(ValueError, match="no parameters"):
        ic.analyze(nn.Sequential())
    with pytest.raises(ValueError, match="no parameters"):
        ic.analyze(nn.ReLU())


def test_input_shape_inference_says_when_it_cannot():
    with pytest.raises(ValueError, match=r"starts with Conv2d.*example_inputs"):
        ic.analyze(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2)))
    report = ic.analyze(nn.Sequential(nn.Flatten(), nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2)))
    assert report.num_generators == 3


def test_eval_mode_batchnorm_says_which_semantics_it_used():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    train = ic.analyze(model)
    evaled = ic.analyze(model.eval())
    assert train.counts() == {"rescale": 4, "normalize": 4, "inert": 4}
    assert evaled.counts() == {"rescale": 4, "normalize": 0, "inert": 0}   # affine BN pins its input
    assert any("eval mode" in n and "model.train()" in n for n in evaled.notes)


def test_not_a_module_is_refused():
    with pytest.raises(TypeError, match="nn.Module"):
        ic.analyze(lambda x: x)


class SharedBias(nn.Module):
    """One parameter used in two incompatible ways: as a Linear weight and, sliced, as a bias."""
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 3))
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        h = F.relu(F.linear(x, self.w))
        return self.out(F.relu(h + self.w[0]))


def test_a_parameter_used_two_ways_is_pinned_soundly():
    """A weight whose first row is also added as a bias: the two uses bind it differently, so its
    classes pin. The one joint scale of all rows of w that survives is not found: sound, one
    generator short (stated in the report)."""
    from invariance_compiler.analyze import oracle
    model = SharedBias()
    x = (torch.randn(64, 3),)
    report = ic.analyze(model, x)
    assert oracle.invariance_error(model, report, x) <= 1e-10
    got = oracle.completeness(model, report, x)
    assert got["residual"] <= 1e-9 and got["null_dim"] == report.num_generators + 1
    assert any("two incompatible ways" in why for _, why in report.pins)


class Transposed(nn.Module):
    """Weights used through views and copies of themselves: still plain Linear layers."""
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(3, 4))            # stored (in, out)
        self.w2 = nn.Parameter(torch.randn(2, 4))

    def forward(self, x):
        h = F.relu(F.linear(x, self.w1.t().contiguous()))
        return F.linear(h, self.w2.view(2, 4).clone())


def test_views_and_copies_of_a_weight_keep_its_symmetry():
    report = ic.analyze(Transposed(), (torch.randn(4, 3),))
    assert report.num_generators == 4 and not report.pins[:-1]
    idx, sign = report.generators[1].entries()["w1"]
    assert idx.tolist() == [1, 5, 9] and sign.tolist() == [1, 1, 1]      # column 1 of the stored (in, out)


def test_an_input_whose_shape_breaks_an_example_dependent_flatten_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 6, 5))
    x = torch.randn(2, 3, 4, 6)
    for form in ("gspace", "fixed"):
        cm = ic.compile_invariant(model, x, form=form)
        assert cm(torch.randn(7, 3, 4, 6)).shape == (7, 5)   # another batch size is fine
        with pytest.raises(ValueError, match=r"node 'flatten' \(aten.flatten.using_ints\) reshapes .*"
                                             r"\(N, 3, 4, 6\).*got an input of shape \(2, 3, 6, 4\).*Compile again"):
            cm(torch.randn(2, 3, 6, 4))            # same number of features: torch alone would accept it
    pooled = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                           nn.Linear(4, 5)).double()
    cm = ic.compile_invariant(pooled, x.double())
    y = torch.randn(2, 3, 9, 5, dtype=torch.float64)     # any size: the flatten sees (N, 4, 1, 1)
    assert torch.allclose(cm(y), pooled(y), rtol=1e-12, atol=1e-14)


def test_integer_parameters_are_kept_exact_and_never_trained():
    class Picker(nn.Module):
        def __init__(self):
            super().__init__()
            self.idx = nn.Parameter(torch.tensor([2, 0]), requires_grad=False)   # registered first
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))[:, self.idx]

    model, x = Picker().double(), torch.randn(5, 3, dtype=torch.float64)
    model.idx.data = torch.tensor([2, 0])                 # .double() left it alone; be explicit
    for form in ("gspace", "fixed"):
        cm = ic.compile_invariant(model, x, form=form)
        assert torch.allclose(cm(x), model(x), rtol=1e-12)
        opt = torch.optim.SGD([p for p in cm.parameters() if p.requires_grad], lr=0.1)
        cm(x).sum().backward()
        opt.step()
        assert torch.equal(cm.export_state_dict()["idx"], torch.tensor([2, 0]))
        assert cm.export_state_dict()["a.weight"].dtype == torch.float64


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_with_the_parameter_and_index(bad):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[2].weight[1, 3] = bad
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"compile_invariant: parameter '2.weight' has 1 non-finite entries "
                                         r"\(first at index \(1, 3\)"):
        ic.compile_invariant(model, x)
    with pytest.raises(ValueError, match=r"GSGD: parameter '2.weight'"):
        ic.optim.GSGD(model, example_inputs=x)

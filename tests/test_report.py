"""The SymmetryReport contract (DESIGN §2): E's layout, act, the table, graph exports, node.meta."""
import copy
import importlib
import pickle

import networkx as nx
import pytest
import torch
import torch.nn as nn

import invariance_compiler as ic
from invariance_compiler.tools.zoo import ZOO, mlp


def test_generator_matrix_rows_follow_model_parameters_order():
    model = mlp([3, 4, 2])                       # 0.weight (4,3), 0.bias (4), 2.weight (2,4), 2.bias (2)
    report = ic.analyze(model)
    E = report.generator_matrix()
    assert E.shape == (report.num_params, report.num_generators) == (26, 4)
    assert set(E.unique().tolist()) <= {-1.0, 0.0, 1.0}
    for g in range(4):                            # hidden unit g: row g of layer 0, column g of layer 2
        col = E[:, g]
        w0 = torch.zeros(4, 3); w0[g] = 1
        b0 = torch.zeros(4); b0[g] = 1
        w2 = torch.zeros(2, 4); w2[:, g] = -1
        assert torch.equal(col, torch.cat([w0.reshape(-1), b0, w2.reshape(-1), torch.zeros(2)]))


def test_sparse_and_dense_generator_matrix_agree():
    model, x = ZOO["resnet_bottleneck"]()
    report = ic.analyze(model, x)
    assert torch.equal(report.generator_matrix(sparse=True).to_dense(), report.generator_matrix())


@pytest.mark.parametrize("name", ["resnet_bottleneck", "mini_transformer", "vgg_bn", "grouped_depthwise"])
def test_generator_matrix_built_in_row_slices_equals_the_whole(name, monkeypatch):
    """Big parameters are cut into dim-0 slices (relations, inert entries and two-factor weights
    each take another path): tiny slices give the same E, dense and sparse."""
    report_module = importlib.import_module("invariance_compiler.analyze.report")   # ic.analyze is a function
    model, x = ZOO[name]()
    report = ic.analyze(model, x)
    whole = report.generator_matrix(dtype=torch.float64)
    monkeypatch.setattr(report_module, "ROW_CHUNK", 5)
    sliced = report.generator_matrix(sparse=True, dtype=torch.float64)
    assert sliced.is_coalesced() and torch.equal(sliced.coalesce().indices(), sliced.indices())
    assert torch.equal(sliced.to_dense(), whole)


def test_entries_match_generator_matrix_columns():
    model, x = ZOO["grouped_depthwise"]()
    report = ic.analyze(model, x)
    E = report.generator_matrix()
    offsets, o = {}, 0
    for n, p in model.named_parameters():
        offsets[n] = o; o += p.numel()
    for g in report.generators:
        col = torch.zeros(report.num_params)
        for name, (idx, sign) in g.entries().items():
            col[offsets[name] + idx] = sign.float()
        assert torch.equal(col, E[:, g.index])


def test_act_applies_exp_e_lambda_and_preserves_the_function():
    model, x = ZOO["vgg_bn"]()
    model = model.double().eval()                 # eval: BN is affine, fewer but exact symmetries
    x = tuple(t.double() for t in x)
    report = ic.analyze(model, x)
    lam = torch.randn(report.num_generators, dtype=torch.float64)
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    ref = model(*x)
    report.act(model, lam)
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    E = report.generator_matrix(dtype=torch.float64)
    assert torch.allclose(after, before * torch.exp(E @ lam), rtol=1e-12, atol=0)
    assert torch.allclose(model(*x), ref, rtol=1e-10, atol=1e-12)


def test_act_checks_its_arguments():
    report = ic.analyze(mlp([3, 4, 2]))
    with pytest.raises(ValueError, match="expected 4 log-scales"):
        report.act(mlp([3, 4, 2]), torch.zeros(3))
    with pytest.raises(ValueError, match="lacks parameters"):
        report.act(nn.Linear(3, 4), torch.zeros(4))


def test_table_names_every_layer_and_the_totals():
    model, x = ZOO["resnet_basic"]()
    report = ic.analyze(model, x)
    text = str(report)
    for layer in {n.rsplit(".", 1)[0] for n, _ in model.named_parameters()}:
        assert layer in text
    c = report.counts()
    assert f"H = {report.num_generators} generators ({c['rescale']} rescale, {c['normalize']} normalize" in text
    assert "model output" in text                 # the reason the classifier's outputs are pinned
    assert "spanning >2 layers" in text           # the residual stream


def test_layer_graph_edges_carry_rescale_generators():
    report = ic.analyze(mlp([3, 4, 5, 2]))
    g = report.to_networkx()
    assert isinstance(g, nx.DiGraph)
    assert sorted(g.edges(data="rescale")) == [("0", "2", 4), ("2", "4", 5)]
    dot = report.to_dot()
    assert dot.startswith("digraph") and '"0" -> "2" [label="4"]' in dot


def test_analysis_lands_in_node_meta():
    model, x = ZOO["cnn_pool"]()
    report = ic.analyze(model, x)
    nodes = {n.name: n for n in report.graph.graph.nodes}
    gens = nodes["relu"].meta["ic_generators"]              # after the first ReLU: one class per channel
    assert gens.shape == (1, 4, 1, 1) and sorted(gens.reshape(-1).tolist()) == [0, 1, 2, 3]
    assert nodes["relu"].meta["nn_module_stack"]             # the exported graph keeps the layers
    assert (nodes["linear"].meta["ic_generators"] == -1).all()   # the output Linear: pinned


def test_model_is_left_untouched():
    model, x = ZOO["vgg_bn"]()
    state = copy.deepcopy(model.state_dict())
    rng = torch.random.get_rng_state()
    ic.analyze(model, x)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k        # BN running stats and num_batches_tracked too
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert model.training


def test_report_pickles():
    report = ic.analyze(mlp([3, 4, 2]))
    clone = pickle.loads(pickle.dumps(report))
    assert torch.equal(clone.generator_matrix(), report.generator_matrix())
    assert clone.graph is None and report.graph is not None   # the exported graph stays behind


def test_a_bias_is_inert_only_where_the_centring_really_removes_it():
    """Per-channel constants reach a BatchNorm through a sum and a 1x1 convolution (inert), but a
    Linear's bias broadcast onto the last image dim is a per-column constant (not inert)."""
    from invariance_compiler.analyze import oracle

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.conv, self.mix = nn.Linear(3, 4), nn.Conv2d(2, 4, 1), nn.Conv2d(4, 4, 1)
            self.bn, self.out = nn.BatchNorm2d(4), nn.Linear(64, 2)

        def forward(self, v, img):
            return self.out(self.bn(self.mix(self.conv(img) + self.fc(v))).flatten(1))

    model, v, img = Mixed().double(), torch.randn(4, 3, dtype=torch.float64), torch.randn(5, 2, 4, 4, dtype=torch.float64)
    report = ic.analyze(model, (v, img))
    assert report.is_inert("conv.bias") and report.is_inert("mix.bias") and not report.is_inert("fc.bias")
    assert oracle.invariance_error(model, report, (v, img)) <= 1e-12

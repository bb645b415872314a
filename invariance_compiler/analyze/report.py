"""SymmetryReport: the rescaling group the analysis found, in the user's terms (parameters, layers).

Generators are stored implicitly: every parameter keeps its factors (sign, class ids, compact), so
E is never materialised unless asked for (ResNet-50 has ~25M rows)."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx
import torch.nn as nn

from .context import Context
from .value import PIN, Value

__all__ = ["SymmetryReport", "Generator"]

KINDS = ("rescale", "normalize", "inert")


@dataclass
class Generator:
    """One column of E: a direction λ_c that leaves the function unchanged."""
    index: int
    kind: str                      # "rescale" | "normalize" | "inert"
    params: tuple[str, ...]        # parameters with non-zero entries
    _report: "SymmetryReport"
    _label: Optional[int] = None   # class label (rescale/normalize)
    _entry: Optional[tuple[str, int]] = None   # (parameter, flat index) for inert

    def entries(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{parameter name: (flat entry indices, signs in {-1, +1})}."""
        if self._entry is not None:
            name, i = self._entry
            return {name: (torch.tensor([i]), torch.tensor([1]))}
        out = {}
        for name in self.params:
            col = self._report._column_of_label(name, self._label)
            idx = col.reshape(-1).nonzero().reshape(-1)
            out[name] = (idx, col.reshape(-1)[idx])
        return out

    def __repr__(self):
        return f"Generator({self.index}, {self.kind}, params={list(self.params)})"


class SymmetryReport:
    def __init__(self, model: nn.Module, graph: torch.fx.GraphModule, ctx: Context,
                 unknown: list[tuple[str, str]]):
        self.graph = graph
        self.param_names = [n for n, _ in model.named_parameters()]
        self.param_shapes = {n: p.shape for n, p in model.named_parameters()}
        self.layer_types = {n: _layer_type(model, n) for n in self.param_names}
        self.pins = list(ctx.pins)
        self.unknown_ops = list(unknown)
        self.notes = list(dict.fromkeys(ctx.notes))
        self.additive = set(ctx.additive)      # parameters added to an output (biases, β)
        self.num_params = sum(p.numel() for p in model.parameters())
        labels = ctx.classes.solve()
        self._labels = labels

        # Final factors per parameter, in labels; inert parameters have none.
        self._factors: dict[str, list[tuple[int, torch.Tensor]]] = {}
        inert = []
        for name in self.param_names:
            b = ctx.bindings.get(name)
            if b is None or (b.inert and len(b.nodes) == 1):
                inert.append(name)
                continue
            self._factors[name] = [(s, _relabel(labels, c)) for s, c in b.factors]

        # Which labels have non-zero +1 / -1 entries (a +c and -c on one entry cancel).
        plus, minus = defaultdict(list), defaultdict(list)     # label -> parameter indices
        for i, name in enumerate(self.param_names):
            factors = self._factors.get(name, [])
            uniq = [lab.unique() for _, lab in factors]
            if len(factors) == 2 and bool(torch.isin(uniq[0], uniq[1]).any()):
                (_, a), (_, b) = factors
                shape = torch.broadcast_shapes(a.shape, b.shape)
                a, b = a.expand(shape), b.expand(shape)
                uniq = [a[a != b].unique(), b[a != b].unique()]
            for (s, _), u in zip(factors, uniq):
                for l in u[u > PIN].tolist():
                    (plus if s > 0 else minus)[l].append(i)
        self.generators: list[Generator] = []
        self._col = torch.full((len(labels),), -1, dtype=torch.long)
        for lab in sorted(set(plus) | set(minus)):
            kind = "rescale" if lab in minus else "normalize"
            params = tuple(self.param_names[i] for i in sorted(set(plus.get(lab, []) + minus.get(lab, []))))
            self._col[lab] = len(self.generators)
            self.generators.append(Generator(len(self.generators), kind, params, self, _label=lab))
        self._inert_start = len(self.generators)
        self._inert = inert
        for name in inert:
            for i in range(self.param_shapes[name].numel()):
                self.generators.append(Generator(len(self.generators), "inert", (name,), self,
                                                 _entry=(name, i)))
        self._annotate_graph()

    # ---- the contract -----------------------------------------------------------------------
    @property
    def num_generators(self) -> int:
        return len(self.generators)

    @property
    def invariant_ratio(self) -> float:
        return self.num_generators / self.num_params if self.num_params else 0.0

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(KINDS, 0)
        for g in self.generators:
            out[g.kind] += 1
        return out

    def exponents(self, name: str, log_scales: torch.Tensor) -> torch.Tensor:
        """(E λ) restricted to parameter `name`, in its shape."""
        shape = self.param_shapes[name]
        lam = log_scales.reshape(-1)
        if name in self._factors:
            lam_ext = torch.cat([lam, lam.new_zeros(1)])           # column -1 -> 0
            out = lam.new_zeros(shape)
            for s, lab in self._factors[name]:
                out = out + s * lam_ext[self._col[lab]]
            return out
        start = self.inert_column(name)
        return lam[start: start + shape.numel()].view(shape)

    def generator_matrix(self, dtype=torch.float32, sparse: bool = False) -> torch.Tensor:
        """E: (m, H), entries in {-1, 0, +1}, rows in model.parameters() order."""
        m, h = self.num_params, self.num_generators
        if not sparse and m * h > 2 ** 28:
            raise MemoryError(f"E would be a dense {m} x {h} matrix; use generator_matrix(sparse=True)")
        rows, cols, vals, offset = [], [], [], 0
        for name in self.param_names:
            numel = self.param_shapes[name].numel()
            for s, lab in self._factors.get(name, []):
                col = self._col[lab].expand(self.param_shapes[name]).reshape(-1)
                keep = col >= 0
                rows.append(offset + keep.nonzero().reshape(-1))
                cols.append(col[keep])
                vals.append(torch.full((int(keep.sum()),), float(s), dtype=dtype))
            offset += numel
        start, offset = self._inert_start, 0
        for name in self.param_names:
            numel = self.param_shapes[name].numel()
            if name in self._inert:
                rows.append(offset + torch.arange(numel))
                cols.append(start + torch.arange(numel))
                vals.append(torch.ones(numel, dtype=dtype))
                start += numel
            offset += numel
        idx = torch.stack([torch.cat(rows), torch.cat(cols)]) if rows else torch.zeros(2, 0, dtype=torch.long)
        val = torch.cat(vals) if vals else torch.zeros(0, dtype=dtype)
        E = torch.sparse_coo_tensor(idx, val, (m, h), check_invariants=True).coalesce()   # a +1 and -1 on one entry sum to 0
        return E if sparse else E.to_dense()

    @torch.no_grad()
    def act(self, model: nn.Module, log_scales: torch.Tensor) -> nn.Module:
        """θ ← θ ⊙ exp(E λ), in place; the function is unchanged. Returns the model."""
        log_scales = torch.as_tensor(log_scales, dtype=torch.float64).reshape(-1)
        if log_scales.numel() != self.num_generators:
            raise ValueError(f"act: expected {self.num_generators} log-scales (one per generator), "
                             f"got {log_scales.numel()}")
        params = dict(model.named_parameters())
        missing = [n for n in self.param_names if n not in params]
        if missing:
            raise ValueError(f"act: the model lacks parameters {missing[:3]}; pass the model this "
                             f"report was built from (or one of the same architecture)")
        for name in self.param_names:
            p = params[name]
            p.mul_(self.exponents(name, log_scales).exp().to(p.dtype))
        return model

    def sides(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(in, out): the generator column each entry of `name` consumes (-1 factor) and produces
        (+1 factor), compact (broadcastable to the parameter); -1 where there is none. An entry whose
        two sides are one class (exponent 0) gets -1 on both. Inert parameters: -1 everywhere."""
        shape = self.param_shapes[name]
        nd = len(shape)
        none = torch.full((1,) * nd, -1, dtype=torch.long)
        side = {+1: none, -1: none}
        for s, lab in self._factors.get(name, []):
            side[s] = self._col[lab]
        out, inp = side[+1], side[-1]
        if bool(((out == inp) & (out >= 0)).any()):
            same = out == inp
            inp, out = torch.where(same, -1, inp), torch.where(same, -1, out)
        return inp, out

    def is_inert(self, name: str) -> bool:
        return name in self._inert

    def inert_column(self, name: str) -> int:
        """Column of the first entry of an inert parameter (its entries are consecutive columns)."""
        return self._inert_start + sum(self.param_shapes[n].numel()
                                       for n in self._inert[: self._inert.index(name)])

    # ---- inspection -------------------------------------------------------------------------
    def _column_of_label(self, name: str, label: int) -> torch.Tensor:
        shape = self.param_shapes[name]
        out = torch.zeros(shape, dtype=torch.long)
        for s, lab in self._factors.get(name, []):
            out = out + s * (lab == label).long()
        return out

    def _annotate_graph(self):
        """node.meta["ic_generators"]: generator index per element (compact), -1 where no scale."""
        for node in self.graph.graph.nodes:
            v = node.meta.get("ic_value")
            if isinstance(v, Value) and v.ids is not None:
                node.meta["ic_generators"] = self.generator_of_ids(v.ids)

    def generator_of_ids(self, ids: torch.Tensor) -> torch.Tensor:
        lab = self._labels[ids.clamp(min=0)]
        return torch.where(ids > PIN, self._col[lab], -1)

    def layers(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for n in self.param_names:
            out.setdefault(_layer_of(n), []).append(n)
        return out

    def _homes(self):
        """Each generator's home layer: the first layer (in parameter order) it touches."""
        return [_layer_of(g.params[0]) if g.params else "?" for g in self.generators]

    def __str__(self) -> str:
        return _format(self)

    def __repr__(self):
        c = self.counts()
        return (f"SymmetryReport(m={self.num_params}, H={self.num_generators}: {c['rescale']} rescale, "
                f"{c['normalize']} normalize, {c['inert']} inert)")

    def to_networkx(self):
        from .graphs import to_networkx
        return to_networkx(self)

    def to_dot(self) -> str:
        from .graphs import to_dot
        return to_dot(self)

    def structure_matrix(self, max_paths: int = 100_000) -> torch.Tensor:
        from .paths import structure_matrix
        return structure_matrix(self, max_paths)


def _relabel(labels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.where(ids > PIN, labels[ids.clamp(min=0)], PIN)


def _layer_of(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


def _layer_type(model, param_name):
    layer = _layer_of(param_name)
    if layer == param_name:
        return "Parameter"
    return type(model.get_submodule(layer)).__name__


def _format(r: SymmetryReport) -> str:
    homes = r._homes()
    per = defaultdict(lambda: dict.fromkeys(KINDS, 0))
    shared = defaultdict(int)
    for g, home in zip(r.generators, homes):
        per[home][g.kind] += 1
        if len({_layer_of(p) for p in g.params}) > 2 and g.kind != "inert":
            shared[home] += 1
    rows = [("layer", "type", "params", "rescale", "normalize", "inert", "note")]
    for layer, names in r.layers().items():
        n = sum(r.param_shapes[p].numel() for p in names)
        c = per[layer]
        note = f"{shared[layer]} spanning >2 layers" if shared[layer] else ""
        rows.append((layer, r.layer_types[names[0]], str(n), str(c["rescale"]), str(c["normalize"]),
                     str(c["inert"]), note))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i < 2 or i == 6 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    c = r.counts()
    lines += ["", f"m = {r.num_params} parameters, H = {r.num_generators} generators "
                  f"({c['rescale']} rescale, {c['normalize']} normalize, {c['inert']} inert), "
                  f"invariant ratio H/m = {r.invariant_ratio:.4f}"]
    reasons = defaultdict(list)
    for node, why in r.pins:
        reasons[why].append(node)
    if reasons:
        lines.append("pinned (scale fixed to 1):")
        for why, nodes in reasons.items():
            more = f" (+{len(nodes) - 4} more)" if len(nodes) > 4 else ""
            lines.append(f"  {why}: {', '.join(nodes[:4])}{more}")
    if r.unknown_ops:
        lines.append("ops without a rule (pinned): " + ", ".join(sorted({op for op, _ in r.unknown_ops})))
    for note in r.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)

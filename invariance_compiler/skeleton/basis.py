"""Basis paths (DESIGN §3.4) for small networks: for every non-fixed entry e from class a to class b,
in-chain(a) + e + out-chain(b), where in-chain follows the carriers back to the input and out-chain
follows the fixed consumer entries on to the output. G-space coordinates are these paths' values."""
from __future__ import annotations

import torch

__all__ = ["basis_paths"]


def basis_paths(report, skeleton) -> torch.Tensor:
    """(m - H, m) 0/1 matrix, one row per non-fixed entry, in parameter order."""
    offsets, o = {}, 0
    for name in report.param_names:
        offsets[name] = o
        o += report.param_shapes[name].numel()

    carrier_of, fixed_of = skeleton.carrier_of, skeleton.fixed_of
    carrier_src, other = skeleton.carrier_src.tolist(), skeleton.other.tolist()

    def in_chain(a):
        out = []
        while a >= 0:
            hit = carrier_of[a]
            if hit is None:
                raise ValueError(f"basis paths: class {a} has no carrier chain from the input")
            out.append(offsets[hit[0]] + hit[1])
            a = carrier_src[a]
        return out

    def out_chain(b):
        out = []
        while b >= 0:
            if not bool(skeleton.consumer[b]):
                raise ValueError(f"basis paths: class {b} is fixed by a producer entry (a normaliser); "
                                 f"its paths end there")
            name, i = fixed_of[b]
            out.append(offsets[name] + i)
            b = other[b]
        return out

    rows = []
    for name in report.param_names:
        ps = skeleton.params[name]
        shape = ps.shape
        inp, out = ps.inp.expand(shape).reshape(-1), ps.out.expand(shape).reshape(-1)
        fixed = set(ps.fixed_idx.tolist())
        for i in range(shape.numel()):
            if i in fixed:
                continue
            row = torch.zeros(o)
            row[in_chain(int(inp[i])) + [offsets[name] + i] + out_chain(int(out[i]))] = 1.0
            rows.append(row)
    return torch.stack(rows)

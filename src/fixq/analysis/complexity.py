"""Complexity and storage (paper §3.1, DESIGN.md §7).

MACs of a conv = ``P * H * W * (M/groups) * N`` (P output pixels; a linear layer has
P = H = W = 1). One MAC at ``<c bits, d bits>`` costs ``c*d/64`` units of ``<8b,8b>``;
``<flp,flp>`` costs 9 and ``<8b,flp>`` 3 (the paper's Table 2 ratios); a c-bit side
against flp data costs ``3*c/8``. Mixed formats sum per 2D filter. Storage counts
coefficient bits, bias bits and one byte per format descriptor (the hybrid overhead).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from fixq.graph.ir import Conv, Graph
from fixq.planning.coeffs import assign_bits
from fixq.planning.partitions import propagate_formats
from fixq.planning.plan import Formats, QuantPlan, filter_grid

__all__ = ["mac_cost", "LayerCost", "NetworkCost", "analyze", "FLP_COST"]

FLP_COST = 9.0


def mac_cost(c: int | None, d: int | None) -> float:
    """Relative cost of one MAC at ``<c, d>`` in ``<8b,8b>`` units.

    >>> mac_cost(8, 8), mac_cost(4, 8), mac_cost(4, 4), mac_cost(None, None), mac_cost(8, None)
    (1.0, 0.5, 0.25, 9.0, 3.0)
    """
    if c is None and d is None:
        return FLP_COST
    if c is None or d is None:
        return 3.0 * (c or d) / 8.0
    return c * d / 64.0


@dataclass(frozen=True)
class LayerCost:
    name: str
    kind: str
    N: int
    M: int          # input channels per group
    H: int
    W: int
    P: int          # output pixels
    groups: int
    macs: int
    coeff_bits: str
    data_bits: str
    rel_complexity_mmacs: float   # million MACs in <8b,8b> units
    coeff_storage_bits: int
    bias_storage_bits: int
    descriptor_bits: int

    @property
    def storage_bits(self) -> int:
        return self.coeff_storage_bits + self.bias_storage_bits + self.descriptor_bits

    def to_json(self) -> dict:
        return {**asdict(self), "storage_bits": self.storage_bits}


@dataclass(frozen=True)
class NetworkCost:
    layers: tuple[LayerCost, ...]

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def rel_complexity_mmacs(self) -> float:
        return sum(layer.rel_complexity_mmacs for layer in self.layers)

    @property
    def storage_bits(self) -> int:
        return sum(layer.storage_bits for layer in self.layers)

    def savings_pct(self, reference: float) -> float:
        return 100.0 * (1.0 - self.rel_complexity_mmacs / reference) if reference else 0.0

    def to_json(self) -> dict:
        ref8 = self.macs / 1e6
        return {"layers": [x.to_json() for x in self.layers],
                "total": {"macs": self.macs, "rel_complexity_mmacs": self.rel_complexity_mmacs,
                          "storage_bits": self.storage_bits,
                          "storage_bytes": (self.storage_bits + 7) // 8,
                          "savings_vs_8b8b_pct": self.savings_pct(ref8),
                          "savings_vs_float_pct": self.savings_pct(FLP_COST * ref8)}}


def _bits_label(b) -> str:
    if b is None:
        return "flp"
    vals = sorted(set(int(v) for v in torch.as_tensor(b).reshape(-1).tolist()))
    return "/".join(f"{v}b" for v in vals)


def analyze(graph: Graph, plan: QuantPlan | None = None, coeff_bits: dict | None = None) -> NetworkCost:
    """Per-layer MACs, relative complexity and storage of the conv/linear layers.

    ``coeff_bits`` may give, per layer, a tensor of bits per 2D filter ``(N, M/groups)``
    (mixed precision); otherwise the plan's coefficient bits apply (no plan: float).

    >>> cost = analyze(graph, plan)                         # doctest: +SKIP
    >>> round(cost.rel_complexity_mmacs, 1), cost.to_json()["total"]["storage_bits"]  # doctest: +SKIP
    """
    fmts = propagate_formats(graph, plan.tensors) if plan is not None else {}
    out = []
    for n in graph.layers():
        w = n.weight
        if isinstance(n, Conv):
            N, Mg, H, W = w.shape
            oshape = graph.shapes[n.name]
            P, groups = oshape[1] * oshape[2], n.groups
        else:
            (N, Mg), H, W, P, groups = w.shape, 1, 1, 1, 1
        lp = plan.layers.get(n.name) if plan is not None else None
        d = fmts.get(n.inputs[0], (None, None))[0] if plan is not None else None
        if coeff_bits is not None and n.name in coeff_bits:
            cb = torch.as_tensor(coeff_bits[n.name]).expand(N, Mg)
        elif lp is not None and lp.weight is not None:
            cb = filter_grid(lp.weight.bits() if isinstance(lp.weight, Formats) else torch.tensor(lp.weight.T), N, Mg)
        else:
            cb = None
        per_filter = P * H * W
        km = None if lp is None else lp.kmeans
        if km is not None:  # K basis kernels at their bits + N residual kernels at theirs (DESIGN §7, §9)
            gb = filter_grid(km.basis.bits(), km.K, Mg)
            dr = d if km.data is None else km.data.word  # <4b,4b>: residual MACs at the residual data bits
            costs = [mac_cost(int(c), d) for c in gb.reshape(-1).tolist()] + [
                mac_cost(int(c), dr) for c in cb.reshape(-1).tolist()]
            rel = float(sum(costs)) * per_filter
            cstore = (int(gb.sum()) + int(cb.sum())) * H * W + N * assign_bits(km.K)
            desc = (_n_partitions(km.basis) + _n_partitions(lp.weight)
                    + (0 if km.data is None else _n_partitions(km.data))) * 8
            label = f"K={km.K}: {_bits_label(gb)} basis + {_bits_label(cb)} residuals" + (
                "" if km.data is None else f" on {int(km.data.T)}b data")
        elif cb is None:
            rel = per_filter * N * Mg * mac_cost(None, d)
            cstore = N * Mg * H * W * 32
            desc = 0
        else:
            costs = torch.tensor([mac_cost(int(c), d) for c in cb.reshape(-1).tolist()], dtype=torch.float64)
            rel = float(costs.sum()) * per_filter
            cstore = int(cb.sum()) * H * W
            desc = (1 if lp is None else _n_partitions(lp.weight)) * 8
        if km is None:
            label = _bits_label(cb)
        if lp is not None and lp.bias is not None:
            bstore, desc = N * lp.bias.T, desc + N * 8
        else:
            bstore = N * 32 if n.bias is not None else 0
        out.append(LayerCost(n.name, n.kind, N, Mg, H, W, P, groups, P * H * W * Mg * N,
                             label, "flp" if d is None else f"{d}b", rel / 1e6, cstore, bstore, desc))
    return NetworkCost(tuple(out))


def _n_partitions(f) -> int:
    n = 1
    for s in f.shape:
        n *= s
    return n

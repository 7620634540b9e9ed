"""Integer rules of the element-wise ops of mobile CNNs (DESIGN.md §5b): table-driven unary
functions, the product of two quantized tensors, channel shuffle. One definition here is
what the engine, both simulation precisions, the C emitter and the QDQ exporter execute.

Notation: input codes ``q`` of a ``Tin``-bit word (:class:`fixq.formats.Word`) at ``Fin``
fractional bits, ``[qmin, qmax]`` their range; output word ``Tout`` at ``Fout``; rounding
is the plan's (``half_up``, ``nearest_even`` or ``floor``); ``sat`` saturates to Tout bits.

- Table function f (sigmoid, hardsigmoid, hardswish, SiLU, tanh, GELU, ...), defined for
  ``Tin <= MAX_TABLE_BITS``: ``table[q - qmin] = sat_Tout(round(f(q * 2**-Fin) * 2**Fout))``
  for every input code, computed once in float64 when the integer tables are built; the
  program then does ``y = table[q - qmin]``. With per-channel data each distinct
  ``(Fin, Fout)`` pair gets one table and every channel an index into them. The only error
  is the output rounding (and saturation) of the exact float function.
- Multiply (either operand may be (C, 1, 1), broadcast over H, W):
  ``y = sat_Tout(round_shift(qa * qb, Fa + Fb - Fout))``; the product is exact in int64 and
  in float64 (``max_code(Ta) * max_code(Tb) < 2**53`` is proved at plan time).
- Channel shuffle with g groups: output channel ``i * g + j`` is input channel
  ``j * C/g + i``; codes and formats move with their channel (exact).

>>> import torch
>>> from fixq.formats import Word
>>> t = unary_table("hardsigmoid", None, Word(4), 2, Word(4, signed=False), 4, "half_up")
>>> t.codes.tolist()
[5, 5, 6, 6, 6, 7, 7, 7, 8, 8, 8, 9, 9, 9, 10, 10]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import code_limits, per_channel, round_shift, round_values, saturate
from .ir import UNARY_FUNCS, ChannelShuffle, Graph, Mul, Table, shuffle_perm
from .plan import Formats, PlanError
from .safety import F64_EXACT_BITS, max_code, prove_op

__all__ = ["MAX_TABLE_BITS", "UnaryTable", "TableInts", "unary_table", "compile_table", "table_ready",
           "table_refusal", "prove_elementwise", "ENGINE_ELEMENTWISE", "SIM_ELEMENTWISE", "mul_shift"]

MAX_TABLE_BITS = 10


@dataclass(frozen=True)
class UnaryTable:
    """One table: ``codes[k]`` is the output code of input code ``qmin + k``; ``sat[k]``
    whether that entry saturated (counted as a data event when looked up)."""
    codes: torch.Tensor  # int64 (2**Tin,)
    sat: torch.Tensor    # bool (2**Tin,)


def unary_table(op: str, alpha, Tin, Fin: int, Tout, Fout: int, rounding: str) -> UnaryTable:
    """The table of ``UNARY_FUNCS[op]`` from input format ``(Tin, Fin)`` to ``(Tout, Fout)``."""
    lo, hi = code_limits(Tin)
    x = torch.arange(lo, hi + 1, dtype=torch.float64) * 2.0 ** -int(Fin)  # exact
    v = round_values(UNARY_FUNCS[op](x, alpha) * 2.0 ** int(Fout), rounding)
    q, _ = saturate(v, Tout)
    return UnaryTable(q.long(), q != v)


@dataclass(frozen=True)
class TableInts:
    """The tables of one Table node: ``tables[index[c]]`` serves channel c."""
    tables: torch.Tensor  # int64 (K, 2**Tin)
    sat: torch.Tensor     # bool (K, 2**Tin)
    index: torch.Tensor   # int64 (C,)
    qmin: int
    Tin: int
    Tout: int
    Fin: torch.Tensor     # int64 (C,)
    Fout: torch.Tensor    # int64 (C,)

    def lookup(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer codes (N, C, ...) -> (output codes, saturation events)."""
        size = self.tables.shape[1]
        base = (self.index * size).reshape(1, -1, *([1] * (q.dim() - 2))).to(q.device)
        g = base + (q - self.qmin)
        return self.tables.to(q.device).reshape(-1)[g], self.sat.to(q.device).reshape(-1)[g].sum()


def table_ready(n: Table, fmts, tensors) -> bool:
    """Whether a Table node has an integer rule under this plan: fixed-point input of at
    most MAX_TABLE_BITS bits and a power-of-two output format."""
    Tin, Fin = fmts.get(n.inputs[0], (None, None))
    return Fin is not None and isinstance(tensors.get(n.name), Formats) and int(Tin) <= MAX_TABLE_BITS


def table_refusal(n: Table, fmts, tensors) -> str:
    """Why a Table node has no integer rule under this plan, and the fix."""
    Tin, Fin = fmts.get(n.inputs[0], (None, None))
    if Fin is None or not isinstance(tensors.get(n.name), Formats):
        return (f"node '{n.name}' ({n.op}) keeps its input or output in floating point (or affine formats): its "
                "integer rule is a lookup table between two fixed-point data formats; give both data bits")
    return (f"node '{n.name}' ({n.op}) has a {int(Tin)}-bit input: its integer rule is a 2^T-entry lookup table, "
            f"defined for inputs of at most {MAX_TABLE_BITS} bits; quantize the data into it with <= "
            f"{MAX_TABLE_BITS} bits (e.g. --data-bits 8, or a per-layer override on '{n.inputs[0]}')")


def compile_table(n: Table, fmts, C: int, rounding: str) -> TableInts:
    Tin, Fin = fmts[n.inputs[0]]
    Tout, Fout = fmts[n.name]
    Fin, Fout = per_channel(Fin, C), per_channel(Fout, C)
    pairs, index, tabs = {}, [], []
    for a, b in zip(Fin.tolist(), Fout.tolist()):
        if (a, b) not in pairs:
            pairs[(a, b)] = len(pairs)
            tabs.append(unary_table(n.op, n.alpha, Tin, a, Tout, b, rounding))
        index.append(pairs[(a, b)])
    return TableInts(torch.stack([t.codes for t in tabs]), torch.stack([t.sat for t in tabs]),
                     torch.tensor(index, dtype=torch.int64), code_limits(Tin)[0], Tin, Tout, Fin, Fout)


def mul_shift(fmts, n: Mul, C: int) -> torch.Tensor:
    """Per-channel right shift ``Fa + Fb - Fout`` of a product."""
    Fa, Fb = (per_channel(fmts[i][1], C) for i in n.inputs)
    return Fa + Fb - per_channel(fmts[n.name][1], C)


def prove_elementwise(graph: Graph, fmts) -> None:
    """DESIGN §5a for multiply (product, shift, left-shifted product) from the formats."""
    for n in graph.nodes:
        if not isinstance(n, Mul) or fmts.get(n.name, (None, None))[1] is None or \
                any(fmts[i][1] is None for i in n.inputs):
            continue
        C = graph.shapes[n.name][0]
        prod = max_code(fmts[n.inputs[0]][0]) * max_code(fmts[n.inputs[1]][0])
        if prod >= 2 ** F64_EXACT_BITS:
            raise PlanError(f"node '{n.name}' (multiply): the product of its {int(fmts[n.inputs[0]][0])}-bit and "
                            f"{int(fmts[n.inputs[1]][0])}-bit inputs can reach 2^53, beyond exact float64 and the "
                            "proved int64 range; use fewer data bits")
        prove_op(n.name, [(prod, torch.zeros(1, dtype=torch.int64))], mul_shift(fmts, n, C))


# ---- integer engine -----------------------------------------------------------------
def _bcv(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(1, -1, *([1] * (like.dim() - 2))).to(like.device)


def _eng_table(eng, n: Table, x):
    ti = eng.tables[n.name]
    y, ev = ti.lookup(x)
    eng.count(n.name, "data", ev)
    return y


def _eng_mul(eng, n: Mul, a, b):
    p = a * b
    y, ev = saturate(round_shift(p, _bcv(mul_shift(eng.fmts, n, p.shape[1]), p), eng.rounding), eng.fmts[n.name][0])
    eng.count(n.name, "data", ev)
    return y


def _shuffle(n: ChannelShuffle, x):
    return x[:, shuffle_perm(x.shape[1], n.groups).to(x.device)]


ENGINE_ELEMENTWISE = {Table: _eng_table, Mul: _eng_mul, ChannelShuffle: lambda eng, n, x: _shuffle(n, x)}


# ---- simulation (float64 exact / float32 fast): the same tables, on values -------------
def _sim_table(sim, n: Table, x):
    ti = sim.elementwise_tables.get(n.name)
    if ti is None:  # no integer rule under this plan: float between quantizers (plan.float_ops)
        return sim.requant(n.name, n.fn(x))
    key = ("table", n.name, x.dtype, x.device)
    if key not in sim._prep:
        vals = torch.empty(ti.tables.shape, dtype=torch.float64)
        for k in range(ti.tables.shape[0]):  # each table's values at its channels' Fout
            c = int((ti.index == k).nonzero()[0])
            vals[k] = ti.tables[k].double() * 2.0 ** -int(ti.Fout[c])
        sim._prep[key] = (torch.pow(2.0, ti.Fin.double()).to(x.dtype), vals.to(device=x.device, dtype=x.dtype))
    up, vals = sim._prep[key]
    q = torch.round(x * _bcv(up, x)).long()  # x is on its grid: exact
    size = ti.tables.shape[1]
    g = _bcv(ti.index * size, q) + (q - ti.qmin)
    vflat = vals.reshape(-1)
    sim.count(n.name, "data", ti.sat.to(x.device).reshape(-1)[g].sum())
    return vflat[g]


def _sim_mul(sim, n: Mul, a, b):
    return sim.requant(n.name, a * b)


SIM_ELEMENTWISE = {Table: _sim_table, Mul: _sim_mul, ChannelShuffle: lambda sim, n, x: _shuffle(n, x)}

"""Integer rules of the element-wise ops of mobile CNNs (DESIGN.md §5b): table-driven unary
functions, the product of two quantized tensors, channel shuffle. One definition here is
what the engine, both simulation precisions, the C emitter and the QDQ exporter execute.

Notation: input codes ``q`` of a ``Tin``-bit word (:class:`fixq.numerics.formats.Word`) at ``Fin``
fractional bits, ``[qmin, qmax]`` their range; output word ``Tout`` at ``Fout``; rounding
is the plan's (``half_up``, ``nearest_even`` or ``floor``); ``sat`` saturates to Tout bits.

- Table function f (sigmoid, hardsigmoid, hardswish, SiLU, tanh, GELU, ...), defined for
  ``Tin <= MAX_SEGMENTED_BITS``: ``table[q - qmin] = sat_Tout(round(f(q * 2**-Fin) * 2**Fout))``
  for every input code, computed once in float64 when the integer tables are built. For
  ``Tin <= MAX_TABLE_BITS`` the program does ``y = table[q - qmin]`` (dense form). Wider
  inputs use the segmented form, a lossless encoding of the same table: segments ``i`` with
  a first input code ``start[i]`` (ascending), the code ``code[i]`` there, an int8 ``step[i]``,
  a shift ``k[i]`` and a saturation flag; ``y = code[i] + step[i] * ((q - start[i]) >> k[i])``
  for the last segment with ``start[i] <= q``. Segments are the runs of equal (code, flag) of
  the table, except that consecutive runs of one length ``2**k`` whose codes advance by one
  constant step merge into one (stretches of slope ``step / 2**k`` codes per input code,
  such as identity-like ones); :func:`compile_table` checks the expansion against the table
  on every input code. With per-channel data each distinct ``(Fin, Fout)`` pair gets one
  table and every channel an index into them. The only error is the output rounding (and
  saturation) of the exact float function.
- Multiply (either operand may be (C, 1, 1), broadcast over H, W):
  ``y = sat_Tout(round_shift(qa * qb, Fa + Fb - Fout))``; the product is exact in int64 and
  in float64 (``max_code(Ta) * max_code(Tb) < 2**53`` is proved at plan time).
- Channel shuffle with g groups: output channel ``i * g + j`` is input channel
  ``j * C/g + i``; codes and formats move with their channel (exact).

>>> import torch
>>> from fixq.numerics.formats import Word
>>> t = unary_table("hardsigmoid", None, Word(4), 2, Word(4, signed=False), 4, "half_up")
>>> t.codes.tolist()
[3, 3, 4, 5, 5, 6, 7, 7, 8, 9, 9, 10, 11, 11, 12, 13]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fixq.graph.ir import UNARY_FUNCS, ChannelShuffle, Graph, Mul, Table, shuffle_perm
from fixq.numerics.formats import code_limits, per_channel, round_shift, round_values, saturate
from .plan import Formats, PlanError
from .safety import F64_EXACT_BITS, max_code, prove_op

__all__ = ["MAX_TABLE_BITS", "MAX_SEGMENTED_BITS", "STEP_LIMIT", "UnaryTable", "Segments", "TableInts",
           "unary_table", "segment_table", "compile_table", "table_ready", "table_refusal", "prove_elementwise",
           "ENGINE_ELEMENTWISE", "SIM_ELEMENTWISE", "mul_shift"]

MAX_TABLE_BITS = 10       # dense tables (2**Tin entries) up to here
MAX_SEGMENTED_BITS = 16   # segmented above: float64 over <= 2**16 codes at plan time; C starts are uint16
STEP_LIMIT = 127          # |step| of a segment: stored as int8


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
class Segments:
    """The segmented form of K tables of one node, concatenated: table k is segments
    ``offset[k] .. offset[k+1]-1``; segment i covers input codes ``start[i]`` up to the next
    start (or the end of the code range), where ``y = code[i] + step[i] * ((q - start[i]) >> shift[i])``
    and every entry saturated iff ``sat[i]``."""
    start: torch.Tensor   # int64 (S,) input codes, ascending within a table (the first is qmin)
    code: torch.Tensor    # int64 (S,)
    step: torch.Tensor    # int64 (S,), |step| <= STEP_LIMIT
    shift: torch.Tensor   # int64 (S,), 0 <= shift <= Tin
    sat: torch.Tensor     # bool (S,)
    offset: torch.Tensor  # int64 (K + 1,)


def segment_table(t: UnaryTable, qmin: int) -> tuple[torch.Tensor, ...]:
    """``(start, code, step, shift, sat)`` of one dense table whose entry k is input code ``qmin + k``.

    >>> from fixq.numerics.formats import Word
    >>> t = unary_table("hardswish", None, Word(12), 4, Word(12), 4, "half_up")
    >>> start, code, step, shift, sat = segment_table(t, -2048)
    >>> (len(start), start[-1].item(), code[-1].item(), step[-1].item(), shift[-1].item())  # x >= 3: y = x
    (29, 48, 48, 1, 0)
    """
    codes, flags = t.codes, t.sat
    n = codes.numel()
    new = torch.ones(n, dtype=torch.bool)
    new[1:] = (codes[1:] != codes[:-1]) | (flags[1:] != flags[:-1])
    r = new.nonzero().flatten()  # runs of equal (code, flag)
    length = torch.diff(r, append=torch.tensor([n]))
    c, f = codes[r], flags[r]
    e = torch.zeros_like(c)
    e[1:] = c[1:] - c[:-1]
    # run j may extend the segment of run j-1: the same power-of-two length, the same flag, an int8 step
    link = torch.zeros_like(f)
    link[1:] = (length[1:] == length[:-1]) & ((length[1:] & (length[1:] - 1)) == 0) & (f[1:] == f[:-1]) & \
        (e[1:].abs() <= STEP_LIMIT)
    first = ~link  # run j starts a segment unless it links and keeps the step of the link before it
    first[1:] |= link[:-1] & (e[1:] != e[:-1])
    a = first.nonzero().flatten()
    step, shift = torch.zeros_like(a), torch.zeros_like(a)
    inner = a + 1 < len(r)
    inner[inner.clone()] = ~first[a[inner] + 1]  # the segment holds more than its first run
    step[inner] = e[a[inner] + 1]
    shift[inner] = torch.log2(length[a[inner]].double()).round().long()  # every run of it: 2**shift codes
    return r[a] + qmin, c[a], step, shift, f[a]


@dataclass(frozen=True)
class TableInts:
    """The tables of one Table node: ``tables[index[c]]`` serves channel c (dense form,
    ``Tin <= MAX_TABLE_BITS``), or the segments ``seg`` (wider inputs; ``tables``, ``sat`` None)."""
    tables: torch.Tensor | None  # int64 (K, 2**Tin)
    sat: torch.Tensor | None     # bool (K, 2**Tin)
    index: torch.Tensor   # int64 (C,)
    qmin: int
    Tin: int
    Tout: int
    Fin: torch.Tensor     # int64 (C,)
    Fout: torch.Tensor    # int64 (C,)
    seg: Segments | None = None

    def lookup(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer codes (N, C, ...) -> (output codes, saturation events)."""
        if self.seg is not None:
            y, sat = self._seg_lookup(q)
            return y, sat.sum()
        size = self.tables.shape[1]
        base = (self.index * size).reshape(1, -1, *([1] * (q.dim() - 2))).to(q.device)
        g = base + (q - self.qmin)
        return self.tables.to(q.device).reshape(-1)[g], self.sat.to(q.device).reshape(-1)[g].sum()

    def _seg_lookup(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, size = self.seg, 2 ** int(self.Tin)
        owner = torch.repeat_interleave(torch.arange(len(s.offset) - 1), torch.diff(s.offset))
        keys = (owner * size + (s.start - self.qmin)).to(q.device)  # ascending over all K tables
        g = (self.index * size).reshape(1, -1, *([1] * (q.dim() - 2))).to(q.device) + (q - self.qmin)
        i = torch.searchsorted(keys, g.contiguous(), right=True) - 1  # the last segment starting at or before q
        code, step, start, shift, sat = (v.to(q.device) for v in (s.code, s.step, s.start, s.shift, s.sat))
        return code[i] + step[i] * torch.bitwise_right_shift(q - start[i], shift[i]), sat[i]

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tables, sat)`` (K, 2**Tin) of either form."""
        if self.seg is None:
            return self.tables, self.sat
        K, (lo, hi) = len(self.seg.offset) - 1, code_limits(self.Tin)
        q = torch.arange(lo, hi + 1, dtype=torch.int64).reshape(1, 1, -1).expand(1, K, -1)
        flat = TableInts(None, None, torch.arange(K), self.qmin, self.Tin, self.Tout, self.Fin, self.Fout, self.seg)
        codes, sat = flat._seg_lookup(q)
        return codes[0], sat[0]


def table_ready(n: Table, fmts, tensors) -> bool:
    """Whether a Table node has an integer rule under this plan: fixed-point input of at
    most MAX_SEGMENTED_BITS bits and a power-of-two output format."""
    Tin, Fin = fmts.get(n.inputs[0], (None, None))
    return Fin is not None and isinstance(tensors.get(n.name), Formats) and int(Tin) <= MAX_SEGMENTED_BITS


def table_refusal(n: Table, fmts, tensors) -> str:
    """Why a Table node has no integer rule under this plan, and the fix."""
    Tin, Fin = fmts.get(n.inputs[0], (None, None))
    if Fin is None or not isinstance(tensors.get(n.name), Formats):
        return (f"node '{n.name}' ({n.op}) keeps its input or output in floating point (or affine formats): its "
                "integer rule is a lookup table between two fixed-point data formats; give both data bits")
    return (f"node '{n.name}' ({n.op}) has a {int(Tin)}-bit input: its integer rule is a lookup table over every "
            f"input code (dense up to {MAX_TABLE_BITS} bits, segmented up to {MAX_SEGMENTED_BITS}), defined for "
            f"inputs of at most {MAX_SEGMENTED_BITS} bits; quantize the data into it with <= {MAX_SEGMENTED_BITS} "
            f"bits (e.g. --data-bits 16, or a per-layer override on '{n.inputs[0]}')")


def compile_table(n: Table, fmts, C: int, rounding: str) -> TableInts:
    """The integer rule of Table node ``n`` with ``C`` channels: dense tables for inputs of at
    most MAX_TABLE_BITS bits, else their segments (checked equal on every input code)."""
    Tin, Fin = fmts[n.inputs[0]]
    Tout, Fout = fmts[n.name]
    Fin, Fout = per_channel(Fin, C), per_channel(Fout, C)
    qmin = code_limits(Tin)[0]
    pairs, index, tabs = {}, [], []
    for a, b in zip(Fin.tolist(), Fout.tolist()):
        if (a, b) not in pairs:
            pairs[(a, b)] = len(pairs)
            tabs.append(unary_table(n.op, n.alpha, Tin, a, Tout, b, rounding))
        index.append(pairs[(a, b)])
    index = torch.tensor(index, dtype=torch.int64)
    if int(Tin) <= MAX_TABLE_BITS:
        return TableInts(torch.stack([t.codes for t in tabs]), torch.stack([t.sat for t in tabs]),
                         index, qmin, Tin, Tout, Fin, Fout)
    parts = [segment_table(t, qmin) for t in tabs]
    offset = torch.tensor([0] + [len(p[0]) for p in parts], dtype=torch.int64).cumsum(0)
    seg = Segments(*(torch.cat([p[j] for p in parts]) for j in range(5)), offset)
    ti = TableInts(None, None, index, qmin, Tin, Tout, Fin, Fout, seg)
    codes, sat = ti.dense()  # lossless by construction; checked on every input code
    if not (torch.equal(codes, torch.stack([t.codes for t in tabs]))
            and torch.equal(sat, torch.stack([t.sat for t in tabs]))):
        raise PlanError(f"node '{n.name}' ({n.op}): the segmented table differs from the dense one (a fixq bug)")
    return ti


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
    if ti.seg is not None:  # segmented: the engine's lookup on the codes (exact in float32 when Tout <= 24)
        if key not in sim._prep:
            sim._prep[key] = tuple(torch.pow(2.0, s * F.double()).to(x.dtype) for s, F in ((1, ti.Fin), (-1, ti.Fout)))
        up, down = sim._prep[key]
        y, ev = ti.lookup(torch.round(x * _bcv(up, x)).long())
        sim.count(n.name, "data", ev)
        return y.to(x.dtype) * _bcv(down, x)
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

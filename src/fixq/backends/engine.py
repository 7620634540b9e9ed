"""The integer engine: graph + plan interpreted with integers only (DESIGN.md §5). This is
fixq's executable specification; the float64 simulation and the generated C are tested
against it bit for bit.

Notation: codes ``q`` (int64) at fractional bits ``F``; ``T`` data bits; ``Fw``/``Fx``
coefficient/input formats; ``S[i] = max_j Fw[i,j] + Fx[j]`` exact-sum format; ``A`` and
``Facc`` accumulator; ``round_shift(a, s)`` rounds right for s > 0, shifts left for s <= 0;
``sat_T`` saturates (or wraps) to T bits and counts events.

Conv/linear, per output channel i:
  1. ``sum = Σ_j (Σ_hw w_q[i,j] x_q[j]) << (S[i] - Fw[i,j] - Fx[j])``   (exact, wide);
     a K-means layer adds its basis map ``g[l(i)] << (S[i] - Sg[l(i)])`` (DESIGN §9); with
     ``<4b,4b>`` residuals the residual kernels read ``xr = sat_Tr(round_shift(x, Fx - Fxr))``
  2. ``acc = sat_A(round_shift(sum + round_shift(b_q, Fb - S), S - Facc))``
  3. fused activation: clamp at the bounds' codes at Facc
  4. ``y = sat_Ty(round_shift(acc, Facc - Fy))``
Matrix products run in float64 only when the checked bound ``max|a| max|b| K < 2**53``
makes every partial sum an exact integer; otherwise in int64, where every shift table is in
[-62, 62] and the worst-case sum is proved below 2**62 when the tables are built
(:mod:`fixq.planning.safety`, DESIGN §5a): a plan that cannot be proved is refused, naming the layer.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as Fn

from fixq.graph.ir import (AdaptiveAvgPool, Add, AvgPool, Clamp, Concat, Conv, Flatten, FloatOp, Graph, Input, Linear,
                           MaxPool, Pad, Slice, Table)
from fixq.numerics.formats import bound_codes, quantize_codes, round_div, round_shift, saturate
from fixq.planning.elementwise import ENGINE_ELEMENTWISE, table_ready, table_refusal
from fixq.planning.partitions import propagate_formats
from fixq.planning.plan import QuantPlan
from .pooling import adaptive_windows, pool_divisors
from .exact_sums import EngineError, bc, product_sum, windows
from .lowering import BasisInts, LayerInts, check_plan, compile_layer, lower  # noqa: F401 (named here too)

__all__ = ["Engine", "EngineError", "ENGINE_RULES", "LayerInts", "BasisInts", "compile_layer",
           "exact_sum", "residual_input", "layer_forward", "check_plan", "clamp_codes"]
# LayerInts, BasisInts, compile_layer, check_plan: defined in fixq.backends.lowering (the one
# lowering every backend consumes), named here too for the engine's readers


class Engine:
    """Run a graph + plan on integer codes.

    >>> eng = Engine(graph, plan)                     # doctest: +SKIP
    >>> codes = eng.run(eng.quantize_input(images))   # int64 output codes
    >>> eng.dequantize(codes)                         # == Simulator(graph, plan, exact=True)(images)
    """

    def __init__(self, graph: Graph, plan: QuantPlan):
        if plan.is_affine:
            raise EngineError("the plan uses affine (TensorFlow-style) formats: not powers of two, so the integer "
                              "engine and the C export cannot run it; use maxabs, percentile:P or mse")
        for n in graph.nodes:
            if isinstance(n, FloatOp):
                raise EngineError(f"node '{n.name}' ({n.op}) has no integer rule in fixq: the integer engine and the "
                                  "C export cannot run it (the simulation runs it in float between quantizers). "
                                  "Replace the op with one fixq has an integer rule for (README 'Supported ops'), or "
                                  "cut the model before it and run it yourself on the exported output", hint="")
            if isinstance(n, (Conv, Linear)) and (plan.layers.get(n.name) is None or plan.layers[n.name].acc_F is None):
                raise EngineError(f"layer '{n.name}' keeps coefficients or data in floating point (flp): the "
                                  "integer engine needs fixed-point formats for every tensor")
        if graph.input not in plan.tensors:
            raise EngineError("the plan keeps the input in floating point: the integer engine needs data bits")
        self.graph, self.plan, self.rounding = graph, plan, plan.rounding
        fmts = propagate_formats(graph, plan.tensors)
        for n in graph.nodes:
            if isinstance(n, Table) and not table_ready(n, fmts, plan.tensors):
                raise EngineError(table_refusal(n, fmts, plan.tensors), hint="")
        self.program = lower(graph, plan, fmts=fmts)  # every table compiled and proved once (fixq.backends.lowering)
        self.fmts = self.program.fmts
        self.layers = self.program.layers
        for n in graph.layers():
            if n.name not in self.layers:  # defensive: the checks above leave no such layer today
                raise EngineError(f"layer '{n.name}' reads or writes floating-point (flp) data in this plan: the "
                                  "integer engine needs fixed-point formats for every tensor")
        self.tables = self.program.tables
        self._sat: dict[str, dict[str, int]] = {}

    # -- helpers ---------------------------------------------------------------------
    def count(self, name: str, what: str, events) -> None:
        d = self._sat.setdefault(name, {})
        d[what] = d.get(what, 0) + int(events)

    def saturations(self) -> dict[str, dict[str, int]]:
        return {k: {w: c for w, c in d.items()} for k, d in self._sat.items()}

    def reset_counts(self) -> None:
        self._sat.clear()

    def F(self, name: str) -> torch.Tensor:
        return self.fmts[name][1]

    def requant(self, name: str, q: torch.Tensor, F_in: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """``sat_T(round_shift(q, F_in - Fy))`` into ``name``'s format; ``inplace``: q may be reused."""
        T, Fy = self.fmts[name]
        y, ev = saturate(round_shift(q, bc(F_in - Fy, q), self.rounding, inplace), T)
        self.count(name, "data", ev)
        return y

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Float images to input codes, exactly as the simulation does (counted)."""
        T, F = self.fmts[self.graph.input]
        q, ev = quantize_codes(x.double().cpu(), bc(F, x), T, self.rounding)
        self.count(self.graph.input, "data", ev)
        return q.long()

    def dequantize(self, q: torch.Tensor, name: str | None = None) -> torch.Tensor:
        F = self.F(name or self.graph.output)
        return q.double() * torch.pow(2.0, -bc(F, q).double())

    # -- running ---------------------------------------------------------------------
    @torch.no_grad()
    def run(self, q: torch.Tensor, keep: bool = False):
        env = {self.graph.input: q.long()}
        for n in self.graph.nodes:
            if isinstance(n, Input):
                continue
            env[n.name] = ENGINE_RULES[type(n)](self, n, *(env[i] for i in n.inputs))
        return env if keep else env[self.graph.output]


def _eng_layer(eng: Engine, n, x):
    return layer_forward(eng.layers[n.name], n, x, eng.rounding, lambda what, ev: eng.count(n.name, what, ev))


def residual_input(L: LayerInts, x: torch.Tensor, rounding: str, count=lambda what, ev: None) -> torch.Tensor:
    """What the (residual) kernels read: ``x``, or for ``<4b,4b>`` K-means residuals
    ``xr = sat_Tr(round_shift(x, Fx - Fxr))`` (saturations counted as the layer's data)."""
    if L.rdata is None:
        return x
    sh, Tr = L.rdata
    xr, ev = saturate(round_shift(x, bc(sh, x), rounding), Tr)
    count("data", ev)
    return xr


def exact_sum(L: LayerInts, n, x: torch.Tensor, xr: torch.Tensor | None = None) -> torch.Tensor:
    """Step 1 of a conv/linear: the exact wide sum at S, bias included. A K-means layer
    adds its shared basis maps: ``sum_i += basis[l(i)] << (S[i] - Sg[l(i)])``; its
    residual kernels read ``xr`` (:func:`residual_input`; default ``x``)."""
    s = product_sum(L.w, L.wshift, n, x if xr is None else xr)
    if L.basis is not None:
        b = product_sum(L.basis.w, L.basis.wshift, n, x)[:, L.basis.assign]
        s = s + (b << bc(L.basis.align, b))
    return s.add_(bc(L.bias, s))


def layer_forward(L: LayerInts, n, x: torch.Tensor, rounding: str, count=lambda what, ev: None) -> torch.Tensor:
    """Steps 1-4 of a conv/linear on integer codes (see the module docstring)."""
    s = exact_sum(L, n, x, residual_input(L, x, rounding, count))  # a new tensor: updated in place below
    acc = round_shift(s, bc(L.acc_shift, s), rounding, inplace=True)
    acc, ev = saturate(acc, L.A, L.overflow)
    count("acc", ev)
    if L.lo is not None or L.hi is not None:
        acc = clamp_codes(acc, L.lo, L.hi, inplace=True)
    y, ev = saturate(round_shift(acc, bc(L.out_shift, acc), rounding, inplace=True), L.Ty)
    count("data", ev)
    return y


def _eng_add(eng: Engine, n: Add, a, b):
    Fa, Fb = eng.F(n.inputs[0]), eng.F(n.inputs[1])
    Fm = torch.maximum(Fa, Fb)
    sa, sb = Fm - Fa, Fm - Fb
    s = (a << bc(sa, a) if bool(sa.any()) else a) + (b << bc(sb, b) if bool(sb.any()) else b)  # a new tensor
    if n.act is not None:
        s = clamp_codes(s, *bound_codes(n.act, Fm, s.shape[1], eng.rounding), inplace=True)
    return eng.requant(n.name, s, Fm, inplace=True)


def _eng_concat(eng: Engine, n: Concat, *xs):
    T, Fy = eng.fmts[n.name]
    out, c0 = [], 0
    for i, x in zip(n.inputs, xs):
        c = x.shape[1]
        F_out = Fy if Fy.dim() == 0 else Fy[c0:c0 + c]
        y, ev = saturate(round_shift(x, bc(eng.F(i) - F_out, x), eng.rounding), T)
        eng.count(n.name, "data", ev)
        out.append(y)
        c0 += c
    return torch.cat(out, dim=1)


def _eng_avg(eng: Engine, n, x):
    Fx, (T, Fy) = eng.F(n.inputs[0]), eng.fmts[n.name]
    if isinstance(n, AdaptiveAvgPool):
        wh = adaptive_windows(x.shape[2], n.output_size[0])
        ww = adaptive_windows(x.shape[3], n.output_size[1])
        s = torch.stack([torch.stack([x[:, :, a:b, c:d].sum(dim=(2, 3)) for c, d in ww], -1) for a, b in wh], -2)
    else:
        s = windows(x, n.kernel, n.stride, n.padding, (1, 1), 0, n.ceil_mode).sum(dim=(4, 5))
    K = pool_divisors(n, tuple(x.shape[2:]))
    sh = bc(Fy - Fx, s)
    num = s << torch.clamp(sh, min=0)
    den = K << torch.clamp(-sh, min=0)
    y, ev = saturate(round_div(num, den, eng.rounding), T)
    eng.count(n.name, "data", ev)
    return y


def _eng_maxpool(eng: Engine, n: MaxPool, x):
    fill = -(2 ** 62)
    return windows(x, n.kernel, n.stride, n.padding, n.dilation, fill, n.ceil_mode).amax(dim=(4, 5))


def _eng_clamp(eng: Engine, n: Clamp, x):
    return clamp_codes(x, *bound_codes((n.lo, n.hi), eng.F(n.inputs[0]), x.shape[1], eng.rounding))


def clamp_codes(t: torch.Tensor, lo, hi, inplace: bool = False) -> torch.Tensor:
    """Clamp codes to per-channel bounds ``lo``/``hi`` (tensors or None); a bound equal on
    every channel is applied as one number (a faster kernel, same values)."""
    lo, hi = (None if v is None or v.numel() == 0 else v for v in (lo, hi))
    if lo is None and hi is None:
        return t
    if all(v is None or bool((v == v.reshape(-1)[0]).all()) for v in (lo, hi)):  # torch.clamp: numbers or
        lo, hi = (None if v is None else int(v.reshape(-1)[0]) for v in (lo, hi))  # tensors, not one of each
    else:
        lo, hi = (None if v is None else bc(v, t) for v in (lo, hi))
    return t.clamp_(min=lo, max=hi) if inplace else torch.clamp(t, min=lo, max=hi)


ENGINE_RULES: dict[type, Callable] = {
    Conv: _eng_layer,
    Linear: _eng_layer,
    Add: _eng_add,
    Concat: _eng_concat,
    AvgPool: _eng_avg,
    AdaptiveAvgPool: _eng_avg,
    MaxPool: _eng_maxpool,
    Clamp: _eng_clamp,
    Pad: lambda eng, n, x: Fn.pad(x, n.pads),
    Slice: lambda eng, n, x: x[tuple(slice(*s) for s in n.index)],
    Flatten: lambda eng, n, x: x.reshape(x.shape[0], -1),
    **ENGINE_ELEMENTWISE,  # table functions, multiply, channel shuffle (DESIGN §5b)
}

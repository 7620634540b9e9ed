"""The one lowering: ``(graph, plan)`` -> an integer program, built once (DESIGN.md §5, §5a).

Notation (as :mod:`fixq.backends.engine`): codes ``q`` at fractional bits ``F``; ``Fw``/``Fx``
coefficient/input formats; ``S[i] = max_j Fw[i,j] + Fx[j]`` exact-sum format; ``A``/``Facc``
accumulator; ``Fy`` output format; shifts round (``round_shift``) with the plan's rounding and
results saturate to ``T`` bits (``sat_T``).

:func:`lower` propagates the data formats, compiles every conv/linear layer with integer
formats into its tables (:class:`LayerInts`: codes, shift tables, aligned biases, clamp bounds,
accumulator and output formats) and every table op into its integer table, and proves the
numeric-safety rules (DESIGN §5a: :mod:`fixq.planning.safety`) while doing so: a plan that cannot
be proved is refused here, naming the layer, before any backend runs. The integer engine, the
float32/float64 simulations, the C emitter (through the engine) and the QDQ ONNX exporter all
consume the :class:`Program`; none compiles a layer on its own. :meth:`Program.with_layer`
re-lowers one layer (a plan that differs only there: learned rounding, searches).

>>> prog = lower(graph, plan)                                   # doctest: +SKIP
>>> [s.node.name for s in prog.steps][:2], prog.layers["conv1"].S  # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import torch

from fixq.graph.ir import AdaptiveAvgPool, Add, AvgPool, Concat, Conv, Graph, Input, Linear, Table
from fixq.numerics.formats import bound_codes, per_channel, round_shift_int
from fixq.planning.coeffs import basis_grid, bias_codes, layer_codes
from fixq.planning.elementwise import compile_table, prove_elementwise, table_ready
from fixq.planning.partitions import filter_formats, layer_sum_format, propagate_formats
from fixq.planning.plan import PlanError, QuantPlan
from fixq.planning.safety import check_headroom, check_shift, max_code, prove_layer, prove_op
from .pooling import pool_divisors

__all__ = ["Program", "Step", "lower", "lower_layer", "LayerInts", "BasisInts", "compile_layer", "check_plan", "prove_ops"]


@dataclass(frozen=True)
class LayerInts:
    """Integer tables of one conv/linear layer: what the engine and the C code execute."""

    w: torch.Tensor          # int64 (N, Mg, kh, kw) codes at Fw
    wshift: torch.Tensor     # int64 (N, Mg): S - Fw - Fx >= 0
    bias: torch.Tensor       # int64 (N,): bias codes aligned to S
    acc_shift: torch.Tensor  # int64 (N,): S - Facc >= 0
    A: int
    overflow: str
    lo: torch.Tensor | None  # int64 (N,) activation bounds at Facc
    hi: torch.Tensor | None
    out_shift: torch.Tensor  # int64 (N,): Facc - Fy
    Ty: int
    S: torch.Tensor
    Facc: torch.Tensor
    Fy: torch.Tensor
    basis: "BasisInts | None" = None
    bound: float = 0.0       # proved worst-case max_i |sum_i| at S (DESIGN §5a), < 2**62
    rdata: "tuple | None" = None  # <4b,4b> K-means: (shift Fx - Fxr per input channel, word Tr)


@dataclass(frozen=True)
class BasisInts:
    """K-means basis kernels of a layer (DESIGN §9): ``Sg[k] = max_j Fg[k,j] + Fx[j]``."""

    w: torch.Tensor          # int64 (K, Mg, kh, kw) codes at Fg
    wshift: torch.Tensor     # int64 (K, Mg): Sg - Fg - Fx >= 0
    assign: torch.Tensor     # int64 (N,): l(i)
    align: torch.Tensor      # int64 (N,): S[i] - Sg[l(i)] >= 0


def compile_layer(n: Conv | Linear, plan: QuantPlan, fmts, rounding: str) -> LayerInts:
    lp = plan.layers[n.name]
    groups = n.groups if isinstance(n, Conv) else 1
    w = n.weight.detach().double().cpu()
    w4 = w if w.dim() == 4 else w[:, :, None, None]
    N, Mg = w4.shape[:2]
    Tx, Fx = fmts[n.inputs[0]]
    km, basis, rdata = lp.kmeans, None, None
    Fxr = Fx if km is None else km.residual_F(Fx)  # <4b,4b>: the residuals read their own data format
    Fw2, Fxg = filter_formats(lp.weight.F_tensor(), Fxr, w4.shape, groups)  # residual formats for K-means
    S = layer_sum_format(lp, Fx, w4.shape, groups)
    wq = layer_codes(n, lp, rounding).reshape(w4.shape)  # the one place codes come from (fixq.planning.coeffs)
    if km is not None:
        Fg = basis_grid(km, Mg)
        Fxb = filter_formats(Fg, Fx, (km.K, Mg), 1)[1]  # groups == 1: every kernel reads every input channel
        if km.data is not None:
            rsh = per_channel(Fx, Mg) - per_channel(Fxr, Mg)
            check_shift(f"layer '{n.name}'", "residual data requantization (Fx - Fxr)", rsh)
            rdata = (rsh, km.data.word)
        Sg = (Fg + Fxb).amax(dim=1)
        a = km.assign_tensor()
        basis = BasisInts(km.basis_tensor(w4.shape[1:]), Sg[:, None] - Fg - Fxb, a, S - Sg[a])
    wshift = S[:, None] - Fw2 - Fxg
    check_shift(f"layer '{n.name}'", "weight (S - Fw - Fx)", wshift, 0)
    bq = bias_codes(n, lp, rounding)
    if bq is not None:
        sh = (lp.bias.F_tensor() - S).tolist()  # exact in Python integers, any shift
        aligned = [round_shift_int(int(b), int(s), rounding) for b, s in zip(bq.long().tolist(), sh)]
        check_headroom(f"layer '{n.name}'", "bias aligned to S", float(max(abs(a) for a in aligned)),
                       "the bias is far above the range of its weights times the data; rescale or drop it")
        bias = torch.tensor(aligned, dtype=torch.int64)
    else:
        bias = torch.zeros(N, dtype=torch.int64)
    Facc = torch.tensor(lp.acc_F, dtype=torch.int64)
    Fy = per_channel(fmts[n.name][1], N)
    lo, hi = (None, None) if n.act is None else bound_codes(n.act, Facc, N, rounding)
    wq = wq.long()
    bsum = None if basis is None else (basis.w.abs().sum(dim=(2, 3)), basis.wshift, basis.assign, basis.align)
    if rdata is not None and max_code(rdata[1]) > max_code(Tx):  # |x|, |xr| <= the larger code: a valid bound
        Tx = rdata[1]
    bound = prove_layer(n.name, wq.abs().sum(dim=(2, 3)), wshift, Tx, bias, S - Facc, Facc - Fy, lp.acc_bits,
                        (lo, hi), bsum)
    return LayerInts(wq, wshift, bias, S - Facc, lp.acc_bits, lp.acc_overflow, lo, hi,
                     Facc - Fy, fmts[n.name][0], S, Facc, Fy, basis, bound, rdata)


def prove_ops(graph: Graph, fmts) -> None:
    """DESIGN §5a rules 2-3 for the ops other than conv/linear (add, concat, average pools),
    from the formats alone; nodes whose data are flp are skipped."""
    for n in graph.nodes:
        T, Fy = fmts.get(n.name, (None, None))
        if T is None or Fy is None or not isinstance(n, (Add, Concat, AvgPool, AdaptiveAvgPool)):
            continue
        ins = [fmts[i] for i in n.inputs]
        if any(t is None or f is None for t, f in ins):
            continue
        C = graph.shapes[n.name][0]
        if isinstance(n, Add):
            Fm = torch.maximum(per_channel(ins[0][1], C), per_channel(ins[1][1], C))
            prove_op(n.name, [(max_code(t), Fm - per_channel(f, C)) for t, f in ins], Fm - per_channel(Fy, C))
        elif isinstance(n, Concat):
            c0, Fv = 0, per_channel(Fy, C)
            for i, (t, f) in zip(n.inputs, ins):
                c = graph.shapes[i][0]
                prove_op(n.name, [(max_code(t), torch.zeros(1, dtype=torch.int64))], per_channel(f, c) - Fv[c0:c0 + c])
                c0 += c
        else:
            Tx, Fx = ins[0]
            K = int(pool_divisors(n, tuple(graph.shapes[n.inputs[0]][1:])).max())
            sh = per_channel(Fy, C) - per_channel(Fx, C)
            prove_op(n.name, [(K * max_code(Tx), sh.clamp(min=0))])  # numerator: window sum << (Fy - Fx)
            prove_op(n.name, [(K, (-sh).clamp(min=0))])              # divisor: K << (Fx - Fy)
    prove_elementwise(graph, fmts)


def check_plan(graph: Graph, plan: QuantPlan) -> dict[str, float]:
    """Prove DESIGN §5a for every integer layer and op of a plan (the plan-time refusal):
    returns each conv/linear's proved worst-case |sum|; raises PlanError naming the node."""
    return lower(graph, plan, keep=False, tables=False).bounds


@dataclass(frozen=True)
class Step:
    """One node of the program in graph order: ``ints`` its integer tables (:class:`LayerInts`
    for conv/linear, the table of a table op), None where the op's rule needs only the formats
    or the node has no integer form under this plan (flp data, affine formats, a float op)."""

    node: object
    ints: object = None


@dataclass(frozen=True)
class Program:
    """The lowered plan: data formats per tensor (``fmts``: name -> (T, F)), the steps, and
    each integer layer's proved worst-case |sum| (``bounds``). Lowered with ``keep=False``
    (the simulation, :func:`check_plan`), the steps hold no layer tables: each layer was
    compiled and proved, its bound kept, its tables dropped at once (memory)."""

    graph: Graph
    plan: QuantPlan
    fmts: dict
    steps: tuple[Step, ...]
    bounds: dict

    @cached_property
    def layers(self) -> dict:
        """name -> :class:`LayerInts` of every conv/linear layer with integer formats."""
        return {s.node.name: s.ints for s in self.steps if isinstance(s.node, (Conv, Linear)) and s.ints is not None}

    @cached_property
    def tables(self) -> dict:
        """name -> integer table of every table op the plan gives integer formats."""
        return {s.node.name: s.ints for s in self.steps if isinstance(s.node, Table) and s.ints is not None}

    def with_layer(self, plan: QuantPlan, name: str) -> "Program":
        """The program of ``plan``, which differs from this one's only in layer ``name``'s
        entry (decided codes, bits; same data formats): that layer alone is compiled and
        proved again; the other steps are reused."""
        if plan.tensors != self.plan.tensors:
            raise PlanError("Program.with_layer: the new plan has other data formats; lower it again")
        i = next((k for k, s in enumerate(self.steps) if s.node.name == name), None)
        if i is None or not isinstance(self.steps[i].node, (Conv, Linear)):
            raise KeyError(f"no conv/linear layer named {name!r} in the program")
        L = lower_layer(self.steps[i].node, plan, self.fmts)
        bounds = {k: v for k, v in self.bounds.items() if k != name}
        if L is not None:
            bounds[name] = L.bound
        steps = self.steps[:i] + (replace(self.steps[i], ints=L),) + self.steps[i + 1:]
        return Program(self.graph, plan, self.fmts, steps, bounds)


def _integer_layer(n, plan: QuantPlan, fmts) -> bool:
    lp = plan.layers.get(n.name)
    return (lp is not None and lp.acc_F is not None and fmts[n.inputs[0]][1] is not None
            and fmts[n.name][1] is not None)


def lower_layer(n, plan: QuantPlan, fmts) -> LayerInts | None:
    """:class:`LayerInts` of conv/linear ``n`` under ``plan`` (None where its coefficients or
    data are flp), proved (DESIGN §5a)."""
    return compile_layer(n, plan, fmts, plan.rounding) if _integer_layer(n, plan, fmts) else None


def lower(graph: Graph, plan: QuantPlan, keep: bool = True, tables: bool = True, fmts=None) -> Program:
    """Lower ``plan`` on ``graph`` (module docstring); raises PlanError naming the node when
    DESIGN §5a cannot be proved. Affine plans lower to formats only (no integer program).
    ``keep=False``: bounds only, no layer tables kept; ``tables=False``: table ops not
    compiled (a proof needs neither: :func:`check_plan`); ``fmts``: ``propagate_formats(graph,
    plan.tensors)`` when the caller has it already."""
    fmts = propagate_formats(graph, plan.tensors) if fmts is None else fmts
    steps, bounds = [], {}
    for n in graph.nodes:
        if isinstance(n, Input):
            continue
        ints = None
        if plan.is_affine:
            pass
        elif isinstance(n, (Conv, Linear)):
            ints = lower_layer(n, plan, fmts)
            if ints is not None:
                bounds[n.name] = ints.bound
                ints = ints if keep else None
        elif tables and isinstance(n, Table) and table_ready(n, fmts, plan.tensors):
            ints = compile_table(n, fmts, graph.shapes[n.name][0], plan.rounding)
        steps.append(Step(n, ints))
    if not plan.is_affine:
        prove_ops(graph, fmts)
    return Program(graph, plan, fmts, tuple(steps), bounds)

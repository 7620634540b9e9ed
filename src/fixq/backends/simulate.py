"""Fake-quant simulation of graph + plan (DESIGN.md §5-§6).

Notation: tensors hold real values ``q * 2**-F``; ``T``/``F`` data formats, ``Fw``
coefficients, ``Fb`` biases, ``S[i]`` exact-sum format, ``A``/``Facc`` accumulator,
rounding and saturation as in :mod:`fixq.numerics.formats`.

``exact=True`` computes in float64: every product and sum of integer multiples of
``2**-S`` is exact there, so the outputs equal the integer engine bit for bit. The fast
mode computes the same formulas in float32 (large sums may round differently).
"""
from __future__ import annotations

from typing import Callable

import torch

from fixq.graph.ir import (FLOAT_RULES, AdaptiveAvgPool, Add, AvgPool, Clamp, Concat, Conv, Flatten, FloatOp, Graph,
                           Input, Linear, MaxPool, Pad, Slice, apply_act, pre_activation)
from fixq.numerics.formats import bound_codes, exp2, fake_quantize, per_channel, round_values
from fixq.numerics.fused import fused_available, fused_fake_quantize
from fixq.numerics.fused_cpu import cpu_fused_available, cpu_fused_fake_quantize
from fixq.numerics.ranges import affine_quantize
from fixq.planning.coeffs import bias_codes, coeff_grid, layer_codes, layer_values
from fixq.planning.elementwise import SIM_ELEMENTWISE
from fixq.planning.partitions import filter_formats, layer_sum_format
from fixq.planning.plan import AffineFormats, Formats, PlanError, QuantPlan
from fixq.planning.safety import F64_EXACT_BITS, max_code
from .lowering import lower, lower_layer
from .pooling import pool_divisors, window_sum

__all__ = ["Simulator", "SIM_RULES"]

F32_EXACT_BITS = 24  # float32 holds every integer below 2**24 exactly


def _bc(F: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-channel vector (or 0-d) over an (N, C, ...) tensor."""
    if F.dim() == 0:
        return F
    return F.reshape(1, -1, *([1] * (like.dim() - 2)))


class Simulator:
    """Run the quantized model described by ``plan`` on float inputs.

    >>> sim = Simulator(graph, plan, exact=True)       # doctest: +SKIP
    >>> logits = sim(images)                           # dequantized outputs
    >>> sim.saturations()                              # per-layer saturation events
    """

    def __init__(self, graph: Graph, plan: QuantPlan, exact: bool = False,
                 device: str | torch.device = "cpu", fast_cpu: bool = False):
        self.graph, self.plan = graph, plan
        # fast mode on the CPU, for callers that run many passes (the plan searches): the compiled
        # one-pass quantizer (fixq.numerics.fused_cpu), and channels-last images and kernels where
        # that cannot change a float32 value (self.channels_last, set below)
        self.fast_cpu = fast_cpu and not exact and torch.device(device).type == "cpu"
        self.channels_last = False
        self.exact = exact
        self.dtype = torch.float64 if exact else torch.float32
        self.device = torch.device(device)
        if self.device.type == "cuda":  # TF32 would round products the simulation relies on
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        self.rounding = plan.rounding
        prog = lower(graph, plan, keep=False)  # the engine's lowering: same formats, refusals, bounds (DESIGN §5a)
        self.formats = prog.fmts
        self._sat: dict[str, dict[str, torch.Tensor]] = {}
        self._prep: dict[str, dict] = {}
        self._bounds = prog.bounds
        # channels-last sums in another order than the standard layout: used only when every data
        # tensor is fixed point of <= 8 bits (pool/add sums of codes are then exact in float32)
        # and, per conv, only where the proved bound keeps every partial sum exact (< 2**24 at S)
        self.channels_last = (self.fast_cpu and not plan.is_affine and not plan.float_ops
                              and all(T is not None and int(T) <= 8 for T, _ in self.formats.values()))
        for n in graph.nodes:
            if isinstance(n, (Conv, Linear)):
                self._prep[n.name] = self._prepare_layer(n)
        # DESIGN §5b: the engine's tables; a table op without an integer rule under this plan
        # (flp/affine data, input wider than MAX_SEGMENTED_BITS) runs in float between quantizers
        self.elementwise_tables = prog.tables  # (the layers' integer tables are not kept: memory)

    def derive(self, plan: QuantPlan, names) -> "Simulator":
        """A simulator of ``plan``, which differs from this one's plan only in the layer entries
        ``names`` (same config, data formats and float ops): those layers are proved and
        prepared again, every other layer's prepared tensors are shared (a search trial
        re-quantizes only what it changes). Same outputs as ``Simulator(graph, plan, ...)``.

        >>> trial = base_sim.derive(trial_plan, ["layer2.0.conv1"])    # doctest: +SKIP
        """
        new = object.__new__(Simulator)
        new.__dict__.update(self.__dict__)
        new._sat, new._prep, new._bounds = {}, dict(self._prep), dict(self._bounds)
        for name in names:
            new.update_layer(plan, name)
        new.plan = plan
        return new

    def update_layer(self, plan: QuantPlan, name: str) -> None:
        """Take ``plan``, which differs from the current one only in layer ``name``'s entry
        (its decided codes, :mod:`fixq.algorithms.learned`): that layer is proved and prepared again."""
        n = self.graph.node(name)
        self.plan = plan
        L = None if plan.is_affine else lower_layer(n, plan, self.formats)  # its proof again (DESIGN §5a)
        if L is None:
            self._bounds.pop(name, None)
        else:
            self._bounds[name] = L.bound
        for key in [k for k in self._prep if isinstance(k, tuple) and k[:2] == ("act", name)]:
            del self._prep[key]  # activation bounds at the layer's old accumulator format
        self._prep[name] = self._prepare_layer(n)

    # ---- precomputation ----------------------------------------------------------------
    def _t(self, v, cl: bool = False) -> torch.Tensor:
        v = v.to(device=self.device, dtype=self.dtype)
        return v.contiguous(memory_format=torch.channels_last) if cl and v.dim() == 4 else v

    def _cl(self, n) -> bool:
        """Whether conv ``n`` runs channels-last: its float32 sums are exact in any order."""
        return (self.channels_last and isinstance(n, Conv)
                and self._bounds.get(n.name, float("inf")) < 2.0 ** F32_EXACT_BITS)

    def _prepare_layer(self, n) -> dict:
        lp = self.plan.layers.get(n.name)
        # plan-time arithmetic on the CPU; the prepared tensors then move to the device
        w = n.weight.detach().double().cpu()
        b = None if n.bias is None else n.bias.detach().double().cpu()
        cl = self._cl(n)
        out = {"weight": self._t(w), "bias": None if b is None else self._t(b), "acc": None, "cl": cl}
        if lp is None or lp.weight is None:
            return out
        wf = lp.weight
        view = (-1,) + (1,) * (w.dim() - 1) if len(wf.shape) == 1 else (
            (wf.shape[0], wf.shape[1]) + (1,) * (w.dim() - 2) if len(wf.shape) == 2 else ())
        if isinstance(wf, AffineFormats):
            mu = torch.tensor(wf.mu, dtype=torch.float64).reshape(view)
            sigma = torch.tensor(wf.sigma, dtype=torch.float64).reshape(view)
            out["weight"] = self._t(affine_quantize(w, mu, sigma, wf.T, self.rounding), cl)
        elif lp.kmeans is not None and lp.kmeans.data is not None:  # <4b,4b>: two branches, two inputs
            km, g = lp.kmeans, coeff_grid(n, lp)
            out["weight"] = self._t(g.offset, cl)  # the quantized basis kernel of each output channel
            out["rweight"] = self._t(g.steps(layer_codes(n, lp, self.rounding)), cl)  # the codes every backend uses
            out["rdata"] = (km.data.F_tensor().to(self.device), km.data.word)
        else:  # the codes every backend uses (fixq.planning.coeffs), times 2**-F (+ the K-means basis): exact
            out["weight"] = self._t(layer_values(n, lp, self.rounding), cl)
        groups = n.groups if isinstance(n, Conv) else 1
        S = None if lp.acc_F is None else layer_sum_format(lp, self.formats[n.inputs[0]][1], n.weight.shape, groups)
        if b is not None and lp.bias is not None:
            bq = bias_codes(n, lp, self.rounding).double() * exp2(-lp.bias.F_tensor(), b)
            if S is not None:  # aligned to the exact-sum format, as the engine does
                bq = round_values(bq * exp2(S, bq), self.rounding) / exp2(S, bq)
            out["bias"] = self._t(bq)
        if S is not None:
            bound = self._bounds.get(n.name, float("inf"))
            if self.exact and bound >= 2.0 ** F64_EXACT_BITS:  # rule 4: guard the float64 sums at S
                out["guard"] = (out["weight"].abs() if "rweight" in out else self._t(w).abs(), self._t(S.double()),
                                out["rweight"].abs() if "rweight" in out else None)
            Facc = torch.tensor(lp.acc_F, dtype=torch.int64)
            out["acc"] = (Facc.to(self.device), lp.acc_bits, lp.acc_overflow)
            out["acc_identity"] = bool((Facc == S).all()) and self._sum_fits(n, lp.acc_bits, out, S, groups)
        return out

    def _sum_fits(self, n, A: int, prep, S: torch.Tensor, groups: int) -> bool:
        """Whether the worst-case |sum| (every input at its largest code) fits in A bits at S:
        with Facc = S the accumulator step then provably changes nothing and the simulation
        skips it (the engine always performs it)."""
        T_in, Fx = self.formats[n.inputs[0]]
        w = prep["weight"].double().cpu().abs()
        N, Mg = w.shape[0], w.shape[1]
        # |x[j]| <= max|code| * 2**-Fx[j] for the input channel each filter reads (2**(T-1) signed)
        _, Fxg = filter_formats(torch.zeros(()), Fx, w.shape, groups)
        xlim = float(max_code(T_in)) * torch.pow(2.0, -Fxg.double())
        bound = (w.reshape(N, Mg, -1).sum(dim=2) * xlim).sum(dim=1)
        if "rweight" in prep:  # <4b,4b>: the residual kernels read xr at Fxr
            Fxr, Tr = prep["rdata"]
            _, Fxgr = filter_formats(torch.zeros(()), Fxr.cpu(), w.shape, groups)
            xlim_r = float(max_code(Tr)) * torch.pow(2.0, -Fxgr.double())
            bound = bound + (prep["rweight"].double().cpu().abs().reshape(N, Mg, -1).sum(dim=2) * xlim_r).sum(dim=1)
        if prep["bias"] is not None:
            bound = bound + prep["bias"].double().cpu().abs()
        return bool((bound * torch.pow(2.0, S.double()) < 2.0 ** (A - 1) - 1).all())

    # ---- helpers used by the rules --------------------------------------------------
    def count(self, name: str, what: str, events: torch.Tensor) -> None:
        d = self._sat.setdefault(name, {})
        d[what] = d[what] + events if what in d else events

    def requant(self, name: str, v: torch.Tensor, relu: bool = False, inplace: bool = False) -> torch.Tensor:
        """Quantize a node's output to its data format (identity where data is flp).
        ``relu`` applies a ReLU first (fused in one pass on CUDA). ``inplace``: ``v`` was just
        made by the caller and may be overwritten (same values, no second tensor of its size)."""
        f = self.plan.tensors.get(name)
        if f is None:
            return torch.clamp(v, min=0) if relu else v
        if isinstance(f, AffineFormats):
            mu = _bc(torch.tensor(f.mu, dtype=v.dtype, device=v.device).reshape(f.shape), v)
            sigma = _bc(torch.tensor(f.sigma, dtype=v.dtype, device=v.device).reshape(f.shape), v)
            return affine_quantize(torch.clamp(v, min=0) if relu else v, mu, sigma, f.T, self.rounding)
        y, ev = self.fq(v, self.formats[name][1], f.word, relu=relu, inplace=inplace)
        self.count(name, "data", ev)
        return y

    def fq(self, v: torch.Tensor, F: torch.Tensor, T: int, overflow: str = "saturate", relu: bool = False,
           inplace: bool = False):
        """fake_quantize with F per channel; one fused pass on CUDA in the fast mode (and on the CPU
        with ``fast_cpu``). ``inplace``:
        ``v`` is the caller's temporary (:meth:`requant`)."""
        if not self.exact and overflow == "saturate" and fused_available(v, self.rounding):
            return fused_fake_quantize(v, self._scale(F, v, shaped=False), T, self.rounding, relu)
        if self.fast_cpu and overflow == "saturate" and cpu_fused_available(v, self.rounding):
            got = cpu_fused_fake_quantize(v, self._scale(F, v, shaped=True), T, self.rounding, relu)
            if got is not None:
                return got
        if relu:
            v = v.clamp_(min=0) if inplace else torch.clamp(v, min=0)
        return fake_quantize(v, _bc(F.to(v.device), v), T, self.rounding, overflow, inplace=inplace)

    def _scale(self, F: torch.Tensor, v: torch.Tensor, shaped: bool) -> torch.Tensor:
        """``2**F`` for the fused quantizers, cached per F object (kept alive with it): as it is
        (CUDA kernel), or broadcast over ``v``'s dims (CPU kernel)."""
        key = ("scale", id(F), v.dim() if shaped else None)
        if key not in self._prep:
            s = exp2(F.to(v.device), v)
            self._prep[key] = (F, _bc(s, v).contiguous() if shaped else s)
        return self._prep[key][1]

    def check_exact(self, n, x: torch.Tensor, xr: torch.Tensor | None = None) -> None:
        """DESIGN §5a rule 4: float64 sums are exact while ``Σ|w||x| + |b| < 2**53`` at S
        (every partial sum, any order); a layer whose proved bound is larger is checked
        here on the actual data, and a trip is an error naming the layer."""
        p = self._prep[n.name]
        if "guard" not in p:
            return
        wabs, S, rabs = p["guard"]
        b = None if p["bias"] is None else p["bias"].abs()
        m = pre_activation(n, x.abs(), wabs, b)
        if rabs is not None:  # <4b,4b>: + the residual branch on its own input
            m = m + pre_activation(n, xr.abs(), rabs, None)
        if bool((m * exp2(_bc(S, m), m) >= 2.0 ** F64_EXACT_BITS).any()):
            raise PlanError(f"layer '{n.name}': a partial sum reaches 2^{F64_EXACT_BITS} at the exact-sum format S, "
                            "so the float64 simulation is no longer exact there; use the integer engine "
                            "(fixq.backends.engine.Engine) or fewer bits / coarser partitions for this layer")

    def saturations(self) -> dict[str, dict[str, int]]:
        return {k: {w: int(c) for w, c in d.items()} for k, d in self._sat.items()}

    def reset_counts(self) -> None:
        self._sat.clear()

    # ---- running ---------------------------------------------------------------------
    @torch.no_grad()
    def run(self, x: torch.Tensor, keep: bool = False, before=None, stop: int | None = None):
        """The dequantized output (``keep``: every node's output, a dict). Without ``keep`` a
        tensor is dropped once its last user has run: memory holds the live tensors only.
        ``before(i, env)`` is called before node ``i`` runs, with the live tensors (read only);
        ``stop``: run no node from ``stop`` on (and return None) once ``before`` has seen it."""
        g = self.graph
        return self.run_from(0, {g.input: self.requant(g.input, self._t(x, self.channels_last))}, keep, before, stop)

    @torch.no_grad()
    def run_from(self, start: int, env: dict, keep: bool = False, before=None, stop: int | None = None):
        """Run ``graph.nodes[start:]`` on ``env`` (a dict holding at least every tensor those
        nodes read; not changed): how a plan that differs from another only from node
        ``start`` on resumes the other's simulation of the same batch (same values as ``run``).

        >>> sim.run_from(0, {g.input: sim.requant(g.input, x)})  # == sim(x)  # doctest: +SKIP
        """
        g = self.graph
        left = None
        if not keep:
            left = {}
            for n in g.nodes[start:]:
                for i in n.inputs:
                    left[i] = left.get(i, 0) + 1
            env = {k: v for k, v in env.items() if left.get(k, 0) or k == g.output}
        else:
            env = dict(env)
        for k, n in enumerate(g.nodes[start:], start):
            if isinstance(n, Input):
                continue
            if before is not None:
                before(k, env)
            if stop is not None and k >= stop:
                return None
            env[n.name] = SIM_RULES[type(n)](self, n, *(env[i] for i in n.inputs))
            if left is not None:
                for i in n.inputs:
                    left[i] -= 1
                    if left[i] == 0 and i != g.output:
                        del env[i]
        return env if keep else env[g.output]

    __call__ = run


def _sim_layer(sim: Simulator, n, x):
    p = sim._prep[n.name]
    xr = None
    if "rdata" in p:  # <4b,4b> K-means: the residual kernels read x requantized to their own format
        xr, ev = sim.fq(x, p["rdata"][0], p["rdata"][1])
        sim.count(n.name, "data", ev)
    sim.check_exact(n, x, xr)
    if sim.channels_last and x.dim() == 4:  # this layer's layout (Simulator._cl): the other one's sums may differ
        fmt = torch.channels_last if p["cl"] else torch.contiguous_format
        x = x.contiguous(memory_format=fmt)
        xr = None if xr is None else xr.contiguous(memory_format=fmt)
    y = pre_activation(n, x, p["weight"], p["bias"])
    if xr is not None:
        y = y + pre_activation(n, xr, p["rweight"], None)
    relu = n.act == (0.0, None)  # ReLU fuses into the requantization exactly
    if p["acc"] is not None:
        Facc, A, overflow = p["acc"]
        if not p["acc_identity"]:
            y, ev = sim.fq(y, Facc, A, overflow, inplace=True)  # y is this rule's own temporary
            sim.count(n.name, "acc", ev)
        if n.act is not None and not relu:
            lo, hi = _act_bounds(sim, n.name, n.act, Facc, y)
            y = y.clamp_(min=lo, max=hi)
    elif not relu:
        y = apply_act(y, n.act, inplace=True)
    return sim.requant(n.name, y, relu=relu, inplace=True)


def _act_bounds(sim: Simulator, name: str, act, F: torch.Tensor, like: torch.Tensor):
    """Clamp bounds of ``act`` as values on the grid F (0-d or per channel), cached per node."""
    key = ("act", name, like.dim())
    if key not in sim._prep:
        Fv = per_channel(F.cpu(), like.shape[1])
        codes = bound_codes(act, Fv, like.shape[1], sim.rounding)
        sim._prep[key] = tuple(None if c is None else _bc(sim._t(c.double() * torch.pow(2.0, -Fv.double())), like)
                               for c in codes)
    return sim._prep[key]


def _sim_add(sim: Simulator, n: Add, a, b):
    y = a + b
    Fa, Fb = sim.formats[n.inputs[0]][1], sim.formats[n.inputs[1]][1]
    if n.act is not None and Fa is not None and Fb is not None and n.name in sim.plan.tensors:
        lo, hi = _act_bounds(sim, n.name, n.act, torch.maximum(Fa, Fb), y)
        y = y.clamp_(min=lo, max=hi)
    else:
        y = apply_act(y, n.act, inplace=True)
    return sim.requant(n.name, y, inplace=True)


def _sim_avg(sim: Simulator, n, x):
    fx = sim.formats[n.inputs[0]][1]
    if fx is None or not isinstance(sim.plan.tensors.get(n.name), Formats):
        return sim.requant(n.name, FLOAT_RULES[type(n)](n, x))
    K = pool_divisors(n, tuple(x.shape[-2:])).to(device=x.device, dtype=x.dtype)
    return sim.requant(n.name, window_sum(n, x) / K, inplace=True)


def _sim_clamp(sim: Simulator, n: Clamp, x):
    F = sim.formats[n.inputs[0]][1]
    if F is None:
        return FLOAT_RULES[Clamp](n, x)
    lo, hi = _act_bounds(sim, n.name, (n.lo, n.hi), F, x)
    return torch.clamp(x, min=lo, max=hi)


def _sim_concat(sim: Simulator, n: Concat, *xs):
    f = sim.plan.tensors.get(n.name)
    if f is None:
        return torch.cat(xs, dim=1)
    out, c0 = [], 0
    F = sim.formats[n.name][1]
    for x in xs:  # each input requantized to its slice of the output format
        c = x.shape[1]
        if isinstance(f, AffineFormats):
            out.append(sim.requant(n.name, x))
        else:
            key = ("concat", n.name, c0, c)  # one slice object per input: fq caches its scales by identity
            if key not in sim._prep:
                sim._prep[key] = F if F.dim() == 0 else F[c0:c0 + c]
            y, ev = sim.fq(x, sim._prep[key], f.word)
            sim.count(n.name, "data", ev)
            out.append(y)
        c0 += c
    return torch.cat(out, dim=1)


SIM_RULES: dict[type, Callable] = {
    Conv: _sim_layer,
    Linear: _sim_layer,
    Add: _sim_add,
    Concat: _sim_concat,
    AvgPool: _sim_avg,
    AdaptiveAvgPool: _sim_avg,
    Clamp: _sim_clamp,
    MaxPool: lambda sim, n, x: FLOAT_RULES[MaxPool](n, x),
    Pad: lambda sim, n, x: FLOAT_RULES[Pad](n, x),
    Slice: lambda sim, n, x: FLOAT_RULES[Slice](n, x),
    Flatten: lambda sim, n, x: FLOAT_RULES[Flatten](n, x),
    FloatOp: lambda sim, n, *xs: sim.requant(n.name, FLOAT_RULES[FloatOp](n, *xs)),
    **SIM_ELEMENTWISE,  # table functions, multiply, channel shuffle (DESIGN §5b)
}

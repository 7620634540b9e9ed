"""Calibration: observe the float model on probe images and build a QuantPlan.

Notation (DESIGN.md §3-§5): ``T`` bits, ``F`` fractional bits per partition, ``Fx`` input
data formats, ``Fw`` coefficient formats, ``S[i] = max_j Fw[i,j] + Fx[j]`` the exact-sum
format, ``A`` accumulator bits, ``Facc[i] = min(S[i], A - 1 - ceil(log2 max|acc_i|))``.

Pass 1 collects per-channel max|x|, min, max and (for percentile methods) exponent
histograms at every requantization point, plus each conv/linear's pre-activation range
(the accumulator). Pass 2 runs only when a tensor uses ``mse``: squared error of the five
candidate F's per channel. Observers are tensor ops on the model's device.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .formats import Word, fake_quantize
from .ir import (FLOAT_RULES, QUANT_POINTS, Concat, Conv, FloatOp, Graph, Input, Linear, Table, apply_act,
                 nonnegative_nodes, pre_activation)
from .partitions import accumulator_F, filter_formats, propagate_formats, sum_format
from .plan import AffineFormats, Formats, LayerPlan, PlanError, QuantConfig, QuantPlan
from .progress import progress
from .safety import bound_spread
from .ranges import (EXP_LO, MSE_CANDIDATES, F_from_histogram, F_from_maxabs, F_from_percentile_rows, affine_params,
                     ceil_log2, exponent_histogram, mse_candidates, parse_method)

__all__ = ["calibrate", "observe", "plan_from", "Observations", "needs_histograms",
           "weight_formats", "bias_formats", "filter_formats", "sum_format", "accumulator_F", "CalibrationError"]


from .errors import FixqError  # noqa: E402  (the one error hierarchy, errors.py)


class CalibrationError(FixqError):
    """Empty data, NaN/Inf activations, or a config the model cannot take."""


def _partitions(w: torch.Tensor, mode: str, groups: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """View the weight as (n_partitions, elements) for a granularity; returns grid shape."""
    N = w.shape[0]
    if mode == "4D":
        return w.reshape(1, -1), ()
    if mode == "3D":
        return w.reshape(N, -1), (N,)
    Mg = w.shape[1]
    return w.reshape(N * Mg, -1), (N, Mg)


def _F_for_rows(rows: torch.Tensor, T: int, method: str, rounding: str) -> torch.Tensor:
    """F per row of a (partitions, elements) float tensor."""
    m = parse_method(method)
    amax = rows.abs().amax(dim=1)
    F0 = F_from_maxabs(amax, T)
    if m.kind == "maxabs":
        return F0
    if m.kind == "percentile":
        return F_from_percentile_rows(rows, T, m.p)
    # mse: best of F0 .. F0+4, ties to the smaller F (larger range)
    cands = mse_candidates(F0)
    errs = torch.stack([((fake_quantize(rows, cands[:, k:k + 1], T, rounding)[0] - rows) ** 2).sum(dim=1)
                        for k in range(MSE_CANDIDATES)], dim=1)
    return cands.gather(1, errs.argmin(dim=1, keepdim=True)).squeeze(1)


def weight_formats(w: torch.Tensor, T: int, mode: str, method: str, groups: int = 1,
                   rounding: str = "half_up", bits: torch.Tensor | None = None) -> Formats | AffineFormats:
    """Coefficient formats of one layer. ``bits`` (one word length per partition of
    ``mode``'s grid, e.g. 8 or 4 per 2D filter) makes a mixed-precision layer; ``T`` is
    then ignored.

    >>> f = weight_formats(torch.tensor([[[[0.5, -0.2]]], [[[3.0, 1.0]]]]), 8, "3D", "maxabs")
    >>> f.F, f.shape
    ((8, 5), (2,))
    >>> weight_formats(torch.tensor([[[[0.5, -0.2]]], [[[3.0, 1.0]]]]), 8, "3D", "maxabs",
    ...                bits=torch.tensor([8, 4])).F
    (8, 1)
    """
    rows, shape = _partitions(w.detach().double(), mode, groups)
    if parse_method(method).kind == "affine":
        if bits is not None:
            raise PlanError("mixed precision needs power-of-two formats, not affine")
        mu, sigma = affine_params(rows.amin(dim=1), rows.amax(dim=1), T)
        return AffineFormats(T, mode, tuple(mu.tolist()), tuple(sigma.tolist()), shape)
    nonzero = rows.abs().amax(dim=1) > 0
    if bits is None:
        F = bound_spread(_F_for_rows(rows, T, method, rounding), T, nonzero)  # DESIGN §5a rule 1
        return Formats(T, mode, tuple(F.tolist()), shape)
    bits = torch.as_tensor(bits, dtype=torch.int64).reshape(-1)
    if bits.numel() != rows.shape[0]:
        raise PlanError(f"{bits.numel()} word lengths for {rows.shape[0]} {mode} partitions")
    F = torch.zeros(rows.shape[0], dtype=torch.int64)
    for t in sorted(set(bits.tolist())):
        sel = bits == t
        F[sel] = _F_for_rows(rows[sel], int(t), method, rounding).cpu()
    F = bound_spread(F, bits, nonzero)
    Tp = tuple(int(v) for v in bits.tolist())
    return Formats(max(Tp), mode, tuple(int(v) for v in F.tolist()), shape, Tp=None if len(set(Tp)) == 1 else Tp)


def bias_formats(b: torch.Tensor, T: int) -> Formats:
    """One maxabs format per output channel (paper: biases in their own 8 bits)."""
    F = F_from_maxabs(b.detach().double().abs(), T)
    return Formats(T, "3D", tuple(int(v) for v in F.tolist()), (b.numel(),))


@dataclass
class _Stats:
    """Per-channel running statistics of one tensor."""
    amax: torch.Tensor | None = None
    vmin: torch.Tensor | None = None
    vmax: torch.Tensor | None = None
    hist: torch.Tensor | None = None
    count: int = 0


def _per_channel(x: torch.Tensor) -> torch.Tensor:
    """(C, elements) view of a batch (channels on dim 1; a 2-D tensor has features)."""
    return x.detach().transpose(0, 1).reshape(x.shape[1], -1)


def _observe(st: _Stats, x: torch.Tensor, want_hist: bool) -> None:
    # two reductions over the non-channel dims, no copy: max|x| = max(max, -min)
    dims = [d for d in range(x.dim()) if d != 1]
    vmin, vmax = torch.aminmax(x.detach(), dim=dims[0]) if len(dims) == 1 else (
        x.detach().amin(dim=dims), x.detach().amax(dim=dims))
    amax = torch.maximum(vmax, -vmin)
    if st.amax is None:
        st.amax, st.vmin, st.vmax = amax, vmin, vmax
    else:
        st.amax, st.vmin, st.vmax = (torch.maximum(st.amax, amax), torch.minimum(st.vmin, vmin),
                                     torch.maximum(st.vmax, vmax))
    if want_hist:
        c = _per_channel(x)
        groups = torch.arange(c.shape[0], device=c.device).unsqueeze(1).expand_as(c)
        h = exponent_histogram(c, groups, c.shape[0])
        st.hist = h if st.hist is None else st.hist + h
    st.count += x.numel() // x.shape[1]


def _forward_observed(graph: Graph, x: torch.Tensor, on_tensor, on_acc) -> None:
    env = {graph.input: x}
    on_tensor(graph.input, x)
    for n in graph.nodes:
        if isinstance(n, Input):
            continue
        args = [env[i] for i in n.inputs]
        if isinstance(n, (Conv, Linear)):
            pre = pre_activation(n, *args)
            on_acc(n.name, pre)
            y = apply_act(pre, n.act)
        else:
            y = FLOAT_RULES[type(n)](n, *args)
        env[n.name] = y
        if isinstance(n, QUANT_POINTS):
            on_tensor(n.name, y)


def _magnitude_T(T: int, signed: bool) -> int:
    """Signed bits with U(T,F)'s magnitude (one more than Q(T,F)): what every F rule takes."""
    return T + (0 if signed else 1)


def _data_F(st: _Stats, T: int, mode: str, method: str) -> torch.Tensor:
    m = parse_method(method)
    amax = st.amax if mode == "3D" else st.amax.max().reshape(1)
    if m.kind == "percentile":
        hist = st.hist if mode == "3D" else st.hist.sum(dim=0, keepdim=True)
        return F_from_histogram(hist, T, m.p)
    return F_from_maxabs(amax, T)


def _nonzero(st: _Stats, mode: str) -> torch.Tensor:
    """Which partitions (channels, or the one tensor) of a data tensor have a nonzero range."""
    nz = st.amax.cpu() > 0
    return nz if mode == "3D" else nz.any().reshape(1)


@dataclass
class Observations:
    """Float statistics of every requantized tensor and every accumulator over the
    calibration batches (pass 1), plus cached mse passes (pass 2). Plans for any number of
    configurations are built from one of these (``plan_from``): a sweep calibrates once."""

    graph: Graph
    batches: list
    device: torch.device
    stats: dict
    acc: dict
    histograms: bool
    show_progress: bool = True
    mse_cache: dict = None

    def mse_F(self, requests: list[tuple[str, int, str, bool]], rounding: str) -> dict:
        """Best F per channel (3D) or tensor (4D) among F_maxabs..F_maxabs+4 by squared
        error; one extra pass over the batches for every request ``(name, T, mode, signed)``
        not cached yet."""
        self.mse_cache = self.mse_cache or {}
        todo = [r for r in set(requests) if (r, rounding) not in self.mse_cache]
        if todo:
            cands = {r: mse_candidates(_data_F(self.stats[r[0]], _magnitude_T(r[1], r[3]), r[2], "maxabs"))
                     for r in todo}
            err = {r: torch.zeros(c.shape, dtype=torch.float64, device=c.device) for r, c in cands.items()}
            by_name: dict[str, list] = {}
            for r in todo:
                by_name.setdefault(r[0], []).append(r)

            def on_tensor(name, t):
                for r in by_name.get(name, ()):
                    c = _per_channel(t).double()
                    word = Word(r[1], r[3])
                    for k in range(MSE_CANDIDATES):
                        F = cands[r][:, k:k + 1]
                        if r[2] == "3D":
                            e = ((fake_quantize(c, F, word, rounding)[0] - c) ** 2).sum(dim=1)
                        else:
                            e = ((fake_quantize(c, F[0, 0], word, rounding)[0] - c) ** 2).sum().reshape(1)
                        err[r][:, k] += e

            with torch.no_grad():
                for x in progress(self.batches, "calibrate (mse)", self.show_progress):
                    _forward_observed(self.graph, x, on_tensor, lambda *a: None)
            for r in todo:
                self.mse_cache[(r, rounding)] = cands[r].gather(1, err[r].argmin(dim=1, keepdim=True)).squeeze(1)
        return {r: self.mse_cache[(r, rounding)] for r in requests}


def observe(graph: Graph, loader, device: str | torch.device = "cpu", histograms: bool = False,
            show_progress: bool = True) -> Observations:
    """Pass 1 over the calibration data: per-channel max|x|, min, max (and exponent
    histograms when ``histograms``) at every requantization point and accumulator."""
    device = torch.device(device)
    batches = []
    for batch in loader:  # kept (as the loader yields them) for an mse pass
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if x.numel():
            batches.append(x.to(device=device, dtype=torch.float32))
    if not batches:
        raise CalibrationError("no calibration images: the calibration set is empty")
    qpoints = [n for n in graph.nodes if isinstance(n, QUANT_POINTS)]
    stats = {n.name: _Stats() for n in qpoints}
    acc = {n.name: _Stats() for n in graph.layers()}
    with torch.no_grad():
        for x in progress(batches, "calibrate", show_progress):
            _forward_observed(graph, x, lambda name, t: _observe(stats[name], t, histograms),
                              lambda name, t: _observe(acc[name], t, False))
    # NaN/Inf propagate through min/max, so the per-channel statistics reveal them
    for n in graph.nodes:
        st = acc.get(n.name) or stats.get(n.name)
        if st is not None and st.amax is not None and not bool(torch.isfinite(st.amax).all()):
            if isinstance(n, Input):
                raise CalibrationError("the calibration images contain NaN or Inf after preprocessing")
            raise CalibrationError(f"layer '{n.name}' produced NaN or Inf on the calibration images; "
                                   "check the weights and the preprocessing")
    return Observations(graph, batches, device, stats, acc, histograms, show_progress)


def needs_histograms(graph: Graph, configs) -> bool:
    return any(parse_method(c.for_layer(n.name).effective_data_method).kind == "percentile"
               for c in configs for n in graph.nodes)


def calibrate(graph: Graph, loader, config: QuantConfig, model_name: str = "model",
              device: str | torch.device = "cpu", show_progress: bool = True) -> QuantPlan:
    """Run the float graph over ``loader`` (yielding ``(images, labels)`` or images) and
    choose every format of the plan.

    >>> plan = calibrate(graph, [(torch.randn(8, 1, 8, 8), None)], QuantConfig())  # doctest: +SKIP
    """
    obs = observe(graph, loader, device, needs_histograms(graph, [config]), show_progress)
    return plan_from(obs, config, model_name)


def plan_from(obs: Observations, config: QuantConfig, model_name: str = "model",
              filter_bits: dict | None = None, kmeans: dict | None = None,
              kmeans_bits: tuple[int, int] = (8, 4)) -> QuantPlan:
    """Choose every format of the plan for ``config`` from calibration statistics.

    ``filter_bits`` maps a layer to its coefficient word length per 2D filter, an int
    tensor ``(N, M/groups)`` (mixed precision, :mod:`fixq.mixed`): those layers get 2D
    formats with the given bits whatever the config's mode and bits say. ``kmeans`` maps
    a layer to a :class:`fixq.kmeans.Clustering`: basis kernels at ``kmeans_bits[0]``,
    residuals at ``kmeans_bits[1]``, both in the layer's coefficient mode."""
    graph = obs.graph
    cfgs = {n.name: config.for_layer(n.name) for n in graph.nodes}
    for p in config.unmatched_patterns([n.name for n in graph.nodes]):
        raise PlanError(f"config override {p!r} matches no layer; layers are: "
                        + ", ".join(n.name for n in graph.layers()))
    if needs_histograms(graph, [config]) and not obs.histograms:
        raise PlanError("a percentile method needs observe(..., histograms=True)")
    tensors: dict[str, Formats | AffineFormats] = {}
    mse = []
    nonneg = nonnegative_nodes(graph)
    for n in graph.nodes:
        if not isinstance(n, QUANT_POINTS):
            continue
        cfg, st = cfgs[n.name], obs.stats[n.name]
        if cfg.data_bits is None or st.amax is None:
            continue
        method = parse_method(cfg.effective_data_method)
        T, mode = cfg.data_bits, cfg.data_mode
        shape = (st.amax.numel(),) if mode == "3D" else ()
        if method.kind == "affine":
            vmin, vmax = (st.vmin, st.vmax) if mode == "3D" else (st.vmin.min().reshape(1), st.vmax.max().reshape(1))
            mu, sigma = affine_params(vmin, vmax, T)
            tensors[n.name] = AffineFormats(T, mode, tuple(mu.tolist()), tuple(sigma.tolist()), shape)
            continue
        # U(32,F) codes would not fit the int64/C int32 paths' 32-bit word: 32-bit data stays signed
        signed = cfg.data_sign == "signed" or n.name not in nonneg or T >= 32
        if method.kind == "mse":
            mse.append((n.name, T, mode, signed))
            continue
        Tm = _magnitude_T(T, signed)
        F = bound_spread(_data_F(st, Tm, mode, str(method)), Tm, _nonzero(st, mode))
        tensors[n.name] = Formats(T, mode, tuple(int(v) for v in F.tolist()), shape, signed=signed)
    for (name, T, mode, signed), F in obs.mse_F(mse, config.rounding).items():
        F = bound_spread(F, _magnitude_T(T, signed), _nonzero(obs.stats[name], mode))
        tensors[name] = Formats(T, mode, tuple(int(v) for v in F.tolist()), (F.numel(),) if mode == "3D" else (),
                                signed=signed)
    ordered = {n.name: tensors[n.name] for n in graph.nodes if n.name in tensors}
    _concat_keeps_formats(graph, cfgs, ordered)
    return _build_plan(graph, config, cfgs, ordered, obs.acc, model_name, filter_bits or {}, kmeans or {},
                       kmeans_bits)


def _concat_keeps_formats(graph, cfgs, tensors) -> None:
    """With per-channel (3D) data, a concat keeps each input's own channel formats (an
    unsigned input's channels get ``F - 1`` in a signed concat: the same range)."""
    derived = None
    for n in graph.nodes:
        if isinstance(n, Concat) and n.name in tensors and cfgs[n.name].data_mode == "3D" \
                and isinstance(tensors[n.name], Formats):
            derived = propagate_formats(graph, tensors)
            f = tensors[n.name]
            parts = [None if derived[i][1] is None else
                     derived[i][1] - (1 if f.signed and not derived[i][0].signed else 0) for i in n.inputs]
            if all(p is not None for p in parts):
                C = [graph.shapes[i][0] for i in n.inputs]
                F = torch.cat([p.expand(c) if p.dim() == 0 else p for p, c in zip(parts, C)])
                tensors[n.name] = Formats(f.T, f.granularity, tuple(int(v) for v in F.tolist()), f.shape,
                                          signed=f.signed)


def _build_plan(graph, config, cfgs, tensors, acc, model_name, filter_bits, kmeans, kmeans_bits) -> QuantPlan:
    fmts = propagate_formats(graph, tensors)
    layers: dict[str, LayerPlan] = {}
    notes: list[str] = []
    for n in graph.layers():
        cfg = cfgs[n.name]
        lnotes = []
        groups = n.groups if isinstance(n, Conv) else 1
        mode = cfg.coeff_mode
        bits = filter_bits.get(n.name)
        if bits is not None:
            mode = "2D"
            bits = torch.as_tensor(bits, dtype=torch.int64)
            if tuple(bits.shape) != tuple(n.weight.shape[:2]):
                raise PlanError(f"layer '{n.name}': filter bits have shape {tuple(bits.shape)}, "
                                f"the layer has {tuple(n.weight.shape[:2])} 2D filters")
            lo = int((bits < bits.max()).sum())
            lnotes.append(f"mixed precision: {lo} of {bits.numel()} 2D filters at {int(bits.min())}b")
        elif mode == "2D" and isinstance(n, Linear):
            mode = "3D"
            lnotes.append("2D asked on a fully connected layer: 3D (per output neuron) used")
            warnings.warn(f"layer '{n.name}' is fully connected: 2D coefficient formats do not apply, "
                          "3D (one format per output neuron) is used", stacklevel=2)
        elif mode == "2D" and n.weight.shape[1] == 1:
            lnotes.append("depthwise conv: 2D and 3D coincide")
        if cfg.coeff_bits is None and bits is None:
            layers[n.name] = LayerPlan(n.name, None, None, notes=tuple(lnotes))
            continue
        km = None
        if n.name in kmeans:
            from .kmeans import KMeansError, kmeans_layer
            if groups != 1:
                raise KMeansError(f"layer '{n.name}' is a grouped conv (groups={groups}): a shared basis kernel "
                                  "would read every group's inputs; leave it out of the K-means layers")
            km, wf = kmeans_layer(n.weight, kmeans[n.name], kmeans_bits[0], kmeans_bits[1], mode, cfg.method,
                                  config.rounding)
            lnotes.append(f"K-means: K={km.K} basis kernels at {kmeans_bits[0]}b + residuals at {kmeans_bits[1]}b")
        else:
            wf = weight_formats(n.weight, cfg.coeff_bits, mode, cfg.method, groups, config.rounding, bits)
        bf = bias_formats(n.bias, cfg.bias_bits) if n.bias is not None else None
        T_in, Fx = fmts[n.inputs[0]]
        acc_F = None
        A = None
        if isinstance(wf, Formats) and Fx is not None and n.name in tensors:
            A = cfg.acc_bits
            Fw = LayerPlan(n.name, wf, None, kmeans=km).coeff_F(*n.weight.shape[:2])
            S = sum_format(Fw, Fx, n.weight.shape, groups)
            st = acc[n.name]
            amax = st.amax.double() if st.amax is not None else torch.zeros(S.shape, dtype=torch.float64)
            acc_I = ceil_log2(amax.cpu()).clamp(min=EXP_LO - 1)
            acc_F = accumulator_F(S, acc_I, A)
            if any(a < s for a, s in zip(acc_F, S.tolist())):
                lnotes.append(f"accumulator range needs more than A={A} bits at the exact-sum format: "
                              "partial sums are rounded into the accumulator")
        layers[n.name] = LayerPlan(n.name, wf, bf, A, acc_F, cfg.acc_overflow, tuple(lnotes),
                                   None if acc_F is None else tuple(int(v) for v in acc_I.tolist()), km)
    from .elementwise import table_ready
    float_ops = tuple(n.name for n in graph.nodes if isinstance(n, FloatOp))
    float_tables = tuple(n.name for n in graph.nodes if isinstance(n, Table) and not table_ready(n, fmts, tensors))
    if float_ops:
        notes.append("ops with no integer rule run in float between quantizers: " + ", ".join(float_ops))
    if float_tables:
        notes.append("table functions whose data are flp, affine or wider than 10 bits run in float between "
                     "quantizers (no integer rule): " + ", ".join(float_tables))
        float_ops = float_ops + float_tables
    plan = QuantPlan(model_name, config, tensors, layers, float_ops, tuple(notes))
    from .engine import check_plan  # DESIGN §5a: refuse at plan time what int64 cannot hold
    check_plan(graph, plan)
    return plan


"""Calibration: observe the float model on probe images and build a QuantPlan.

Notation (DESIGN.md §3-§5): ``T`` bits, ``F`` fractional bits per partition, ``Fx`` input
data formats, ``Fw`` coefficient formats, ``S[i] = max_j Fw[i,j] + Fx[j]`` the exact-sum
format, ``A`` accumulator bits, ``Facc[i] = min(S[i], A - 1 - ceil(log2 max|acc_i|))``.

The statistics come from :mod:`fixq.algorithms.observe` (pass 1: per-channel max|x|, min, max,
exponent histograms, accumulator ranges; pass 2 for ``mse`` data), streamed batch by batch.
"""
from __future__ import annotations

import warnings
from dataclasses import replace

import torch

from fixq.backends.lowering import check_plan, lower_layer
from fixq.graph.ir import QUANT_POINTS, Concat, Conv, FloatOp, Graph, Linear, Table, nonnegative_nodes
from fixq.numerics.ranges import EXP_LO, affine_params, ceil_log2, parse_method
from fixq.planning.elementwise import MAX_SEGMENTED_BITS, table_ready
from fixq.planning.partitions import accumulator_F, input_point, layer_sum_format, propagate_formats
from fixq.planning.plan import AffineFormats, Formats, LayerPlan, PlanError, QuantConfig, QuantPlan
from fixq.planning.safety import bound_spread
from .coeff_formats import bias_formats, weight_formats
from .kmeans import KMeansError, kmeans_layer, residual_data_formats
from .observe import CalibrationError, Observations, _data_F, _magnitude_T, _nonzero, needs_histograms, observe

__all__ = ["calibrate", "observe", "plan_from", "replan", "Observations", "needs_histograms", "CalibrationError"]


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
              kmeans_bits: tuple[int, ...] = (8, 4)) -> QuantPlan:
    """Choose every format of the plan for ``config`` from calibration statistics.

    ``filter_bits`` maps a layer to its coefficient word length per 2D filter, an int
    tensor ``(N, M/groups)`` (mixed precision, :mod:`fixq.algorithms.mixed`): those layers get 2D
    formats with the given bits whatever the config's mode and bits say. ``kmeans`` maps
    a layer to a :class:`fixq.algorithms.kmeans.Clustering`: basis kernels at ``kmeans_bits[0]``,
    residuals at ``kmeans_bits[1]``, both in the layer's coefficient mode; a third entry
    ``kmeans_bits[2]`` (not None) gives the residual branch its own data format of that many
    bits (``<4b,4b>``, :func:`fixq.algorithms.kmeans.residual_data_formats`)."""
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
    rdata = {}
    if kmeans and len(kmeans_bits) > 2 and kmeans_bits[2] is not None:
        rdata = {n: residual_data_formats(obs, n, int(kmeans_bits[2]), cfgs[input_point(graph, n)], config.rounding,
                                          ordered) for n in kmeans}
    return _build_plan(graph, config, cfgs, ordered, obs.acc, model_name, filter_bits or {}, kmeans or {},
                       kmeans_bits, rdata)


def replan(obs: Observations, base: QuantPlan, filter_bits: dict | None = None, kmeans: dict | None = None,
           kmeans_bits: tuple[int, ...] = (8, 4), fmts: dict | None = None) -> QuantPlan:
    """``plan_from(obs, base.config, base.model, filter_bits, kmeans, kmeans_bits)`` for a
    ``base`` that is ``plan_from(obs, base.config, base.model)``, as a plan -> plan transform:
    only the layers named in ``filter_bits`` and ``kmeans`` are planned and proved again
    (DESIGN §5a); the data formats, the notes and every other layer's entry are the base
    plan's (the same objects). ``fmts``: ``propagate_formats(graph, base.tensors)`` if known.

    >>> base = plan_from(obs, QuantConfig())                                       # doctest: +SKIP
    >>> replan(obs, base, {"conv2": bits}) == plan_from(obs, QuantConfig(), filter_bits={"conv2": bits})  # doctest: +SKIP
    True
    """
    graph, config = obs.graph, base.config
    filter_bits, kmeans = filter_bits or {}, kmeans or {}
    rdata = {}  # configs looked up for the nodes a trial names only (a trial runs per search step)
    if kmeans and len(kmeans_bits) > 2 and kmeans_bits[2] is not None:  # as plan_from: every name it is given
        rdata = {n: residual_data_formats(obs, n, int(kmeans_bits[2]), config.for_layer(input_point(graph, n)),
                                          config.rounding, base.tensors) for n in kmeans}
    names = [n for n in graph.layers() if n.name in filter_bits or n.name in kmeans]
    if not names:
        return base
    fmts = propagate_formats(graph, base.tensors) if fmts is None else fmts
    layers = dict(base.layers)
    for n in names:
        layers[n.name] = _layer_plan(n, config.for_layer(n.name), config, fmts, base.tensors, obs.acc, filter_bits,
                                     kmeans, kmeans_bits, rdata)
    plan = replace(base, layers=layers)
    for n in names if not plan.is_affine else ():  # as check_plan; the rest was proved with the base plan
        lower_layer(n, plan, fmts)
    return plan


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


def _build_plan(graph, config, cfgs, tensors, acc, model_name, filter_bits, kmeans, kmeans_bits, rdata) -> QuantPlan:
    fmts = propagate_formats(graph, tensors)
    layers: dict[str, LayerPlan] = {}
    notes: list[str] = []
    for n in graph.layers():
        layers[n.name] = _layer_plan(n, cfgs[n.name], config, fmts, tensors, acc, filter_bits, kmeans, kmeans_bits,
                                     rdata)
    float_ops = tuple(n.name for n in graph.nodes if isinstance(n, FloatOp))
    float_tables = tuple(n.name for n in graph.nodes if isinstance(n, Table) and not table_ready(n, fmts, tensors))
    if float_ops:
        notes.append("ops with no integer rule run in float between quantizers: " + ", ".join(float_ops))
    if float_tables:
        notes.append("table functions whose data are flp, affine or wider than "
                     f"{MAX_SEGMENTED_BITS} bits run in float between quantizers (no integer rule): " + ", ".join(float_tables))
        float_ops = float_ops + float_tables
    plan = QuantPlan(model_name, config, tensors, layers, float_ops, tuple(notes))
    check_plan(graph, plan)  # DESIGN §5a: refuse at plan time what int64 cannot hold
    return plan


def _layer_plan(n, cfg, config, fmts, tensors, acc, filter_bits, kmeans, kmeans_bits, rdata) -> LayerPlan:
    """One conv/linear layer's entry of the plan (its coefficient, bias and accumulator formats)."""
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
        if isinstance(n, Linear) and cfg.fc_mode == "4D":
            if int(bits.min()) != int(bits.max()):
                raise PlanError(f"layer '{n.name}' is fully connected and fc_mode is 4D (one format per "
                                "layer, paper §3): it cannot mix word lengths per weight; exclude it "
                                "(--exclude) or use --fc-mode auto")
            mode, bits, cfg = "4D", None, replace(cfg, coeff_bits=int(bits.max()))
            lnotes.append(f"fully connected layer: 4D at {cfg.coeff_bits}b (fc_mode 4D, paper §3)")
    if bits is not None:
        lo = int((bits < bits.max()).sum())
        lnotes.append(f"mixed precision: {lo} of {bits.numel()} 2D filters at {int(bits.min())}b")
    elif isinstance(n, Linear) and cfg.fc_mode == "4D" and mode != "4D":
        mode = "4D"
        lnotes.append(f"fully connected layer: 4D (one format per layer; fc_mode 4D, paper §3) instead of "
                      f"{cfg.coeff_mode}")
    elif mode == "2D" and isinstance(n, Linear):
        mode = "3D"
        lnotes.append("2D asked on a fully connected layer: 3D (per output neuron) used")
        warnings.warn(f"layer '{n.name}' is fully connected: 2D coefficient formats do not apply, "
                      "3D (one format per output neuron) is used", stacklevel=2)
    elif mode == "2D" and n.weight.shape[1] == 1:
        lnotes.append("depthwise conv: 2D and 3D coincide")
    if cfg.coeff_bits is None and bits is None:
        return LayerPlan(n.name, None, None, notes=tuple(lnotes))
    km = None
    if n.name in kmeans:
        if groups != 1:
            raise KMeansError(f"layer '{n.name}' is a grouped conv (groups={groups}): a shared basis kernel "
                              "would read every group's inputs; leave it out of the K-means layers")
        km, wf = kmeans_layer(n.weight, kmeans[n.name], kmeans_bits[0], kmeans_bits[1], mode, cfg.method,
                              config.rounding)
        if n.name in rdata:
            km = replace(km, data=rdata[n.name])
        lnotes.append(f"K-means: K={km.K} basis kernels at {kmeans_bits[0]}b + residuals at {kmeans_bits[1]}b"
                      + (f" reading {km.data.T}-bit data" if km.data is not None else ""))
    else:
        wf = weight_formats(n.weight, cfg.coeff_bits, mode, cfg.method, groups, config.rounding, bits)
    bf = bias_formats(n.bias, cfg.bias_bits) if n.bias is not None else None
    T_in, Fx = fmts[n.inputs[0]]
    acc_F = None
    A = None
    if isinstance(wf, Formats) and Fx is not None and n.name in tensors:
        A = cfg.acc_bits
        S = layer_sum_format(LayerPlan(n.name, wf, None, kmeans=km), Fx, n.weight.shape, groups)
        st = acc[n.name]
        amax = st.amax.double() if st.amax is not None else torch.zeros(S.shape, dtype=torch.float64)
        acc_I = ceil_log2(amax.cpu()).clamp(min=EXP_LO - 1)
        acc_F = accumulator_F(S, acc_I, A)
        if any(a < s for a, s in zip(acc_F, S.tolist())):
            lnotes.append(f"accumulator range needs more than A={A} bits at the exact-sum format: "
                          "partial sums are rounded into the accumulator")
    return LayerPlan(n.name, wf, bf, A, acc_F, cfg.acc_overflow, tuple(lnotes),
                     None if acc_F is None else tuple(int(v) for v in acc_I.tolist()), km)

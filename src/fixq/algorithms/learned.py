"""Learned rounding (AdaRound-style) and bias correction of a plan's coefficient codes.

Notation (DESIGN.md §2, §5; :mod:`fixq.planning.coeffs`): per coefficient ``X`` (weight, or K-means
residual) in its fixed partition format ``Q(T, F)``, ``fl = floor(X 2**F)``; the code is
``sat_T(fl + up)`` with ``up`` in {0, 1}: learned rounding only chooses, per coefficient,
between the two grid points around it, inside the partition's range. The formats (``F``,
``T``) never change.

Per conv/linear layer, in graph order (AdaRound, Nagel et al. 2020):
- inputs ``x~``: the layer's input in the fast simulation of the plan with every earlier
  layer already decided (their codes and corrected biases), on the calibration images;
  target ``y``: the float model's pre-activation on the same images (no labels). One pass
  through the graph computes both, layer after layer;
- the optimiser works on sampled output pixels (``samples`` im2col rows over all images and
  positions, ``batch`` of them per step): the same loss as whole images, far cheaper;
- soft codes ``fl + h(V)``, ``h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``,
  ``zeta = 1.1, gamma = -0.1``, ``V`` initialised so that ``h = X 2**F - fl`` (nearest);
- loss ``mean_{pixels} sum_channels (act(conv(x~, W(h)) + b) - act(y))**2`` plus
  ``lambda sum (1 - |2h - 1|**beta)`` after a warm-up, ``beta`` annealed linearly from 20
  to 2: it drives every ``h`` to 0 or 1; Adam on ``V``, seeded minibatches;
- decision ``up = h >= 1/2``. Guard: the layer's output error with the learned codes is
  measured (float64) on all calibration images against nearest rounding's; when it is
  higher, the layer keeps nearest rounding (a tie keeps the learned codes). So, on the
  calibration data, a layer's output
  error never increases (a guard, not a property of the optimiser).
Bias correction (optional, after the codes): per output channel ``e_i = mean(conv(x~, Wq) +
b - y)_i`` over the calibration images and pixels; the bias becomes ``b - e``, with new
maxabs bias formats (same bits) and its codes stored in the plan, so the per-channel mean
error left is the bias quantization's (at most one bias LSB).

Everything decided is stored in the plan (:class:`fixq.planning.plan.LayerCodes`) and consumed by
every backend through :mod:`fixq.planning.coeffs`.

>>> plan2, rows = learn_rounding(graph, plan, calib_images, RoundingOptions(iters=500))  # doctest: +SKIP
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

import torch.nn.functional as Fn

from fixq.backends.lowering import check_plan
from fixq.backends.simulate import SIM_RULES, Simulator
from fixq.graph.ir import FLOAT_RULES, Conv, Graph, Input, apply_act, pre_activation
from fixq.numerics.formats import exp2, round_values, saturate
from fixq.planning.coeffs import coeff_grid, layer_codes, pack_bits, weights_digest
from fixq.planning.plan import Formats, LayerCodes, PlanError, QuantPlan
from fixq.util.progress import progress, set_status
from .coeff_formats import bias_formats

__all__ = ["RoundingOptions", "learn_rounding", "up_bits", "layer_output_error", "ZETA", "GAMMA", "BANK_INPUTS"]

ZETA, GAMMA = 1.1, -0.1
BANK_INPUTS = ("sequential", "base")  # RoundingOptions.bank_inputs (fixq.algorithms.learned_bank)


@dataclass(frozen=True)
class RoundingOptions:
    """Settings of :func:`learn_rounding` (``learned=False``: bias correction only)."""

    learned: bool = True
    bias_correction: bool = True
    iters: int = 1000        # Adam steps per layer
    batch: int = 1024        # sampled output pixels per step
    samples: int = 32768     # output pixels (over all calibration images) the optimiser sees
    lr: float = 1e-2
    reg: float = 0.01        # lambda of the rounding regulariser
    warmup: float = 0.2      # share of the steps without the regulariser
    beta: tuple[float, float] = (20.0, 2.0)
    seed: int = 0
    bank_inputs: str = "sequential"  # fixq mixed / kmeans code banks (learned_bank): each layer's input

    def __post_init__(self) -> None:
        if self.bank_inputs not in BANK_INPUTS:
            raise PlanError(f"bank_inputs must be one of {', '.join(BANK_INPUTS)}, got {self.bank_inputs!r}")
        if not (self.learned or self.bias_correction):
            raise PlanError("learn_rounding with neither learned rounding nor bias correction does nothing")
        if self.iters < 1 or self.batch < 1 or self.samples < 1:
            raise PlanError(f"learned rounding needs iters, batch and samples >= 1, got {self.iters}, {self.batch}, "
                            f"{self.samples}")

    def label(self) -> str:
        parts = []
        if self.learned:
            parts.append(f"learned rounding ({self.iters} steps/layer, {self.batch} of {self.samples} sampled "
                         f"pixels per step, seed {self.seed})")
        if self.bias_correction:
            parts.append("bias correction")
        return " + ".join(parts)


BS = 128  # images per chunk of every whole-data pass


def _chunked(fn, args, n: int):
    """``fn`` over chunks of ``BS`` images of every tensor argument, concatenated."""
    return torch.cat([fn(*[a[i:i + BS] for a in args]) for i in range(0, n, BS)])


def _layer_stats(n, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b):
    """float64 over all images: ``(sum (act(layer) - act(y))**2, per-channel sum of
    layer - y before the activation, pixels per channel)``."""
    err, dsum, count = 0.0, 0.0, 0
    b = None if b is None else b.double().to(x.device)
    w = w.double().to(x.device)
    dims = [0] + list(range(2, y.dim()))
    with torch.no_grad():
        for i in range(0, x.shape[0], BS):
            pre = pre_activation(n, x[i:i + BS].double(), w, b)
            yy = y[i:i + BS].double()
            d = apply_act(pre, n.act) - apply_act(yy, n.act)
            err += float((d * d).sum())
            dsum = dsum + (pre - yy).sum(dim=dims).cpu()
            count += (pre.numel() // pre.shape[1])
    return err, dsum, count


def layer_output_error(n, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b=None) -> float:
    """``sum (act(layer(x, w, b)) - act(y))**2`` over all images, in float64 (the guard's
    measure; ``y`` the float pre-activation)."""
    return _layer_stats(n, x, y, w, b)[0]


def _samples(n, x: torch.Tensor, y: torch.Tensor, opts: RoundingOptions, gen: torch.Generator):
    """``(X, Y)``: im2col rows ``(P, groups, K/groups)`` of the quantized input at ``P``
    sampled output pixels and the float pre-activation there ``(P, N)``."""
    if isinstance(n, Conv):
        kh, kw = n.weight.shape[2:]
        OH, OW = y.shape[2], y.shape[3]
        total = x.shape[0] * OH * OW
        pick = torch.randperm(total, generator=gen)[:min(opts.samples, total)].sort().values
        img, oh, ow = pick // (OH * OW), (pick // OW) % OH, pick % OW
        xp = Fn.pad(x, (n.padding[1], n.padding[1], n.padding[0], n.padding[0]))
        st = xp.stride()
        win = xp.as_strided((x.shape[0], x.shape[1], OH, OW, kh, kw),
                            (st[0], st[1], st[2] * n.stride[0], st[3] * n.stride[1], st[2] * n.dilation[0],
                             st[3] * n.dilation[1]))  # (B, C, OH, OW, kh, kw) windows, no copy
        X = win[img, :, oh, ow]  # (P, C, kh, kw): the im2col rows of the sampled pixels
        return X.reshape(X.shape[0], n.groups, -1), y[img, :, oh, ow]
    pick = torch.randperm(x.shape[0], generator=gen)[:min(opts.samples, x.shape[0])]
    return x[pick].reshape(len(pick), 1, -1), y[pick]


def _h(V: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _optimise(n, g, x: torch.Tensor, y: torch.Tensor, opts: RoundingOptions, seed: int, show: bool) -> torch.Tensor:
    """AdaRound on one layer (module docstring): the ``up`` decisions (bool, weight shape)."""
    dev = x.device
    gen = torch.Generator().manual_seed(seed)
    X, Y = _samples(n, x, y, opts, gen)
    X, Y = X.to(dev), Y.to(dev)
    s = g.scaled()
    fl = torch.floor(s)
    rest = (s - fl).float().to(dev)
    fl = fl.float().to(dev)
    lo, hi = g.lo.float().to(dev), g.hi.float().to(dev)
    step = exp2(-g.F, g.x).float().to(dev)
    off = None if g.offset is None else g.offset.float().to(dev)
    b = None if n.bias is None else n.bias.detach().float().to(dev)
    p = ((rest - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
    V = torch.log(p / (1 - p)).requires_grad_(True)
    bar = progress(range(opts.iters), f"learned rounding {n.name}", show)
    ya = apply_act(Y, n.act)
    threads = torch.get_num_threads()
    if dev.type == "cpu":  # small products: one thread is several times faster than contended ones
        torch.set_num_threads(1)
    try:
        return _steps(n, bar, X, ya, V, fl, lo, hi, step, off, b, opts, gen)
    finally:
        torch.set_num_threads(threads)


def _steps(n, bar, X, ya, V, fl, lo, hi, step, off, b, opts: RoundingOptions, gen) -> torch.Tensor:
    N = n.weight.shape[0]
    groups = X.shape[1]
    dev = X.device
    opt = torch.optim.Adam([V], lr=opts.lr)
    warm = int(opts.warmup * opts.iters)
    for it in bar:
        idx = torch.randint(0, X.shape[0], (min(opts.batch, X.shape[0]),), generator=gen).to(dev)
        h = _h(V)
        q = torch.minimum(torch.maximum(fl + h, lo), hi)
        w = q * step if off is None else off + q * step
        out = torch.einsum("pgk,gnk->pgn", X[idx], w.reshape(groups, N // groups, -1)).reshape(len(idx), N)
        if b is not None:
            out = out + b
        d = apply_act(out, n.act) - ya[idx]
        rec = (d * d).sum(dim=1).mean()
        loss = rec
        if it >= warm:
            t = (it - warm) / max(1, opts.iters - warm)
            beta = opts.beta[1] + (opts.beta[0] - opts.beta[1]) * (1 - t)
            loss = rec + opts.reg * (1 - (2 * h - 1).abs().pow(beta)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if it % 50 == 0 or it == opts.iters - 1:
            set_status(bar, f"loss {float(loss.detach()):.4g} (output {float(rec.detach()):.4g})")
    return (V.detach() >= 0).cpu()


def _bias_from(n, lp, dsum: torch.Tensor, count: int, rounding: str):
    """``(bias formats, codes)`` of ``b - mean(layer - y)`` (module docstring)."""
    bc = n.bias.detach().double().cpu() - dsum / count
    bf = bias_formats(bc, lp.bias.T)
    codes = saturate(round_values(bc * exp2(bf.F_tensor(), bc), rounding), bf.T)[0].long()
    return bf, tuple(int(v) for v in codes.tolist())


def _decide(n, lp, x, y, opts: RoundingOptions, rounding: str, seed: int, show: bool):
    """One layer: ``(new LayerPlan, report row)``."""
    t0 = time.time()
    g = coeff_grid(n, lp)
    near = layer_codes(n, replace(lp, codes=None), rounding)
    bias = None if n.bias is None else n.bias.detach().double()
    # bias correction alone corrects the codes the plan has (decided ones are kept)
    held = None if opts.learned or lp.codes is None else lp.codes.up
    err_n, dsum, count = _layer_stats(n, x, y, g.values(near if held is None else layer_codes(n, lp, rounding)), bias)
    row = {"layer": n.name, "nearest_error": err_n, "learned_error": None, "kept": "nearest" if held is None else "plan",
           "changed_codes": 0}
    up, notes = held, list(lp.notes)
    if opts.learned:
        cand = g.decided(_optimise(n, g, x, y, opts, seed, show))
        err_l, dsum_l, _ = _layer_stats(n, x, y, g.values(cand), bias)
        row["learned_error"] = err_l
        changed = int((cand != near).sum())
        if err_l <= err_n and changed:
            up, dsum = pack_bits(up_bits(g, cand)), dsum_l
            row.update(kept="learned", changed_codes=changed)
        notes.append(f"learned rounding: {row['changed_codes']} of {near.numel()} codes differ from nearest; "
                     f"calibration output error {err_n:.4g} (nearest) -> {err_l:.4g} (learned), kept {row['kept']}")
    bf, bcodes = lp.bias, None
    row["bias"] = "-"
    if opts.bias_correction and n.bias is not None and lp.bias is not None:
        bf, bcodes = _bias_from(n, lp, dsum, count, rounding)
        row["bias"] = "corrected"
        notes.append("bias correction: per-channel mean output error on the calibration images folded into the bias")
    elif opts.bias_correction:  # said, never skipped silently
        why = "the layer has no bias" if n.bias is None else "its bias stays in floating point in this plan"
        row["bias"] = f"not corrected: {why}"
        notes.append(f"bias correction not applied: {why} (a corrected bias would add a term the model does not have)"
                     if n.bias is None else f"bias correction not applied: {why}; give it bias bits to correct it")
    lc = None if up is None and bcodes is None else LayerCodes(weights_digest(n), up, bcodes)
    row["seconds"] = time.time() - t0
    return replace(lp, bias=bf, codes=lc, notes=tuple(notes)), row


def up_bits(g, codes: torch.Tensor) -> torch.Tensor:
    """Round-up bits that give ``codes`` (codes = sat(floor + up); saturated codes: up = 0)."""
    return (codes.double() > torch.floor(g.scaled())).reshape(-1)


def learn_rounding(graph: Graph, plan: QuantPlan, images: torch.Tensor, opts: RoundingOptions = RoundingOptions(),
                   device: str | torch.device = "cpu", show_progress: bool = True,
                   context: QuantPlan | None = None, only=None) -> tuple[QuantPlan, list[dict]]:
    """Decide every coefficient's rounding (and correct every bias) layer by layer on the
    calibration ``images``, in one pass through the graph (float and simulated side by
    side); returns the new plan (formats unchanged, codes stored) and one row per layer:
    output error (float64, calibration images) with nearest and learned codes, which was
    kept, how many codes differ from nearest, seconds. ``context``: the layers' inputs come
    from the simulation of that plan (same graph and data formats) instead of the plan being
    decided, so each layer is decided as if it alone took ``plan``'s formats
    (:class:`fixq.algorithms.learned_bank.CodeBank`). With ``opts.learned`` off, the plan's
    decided round-up bits are kept and only the biases are corrected. ``only``: the names of the
    layers to decide (default: every conv/linear layer with power-of-two coefficients)."""
    if plan.is_affine:
        raise PlanError("learned rounding and bias correction need power-of-two formats (not affine)")
    split = sorted(k for k, lp in plan.layers.items() if lp.kmeans is not None and lp.kmeans.data is not None)
    if split:  # their residual branch reads its own requantized input, which the layer statistics do not model
        raise PlanError(f"learned rounding and bias correction do not model the <4b,4b> residual branch's own data "
                        f"format (layer {split[0]!r}): drop --residual-data-bits or the rounding options")
    if images.shape[0] == 0:
        raise PlanError("learned rounding needs calibration images; none were given")
    if context is not None and context.tensors != plan.tensors:
        raise PlanError("learned rounding: the context plan must have the plan's data formats (same calibration)")
    unknown = sorted(set(only or ()) - {n.name for n in graph.layers()})
    if unknown:
        raise PlanError(f"learned rounding: no conv/linear layer named {', '.join(map(repr, unknown))}")
    device = torch.device(device)
    sim = Simulator(graph, plan if context is None else context, exact=False, device=device)
    B = images.shape[0]
    x0 = images.to(device=device, dtype=torch.float32)
    envf = {graph.input: x0}
    envq = {graph.input: _chunked(lambda t: sim.requant(graph.input, sim._t(t)), [x0], B)}
    left = {k: len(v) for k, v in graph.users().items()}
    layers, rows, cur, k = dict(plan.layers), [], plan, 0
    with torch.no_grad():
        for n in graph.nodes:
            if isinstance(n, Input):
                continue
            fa, qa = [envf[i] for i in n.inputs], [envq[i] for i in n.inputs]
            lp = layers.get(n.name)
            decide = lp is not None and isinstance(lp.weight, Formats)
            k += decide  # a layer's seed is its place among these layers, with or without ``only``
            if decide and (only is None or n.name in only):
                y = _chunked(lambda t: pre_activation(n, t), fa, B)
                with torch.enable_grad():
                    lp, row = _decide(n, lp, qa[0], y, opts, plan.rounding, opts.seed * 1000003 + k - 1, show_progress)
                rows.append(row)
                layers[n.name] = lp
                cur = replace(cur, layers=dict(layers))
                if context is None:
                    sim.update_layer(cur, n.name)
                envf[n.name] = apply_act(y, n.act)
            else:
                envf[n.name] = _chunked(lambda *t: FLOAT_RULES[type(n)](n, *t), fa, B)
            envq[n.name] = _chunked(lambda *t: SIM_RULES[type(n)](sim, n, *t), qa, B)
            for i in n.inputs:  # free what no later node reads
                left[i] -= 1
                if left[i] == 0 and i != graph.output:
                    del envf[i], envq[i]
    note = f"coefficient codes: {opts.label()} on {B} calibration images"
    out = replace(cur, notes=tuple(cur.notes) + (note,))
    check_plan(graph, out)  # DESIGN §5a on the corrected biases
    return out, rows

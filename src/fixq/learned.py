"""Learned rounding (AdaRound-style) and bias correction of a plan's coefficient codes.

Notation (DESIGN.md §2, §5; :mod:`fixq.coeffs`): per coefficient ``X`` (weight, or K-means
residual) in its fixed partition format ``Q(T, F)``, ``fl = floor(X 2**F)``; the code is
``sat_T(fl + up)`` with ``up`` in {0, 1}: learned rounding only chooses, per coefficient,
between the two grid points around it, inside the partition's range. The formats (``F``,
``T``) never change.

Per conv/linear layer, in graph order (AdaRound, Nagel et al. 2020):
- inputs ``x~``: the layer's input in the fast simulation of the plan with every earlier
  layer already decided (their codes and corrected biases), on the calibration images;
  target ``y``: the float model's pre-activation on the same images (no labels);
- soft codes ``fl + h(V)``, ``h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``,
  ``zeta = 1.1, gamma = -0.1``, ``V`` initialised so that ``h = X 2**F - fl`` (nearest);
- loss ``mean_{batch, pixels} sum_channels (act(conv(x~, W(h)) + b) - act(y))**2`` plus
  ``lambda sum (1 - |2h - 1|**beta)`` after a warm-up, ``beta`` annealed linearly from 20
  to 2: it drives every ``h`` to 0 or 1; Adam on ``V``, seeded minibatches;
- decision ``up = h >= 1/2``. Guard: the layer's output error with the learned codes is
  measured (float64) on all calibration images against nearest rounding's; when it is not
  lower, the layer keeps nearest rounding. So, on the calibration data, a layer's output
  error never increases (a guard, not a property of the optimiser).
Bias correction (optional, after the codes): per output channel ``e_i = mean(conv(x~, Wq) +
b - y)_i`` over the calibration images and pixels; the bias becomes ``b - e``, with new
maxabs bias formats (same bits) and its codes stored in the plan, so the per-channel mean
error left is the bias quantization's (at most one bias LSB).

Everything decided is stored in the plan (:class:`fixq.plan.LayerCodes`) and consumed by
every backend through :mod:`fixq.coeffs`.

>>> plan2, rows = learn_rounding(graph, plan, calib_images, RoundingOptions(iters=500))  # doctest: +SKIP
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from .coeffs import coeff_grid, layer_codes, pack_bits, weights_digest
from .formats import exp2, round_values, saturate
from .ir import FLOAT_RULES, Graph, Input, apply_act, pre_activation
from .plan import Formats, LayerCodes, PlanError, QuantPlan
from .progress import progress, set_status

__all__ = ["RoundingOptions", "learn_rounding", "layer_output_error", "ZETA", "GAMMA"]

ZETA, GAMMA = 1.1, -0.1


@dataclass(frozen=True)
class RoundingOptions:
    """Settings of :func:`learn_rounding` (``learned=False``: bias correction only)."""

    learned: bool = True
    bias_correction: bool = True
    iters: int = 1000        # Adam steps per layer
    batch: int = 32          # calibration images per step
    lr: float = 1e-2
    reg: float = 0.01        # lambda of the rounding regulariser
    warmup: float = 0.2      # share of the steps without the regulariser
    beta: tuple[float, float] = (20.0, 2.0)
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.learned or self.bias_correction):
            raise PlanError("learn_rounding with neither learned rounding nor bias correction does nothing")
        if self.iters < 1 or self.batch < 1:
            raise PlanError(f"learned rounding needs iters >= 1 and batch >= 1, got {self.iters}, {self.batch}")

    def label(self) -> str:
        parts = []
        if self.learned:
            parts.append(f"learned rounding ({self.iters} steps/layer, batch {self.batch}, seed {self.seed})")
        if self.bias_correction:
            parts.append("bias correction")
        return " + ".join(parts)


def _run_until(graph: Graph, x: torch.Tensor, stop: str, sim=None) -> torch.Tensor:
    """Input of node ``stop``: the float graph, or the simulation ``sim`` (nodes before it only)."""
    from .simulate import SIM_RULES
    env = {graph.input: x if sim is None else sim.requant(graph.input, sim._t(x))}
    node = graph.node(stop)
    for m in graph.nodes:
        if m.name == stop:
            break
        if isinstance(m, Input):
            continue
        args = [env[i] for i in m.inputs]
        env[m.name] = FLOAT_RULES[type(m)](m, *args) if sim is None else SIM_RULES[type(m)](sim, m, *args)
    return env[node.inputs[0]]


def _collect(graph: Graph, plan: QuantPlan, n, images: torch.Tensor, device, bs: int = 128):
    """``(x~, y)``: the layer's quantized-simulation input and the float pre-activation."""
    from .simulate import Simulator
    sim = Simulator(graph, plan, exact=False, device=device)
    xs, ys = [], []
    with torch.no_grad():
        for i in range(0, images.shape[0], bs):
            x = images[i:i + bs].to(device=device, dtype=torch.float32)
            xs.append(_run_until(graph, x, n.name, sim).float())
            ys.append(pre_activation(n, _run_until(graph, x, n.name)).float())
    return torch.cat(xs), torch.cat(ys)


def _out_error(n, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b, reduce_dims) -> torch.Tensor:
    d = apply_act(pre_activation(n, x, w, b), n.act) - apply_act(y, n.act)
    return (d * d).sum(dim=reduce_dims)


def layer_output_error(n, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b=None, bs: int = 128) -> float:
    """``sum (act(layer(x, w, b)) - act(y))**2`` over all images, in float64 (the guard's
    measure; ``y`` the float pre-activation)."""
    b = None if b is None else b.double()
    tot = 0.0
    with torch.no_grad():
        for i in range(0, x.shape[0], bs):
            tot += float(_out_error(n, x[i:i + bs].double(), y[i:i + bs].double(), w.double(),
                                    b, tuple(range(y.dim()))))
    return tot


def _h(V: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _optimise(n, g, x: torch.Tensor, y: torch.Tensor, opts: RoundingOptions, seed: int, show: bool) -> torch.Tensor:
    """AdaRound on one layer: returns the ``up`` decisions (bool, weight shape)."""
    dev = x.device
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
    opt = torch.optim.Adam([V], lr=opts.lr)
    gen = torch.Generator().manual_seed(seed)
    warm = int(opts.warmup * opts.iters)
    dims = (1,)
    bar = progress(range(opts.iters), f"learned rounding {n.name}", show)
    for it in bar:
        idx = torch.randint(0, x.shape[0], (min(opts.batch, x.shape[0]),), generator=gen).to(dev)
        h = _h(V)
        q = torch.minimum(torch.maximum(fl + h, lo), hi)
        w = q * step if off is None else off + q * step
        rec = _out_error(n, x[idx], y[idx], w, b, dims).mean()
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


def _corrected_bias(n, lp, x, y, w: torch.Tensor, rounding: str):
    """``(bias formats, codes)`` of ``b - e`` (module docstring), or None without a bias."""
    from .calibrate import bias_formats
    if n.bias is None or lp.bias is None:
        return None
    b = n.bias.detach().double().cpu()
    dims = [0] + list(range(2, y.dim()))
    e, count = torch.zeros_like(b), 0
    with torch.no_grad():
        for i in range(0, x.shape[0], 128):
            d = pre_activation(n, x[i:i + 128].double(), w.double().to(x.device), b.to(x.device)) - y[i:i + 128].double()
            e += d.sum(dim=dims).cpu()
            count += d.numel() // d.shape[1]
    bc = b - e / count
    bf = bias_formats(bc, lp.bias.T)
    codes = saturate(round_values(bc * exp2(bf.F_tensor(), bc), rounding), bf.T)[0].long()
    return bf, tuple(int(v) for v in codes.tolist())


def learn_rounding(graph: Graph, plan: QuantPlan, images: torch.Tensor, opts: RoundingOptions = RoundingOptions(),
                   device: str | torch.device = "cpu", show_progress: bool = True) -> tuple[QuantPlan, list[dict]]:
    """Decide every coefficient's rounding (and correct every bias) layer by layer on the
    calibration ``images``; returns the new plan (formats unchanged, codes stored) and one
    row per layer: output error (float64, calibration images) with nearest and learned
    codes, which was kept, how many codes differ from nearest, seconds."""
    if plan.is_affine:
        raise PlanError("learned rounding and bias correction need power-of-two formats (not affine)")
    if images.shape[0] == 0:
        raise PlanError("learned rounding needs calibration images; none were given")
    device = torch.device(device)
    layers, rows = dict(plan.layers), []
    cur = plan
    for k, n in enumerate(graph.layers()):
        lp = layers.get(n.name)
        if lp is None or not isinstance(lp.weight, Formats):
            continue
        t0 = time.time()
        x, y = _collect(graph, cur, n, images, device)
        g = coeff_grid(n, lp)
        near = layer_codes(n, replace(lp, codes=None), plan.rounding)
        wn = g.values(near)
        bias = None if n.bias is None else n.bias.detach().double()
        err_n = layer_output_error(n, x, y, wn, bias)
        row = {"layer": n.name, "nearest_error": err_n, "learned_error": None, "kept": "nearest", "changed_codes": 0}
        up, codes = None, near
        if opts.learned:
            cand = _optimise(n, g, x, y, opts, opts.seed * 1000003 + k, show_progress)
            cq = g.decided(cand)
            err_l = layer_output_error(n, x, y, g.values(cq), bias)
            row["learned_error"] = err_l
            changed = int((cq != near).sum())
            if err_l <= err_n and changed:
                up, codes = pack_bits(cand), cq
                row.update(kept="learned", changed_codes=changed)
        notes = list(lp.notes)
        if opts.learned:
            notes.append(f"learned rounding: {row['changed_codes']} of {near.numel()} codes differ from nearest; "
                         f"calibration output error {err_n:.4g} (nearest) -> {row['learned_error']:.4g} (learned), "
                         f"kept {row['kept']}")
        bf, bcodes = lp.bias, None
        if opts.bias_correction:
            cb = _corrected_bias(n, lp, x, y, g.values(codes), plan.rounding)
            if cb is not None:
                bf, bcodes = cb
                notes.append("bias correction: per-channel mean output error on the calibration images folded "
                             "into the bias")
        lc = None if up is None and bcodes is None else LayerCodes(weights_digest(n), up, bcodes)
        layers[n.name] = replace(lp, bias=bf, codes=lc, notes=tuple(notes))
        cur = replace(cur, layers=dict(layers))
        row["seconds"] = time.time() - t0
        rows.append(row)
    note = f"coefficient codes: {opts.label()} on {images.shape[0]} calibration images"
    out = replace(cur, notes=tuple(cur.notes) + (note,))
    from .engine import check_plan  # DESIGN §5a on the corrected biases
    check_plan(graph, out)
    return out, rows

"""Energy-based automatic 8/4-bit mixed precision per 2D filter (paper §5, Fig. 4; DESIGN §8).

Notation: ``E[i, j] = sum over probe images and pixels of |y_ij(p)|**2`` with
``y_ij = F_ij * x_j`` the partial feature map of 2D filter (i, j); ``f`` the energy
threshold; ``base``/``low`` the coefficient word lengths T (default 8 and 4).

The energy is computed without any partial map: ``E[i, j] = w_ij^T R_j w_ij`` where
``R_j = sum over images and output pixels of patch_j patch_j^T`` is the (kh*kw)^2 Gram
matrix of input channel j's receptive-field patches (the conv's own stride, padding and
dilation). A linear layer is a 1x1 conv on a 1x1 map.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as Fn

from fixq.data.stream import as_stream, stream_map
from fixq.errors import FixqError
from fixq.graph.ir import FLOAT_RULES, Conv, Graph, Input, Linear, apply_act, pre_activation
from fixq.util.progress import progress

__all__ = ["MixedError", "filter_grams", "energies_from_grams", "filter_energies", "low_precision_mask", "filter_bits", "eligible_layers",
           "Trial", "TuneResult", "tune_threshold", "layer_thresholds"]


class MixedError(FixqError):
    """A mixed-precision request that cannot be honoured (bad target, layers, data)."""


def _gram(n, x: torch.Tensor) -> torch.Tensor:
    """``R_j``: (C, k, k) Gram matrices of each input channel's patches, float64."""
    x = x.double()
    if isinstance(n, Linear):
        return (x * x).sum(dim=0).reshape(-1, 1, 1)
    B, C = x.shape[:2]
    kh, kw = n.weight.shape[2:]
    cols = Fn.unfold(x, (kh, kw), dilation=n.dilation, padding=n.padding, stride=n.stride)
    cols = cols.reshape(B, C, kh * kw, -1)
    return torch.einsum("bckl,bcml->ckm", cols, cols)


def _energy_from_gram(n, R: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """``E[i, j] = w_ij^T R_j w_ij`` for kernel i's input channels j (its group's); ``w``
    (weight shape) instead of the layer's weights, e.g. a coefficient change."""
    w = (n.weight.detach() if w is None else w).double().to(R.device)
    N, Mg = w.shape[:2]
    w = w.reshape(N, Mg, -1)
    groups = n.groups if isinstance(n, Conv) else 1
    Rg = R.reshape(groups, Mg, R.shape[1], R.shape[2])[torch.arange(N, device=R.device) // (N // groups)]
    return torch.einsum("nmk,nmkl,nml->nm", w, Rg, w)


@torch.no_grad()
def filter_grams(graph: Graph, loader, layers=None, device="cpu", show_progress: bool = True) -> dict:
    """``R_j`` of every input channel of ``layers`` (default: all conv/linear) over the probe
    images ``loader`` yields (``(images, labels)`` or images), float activations. Returns
    ``{layer: (C, kh*kw, kh*kw)}`` float64 tensors.

    >>> R = filter_grams(graph, [torch.randn(4, 1, 8, 8)])        # doctest: +SKIP
    >>> R["conv1"].shape                                          # 1 input channel, 5x5 kernel  # doctest: +SKIP
    torch.Size([1, 25, 25])
    """
    wanted = {n.name for n in graph.layers()} if layers is None else set(layers)
    stream = as_stream(loader)
    if len(stream) == 0:
        raise MixedError("the probe set is empty: give at least one probe image (--probe-size)")

    def one_batch(b, x):  # this batch's Gram matrices; summed below in batch order on every rank
        out = {}
        env = {graph.input: x.to(device=device, dtype=torch.float32)}
        left = {k: len(v) for k, v in graph.users().items()}
        for n in graph.nodes:
            if isinstance(n, Input):
                continue
            args = [env[i] for i in n.inputs]
            if isinstance(n, (Conv, Linear)):
                if n.name in wanted:
                    out[n.name] = _gram(n, args[0])
                env[n.name] = apply_act(pre_activation(n, *args), n.act)
            else:
                env[n.name] = FLOAT_RULES[type(n)](n, *args)
            del args
            for i in n.inputs:
                left[i] -= 1
                if left[i] == 0:
                    del env[i]
        return out

    grams: dict[str, torch.Tensor] = {}
    for out in stream_map(stream, one_batch, "filter energies", show_progress):
        for name, R in out.items():
            R = R.to(device)
            grams[name] = R if name not in grams else grams[name] + R
    return grams


def energies_from_grams(graph: Graph, grams: dict, weights: dict | None = None) -> dict:
    """``{layer: (N, M/groups)}`` energies ``w_ij^T R_j w_ij`` of the layers in ``grams``; with
    ``weights`` (``{layer: tensor of the weight's shape}``) those tensors instead of the layers'
    weights: ``weights = {l: W_low - W_base}`` gives each 2D filter's added noise energy.

    >>> energies_from_grams(graph, grams, {"conv1": dw})["conv1"].shape   # doctest: +SKIP
    torch.Size([6, 1])
    """
    weights = weights or {}
    return {n.name: _energy_from_gram(n, grams[n.name], weights.get(n.name)).cpu() for n in graph.layers()
            if n.name in grams}


def filter_energies(graph: Graph, loader, layers=None, device="cpu", show_progress: bool = True) -> dict:
    """Energy of every 2D filter of ``layers`` (default: all conv/linear) over the probe
    images ``loader`` yields (``(images, labels)`` or images). Returns ``{layer: (N, M/groups)}``
    float64 tensors.

    >>> E = filter_energies(graph, [torch.randn(4, 1, 8, 8)])     # doctest: +SKIP
    >>> E["conv1"].shape                                          # doctest: +SKIP
    torch.Size([6, 1])
    """
    return energies_from_grams(graph, filter_grams(graph, loader, layers, device, show_progress))


def low_precision_mask(E: torch.Tensor, f: float) -> torch.Tensor:
    """The lowest-energy filters whose cumulative share of the layer's energy (their own
    included) stays under ``f``: ``True`` = low precision. Ties keep index order.

    >>> low_precision_mask(torch.tensor([[5.0, 1.0], [2.0, 92.0]]), 0.09).tolist()
    [[True, True], [True, False]]
    """
    if not 0.0 <= f <= 1.0:
        raise MixedError(f"energy threshold f must lie in [0, 1], got {f}")
    flat = E.reshape(-1).double()
    order = torch.sort(flat, stable=True).indices
    total = float(flat.sum())
    share = flat[order].cumsum(0) / total if total > 0 else torch.zeros_like(flat)
    low = torch.zeros_like(flat, dtype=torch.bool)
    low[order] = share < f if f < 1.0 else torch.ones_like(share, dtype=torch.bool)
    return low.reshape(E.shape)


def filter_bits(energies: dict, f: float | dict, base: int = 8, low: int = 4) -> dict:
    """Coefficient bits per 2D filter for every layer in ``energies``: ``low`` where
    :func:`low_precision_mask` says so, ``base`` elsewhere. ``f`` is one threshold or a
    threshold per layer."""
    out = {}
    for name, E in energies.items():
        fl = f[name] if isinstance(f, dict) else f
        out[name] = torch.where(low_precision_mask(E, fl), low, base).to(torch.int64)
    return out


def eligible_layers(graph: Graph, exclude: str | list | tuple = ("first", "last")) -> list[str]:
    """Conv/linear layers that may go low precision: all but ``exclude`` (names, or the
    words ``first``/``last``, ``depthwise`` for every conv with one input channel per filter
    and more than one group; ``none`` for none).

    >>> eligible_layers(g, "first,last,depthwise")   # a MobileNet block: stem, dw, pw, fc  # doctest: +SKIP
    ['pw']
    """
    layers = graph.layers()
    names = [n.name for n in layers]
    items = [s.strip() for s in (exclude.split(",") if isinstance(exclude, str) else exclude) if s.strip()]
    drop = set()
    for it in items:
        if it == "none":
            continue
        if it == "first":
            drop.add(names[0])
        elif it == "last":
            drop.add(names[-1])
        elif it == "depthwise":
            drop.update(n.name for n in layers if isinstance(n, Conv) and n.groups > 1 and n.weight.shape[1] == 1)
        elif it in names:
            drop.add(it)
        else:
            raise MixedError(f"--exclude names layer {it!r}, which the model does not have (words: first, last, "
                             f"depthwise, none); its conv/linear layers are: {', '.join(names)}")
    out = [n for n in names if n not in drop]
    if not out:
        raise MixedError("no layer is left for low precision after --exclude")
    return out


@dataclass(frozen=True)
class Trial:
    """One evaluated threshold of the tuning loop."""

    f: float
    strategy: str                 # "global" or "per-layer"
    top1_error: float             # on the tuning images
    rel_complexity_mmacs: float
    savings_pct: float            # vs <base,8b> everywhere
    low_filters_pct: float        # of all 2D filters of the eligible layers
    meets_target: bool            # under the search's acceptance rule (fixq.algorithms.acceptance)
    drop_bound: float | None = None  # top-1 drop vs float + the noise margin (points)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TuneResult:
    best: Trial | None            # lowest complexity among trials meeting the target
    trials: tuple[Trial, ...]
    stop_reason: str


def tune_threshold(evaluate: Callable[[float], Trial], target: float, f0: float = 0.05,
                   delta: float = 0.05, min_delta: float = 0.005, max_trials: int = 12,
                   show_progress: bool = False) -> TuneResult:
    """Paper Fig. 4: raise f by delta while the error meets ``target``; on a miss go back
    to the last f that met it and halve delta. Stops when delta < ``min_delta`` or after
    ``max_trials`` evaluations (f = 0 counts as the first: the all-base plan). Before the
    steps, f = 1 (the top of the range) is measured once, outside the budget: when it meets
    the target no step can do better (e.g. with learned low-bit codes), otherwise it marks
    the first miss. Returns the lowest-complexity trial that met the target (None if even
    f = 0 did not).

    >>> r = tune_threshold(lambda f: Trial(f, "global", 10 + 10 * f, 1 - f, 100 * f, 100 * f, 10 + 10 * f <= 11), 11)
    >>> round(r.best.f, 3), r.best.meets_target
    (0.1, True)
    """
    trials: list[Trial] = []
    bar = progress(range(max_trials), "tune threshold", show_progress)
    it = iter(bar)

    def run(f):
        next(it, None)
        t = evaluate(f)  # its meets_target already applies the acceptance rule (noise margin)
        trials.append(t)
        return t

    t = run(0.0)
    if not t.meets_target:
        return TuneResult(None, tuple(trials), "the all-base plan (f = 0) already misses the target")
    if run(1.0).meets_target:
        return TuneResult(trials[-1], tuple(trials), "f = 1 (the top of the range) meets the target")
    good, bad, f, reason = 0.0, 1.0, f0, "trial budget spent"
    while len(trials) < max_trials + 1:  # the f = 1 probe is outside the budget
        f = min(f, 1.0)
        # a threshold at or above one that already missed is not re-measured: it counts as a miss
        # (compared within 1e-9: 0.025 + 0.0125 and 0.03125 + 0.00625 are both 0.0375, in two roundings)
        met = f < bad - 1e-9 and run(f).meets_target
        if met:
            good = f
            if f >= 1.0:
                reason = "f = 1 (the top of the range) meets the target"
                break
            f = f + delta
        else:
            bad = min(bad, f)
            delta /= 2
            if delta < min_delta:
                reason = f"step below {min_delta}"
                break
            f = good + delta
    ok = [t for t in trials if t.meets_target]
    best = min(ok, key=lambda t: (t.rel_complexity_mmacs, t.top1_error))
    return TuneResult(best, tuple(trials), reason)


def layer_thresholds(sensitivity: dict, f: float, power: float = 0.5) -> dict:
    """Per-layer thresholds from per-layer sensitivity ``s_l`` (the output noise with layer l
    alone at low precision): ``f_l = min(1, f * (s_ref / s_l)**power)`` with ``s_ref``
    the geometric mean of the positive ``s_l``, so robust layers take more low-precision filters
    than fragile ones; a layer with no noise takes every filter (f > 0).

    >>> {k: round(v, 3) for k, v in layer_thresholds({"a": 1.0, "b": 4.0, "c": 0.0}, 0.2).items()}
    {'a': 0.283, 'b': 0.141, 'c': 1.0}
    """
    s = {k: float(v) for k, v in sensitivity.items()}
    bad = {k: v for k, v in s.items() if not math.isfinite(v) or v < 0}
    if bad:
        raise MixedError(f"layer sensitivity must be a finite noise >= 0, got {bad} (overflowing logits?)")
    pos = [v for v in s.values() if v > 0]
    ref = float(torch.tensor(pos, dtype=torch.float64).log().mean().exp()) if pos else 1.0
    return {k: (min(1.0, f * (ref / v) ** power) if v > 0 else (1.0 if f > 0 else 0.0)) for k, v in s.items()}

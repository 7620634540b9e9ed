"""Learned low-bit codes decided once and reused by every trial of a mixed-precision search.

Notation (DESIGN.md §2, §5; :mod:`fixq.algorithms.learned`): a coefficient ``X`` in its 2D
filter's format ``Q(T, F)`` has the code ``sat_T(floor(X 2**F) + up)``. In an 8/4-bit plan
(``fixq mixed``) a filter's format is its own ``F`` at ``T`` = base or low bits, so a low-bit
filter has the same grid in every trial that takes it low, except where the layer's spread
cap (DESIGN §5a, which depends on the other filters' ``T`` with ``mse`` ranges) moves its ``F``:
such a filter then takes nearest rounding (``apply`` compares ``T`` and ``F`` per coefficient).

The bank learns, once, every eligible layer's codes with all its filters at the low bits
(:func:`fixq.algorithms.learned.learn_rounding`); no bias correction (a bias correction depends
on which filters a trial takes low). Each layer's input (``RoundingOptions.bank_inputs``):
``"sequential"`` (default) the simulation of the all-low plan with the earlier layers' codes
already decided, as AdaRound does, so a layer's codes also absorb the error its input carries
from the earlier low layers; ``"base"`` the all-base-bits plan's simulation (``context``), each
layer decided as if it alone were low. :meth:`CodeBank.apply` gives a
trial plan those codes for the coefficients it takes low (same ``T`` and ``F`` as in the
bank) and the plan's rounding for the others, stored as the plan's round-up bits, so the
tuner measures, and the saved plan holds, exactly the codes every backend runs.

>>> bank = CodeBank(graph, low_plan, base_plan, calib_images, RoundingOptions(iters=300), ["conv2"])  # doctest: +SKIP
>>> trial = bank.apply(bench.plan(filter_bits=bits))                                     # doctest: +SKIP

:class:`KMeansCodeBank` does the same for ``fixq kmeans``: the residual codes of every candidate
``(layer, K)`` are learned once, before they are measured, in one pass per candidate index ``j``
(every candidate layer clustered at its ``j``-th K; ``"sequential"``: fed by the earlier ones
already decided; ``"base"``: each layer alone clustered, fed by the all-base-bits plan); a
trial whose layer has exactly that clustering and those residual formats takes them.

>>> kbank = KMeansCodeBank(graph, [(plan_k1, ["conv2"]), (plan_k2, ["conv2"])], base_plan, calib_images,
...                        RoundingOptions(iters=300))                                     # doctest: +SKIP
>>> trial = kbank.apply(bench.plan(kmeans={"conv2": clusters_k2}))                         # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import replace

import torch

from fixq.graph.ir import Graph
from fixq.planning.coeffs import coeff_grid, layer_codes, pack_bits, weights_digest
from fixq.planning.plan import Formats, LayerCodes, QuantPlan
from .learned import RoundingOptions, learn_rounding, up_bits

__all__ = ["CodeBank", "KMeansCodeBank", "guarded_bias_correction", "inputs_text", "kmeans_inputs_text"]


def inputs_text(opts: RoundingOptions, low: str = "all its filters low") -> str:
    """How a bank layer's input was made, for notes and reports.

    >>> inputs_text(RoundingOptions(bank_inputs="base"))
    'each layer with all its filters low and its input from the all-base-bits plan'
    """
    if opts.bank_inputs == "base":
        return f"each layer with {low} and its input from the all-base-bits plan"
    return f"each layer with {low} and its input from the earlier layers, low too, with their codes already decided"


def kmeans_inputs_text(opts: RoundingOptions) -> str:
    """:func:`inputs_text` for the K-means bank's passes."""
    if opts.bank_inputs == "base":
        return "the layer clustered alone at that K and its input from the all-base-bits plan"
    return ("one pass per candidate index, every candidate layer clustered at that index's K and fed by the "
            "earlier ones with their codes already decided")


def _inputs(opts: RoundingOptions, context: QuantPlan) -> QuantPlan | None:
    """``learn_rounding``'s ``context`` for a bank: the all-base-bits plan with ``"base"``, none
    (the plan being learned feeds its own layers) with ``"sequential"``."""
    return context if opts.bank_inputs == "base" else None


def _grid(g) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F, T)`` of a coefficient grid as broadcastable tensors (per filter, not per coefficient)."""
    return g.F.clone(), torch.as_tensor(g.T).clone()


class CodeBank:
    """Low-bit codes of ``layers`` (those a search may take low, all low in ``low_plan``) learned
    per layer (module docstring); ``context``: the all-base-bits plan (the layers' inputs with
    ``opts.bank_inputs == "base"``); ``rows``: learn_rounding's report rows."""

    def __init__(self, graph: Graph, low_plan: QuantPlan, context: QuantPlan, images: torch.Tensor,
                 opts: RoundingOptions, layers, device="cpu", show_progress: bool = True) -> None:
        self.graph = graph
        learned, self.rows = learn_rounding(graph, low_plan, images, replace(opts, learned=True, bias_correction=False),
                                            device, show_progress, only=set(layers), context=_inputs(opts, context))
        self.codes: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # name -> (F, T, int16 codes)
        for name, lp in learned.layers.items():
            if lp.codes is None or lp.codes.up is None:
                continue  # nearest rounding was kept: trials need nothing from the bank
            n = graph.node(name)
            self.codes[name] = (*_grid(coeff_grid(n, lp)), layer_codes(n, lp, learned.rounding).to(torch.int16))
        self.note = (f"coefficient codes: {replace(opts, bias_correction=False).label()} of the low-bit filters, "
                     f"decided before the search on {images.shape[0]} calibration images, {inputs_text(opts)}; "
                     "other filters: nearest rounding")

    def apply(self, plan: QuantPlan) -> QuantPlan:
        """``plan`` with the bank's codes on every coefficient whose grid (``T``, ``F``) is the
        bank's; the rest keep ``plan``'s rounding. Formats never change."""
        layers, changed = dict(plan.layers), False
        for name, (F, T, codes) in self.codes.items():
            lp = layers.get(name)
            if lp is None or not isinstance(lp.weight, Formats) or lp.codes is not None:
                continue
            n = self.graph.node(name)
            g = coeff_grid(n, lp)
            Fg, Tg = _grid(g)
            same = torch.broadcast_to((Fg == F) & (Tg == T), g.x.shape)
            if not bool(same.any()):
                continue
            near = g.nearest(plan.rounding)
            chosen = torch.where(same, codes.long(), near)
            if torch.equal(chosen, near):
                continue
            layers[name] = replace(lp, codes=LayerCodes(weights_digest(n), pack_bits(up_bits(g, chosen)), None))
            changed = True
        if not changed:
            return plan
        return replace(plan, layers=layers, notes=tuple(plan.notes) + (self.note,))

    def report(self, plan: QuantPlan) -> list[dict]:
        """The learning pass's rows (errors with all filters low, input from the base plan) with
        ``changed_codes`` replaced by the codes of ``plan`` that differ from nearest rounding
        and ``kept`` "learned" only where ``plan`` holds learned codes of that layer."""
        out = []
        for r in self.rows:
            lp = plan.layers.get(r["layer"])
            n = self.graph.node(r["layer"])
            changed = 0 if lp is None or lp.codes is None or lp.codes.up is None else int(
                (layer_codes(n, lp, plan.rounding) != layer_codes(n, replace(lp, codes=None), plan.rounding)).sum())
            out.append(dict(r, changed_codes=changed, kept="learned" if changed else "nearest",
                            learned_in_bank=r["kept"] == "learned"))
        return out


class KMeansCodeBank:
    """Learned residual codes of K-means candidates (module docstring). ``plans``: pairs
    ``(plan, layers)``, each plan clustering its ``layers`` (one K each); every pair is one
    learning pass, its layers fed by the plan itself (``"sequential"``) or by ``context`` (the
    all-base-bits plan, ``"base"``). ``codes``:
    ``(layer, K) -> (KMeansPlan, residual Formats, LayerCodes)`` where learned rounding was kept;
    ``rows``: ``(layer, K) -> learn_rounding's row``."""

    def __init__(self, graph: Graph, plans, context: QuantPlan, images: torch.Tensor, opts: RoundingOptions,
                 device="cpu", show_progress: bool = True) -> None:
        self.graph, self.context, self.images, self.opts = graph, context, images, opts
        self.device, self.show_progress = device, show_progress
        self.codes: dict = {}
        self.rows: dict = {}
        o = replace(opts, learned=True, bias_correction=False)
        self.learn(plans)
        self.note = (f"K-means residual codes: {o.label()}, decided before they were measured on "
                     f"{images.shape[0]} calibration images for each candidate (layer, K) the search tried, "
                     f"{kmeans_inputs_text(opts)}")

    def learn(self, plans) -> None:
        """More passes (pairs ``(plan, layers)`` as in the constructor), e.g. the other candidate
        indices once the search needs them (``search_kmeans`` learns index 0 first)."""
        o = replace(self.opts, learned=True, bias_correction=False)
        for plan, layers in plans:
            learned, rows = learn_rounding(self.graph, plan, self.images, o, self.device, self.show_progress,
                                           only=set(layers), context=_inputs(self.opts, self.context))
            for r in rows:
                lp = learned.layers[r["layer"]]
                key = (r["layer"], lp.kmeans.K)
                self.rows[key] = r
                if lp.codes is not None and lp.codes.up is not None:
                    self.codes[key] = (lp.kmeans, lp.weight, lp.codes)

    def apply(self, plan: QuantPlan) -> QuantPlan:
        """``plan`` with the bank's residual codes on every K-means layer whose clustering and
        residual formats are the bank's for that K (and that has no codes of its own)."""
        layers, changed = dict(plan.layers), False
        for name, lp in plan.layers.items():
            if lp.kmeans is None or lp.codes is not None:
                continue
            hit = self.codes.get((name, lp.kmeans.K))
            if hit is None or hit[0] != lp.kmeans or hit[1] != lp.weight:
                continue
            layers[name] = replace(lp, codes=hit[2])
            changed = True
        if not changed:
            return plan
        return replace(plan, layers=layers, notes=tuple(plan.notes) + (self.note,))

    def report(self, plan: QuantPlan) -> list[dict]:
        """The learning rows of ``plan``'s K-means layers at their K, ``kept`` "learned" only
        where ``plan`` holds the bank's codes of that layer."""
        out = []
        for name, lp in plan.layers.items():
            if lp.kmeans is None or (name, lp.kmeans.K) not in self.rows:
                continue
            r = self.rows[(name, lp.kmeans.K)]
            hit = self.codes.get((name, lp.kmeans.K))
            mine = hit is not None and lp.codes is not None and lp.codes.up == hit[2].up
            out.append(dict(r, K=lp.kmeans.K, kept="learned" if mine else "nearest",
                            changed_codes=r["changed_codes"] if mine else 0, learned_in_bank=hit is not None))
        return out


def guarded_bias_correction(graph: Graph, plan: QuantPlan, images: torch.Tensor, opts: RoundingOptions, device,
                            show_progress: bool, rows, measure, error: float):
    """Bias correction of a searched plan, its codes kept (``fixq mixed`` and ``fixq kmeans``):
    ``(corrected plan, rows, corrected tuning error, kept)``. ``rows``: the plan's codes rows
    (or None), given the correction's bias column; ``measure(plan)``: its tuning top-1 error;
    kept only when it is <= ``error`` (the plan's), else the rows say the biases were not kept.

    >>> cplan, rows, e_bc, kept = guarded_bias_correction(g, plan, calib, opts, "cpu", False, rows,
    ...                                                   lambda p: bench.measure(p)[0], e_plan)  # doctest: +SKIP
    """
    cplan, crows = learn_rounding(graph, plan, images, replace(opts, learned=False), device, show_progress)
    mine = {r["layer"]: r for r in rows or ()}
    rows = [dict(mine[b["layer"]], bias=b["bias"]) if b["layer"] in mine else b for b in crows]
    e_bc = measure(cplan)
    kept = e_bc <= error + 1e-9
    if not kept:  # the rows describe the saved plan: its biases are the model's
        rows = [dict(r, bias=f"{r['bias']}, not kept (guard)") if r.get("bias") == "corrected" else r for r in rows]
    return cplan, rows, e_bc, kept

"""The automatic 8/4-bit search of ``fixq mixed`` over a Session (paper Fig. 4, Table 3).

The evaluation images are split once (seeded) into a tuning part, on which every trial
is measured, and a test part, on which only the final plans are reported: the reported
error is not the one the tuner saw. Complexity is in <8b,8b> MAC units (DESIGN §7);
savings are relative to 2D-HQ with every filter at the base bits.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from fixq.graph.ir import Linear
from fixq.planning.coeffs import layer_values
from fixq.planning.plan import QuantConfig, QuantPlan
from .learned_bank import CodeBank, guarded_bias_correction
from .mixed import (MixedError, Trial, TuneResult, eligible_layers, energies_from_grams, filter_bits, filter_grams,
                    layer_thresholds, tune_threshold)
from .pipeline import Session
from .search import PlanBench, base_config, resolve_target

__all__ = ["MixedOptions", "MixedResult", "PlanScore", "search_mixed"]


@dataclass(frozen=True)
class MixedOptions:
    base_bits: int = 8
    low_bits: int = 4
    target_drop: float | None = 1.0     # points over float on the tuning images
    target_error: float | None = None   # absolute top-1 error (%), instead of target_drop
    probe_size: int = 64
    tune_size: int | None = None        # default: half the evaluation images
    sensitivity_size: int = 256
    exclude: str = "first,last,depthwise"  # a depthwise output channel is one 4-bit kernel, no sum over inputs
    trials: int = 12
    f0: float = 0.05
    delta: float = 0.05
    min_delta: float = 0.005
    strategies: tuple[str, ...] = ("global", "per-layer")
    seed: int = 0
    margin_z: float = 1.0               # acceptance margin in standard errors (fixq.algorithms.acceptance)
    order: str = "noise"                # which filters go low first: "noise" (DESIGN §8) or "energy" (the paper)

    def __post_init__(self) -> None:
        if self.low_bits >= self.base_bits:
            raise MixedError(f"--low-bits ({self.low_bits}) must be below --base-bits ({self.base_bits})")
        if self.probe_size <= 0:
            raise MixedError("the probe set is empty: --probe-size must be at least 1")
        if not (0 < self.f0 <= 1 and 0 < self.delta <= 1 and 0 < self.min_delta <= self.delta):
            raise MixedError("need 0 < f0 <= 1 and 0 < min_delta <= delta <= 1")
        if self.trials < 2:
            raise MixedError("--trials must be at least 2 (f = 0 and one threshold)")
        if self.order not in ("noise", "energy"):
            raise MixedError(f"--order is 'noise' or 'energy', got {self.order!r}")
        bad = set(self.strategies) - {"global", "per-layer"}
        if bad or not self.strategies:
            raise MixedError(f"strategies are 'global' and 'per-layer', got {sorted(bad) or 'none'}")


@dataclass(frozen=True)
class PlanScore:
    """A plan measured on the test images."""

    label: str
    plan: QuantPlan
    top1_error: float
    top5_error: float
    rel_complexity_mmacs: float
    savings_pct: float
    low_filters_pct: float
    low_by_layer: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MixedResult:
    float_top1_tune: float
    float_top1_test: float
    float_top5_test: float
    target: float
    n_tune: int
    n_test: int
    conservative: PlanScore
    tuned: PlanScore
    aggressive: PlanScore
    strategy: str
    tuning: dict                      # strategy -> TuneResult
    sensitivity: dict                 # layer -> {"delta_top1": .., "output_noise": .., "added_noise": ..}
    thresholds: dict                  # layer -> f used by the tuned plan
    seconds: dict
    learned: PlanScore | None = None  # the tuned plan with learned rounding / bias correction (``codes``)
    codes_rows: list | None = None
    codes_in_search: bool = False     # trials ran with the learned low-bit codes (CodeBank)
    bias_guard: dict | None = None    # tuning top-1 of the tuned plan with / without bias correction
    resolution: dict | None = None    # what the tuning images resolve (fixq.algorithms.acceptance.resolution)
    order: str = "noise"              # the order the trials used

    @property
    def saved(self) -> PlanScore:
        """The plan ``fixq mixed`` saves: the bias-corrected one unless it raised the tuning error."""
        if self.learned is not None and (self.bias_guard is None or self.bias_guard["kept"]):
            return self.learned
        return self.tuned


def _low_pct(bits: dict, base: int) -> tuple[float, dict]:
    per = {k: 100.0 * float((b < base).double().mean()) for k, b in bits.items()}
    tot = sum(b.numel() for b in bits.values())
    low = sum(int((b < base).sum()) for b in bits.values())
    return (100.0 * low / tot if tot else 0.0), per


def search_mixed(session: Session, config: QuantConfig, opts: MixedOptions, codes=None) -> MixedResult:
    """Energies on probe images, then the tuning loop for each strategy, then the
    Conservative / tuned / Aggressive plans on the test images. ``codes`` (a
    :class:`fixq.algorithms.learned.RoundingOptions`): with learned rounding, every layer's low-bit
    codes are learned once before the search (:class:`fixq.algorithms.learned_bank.CodeBank`) and
    every trial, the sensitivity pass included, runs with them; with bias correction, the tuned
    plan's biases are then corrected and that plan is reported too (``learned``).

    >>> res = search_mixed(session, QuantConfig(), MixedOptions(target_drop=1.0))  # doctest: +SKIP
    >>> res.tuned.savings_pct, res.tuned.top1_error                              # doctest: +SKIP
    """
    t0 = time.time()
    g = session.graph
    names = eligible_layers(g, opts.exclude)
    # fc_mode 4D (the paper's §3): one format per fully connected layer, so no per-weight 8/4 mix there
    names = [n for n in names if not (isinstance(g.node(n), Linear) and config.for_layer(n).fc_mode == "4D")]
    if not names:
        raise MixedError("no layer is left for low precision: the others are excluded or fully connected with "
                         "--fc-mode 4D (one format per layer)")
    bench = PlanBench(session, base_config(config, opts.base_bits), opts.tune_size, opts.seed, opts.margin_z)
    target = resolve_target(bench.float_tune, opts.target_drop, opts.target_error)
    bench.require_base(target, "tune", MixedError)  # refuse before energies and sensitivity
    resolution = bench.resolution(target)
    cal = session.calib_stream
    if len(cal) == 0:
        raise MixedError("the probe set is empty: no calibration images were loaded")
    probe = cal.subset(range(min(opts.probe_size, len(cal))), batch_size=32)  # the first calibration images
    grams = filter_grams(g, probe, names, session.device, session.show_progress)
    energies = energies_from_grams(g, grams)
    t_energy = time.time() - t0
    aggressive_bits = {n: torch.full(tuple(energies[n].shape), opts.low_bits, dtype=torch.int64) for n in names}

    bank, t_bank = None, time.time()
    if codes is not None and codes.learned:
        bank = CodeBank(g, bench.plan(filter_bits=aggressive_bits), bench.base_plan, cal.tensor(), codes, names,
                        session.device, session.show_progress)
    t_bank = time.time() - t_bank

    def make_plan(bits: dict) -> QuantPlan:
        plan = bench.plan(filter_bits=bits)
        return plan if bank is None else bank.apply(plan)

    low_plan = None  # the all-low plan, made once when the order needs it (the Aggressive row reuses it)
    if opts.order == "noise":  # rank filters by the noise energy their low-bit codes add (bank codes included)
        t_noise = time.time()
        low_plan = make_plan(aggressive_bits)
        base = bench.base_plan
        deltas = {n: layer_values(g.node(n), low_plan.layers[n], low_plan.rounding)
                  - layer_values(g.node(n), base.layers[n], base.rounding) for n in names}
        energies = energies_from_grams(g, grams, deltas)
        t_energy += time.time() - t_noise
    del grams

    def trial_for(strategy, fmap):
        def run(f: float) -> Trial:
            bits = filter_bits(energies, fmap(f), opts.base_bits, opts.low_bits)
            plan = make_plan(bits)
            err, _, logits = bench.measure(plan)
            ok, d = bench.judge(logits, target)
            c, sv = bench.cost(plan)
            return Trial(f, strategy, err, c, sv, _low_pct(bits, opts.base_bits)[0], ok, d["bound"])
        return run

    sensitivity: dict = {}
    fmaps = {"global": lambda f: f}
    if "per-layer" in opts.strategies:
        m = opts.sensitivity_size
        got = bench.measure_many({name: (lambda name=name: make_plan({name: aggressive_bits[name]})) for name in names},
                                 "tune", m, base=True, desc="layer sensitivity")
        base_err, _, base_logits = bench.measure(bench.base_plan, "tune", m)  # kept by the first base pass
        for name in names:
            err, _, logits = got[name]  # one simulation gives all three (same plan, same images)
            sensitivity[name] = {"delta_top1": err - base_err, "output_noise": bench.logit_noise(logits, "tune"),
                                 "added_noise": bench.logit_noise(logits, "tune", base_logits)}
        # s_l: the noise against float (added_noise, without the base plan's own, measured worse; DESIGN §8)
        fmaps["per-layer"] = lambda f: layer_thresholds({k: v["output_noise"] for k, v in sensitivity.items()}, f)
    t_sens = time.time() - t0 - t_energy - t_bank
    tuning: dict[str, TuneResult] = {}
    for s in opts.strategies:
        tuning[s] = tune_threshold(trial_for(s, fmaps[s]), target, opts.f0, opts.delta, opts.min_delta,
                                   opts.trials, session.show_progress)
    winners = [(r.best, s) for s, r in tuning.items() if r.best is not None]
    if not winners:
        raise MixedError(f"even the all-{opts.base_bits}-bit plan misses the target {target:.2f}% on the tuning "
                         "images: raise --target-drop / --target-error or use more base bits")
    # lowest complexity wins; at equal complexity the paper's single global threshold
    best, strategy = min(winners, key=lambda w: (w[0].rel_complexity_mmacs, w[1] != "global"))
    t_tune = time.time() - t0 - t_energy - t_bank - t_sens

    def score(label, bits, plan=None) -> PlanScore:
        plan = plan or make_plan(bits)
        e1, e5, _ = bench.measure(plan, "test")
        c, sv = bench.cost(plan)
        tot, per = _low_pct(bits, opts.base_bits) if bits else (0.0, {n: 0.0 for n in names})
        return PlanScore(label, plan, e1, e5, c, sv, tot, per)

    thresholds = fmaps[strategy](best.f)
    thresholds = {n: thresholds for n in names} if not isinstance(thresholds, dict) else thresholds
    tuned_bits = filter_bits(energies, thresholds, opts.base_bits, opts.low_bits)
    cons = score(f"Conservative (all {opts.base_bits}b)", {})
    banked = "" if bank is None else ", learned low-bit codes"
    tuned = score(f"Tuned ({strategy}, f={best.f:.4g}{banked})", tuned_bits)
    aggr = score(f"Aggressive (eligible layers {opts.low_bits}b{banked})", aggressive_bits, low_plan)
    learned, bias_guard, t_codes = None, None, time.time()
    rows = None if bank is None else bank.report(tuned.plan)  # what the saved plan holds, per layer
    if codes is not None and codes.bias_correction:  # the tuned plan's codes kept: only the biases change
        plan, rows, e_bc, kept = guarded_bias_correction(g, tuned.plan, cal.tensor(), codes, session.device,
                                                         session.show_progress, rows, lambda p: bench.measure(p)[0],
                                                         best.top1_error)
        learned = score("Tuned + bias correction", tuned_bits, plan)
        bias_guard = {"tune_top1_tuned": best.top1_error, "tune_top1_corrected": e_bc, "kept": kept}
    t_codes = time.time() - t_codes + t_bank
    return MixedResult(bench.float_tune, *bench.float_test, target, bench.n_tune, bench.n_test, cons, tuned, aggr, strategy,
                       tuning, sensitivity, thresholds,
                       {"energies_s": t_energy, "sensitivity_s": t_sens, "tuning_s": t_tune, "codes_s": t_codes,
                        "total_s": time.time() - t0}, learned, rows, bank is not None and bool(bank.codes), bias_guard,
                       resolution, opts.order)

"""``fixq kmeans``: K chosen per layer under an accuracy budget, and the paper's Table 4
(one layer) and Table 6 (network) comparisons (paper §6).

Automatic K: candidates 1, 2, 4, ... up to N/4 (at least 25% layer savings with 4-bit
residuals). The first trial clusters every eligible layer at its smallest K (the most savings);
when it meets the target it is kept. Otherwise, for every eligible layer and candidate K the
output noise ``||logits - float||^2 / ||float||^2`` with that layer alone clustered is
measured on tuning images. A budget ``beta`` gives each layer the smallest K whose noise is
<= beta (or no clustering); the largest beta (by bisection over the measured noise values)
whose whole-network plan meets the target top-1 error on the tuning images is kept. Reported
errors come from the test images.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch

from fixq.analysis.complexity import analyze
from fixq.graph.ir import Conv, Graph
from fixq.planning.partitions import input_point
from fixq.planning.plan import QuantConfig, QuantPlan
from .kmeans import KMeansError, check_K, cluster_kernels, layer_savings
from .learned_bank import KMeansCodeBank, guarded_bias_correction
from .mixed import eligible_layers
from .pipeline import Session
from .search import PlanBench, base_config, resolve_target

__all__ = ["KMeansOptions", "KMeansResult", "kmeans_layers", "parse_k", "candidate_Ks", "search_kmeans",
           "input_point", "only_layer_config"]


@dataclass(frozen=True)
class KMeansOptions:
    base_bits: int = 8
    residual_bits: int = 4
    layers: str = "auto"            # "auto" or comma-separated names
    k: str = "auto"                 # "auto", "N" or "layer=K,..."
    exclude: str = "first,last"
    target_drop: float | None = 2.0
    target_error: float | None = None
    tune_size: int | None = None
    sensitivity_size: int = 256
    restarts: int = 4
    seed: int = 0
    margin_z: float = 1.0  # acceptance margin in standard errors (fixq.algorithms.acceptance)
    table4_others: str = "quant"    # Table 4's other layers: quant (the base plan) or flp (the paper's Table 4)
    residual_data_bits: int | None = None  # <4b,4b>: the residuals read their own data format (None: 8-bit x)

    def kbits(self, residual_bits: int | None = None) -> tuple:
        """``kmeans_bits`` for plan_from: the configured residuals, or ``residual_bits`` on the layer's data."""
        if residual_bits is not None:
            return (self.base_bits, residual_bits)
        return (self.base_bits, self.residual_bits, self.residual_data_bits)

    def rlabel(self, data_bits: int = 8) -> str:
        """``<4b,8b>`` or ``<4b,4b>``: the residual kernels' <coefficient, data> bits."""
        return f"<{self.residual_bits}b,{self.residual_data_bits or data_bits}b>"

    def __post_init__(self) -> None:
        if self.table4_others not in ("quant", "flp"):
            raise KMeansError(f"--table4-others must be quant or flp, got {self.table4_others!r}")
        if self.residual_data_bits is not None and not 2 <= self.residual_data_bits <= 16:
            raise KMeansError(f"--residual-data-bits must be 2..16, got {self.residual_data_bits}")
        if self.residual_bits > self.base_bits:
            raise KMeansError(f"--residual-bits ({self.residual_bits}) above --base-bits ({self.base_bits})")


@dataclass(frozen=True)
class KMeansResult:
    float_top1_test: float
    float_top5_test: float
    float_top1_tune: float
    target: float
    n_tune: int
    n_test: int
    plan: QuantPlan
    ks: dict                 # layer -> K of the final plan
    table4: dict             # layer, K and rows
    table6: list             # rows
    noise: dict              # layer -> {K: output noise}
    trials: list             # beta search
    seconds: dict
    codes_rows: list | None = None   # learned rounding / bias correction of the final plan (``codes``)
    saved: int = -1                  # index in table6 of the plan saved (``plan``)
    codes_in_search: bool = False    # candidates and trials ran with learned residual codes (KMeansCodeBank)
    bias_guard: dict | None = None   # bias correction of the searched plan: tuning errors and whether kept
    resolution: dict | None = None   # what the tuning images resolve (fixq.algorithms.acceptance.resolution)


def kmeans_layers(graph: Graph, layers: str = "auto", exclude: str = "first,last") -> list[str]:
    """Layers to cluster: ``auto`` = every conv/linear of groups 1 except ``exclude``."""
    by = {n.name: n for n in graph.layers()}
    if layers == "auto":
        names = [n for n in eligible_layers(graph, exclude or "none")
                 if not (isinstance(by[n], Conv) and by[n].groups != 1)]
    else:
        names = [s.strip() for s in layers.split(",") if s.strip()]
        for s in names:
            if s not in by:
                raise KMeansError(f"--layers names {s!r}, which the model does not have; its conv/linear layers "
                                  f"are: {', '.join(by)}")
            if isinstance(by[s], Conv) and by[s].groups != 1:
                raise KMeansError(f"layer '{s}' is a grouped/depthwise conv (groups={by[s].groups}): a shared "
                                  "basis kernel would read every group's inputs; leave it out of --layers")
    if not names:
        raise KMeansError("no layer left to cluster")
    return names


def parse_k(spec: str, names: list[str], graph: Graph) -> dict | None:
    """``auto`` -> None; ``N`` -> that K everywhere; ``layer=K,...`` -> per layer (others auto
    is not allowed: give every clustered layer a K)."""
    N = {n.name: n.weight.shape[0] for n in graph.layers()}
    spec = str(spec).strip()
    if spec == "auto":
        return None
    out = {}
    try:
        if "=" not in spec:
            out = {n: int(spec) for n in names}
        else:
            for part in spec.split(","):
                k, v = part.split("=")
                out[k.strip()] = int(v)
    except ValueError:
        raise KMeansError(f"--k must be auto, a number or layer=K,... got {spec!r}") from None
    for name, K in out.items():
        if name not in N:
            raise KMeansError(f"--k names layer {name!r}, which the model does not have")
        check_K(K, N[name], f"layer '{name}'")
    return out


def candidate_Ks(N: int) -> list[int]:
    """1, 2, 4, ... up to N/4 (at least 25% layer savings with residuals at half the base
    bits; larger K saves little and costs a clustering each), and always K < N/2."""
    out, k = [], 1
    while 2 * k < N and k <= max(1, N // 4):
        out.append(k)
        k *= 2
    return out


def only_layer_config(graph: Graph, config: QuantConfig, layer: str) -> QuantConfig:
    """The paper's Table 4 setting: ``layer`` (its coefficients and the data it reads)
    quantized as in ``config``, every other layer and tensor in floating point.

    >>> only_layer_config(g, cfg, "layer2.0.conv1").for_layer("layer3.0.conv1").coeff_bits is None  # doctest: +SKIP
    True
    """
    import glob
    from dataclasses import replace
    d = config.default
    q = input_point(graph, layer)
    over = config.overrides + (("*", {"coeff_bits": None, "data_bits": None}),
                               (glob.escape(layer), {"coeff_bits": config.for_layer(layer).coeff_bits}),
                               (glob.escape(q), {"data_bits": config.for_layer(q).data_bits or d.data_bits}))
    return replace(config, overrides=over)


def search_kmeans(session: Session, config: QuantConfig, opts: KMeansOptions, codes=None) -> KMeansResult:
    """Cluster, choose K per layer (or take the given K), report Tables 4 and 6. ``codes`` (a
    :class:`fixq.algorithms.learned.RoundingOptions`): with learned rounding, the residual codes of
    every candidate (layer, K) are learned once (the smallest K's before the first trial, the
    others only when the search needs them)
    (:class:`fixq.algorithms.learned_bank.KMeansCodeBank`) and every candidate and trial runs with
    them; with bias correction (with or without learned rounding), the searched plan's biases are
    then corrected and that is kept only when it does not raise the tuning error. Table 6 gets
    those rows; ``saved`` says which plan the result holds. Neither goes with
    ``residual_data_bits`` (refused).

    >>> res = search_kmeans(session, QuantConfig(), KMeansOptions(target_drop=2.0))   # doctest: +SKIP
    """
    t0 = time.time()
    if codes is not None and opts.residual_data_bits is not None:  # refused before any work
        raise KMeansError("--learned-rounding / --bias-correction with --residual-data-bits: the learned codes and "
                          "corrected biases would be scored on the layer input, not on the <4b,4b> residual branch's "
                          "own requantized input; drop one of them")
    g = session.graph
    names = kmeans_layers(g, opts.layers, opts.exclude)
    given = parse_k(opts.k, names, g)
    if given is not None:
        names = [n for n in names if n in given] + [n for n in given if n not in names]
    bench = PlanBench(session, base_config(config, opts.base_bits), opts.tune_size, opts.seed, opts.margin_z)
    target = resolve_target(bench.float_tune, opts.target_drop, opts.target_error)
    if given is None:  # the K search needs a base plan that meets the target; a given K does not
        bench.require_base(target, "cluster", KMeansError)
    resolution = bench.resolution(target) if given is None else None  # a given K judges no trial
    N = {n.name: n.weight.shape[0] for n in g.layers()}
    cache: dict = {}

    def clusters(name, K):
        if (name, K) not in cache:
            cache[(name, K)] = cluster_kernels(g.node(name).weight, K, opts.seed, opts.restarts, f"layer '{name}'")
        return cache[(name, K)]

    def raw_plan(ks: dict, residual_bits: int | None = None) -> QuantPlan:  # nearest rounding
        return bench.plan(kmeans={n: clusters(n, K) for n, K in ks.items()}, kmeans_bits=opts.kbits(residual_bits))

    per = {n: [given[n]] if given is not None else candidate_Ks(N[n]) for n in names}
    passes = [{n: Ks[j] for n, Ks in per.items() if len(Ks) > j} for j in range(max(map(len, per.values()), default=0))]
    if given is None and not passes:
        raise KMeansError("no layer has enough kernels for K < N/2")
    bank, t_bank, learned = None, 0.0, codes is not None and codes.learned

    def learn(js) -> None:  # the bank's passes js (candidate indices), learned when the search needs them
        nonlocal bank, t_bank
        t, pairs = time.time(), [(raw_plan(passes[j]), list(passes[j])) for j in js]
        if bank is None:
            bank = KMeansCodeBank(g, pairs, bench.base_plan, session.calib_stream.tensor(), codes, session.device,
                                  session.show_progress)
        else:
            bank.learn(pairs)
        t_bank += time.time() - t

    def plan_for(ks: dict, residual_bits: int | None = None) -> QuantPlan:  # with the bank's codes, if any
        plan = raw_plan(ks, residual_bits)
        return plan if bank is None else bank.apply(plan)

    def tune_noise(r) -> float:  # what measure_many keeps of a measurement on the tuning images
        return bench.logit_noise(r[2], "tune")

    noise: dict = {}
    trials: list = []

    def trial(ks: dict, beta) -> bool:
        for t in trials:  # the bisection can reach a plan already measured (e.g. the first trial's)
            if t["ks"] == ks:
                return t["meets_target"]
        plan = plan_for(ks)
        err, _, logits = bench.measure(plan)
        ok, d = bench.judge(logits, target)
        c, sv = bench.cost(plan)
        trials.append({"beta": beta, "ks": ks, "top1_error": err, "rel_complexity_mmacs": c,
                       "savings_pct": sv, "meets_target": ok, "drop_bound": d["bound"]})
        return ok

    if given is None:
        # first the plan every beta tends to: each layer at its smallest K (the most savings); when it
        # meets the target no smaller saving is worth searching for, and nothing else is measured
        if learned:
            learn([0])
        if trial(passes[0], None):
            ks = passes[0]
        else:
            if learned:
                learn(range(1, len(passes)))
            m = opts.sensitivity_size
            jobs = [(n, K) for n in names for K in per[n]]
            got = bench.measure_many({(n, K): (lambda n=n, K=K: plan_for({n: K})) for n, K in jobs}, "tune", m,
                                     keep=tune_noise, desc="K-means candidates")
            for (n, K), v in got.items():
                noise.setdefault(n, {})[K] = v

            def ks_for(beta: float) -> dict:
                out = {}
                for n, d in noise.items():
                    ok = [K for K in sorted(d) if d[K] <= beta]
                    if ok:
                        out[n] = ok[0]
                return out

            betas = sorted({v for d in noise.values() for v in d.values()})
            # the largest beta's plan is passes[0] (missed above); the bisection keeps its whole range, so
            # after a missed first trial the search is the one before the first trial was added
            lo, hi, best = 0, len(betas) - 1, None
            while lo <= hi:  # largest beta whose plan meets the target
                mid = (lo + hi) // 2
                ks = ks_for(betas[mid])
                if trial(ks, betas[mid]):
                    sv = trials[-1]["savings_pct"]
                    if best is None or sv > best[1]:
                        best = (ks, sv)
                    lo = mid + 1
                else:
                    hi = mid - 1
            ks = best[0] if best else {}
    else:
        if learned:
            learn(range(len(passes)))
        ks = given
    plan = plan_for(ks) if ks else bench.base_plan
    t_search = time.time() - t0 - t_bank  # the bank's time is in codes_s

    # Table 4: the most expensive clustered (or eligible) layer; among equally expensive
    # ones, the one whose plain low-bit version adds the most output noise
    costs = {c.name: c for c in analyze(g, bench.base_plan).layers}
    pool = list(ks or names)
    top = max(costs[n].macs for n in pool)
    tied = [n for n in pool if costs[n].macs >= 0.99 * top]
    if len(tied) > 1:  # equal cost (e.g. every ResNet-20 conv): the one plain 4 bits hurts most
        m = opts.sensitivity_size
        low = bench.measure_many({n: (lambda n=n: bench.plan(filter_bits={n: torch.full(
            tuple(g.node(n).weight.shape[:2]), opts.residual_bits, dtype=torch.int64)})) for n in tied}, "tune", m,
            keep=tune_noise)
        layer = max(tied, key=lambda n: low[n])
    else:
        layer = tied[0]
    K4 = ks.get(layer) or (max(candidate_Ks(N[layer])) if candidate_Ks(N[layer]) else 1)
    rows4 = []
    flp = opts.table4_others == "flp"
    if flp:  # the paper's Table 4: every other layer in floating point
        cfg4 = only_layer_config(g, bench.config, layer)

        def plan4(**kw):
            return bench.plan(cfg4, **kw)

        def kplan4(K, residual_bits=None):
            return plan4(kmeans={layer: clusters(layer, K)}, kmeans_bits=opts.kbits(residual_bits))
    else:
        plan4 = bench.plan

        def kplan4(K, residual_bits=None):  # Table 4 is the paper's comparison: nearest rounding throughout
            return raw_plan({layer: K}, residual_bits)

    def row(label, p, table4=True):
        e1, e5, logits = bench.measure(p, "test")
        noise = bench.logit_noise(logits, "test")
        c, sv = bench.cost(p)
        lc = {x.name: x for x in analyze(g, p).layers}[layer]
        base_l = costs[layer].rel_complexity_mmacs
        if flp and table4:  # Table 4's other layers are float: savings of this layer vs the all-base network
            sv = 100.0 * (base_l - lc.rel_complexity_mmacs) / bench.base_cost
        return {"plan": label, "top1_error": e1, "top5_error": e5, "layer_rel_complexity_mmacs": lc.rel_complexity_mmacs,
                "layer_savings_pct": 100.0 * (1 - lc.rel_complexity_mmacs / base_l), "network_savings_pct": sv,
                "rel_complexity_mmacs": c, "logit_noise": noise,
                "logit_sqnr_db": math.inf if noise == 0 else -10.0 * math.log10(noise)}

    layer_bits = {layer: torch.full(tuple(g.node(layer).weight.shape[:2]), opts.residual_bits, dtype=torch.int64)}
    rows4.append(row(f"2D-HQ <{opts.base_bits}b,8b>", plan4() if flp else bench.base_plan))
    rows4.append(row(f"2D-HQ <{opts.residual_bits}b,8b>", plan4(filter_bits=layer_bits)))
    rows4.append(row(f"K-means K={K4}, <{opts.base_bits}b,8b> residuals", kplan4(K4, opts.base_bits)))
    rows4.append(row(f"K-means K={K4}, {opts.rlabel()} residuals", kplan4(K4)))
    if opts.residual_data_bits is not None:  # <4b,4b> beside <4b,8b> (the paper's eq. 9 offers both)
        rows4.append(row(f"K-means K={K4}, <{opts.residual_bits}b,8b> residuals", kplan4(K4, opts.residual_bits)))
    lost = rows4[1]["top1_error"] - rows4[0]["top1_error"]
    # top-1 on one layer is often below the test set's noise; the logit noise is not
    n8, n4 = rows4[0]["logit_noise"], rows4[1]["logit_noise"]

    def recovery(r):  # share of what plain low bits add (top-1 points, logit noise) that r removes
        return (None if lost <= 0 else 100.0 * (rows4[1]["top1_error"] - r["top1_error"]) / lost,
                None if n4 <= n8 else 100.0 * (n4 - r["logit_noise"]) / (n4 - n8))

    recovered, noise_recovered = recovery(rows4[3])

    sweep = []  # the same layer at every candidate K: how recovery trades against layer savings
    for K in sorted(set(candidate_Ks(N[layer])) | {K4}):
        r = dict(rows4[3]) if K == K4 else row(f"K-means K={K}, {opts.rlabel()} residuals", kplan4(K))
        r["K"] = K
        r["top1_recovered_pct"], r["noise_recovered_pct"] = recovery(r)
        sweep.append(r)
    table4 = {"layer": layer, "N": N[layer], "K": K4, "rows": rows4, "others": opts.table4_others, "recovered_pct": recovered,
              "noise_recovered_pct": noise_recovered, "sweep": sweep, "tied_layers": tied, "plain_low_loss": lost,
              "formula_layer_savings_pct": 100.0 * layer_savings(N[layer], K4, opts.base_bits, opts.residual_bits,
                                                                       residual_data_bits=opts.residual_data_bits)}

    all_low = {n: torch.full(tuple(g.node(n).weight.shape[:2]), opts.residual_bits, dtype=torch.int64) for n in names}
    table6 = [row(f"2D-HQ <{opts.base_bits}b,8b>", bench.base_plan, False),
              row(f"2D-HQ <{opts.residual_bits}b,8b> (clustered layers' set)", bench.plan(filter_bits=all_low), False)]
    if opts.residual_data_bits is not None and ks:
        table6.append(row(f"K-means <{opts.residual_bits}b,8b> residuals ({len(ks)} layers)",
                          plan_for(ks, opts.residual_bits), False))
    klabel = f"K-means {opts.rlabel()} residuals ({len(ks)} layers)"
    rows = None if bank is None else bank.report(plan)
    banked = "" if bank is None or not ks else ", nearest residual codes (learned not lower)"
    if bank is not None and any(r["kept"] == "learned" for r in rows):
        banked = ", learned residual codes"
        table6.append(row(f"{klabel}, nearest rounding", raw_plan(ks), False))  # beside plain rounding: same K
    if bank is not None and bank.note not in plan.notes:  # the plan says learned rounding was tried
        plan = replace(plan, notes=tuple(plan.notes) + (bank.note + "; none of this plan's layers kept learned codes",))
    table6.append(row(klabel + banked, plan, False))
    saved, guard, t_codes = len(table6) - 1, None, time.time()
    if codes is not None and codes.bias_correction:
        # the searched plan's codes are kept (learned ones come from the bank): only its biases are corrected,
        # and that is kept only when it does not raise the tuning error (as in fixq mixed)
        e_plan = bench.measure(plan)[0]
        cplan, rows, e_bc, kept = guarded_bias_correction(g, plan, session.calib_stream.tensor(), codes, session.device,
                                                          session.show_progress, rows, lambda p: bench.measure(p)[0],
                                                          e_plan)
        guard = {"tune_top1_searched": e_plan, "tune_top1_corrected": e_bc, "kept": kept}
        table6.append(row(f"{klabel}{banked} + {replace(codes, learned=False).label()}", cplan, False))
        if kept:
            plan, saved = cplan, len(table6) - 1
    t_codes = time.time() - t_codes + t_bank
    return KMeansResult(*bench.float_test, bench.float_tune, target, bench.n_tune, bench.n_test, plan, ks, table4,
                        table6, noise, trials, {"search_s": t_search, "codes_s": t_codes,
                                                "total_s": time.time() - t0}, rows, saved,
                        bank is not None and bool(bank.codes), guard, resolution)

"""Shared machinery of the plan searches (``fixq mixed``, ``fixq kmeans``): a seeded split
of the evaluation images into tuning and test parts, plan building from one calibration,
error measurement on either part, and complexity relative to the all-base-bits plan.

Trials are measured on the tuning part only; the final plans are reported on the test
part, so the reported error is not the one the search optimised.

The acceptance rule (noise of the tuning set) is :mod:`fixq.algorithms.acceptance`.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import torch

from fixq.analysis.complexity import analyze
from fixq.analysis.evaluate import to_stream, topk_errors
from fixq.backends.simulate import Simulator
from fixq.data.stream import stream_map
from fixq.errors import FixqError
from fixq.graph.ir import Conv, Linear
from fixq.planning.partitions import propagate_formats
from fixq.planning.plan import QuantConfig, QuantPlan
from fixq.util import distributed as dist
from fixq.util.progress import progress
from .acceptance import Z_MARGIN, acceptance_rule, accepts, paired_drop, resolution, resolution_text
from .bench_cache import PrefixCache, changed_nodes, default_budget_mb, first_of
from .calibrate import needs_histograms, plan_from, replan
from .pipeline import Session

__all__ = ["SearchError", "PlanBench", "split_eval", "resolve_target", "base_config", "each_chunks", "EACH_CHUNK",
           # the acceptance rule, re-exported (fixq.algorithms.acceptance)
           "paired_drop", "accepts", "Z_MARGIN", "acceptance_rule", "resolution", "resolution_text"]

EACH_CHUNK = 16  # plans measured in one base pass (measure_each): their plans and simulators are alive at once


def each_chunks(items: list, size: int = EACH_CHUNK) -> list:
    """``items`` (in graph order) in runs of ``size``: one :meth:`PlanBench.measure_each` pass each.

    >>> each_chunks(list(range(5)), 2)
    [[0, 1], [2, 3], [4]]
    """
    return [items[i:i + size] for i in range(0, len(items), size)]


class SearchError(FixqError):
    """A search request that cannot be honoured (target, sizes)."""


def split_eval(n: int, n_tune: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded disjoint (tune, test) index sets of ``n`` evaluation images (default half/half)."""
    n_tune = n // 2 if n_tune is None else n_tune
    if not 0 < n_tune < n:
        raise SearchError(f"--tune-size must leave images on both sides: 0 < {n_tune} < {n} evaluation images")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7))
    return perm[:n_tune].sort().values, perm[n_tune:].sort().values


def resolve_target(float_tune: float, drop: float | None, error: float | None) -> float:
    """Absolute top-1 target (%) from ``--target-error`` or float error + ``--target-drop``."""
    if error is not None:
        if error < float_tune:
            raise SearchError(f"target error {error:.2f}% is below the float model's own error on the tuning "
                              f"images ({float_tune:.2f}%): no quantized plan can meet it")
        return float(error)
    if drop is None or drop < 0:
        raise SearchError("give --target-drop POINTS (>= 0) or --target-error PERCENT")
    return float_tune + float(drop)


@dataclass
class PlanBench:
    """Plans from one calibration of ``session`` with ``config`` (2D-HQ at the base bits),
    measured on the tuning or test images. A trial computes only what its plan changes
    (:mod:`fixq.algorithms.bench_cache`): a plan that computes as the all-base plan reuses its
    measurement, and a plan that first differs at node ``k`` resumes the kept live tensors at
    ``k`` (within ``cache_mb``; default ``FIXQ_SEARCH_CACHE_MB`` or 1024)."""

    session: Session
    config: QuantConfig
    tune_size: int | None = None
    seed: int = 0
    margin_z: float = Z_MARGIN
    cache_mb: float | None = None
    fast: bool = True  # the simulator's fast_cpu (compiled quantizer, channels-last); False: the plain formula

    def __post_init__(self) -> None:
        if not (math.isfinite(self.margin_z) and self.margin_z >= 0):
            raise SearchError(f"--margin-z must be a finite number >= 0 (standard errors), got {self.margin_z}")
        self.base_logits = None
        s = self.session
        tune, test = split_eval(len(s.eval_stream), self.tune_size, self.seed)
        self.parts = {"tune": (s.eval_stream.subset(tune.tolist()), s.eval_y[tune], s.float_logits[tune]),
                      "test": (s.eval_stream.subset(test.tolist()), s.eval_y[test], s.float_logits[test])}
        self._heads: dict = {}
        self.n_tune, self.n_test = len(tune), len(test)
        self.float_tune = topk_errors(s.float_logits[tune], s.eval_y[tune])[0]
        self.float_test = topk_errors(s.float_logits[test], s.eval_y[test])
        self.obs = s.observations(needs_histograms(s.graph, [self.config]))
        self.base_plan = self.plan(self.config)  # planned whole; trials are transforms of it
        self._fmts = propagate_formats(s.graph, self.base_plan.tensors)
        self._base_measured: dict = {}
        self._prefix: dict = {}
        self._base_sim = None
        self._last_changes: tuple = (None, None)  # (plan, its changed_nodes vs the base plan)
        self.cache_mb = default_budget_mb() if self.cache_mb is None else float(self.cache_mb)
        self.base_cost = analyze(s.graph, self.base_plan).rel_complexity_mmacs

    def plan(self, config: QuantConfig | None = None, **kw) -> QuantPlan:
        """``plan_from`` with this bench's calibration (and its config unless ``config``);
        ``kw``: filter_bits, kmeans, kmeans_bits. With the bench's config, a transform of the
        base plan (``replan``: only the layers ``kw`` names are planned and proved again)."""
        with warnings.catch_warnings():  # "2D on a linear layer" is noted in the plan itself
            warnings.simplefilter("ignore")
            if config is None:
                return replan(self.obs, self.base_plan, fmts=self._fmts, **kw)
            return plan_from(self.obs, config or self.config, self.session.model_name, **kw)

    def _part(self, part: str, limit: int | None):
        """``(images, labels, float logits)`` of the tuning or test part, its first ``limit`` images."""
        x, y, ref = self.parts[part]
        if limit is not None and limit < len(x):
            if (part, limit) not in self._heads:  # the first images of the part, batched as before
                self._heads[(part, limit)] = x.subset(range(limit))
            x, y, ref = self._heads[(part, limit)], y[:limit], ref[:limit]
        return x, y, ref

    def _changes(self, plan: QuantPlan) -> list[int] | None:
        """``changed_nodes`` of ``plan`` vs the base plan, computed once for the plan in hand
        (measure, simulator and measure_each all ask for the same plan in turn)."""
        if self._last_changes[0] is not plan:
            self._last_changes = (plan, changed_nodes(self.session.graph, plan, self.base_plan))
        return self._last_changes[1]

    def simulator(self, plan: QuantPlan) -> Simulator:
        """The fast simulator of ``plan``: derived from the base plan's (only the layers whose
        entries differ are proved and prepared again) when the plan differs from the base
        plan in conv/linear layer entries only, else built whole."""
        s = self.session
        if self._base_sim is None:
            self._base_sim = Simulator(s.graph, self.base_plan, exact=False, device=s.device, fast_cpu=self.fast)
        changed = self._changes(plan)
        nodes = s.graph.nodes
        if changed is not None and all(isinstance(nodes[i], (Conv, Linear)) and plan.tensors.get(nodes[i].name)
                                       == self.base_plan.tensors.get(nodes[i].name) for i in changed):
            return self._base_sim.derive(plan, [nodes[i].name for i in changed])
        return Simulator(s.graph, plan, exact=False, device=s.device, fast_cpu=self.fast)

    def measure(self, plan: QuantPlan, part: str = "tune", limit: int | None = None):
        """``(top1, top5, logits)`` of the fast simulation on the tuning or test images (the
        same numbers with or without the reuse of the class docstring)."""
        s = self.session
        k = first_of(self._changes(plan), len(s.graph.nodes))
        same = k == len(s.graph.nodes)
        if same and (part, limit) in self._base_measured:
            return self._base_measured[(part, limit)]
        x, y, _ = self._part(part, limit)
        sim = self.simulator(plan)
        key = (part, limit)
        cache = self._prefix.get(key)
        if cache is not None and cache.complete and cache.start <= k:  # resume at the kept prefix
            def one(b, env):
                return sim.run_from(cache.start, {n: v.to(s.device) for n, v in env.items()}).float().cpu()
            source = cache
        else:
            source, keep = to_stream(x, s.batch_size), None
            # keep at k when nothing is kept yet, or what is kept is unusable (over budget, or left
            # unfinished by an error); a complete prefix that starts later is kept as it is
            if 0 < k < len(s.graph.nodes) and (cache is None or (not cache.complete and (not cache.over
                                                                                          or k < cache.start))):
                self._prefix.pop(key, None)
                room = self.cache_mb - sum(c.bytes for c in self._prefix.values()) / 2 ** 20
                if room > 0:
                    keep = PrefixCache(k, [source.batch_len(b) for b in range(source.n_batches)], room,
                                       range(dist.rank(), source.n_batches, dist.world()))
                    self._prefix[key] = keep

            def one(b, xb):  # every path yields the batch's logits: ranks may take different paths
                hook = None if keep is None else (lambda i, env: keep.keep(b, env) if i == keep.start else None)
                return sim.run(xb.to(s.device), before=hook).float().cpu()
        logits = torch.cat(list(stream_map(source, one, "trial", False)))
        out = (*topk_errors(logits, y), logits)
        if same:
            self._base_measured[key] = out
        return out

    def measure_each(self, plans: dict, part: str = "tune", limit: int | None = None,
                     base: bool = False) -> dict:
        """``{key: measure(plan, part, limit)}`` for plans that each differ from the base plan in
        one node only (several may share a node): one base simulation per batch, resumed with
        each plan's simulator at its node (the unchanged prefix is computed once; same values
        as ``measure``). The base pass stops at the last such node, unless ``base`` asks for
        the base plan's own measurement and it is not kept yet: then it runs to the end and is
        kept, so ``measure(base_plan, part, limit)`` simulates nothing. Any other plan is
        measured on its own.

        >>> bench.measure_each({"conv2": plan_with_conv2_low})["conv2"][0]  # top-1 %  # doctest: +SKIP
        """
        s = self.session
        x, y, _ = self._part(part, limit)
        forks: dict = {}
        for k, p in plans.items():
            c = self._changes(p)
            if c is not None and len(c) == 1:
                forks.setdefault(c[0], []).append((k, self.simulator(p)))
        sim = self.simulator(self.base_plan)
        whole = base and (part, limit) not in self._base_measured
        stop = None if whole or not forks else max(forks)  # before() runs the forks at a node, then it stops

        def one(b, xb):
            got = {}

            def fork(i, env):
                for k, fsim in forks.get(i, ()):
                    got[k] = fsim.run_from(i, env).float().cpu()
            out = sim.run(xb.to(s.device), before=fork, stop=stop)
            return (out.float().cpu() if whole else None), got  # a pair: ranks exchange it (pickled)
        parts: dict = {}
        lb = []
        if forks or whole:
            for mine, got in stream_map(to_stream(x, s.batch_size), one, "one-node plans", False):
                lb.append(mine)
                for k, v in got.items():
                    parts.setdefault(k, []).append(v)
        if whole:
            lb = torch.cat(lb)
            self._base_measured[(part, limit)] = (*topk_errors(lb, y), lb)
        out = {}
        for k, p in plans.items():
            if k in parts:
                logits = torch.cat(parts[k])
                out[k] = (*topk_errors(logits, y), logits)
            else:
                out[k] = self.measure(p, part, limit)
        return out

    def measure_many(self, makers: dict, part: str = "tune", limit: int | None = None, base: bool = False,
                     keep=None, desc: str | None = None, size: int = EACH_CHUNK) -> dict:
        """:meth:`measure_each` over any number of plans, ``size`` at a time (one base pass per
        run of ``size``). ``makers`` maps a key to a function that builds its plan, called when its
        run comes, so at most ``size`` plans and their simulators are alive at once; ``keep`` maps
        each ``(top1, top5, logits)`` to what is kept (default: all of it); ``desc`` names a
        progress bar over the runs.

        >>> noise = bench.measure_many({k: (lambda k=k: plan_for(k)) for k in ks}, "tune", 256,
        ...                            keep=lambda r: bench.logit_noise(r[2], "tune"))  # doctest: +SKIP
        """
        out: dict = {}
        show = desc is not None and self.session.show_progress
        for run in progress(each_chunks(list(makers), size), desc or "", show):
            got = self.measure_each({k: makers[k]() for k in run}, part, limit, base)
            out.update({k: got[k] if keep is None else keep(got[k]) for k in run})
        return out

    def _base_tune_logits(self) -> torch.Tensor:
        """The all-base plan's tuning-image logits (measured once, unless require_base did)."""
        if self.base_logits is None:
            self.base_logits = self.measure(self.base_plan)[2]
        return self.base_logits

    def judge(self, logits: torch.Tensor, target: float) -> tuple[bool, dict]:
        """Whether tuning-image ``logits`` meet the absolute top-1 ``target`` under the
        acceptance rule (:mod:`fixq.algorithms.acceptance`): ``(meets, {"drop", "margin", "bound"})``."""
        _, y, ref = self.parts["tune"]
        return accepts(logits, self._base_tune_logits(), ref, y, target - self.float_tune, self.margin_z)

    def resolution(self, target: float) -> dict:
        """:func:`resolution` of the tuning images for the absolute top-1 ``target``."""
        _, y, ref = self.parts["tune"]
        drop = paired_drop(self._base_tune_logits(), ref, y)["drop"]
        return resolution(self.n_tune, drop, target - self.float_tune, self.margin_z)

    def require_base(self, target: float, what: str, error_cls) -> None:
        """Refuse at once when the all-base-bits plan misses the target (before any search)."""
        e1, _, self.base_logits = self.measure(self.base_plan)
        if e1 > target + 1e-9:
            raise error_cls(f"the all-base-bits plan misses the target on the {self.n_tune} tuning images: top-1 "
                            f"{e1:.2f}% vs target {target:.2f}% (float {self.float_tune:.2f}%); nothing to {what}: "
                            "raise --target-drop, use more base bits, or check the data formats "
                            "(--data-method, --data-sign)")

    def output_noise(self, plan: QuantPlan, limit: int) -> float:
        """``||logits - float||^2 / ||float||^2`` on the first ``limit`` tuning images."""
        return self.logit_noise(self.measure(plan, "tune", limit)[2], "tune")

    def logit_noise(self, logits: torch.Tensor, part: str = "test", base: torch.Tensor | None = None) -> float:
        """``||logits - float||^2 / ||float||^2`` of logits measured on the first images of ``part``;
        with ``base`` (another plan's logits on the same images), ``||logits - base||^2 / ||float||^2``:
        the noise one plan adds to the other."""
        ref = self.parts[part][2][:logits.shape[0]].double()
        other = ref if base is None else base[:logits.shape[0]].double()
        if other.shape != logits.shape:
            raise ValueError(f"logit_noise: logits {tuple(logits.shape)} vs base {tuple(other.shape)}")
        return float(((logits.double() - other) ** 2).sum() / (ref ** 2).sum())

    def cost(self, plan: QuantPlan) -> tuple[float, float]:
        """``(complexity in M <8b,8b> MACs, savings % vs the all-base plan)``."""
        c = analyze(self.session.graph, plan).rel_complexity_mmacs
        return c, 100.0 * (1.0 - c / self.base_cost)


def base_config(config: QuantConfig, bits: int) -> QuantConfig:
    return replace(config, default=replace(config.default, coeff_bits=bits, coeff_mode="2D"))

"""Shared machinery of the plan searches (``fixq mixed``, ``fixq kmeans``): a seeded split
of the evaluation images into tuning and test parts, plan building from one calibration,
error measurement on either part, and complexity relative to the all-base-bits plan.

Trials are measured on the tuning part only; the final plans are reported on the test
part, so the reported error is not the one the search optimised.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import torch

from .errors import FixqError
from .calibrate import needs_histograms, plan_from
from .complexity import analyze
from .evaluate import evaluate_quant, topk_errors
from .pipeline import Session
from .plan import QuantConfig, QuantPlan
from .simulate import Simulator

__all__ = ["SearchError", "PlanBench", "split_eval", "resolve_target"]


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
    measured on the tuning or test images."""

    session: Session
    config: QuantConfig
    tune_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        s = self.session
        tune, test = split_eval(s.eval_x.shape[0], self.tune_size, self.seed)
        self.parts = {"tune": (s.eval_x[tune], s.eval_y[tune], s.float_logits[tune]),
                      "test": (s.eval_x[test], s.eval_y[test], s.float_logits[test])}
        self.n_tune, self.n_test = len(tune), len(test)
        self.float_tune = topk_errors(s.float_logits[tune], s.eval_y[tune])[0]
        self.float_test = topk_errors(s.float_logits[test], s.eval_y[test])
        self.obs = s.observations(needs_histograms(s.graph, [self.config]))
        self.base_plan = self.plan()
        self.base_cost = analyze(s.graph, self.base_plan).rel_complexity_mmacs

    def plan(self, **kw) -> QuantPlan:
        """``plan_from`` with this bench's calibration; ``kw``: filter_bits, kmeans, kmeans_bits."""
        with warnings.catch_warnings():  # "2D on a linear layer" is noted in the plan itself
            warnings.simplefilter("ignore")
            return plan_from(self.obs, self.config, self.session.model_name, **kw)

    def measure(self, plan: QuantPlan, part: str = "tune", limit: int | None = None):
        """``(top1, top5, logits)`` of the fast simulation on the tuning or test images."""
        x, y, ref = self.parts[part]
        if limit is not None:
            x, y, ref = x[:limit], y[:limit], ref[:limit]
        sim = Simulator(self.session.graph, plan, exact=False, device=self.session.device)
        r = evaluate_quant(sim, x, y, ref, self.session.batch_size, sqnr_images=0, show_progress=False)
        return r.top1_error, r.top5_error, r.logits

    def output_noise(self, plan: QuantPlan, limit: int) -> float:
        """``||logits - float||^2 / ||float||^2`` on the first ``limit`` tuning images."""
        return self.logit_noise(self.measure(plan, "tune", limit)[2], "tune")

    def logit_noise(self, logits: torch.Tensor, part: str = "test") -> float:
        """``||logits - float||^2 / ||float||^2`` of logits measured on the first images of ``part``."""
        ref = self.parts[part][2][:logits.shape[0]].double()
        return float(((logits.double() - ref) ** 2).sum() / (ref ** 2).sum())

    def cost(self, plan: QuantPlan) -> tuple[float, float]:
        """``(complexity in M <8b,8b> MACs, savings % vs the all-base plan)``."""
        c = analyze(self.session.graph, plan).rel_complexity_mmacs
        return c, 100.0 * (1.0 - c / self.base_cost)


def base_config(config: QuantConfig, bits: int) -> QuantConfig:
    return replace(config, default=replace(config.default, coeff_bits=bits, coeff_mode="2D"))

"""Small models and a calibrate-and-simulate helper shared by tests."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as Fn

from fixq.algorithms.calibrate import calibrate
from fixq.graph.capture import capture
from fixq.planning.plan import LayerConfig, QuantConfig

from conftest import set_bn_stats


class DepthwiseNet(nn.Module):
    """MobileNet-style block: conv, depthwise conv + ReLU6, pointwise, residual, pools, concat."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.bn0 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.grp = nn.Conv2d(16, 8, 3, 1, 2, dilation=2, groups=2)
        self.fc = nn.Linear(8 * 2 * 2, 5)

    def forward(self, x):
        x = Fn.relu6(self.bn0(self.stem(x)))
        y = Fn.relu6(self.bn1(self.dw(x)))
        y = self.pw(y) + x
        z = torch.cat([y, Fn.max_pool2d(x, 3, 1, 1)], dim=1)
        z = Fn.relu(self.grp(z))
        z = Fn.avg_pool2d(z, 2)
        z = Fn.adaptive_avg_pool2d(z, (2, 2))
        return self.fc(torch.flatten(z, 1))


def make_graph(model, shape, seed=0, bn_dtype=torch.float32):
    """``model`` with BatchNorm statistics measured on seeded random inputs, captured.
    ``bn_dtype=torch.float64``: statistics measured in float64 (then float32 weights), so their
    last bits do not depend on the CPU's vector width (tests/test_golden.py)."""
    torch.manual_seed(seed)
    set_bn_stats(model.to(bn_dtype), torch.randn(16, *shape).to(bn_dtype))
    model.float()
    x = torch.randn(2, *shape)
    return capture(model, x)


def plan_for(graph, shape, n=32, seed=1, **cfg):
    torch.manual_seed(seed)
    rounding = cfg.pop("rounding", "half_up")
    x = torch.randn(n, *shape)
    return calibrate(graph, [(x, None)], QuantConfig(LayerConfig(**cfg), rounding), show_progress=False)


def spy_first_trial(monkeypatch, first_meets: bool) -> list:
    """Record every acceptance decision of a search (``PlanBench.judge``) in the returned list,
    and make the first one miss unless ``first_meets``; the others are the rule's own."""
    from fixq.algorithms.search import PlanBench
    judge, calls = PlanBench.judge, []

    def spy(self, logits, target):
        ok, d = judge(self, logits, target)
        calls.append(ok)
        return ok and (first_meets or len(calls) > 1), d
    monkeypatch.setattr(PlanBench, "judge", spy)
    return calls

"""Accumulator width analysis (the paper's accumulator quantization, per layer).

Notation: ``S`` exact-sum format, ``A`` accumulator bits, ``Facc = min(S, A - 1 - I_acc)``
with ``I_acc`` the calibrated integer bits of the accumulator. For every conv/linear layer:

- ``A_exact``: bits that hold the exact wide sum at ``S`` for every calibration image
  (no rounding into the accumulator, no saturation);
- ``A_identical``: the narrowest ``A`` for which the layer's output codes on the
  calibration images are bit-identical to ``A = 32`` (every wider ``A`` too), found by
  re-running that layer alone on its recorded integer inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from fixq.backends.engine import Engine, exact_sum, layer_forward, residual_input
from fixq.backends.lowering import lower_layer
from fixq.planning.partitions import accumulator_F

__all__ = ["AccumulatorRow", "accumulator_table", "with_acc_bits"]


@dataclass(frozen=True)
class AccumulatorRow:
    name: str
    S_min: int
    S_max: int
    acc_I_max: int
    A_exact: int
    A_identical: int
    saturations_at_plan: int


def with_acc_bits(plan, name: str, A: int, S: torch.Tensor):
    """The plan with layer ``name``'s accumulator at ``A`` bits (Facc re-derived)."""
    lp = plan.layers[name]
    acc_F = accumulator_F(S, torch.tensor(lp.acc_I), A)
    return replace(plan, layers={**plan.layers, name: replace(lp, acc_bits=A, acc_F=acc_F)})


@torch.no_grad()
def accumulator_table(graph, plan, x: torch.Tensor, A_min: int = 8) -> list[AccumulatorRow]:
    """Per-layer accumulator widths on calibration images ``x`` (float, preprocessed)."""
    eng = Engine(graph, plan)
    env = eng.run(eng.quantize_input(x), keep=True)
    sat = eng.saturations()
    rows = []
    for n in graph.layers():
        L = eng.layers[n.name]
        xin = env[n.inputs[0]]
        peak = int(exact_sum(L, n, xin, residual_input(L, xin, eng.rounding)).abs().max())
        A_exact = max(2, peak.bit_length() + 1)
        ref = env[n.name]
        ident = 32
        for A in range(31, A_min - 1, -1):
            pa = with_acc_bits(plan, n.name, A, L.S)
            LA = lower_layer(n, pa, eng.fmts)  # the lowering of every backend, proved (DESIGN §5a)
            if not torch.equal(layer_forward(LA, n, xin, eng.rounding), ref):
                break
            ident = A
        lp = plan.layers[n.name]
        rows.append(AccumulatorRow(n.name, int(L.S.min()), int(L.S.max()), max(lp.acc_I), A_exact, ident,
                                   sat.get(n.name, {}).get("acc", 0)))
    return rows

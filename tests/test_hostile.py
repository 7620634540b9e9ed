"""Property test that looks for trouble (issue #15, DESIGN §5a): small generated nets with
hostile weights (scales 1e-30..1e6, dead channels and filters, all-zero layers, values on
rounding halves), 2..16 bits, 4D/3D/2D, saturate/wrap, every rounding. For each one:
engine == float64 simulation == C under UBSan, or a refusal naming the layer. Never a
silent difference. The example budget is fixed and derandomized, so CI stays short."""
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as Fn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from fixq.algorithms.calibrate import calibrate  # noqa: E402
from fixq.backends.engine import Engine, exact_sum  # noqa: E402
from fixq.backends.export_c import export_c, run_c_program  # noqa: E402
from fixq.backends.export_c.run import UBSAN_FLAGS, build  # noqa: E402
from fixq.planning.plan import LayerConfig, PlanError, QuantConfig  # noqa: E402
from fixq.backends.simulate import Simulator  # noqa: E402


HAS_CC = shutil.which("gcc") is not None and shutil.which("make") is not None
KINDS = ("conv", "depthwise", "add", "concat")
POOLS = ("max", "avg", "adaptive")


class Hostile(nn.Module):
    """conv -> ReLU -> (conv | depthwise) [+ residual add + ReLU6 | concat] -> pool -> linear."""

    def __init__(self, kind: str, pool: str):
        super().__init__()
        self.kind, self.pool = kind, pool
        self.a = nn.Conv2d(2, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1, groups=4 if kind == "depthwise" else 1)
        c = 8 if kind == "concat" else 4
        self.fc = nn.Linear(c * (4 if pool == "adaptive" else 9), 3)

    def forward(self, x):
        x = Fn.relu(self.a(x))
        y = self.b(x)
        if self.kind == "add":
            y = Fn.relu6(y + x)
        elif self.kind == "concat":
            y = torch.cat([y, x], 1)
        if self.pool == "max":
            y = Fn.max_pool2d(y, 2)
        elif self.pool == "avg":
            y = Fn.avg_pool2d(y, 2)
        else:
            y = Fn.adaptive_avg_pool2d(y, (2, 2))
        return self.fc(torch.flatten(y, 1))


def _hostile_weights(m: nn.Module, g: torch.Generator, layer_exp, chan_exp, dead, zero_layer, halves):
    with torch.no_grad():
        for k, layer in enumerate((m.a, m.b, m.fc)):
            w, b = layer.weight, layer.bias
            w.mul_(10.0 ** layer_exp[k])
            b.mul_(10.0 ** layer_exp[k])
            N = w.shape[0]
            i = int(torch.randint(0, N, (1,), generator=g))
            w[i] *= 10.0 ** chan_exp[k]  # one output channel far from the others
            b[i] *= 10.0 ** chan_exp[k]
            if dead[k]:  # a dead channel and (for convs) a dead 2D filter
                w[(i + 1) % N] = 0.0
                if w.dim() == 4 and w.shape[1] > 1:
                    w[(i + 2) % N, 0] = 0.0
            if halves[k]:  # exact binary values that land on rounding halves at coarse formats
                flat = w.view(-1)
                flat[: min(6, flat.numel())] = torch.tensor([0.75, -0.75, 1.5, -1.5, 0.375, -0.375])[: min(6, flat.numel())]
            if zero_layer == k:
                w.zero_()
                b.zero_()


OUTCOMES = {"refused": 0, "guarded": 0, "compared": 0}  # what the examples ended in (checked below)


def _names_a_node(e: Exception) -> bool:
    return "layer '" in str(e) or "node '" in str(e)


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(KINDS), pool=st.sampled_from(POOLS), seed=st.integers(0, 2 ** 16),
       cbits=st.integers(2, 16), dbits=st.integers(2, 16), cm=st.sampled_from(("4D", "3D", "2D")),
       dm=st.sampled_from(("4D", "3D")), A=st.sampled_from((12, 16, 24, 32)),
       overflow=st.sampled_from(("saturate", "wrap")), rounding=st.sampled_from(("half_up", "nearest_even", "floor")),
       layer_exp=st.lists(st.integers(-30, 6), min_size=3, max_size=3),
       chan_exp=st.lists(st.integers(-30, 6), min_size=3, max_size=3),
       dead=st.lists(st.booleans(), min_size=3, max_size=3), zero_layer=st.sampled_from((None, 0, 1, 2)),
       halves=st.lists(st.booleans(), min_size=3, max_size=3), in_exp=st.integers(-2, 2))
def test_hostile_nets_are_exact_or_refused(tmp_path_factory, kind, pool, seed, cbits, dbits, cm, dm, A, overflow,
                                           rounding, layer_exp, chan_exp, dead, zero_layer, halves, in_exp):
    torch.manual_seed(seed)
    m = Hostile(kind, pool).eval()
    g = torch.Generator().manual_seed(seed)
    _hostile_weights(m, g, layer_exp, chan_exp, dead, zero_layer, halves)
    from fixq.graph.capture import capture
    graph = capture(m, torch.randn(2, 2, 6, 6))
    xc = torch.randn(16, 2, 6, 6, generator=g) * 2.0 ** in_exp
    x = torch.randn(4, 2, 6, 6, generator=g) * 2.0 ** (in_exp + 1)  # beyond the calibration range
    x[0, 0, 0, :4] = torch.tensor([0.5, -0.5, 1.5, -2.5]) * 2.0 ** in_exp  # halves at coarse input formats
    cfg = LayerConfig(coeff_bits=cbits, data_bits=dbits, coeff_mode=cm, data_mode=dm, acc_bits=A,
                      acc_overflow=overflow)
    try:
        plan = calibrate(graph, [(xc, None)], QuantConfig(cfg, rounding), show_progress=False)
    except PlanError as e:  # a clear refusal at plan time, naming the node
        assert _names_a_node(e), str(e)
        OUTCOMES["refused"] += 1
        return
    eng = Engine(graph, plan)
    q = eng.quantize_input(x)
    env = eng.run(q, keep=True)
    codes = env[graph.output]
    for n in graph.layers():  # the plan-time proof is sound: no wide sum exceeds it
        assert int(exact_sum(eng.layers[n.name], n, env[n.inputs[0]]).abs().max()) <= eng.layers[n.name].bound < 2 ** 62
    try:
        ys = Simulator(graph, plan, exact=True)(x)
    except PlanError as e:  # the exact simulation's guard at S: an error naming the layer
        assert _names_a_node(e) and "2^53" in str(e), str(e)
        OUTCOMES["guarded"] += 1
    else:
        assert torch.equal(eng.dequantize(codes), ys)
        OUTCOMES["compared"] += 1
    if HAS_CC:
        out = tmp_path_factory.mktemp("hostile")
        res = export_c(graph, plan, out / "c")
        build(res.out, cc="gcc", cflags=UBSAN_FLAGS)
        got, _ = run_c_program(res.out, q)
        assert torch.equal(got, codes.reshape(4, -1))


def test_hostile_examples_mostly_compare_outputs():
    """The property test above must not pass by refusing everything: of its 30 examples,
    at least a third run to the engine == float64 simulation comparison."""
    if sum(OUTCOMES.values()) < 30:
        pytest.skip("the hostile property test did not run in this session (deselected)")
    assert OUTCOMES["compared"] >= 10, OUTCOMES

"""No silent wrong integers (DESIGN §5a): the issue's repros as tests, the plan-time
refusals, the exact simulation's guard at S, and the C runtime's extreme cases under UBSan."""
import shutil
import subprocess
from dataclasses import replace
from fractions import Fraction

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as Fn

from fixq.algorithms.calibrate import calibrate
from fixq.backends.engine import Engine, check_plan
from fixq.backends.export_c import export_c, run_c_program
from fixq.backends.export_c.run import UBSAN_FLAGS, build
from fixq.numerics.formats import round_shift, round_shift_int
from fixq.planning.plan import LayerConfig, PlanError, QuantConfig
from fixq.planning.safety import MAX_SHIFT, SPREAD_BITS, bound_spread
from fixq.backends.simulate import Simulator

from helpers import make_graph

HAS_CC = shutil.which("gcc") is not None and shutil.which("make") is not None
SHAPE = (3, 8, 8)


class TwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.c2(Fn.relu(self.c1(x)))


def _net(scale_channel=None, scale_filter=None):
    torch.manual_seed(0)
    m = TwoConvs()
    with torch.no_grad():
        if scale_channel is not None:  # one output channel of the first conv (and its bias)
            m.c1.weight[1] *= scale_channel
            m.c1.bias[1] = abs(float(m.c1.bias[1])) * scale_channel
        if scale_filter is not None:   # one 2D filter of the second conv
            m.c2.weight[2, 1] *= scale_filter
    return make_graph(m, SHAPE)


def _plan(g, rounding="half_up", **cfg):
    torch.manual_seed(1)
    return calibrate(g, [(torch.randn(32, *SHAPE), None)], QuantConfig(LayerConfig(**cfg), rounding),
                     show_progress=False)


def three_way(g, plan, tmp_path, n=8, seed=3, scale=1.5):
    """engine == float64 simulation == C (gcc with UBSan), outputs and saturation counts."""
    torch.manual_seed(seed)
    x = torch.randn(n, *g.shapes[g.input]) * scale
    eng, sim = Engine(g, plan), Simulator(g, plan, exact=True)
    q = eng.quantize_input(x)
    codes = eng.run(q)
    assert torch.equal(eng.dequantize(codes), sim(x))
    if HAS_CC:
        res = export_c(g, plan, tmp_path / "c")
        build(res.out, cc="gcc", cflags=UBSAN_FLAGS)
        got, _ = run_c_program(res.out, q)
        assert torch.equal(got, codes.reshape(n, -1))
    return eng


@pytest.mark.parametrize("scale", [1e-25, 1e-15])
def test_repro_tiny_output_channel_with_per_channel_data(tmp_path, scale):
    g = _net(scale_channel=scale)
    plan = _plan(g, coeff_mode="2D", data_mode="3D")
    eng = three_way(g, plan, tmp_path)
    L = eng.layers["c2"]
    assert int(L.wshift.max()) <= MAX_SHIFT and int(L.S.max()) < 60  # S = 115 and shifts of 100 before
    Fx = torch.tensor(plan.tensors["c1"].F)
    assert int(Fx.max() - Fx.min()) <= SPREAD_BITS


@pytest.mark.parametrize("scale", [1e-21, 1e-15])
def test_repro_tiny_2d_filter(tmp_path, scale):
    g = _net(scale_filter=scale)
    plan = _plan(g, coeff_mode="2D", data_mode="4D")
    eng = three_way(g, plan, tmp_path)
    assert int(eng.layers["c2"].wshift.max()) <= SPREAD_BITS


def test_dead_filters_and_all_zero_layer(tmp_path):
    torch.manual_seed(0)
    m = TwoConvs()
    with torch.no_grad():
        m.c1.weight[0] = 0.0
        m.c2.weight.zero_()
        m.c2.bias.zero_()
    g = make_graph(m, SHAPE)
    for cm in ("4D", "3D", "2D"):
        three_way(g, _plan(g, coeff_mode=cm, data_mode="3D"), tmp_path / cm)


def _with_F(plan, layer, F):
    lp = plan.layers[layer]
    return replace(plan, layers={**plan.layers, layer: replace(lp, weight=replace(lp.weight, F=tuple(F)))})


def test_hand_edited_plan_with_far_apart_formats_is_refused_naming_the_layer(tmp_path):
    g = _net()
    plan = _plan(g, coeff_mode="2D")
    F = list(plan.layers["c2"].weight.F)
    F[5] += 70  # one 2D filter 70 bits finer: a weight shift of 70
    bad = _with_F(plan, "c2", F)
    for run in (lambda: Engine(g, bad), lambda: Simulator(g, bad, exact=True), lambda: Simulator(g, bad),
                lambda: check_plan(g, bad), lambda: export_c(g, bad, tmp_path / "c")):
        with pytest.raises(PlanError, match=r"layer 'c2'.*shifts span \[0, 7\d\]"):
            run()


def test_headroom_refused_at_plan_time_naming_the_layer_and_the_fix():
    torch.manual_seed(0)
    m = TwoConvs()
    with torch.no_grad():  # weights at 1e-20, bias at 1e6: the bias needs ~2^100 at S
        m.c2.weight.mul_(1e-20)
        m.c2.bias.fill_(1e6)
    g = make_graph(m, SHAPE)
    with pytest.raises(PlanError, match=r"layer 'c2'.*bias aligned to S.*int64 headroom.*rescale"):
        _plan(g, coeff_mode="4D")


def test_exact_simulation_guards_the_sum_format_and_names_the_layer():
    """16-bit data and coefficients, two 2D filters 20 bits apart: the proved bound is above
    2**53 and the data reach it, so the float64 simulation refuses instead of rounding."""
    conv = nn.Conv2d(2, 1, 5, bias=False)
    with torch.no_grad():
        conv.weight.fill_(0.99)
        conv.weight[0, 1] *= 2.0 ** -20
    g = make_graph(nn.Sequential(conv), (2, 5, 5))
    x = torch.full((1, 2, 5, 5), 0.99)
    plan = calibrate(g, [(x, None)], QuantConfig(LayerConfig(coeff_bits=16, data_bits=16, coeff_mode="2D")),
                     show_progress=False)
    assert check_plan(g, plan)["0"] >= 2 ** 53
    with pytest.raises(PlanError, match=r"layer '0'.*2\^53 at the exact-sum format S"):
        Simulator(g, plan, exact=True)(x)
    eng = Engine(g, plan)  # the integer engine holds it exactly
    assert int(eng.run(eng.quantize_input(x)).abs().max()) > 0
    Simulator(g, plan, exact=True)(x * 2.0 ** -12)  # small data stay below 2**53: no error


def test_bound_spread_rule():
    F = torch.tensor([3, 5, 40, 7])
    nz = torch.tensor([True, True, True, False])
    assert bound_spread(F, 8, nz).tolist() == [3, 5, 3 + SPREAD_BITS, 7]
    tiny = torch.tensor([107, 110, 7])  # a layer at 1e-30 with one dead partition
    assert bound_spread(tiny, 8, torch.tensor([True, True, False])).tolist() == [107, 110, 107]
    assert bound_spread(torch.tensor([7, 7]), 8, torch.tensor([False, False])).tolist() == [7, 7]
    mixed = bound_spread(torch.tensor([5, 60]), torch.tensor([8, 4]), torch.tensor([True, True]))
    assert mixed.tolist() == [5, 4 - 1 - (8 - 1 - 5) + SPREAD_BITS]


def test_engine_round_shift_matches_python_integers_up_to_the_limit():
    a = torch.tensor([0, 1, -1, 3, -3, 2 ** 61, -2 ** 61, 2 ** 62 - 1, -2 ** 62, 2 ** 63 - 1, -2 ** 63])
    for rounding in ("half_up", "nearest_even", "floor"):
        for s in (1, 2, 31, 61, 62):
            got = round_shift(a, s, rounding).tolist()
            assert got == [round_shift_int(int(v), s, rounding) for v in a.tolist()], (rounding, s)


C_TEST = r"""
#include <stdio.h>
#include <inttypes.h>
#include "fixq_rt.h"
int main(void) {
    static const int64_t A[] = {A_VALUES};
    static const int S[] = {S_VALUES};
    int i, k, r, b;
    for (r = 0; r < 3; r++)
        for (k = 0; k < (int)(sizeof S / sizeof S[0]); k++)
            for (i = 0; i < (int)(sizeof A / sizeof A[0]); i++)
                printf("%" PRId64 "\n", fixq_round_shift(A[i], S[k], r));
    for (b = 2; b <= 32; b += 5)
        for (i = 0; i < (int)(sizeof A / sizeof A[0]); i++) {
            printf("%" PRId64 "\n", fixq_sat(A[i], b, FIXQ_WRAP, NULL));
            printf("%" PRId64 "\n", fixq_sat(A[i], b, FIXQ_SATURATE, NULL));
        }
    for (i = 0; i < (int)(sizeof A / sizeof A[0]); i++)
        for (k = 1; k < 9; k++) printf("%" PRId64 "\n", fixq_round_div(A[i] / 4, k, k % 3));
    for (b = 2; b <= 31; b += 4) /* unsigned data words U(b,F): codes 0 .. 2^b - 1 */
        for (i = 0; i < (int)(sizeof A / sizeof A[0]); i++)
            printf("%" PRId64 "\n", fixq_sat(A[i], b | FIXQ_UNSIGNED, FIXQ_SATURATE, NULL));
    return 0;
}
"""


def _ref_round(a: int, s: int, rounding: str) -> int:
    if s <= 0:
        return max(-2 ** 63, min(2 ** 63 - 1, a << -s))  # fixq_shl saturates (never used by a proved model)
    v = Fraction(a, 2 ** s)
    fl = v.numerator // v.denominator
    if rounding == "floor":
        return fl
    if rounding == "half_up":
        return (v + Fraction(1, 2)).__floor__()
    return round(v)


def _ref_wrap(v: int, b: int, overflow: str) -> int:
    lo, hi = -2 ** (b - 1), 2 ** (b - 1) - 1
    if overflow == "saturate":
        return max(lo, min(hi, v))
    return (v - lo) % 2 ** b + lo


def _ref_div(n: int, d: int, rounding: str) -> int:
    v = Fraction(n, d)
    if rounding == "floor":
        return v.__floor__()
    return (v + Fraction(1, 2)).__floor__() if rounding == "half_up" else round(v)


def _trunc4(a: int) -> int:  # C's a / 4 (toward zero)
    return -((-a) // 4) if a < 0 else a // 4


@pytest.mark.skipif(not HAS_CC, reason="needs gcc and make")
def test_c_runtime_extremes_under_ubsan(tmp_path):
    """Negative halves, every shift 0..64 and beyond, INT64 extremes, wrap at every width:
    the runtime equals exact rational arithmetic and UBSan stays silent."""
    from fixq.backends.export_c.emit import RUNTIME_DIR
    A = [0, 1, -1, 2, -2, 3, -3, 5, -5, 6, -6, 7, -7, 2 ** 31, -2 ** 31 - 1, 3 * 2 ** 40, -3 * 2 ** 40,
         2 ** 61, -2 ** 61, 3 * 2 ** 61, -3 * 2 ** 61, 2 ** 62, -2 ** 62, 2 ** 62 + 1, -2 ** 62 - 1,
         2 ** 63 - 1, -2 ** 63 + 1, -2 ** 63]
    S = list(range(-3, 66)) + [100]
    lit = ", ".join(("INT64_MIN" if v == -2 ** 63 else f"INT64_C({v})") for v in A)
    (tmp_path / "t.c").write_text(C_TEST.replace("A_VALUES", lit).replace("S_VALUES", ", ".join(map(str, S))))
    (tmp_path / "fixq_config.h").write_text("#define FIXQ_ACT_T int8_t\n#define FIXQ_W_T int8_t\n")
    for f in [*(h.name for h in RUNTIME_DIR.glob("*.h")), "fixq_rt.c"]:  # fixq_rt.c includes fixq_rt_gemm.h
        shutil.copy(RUNTIME_DIR / f, tmp_path / f)
    for cc in [c for c in ("gcc", "clang") if shutil.which(c)]:
        r = subprocess.run([cc, *UBSAN_FLAGS.split(), "-o", "t", "t.c", "fixq_rt.c"], cwd=tmp_path,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        r = subprocess.run(["./t"], cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode == 0 and r.stderr == "", r.stderr
        got = [int(v) for v in r.stdout.split()]
        want = [_ref_round(a, s, rd) for rd in ("half_up", "nearest_even", "floor") for s in S for a in A]
        want += [f(a, b, o) for b in range(2, 33, 5) for a in A for f, o in ((_ref_wrap, "wrap"), (_ref_wrap, "saturate"))]
        want += [_ref_div(_trunc4(a), k, ("half_up", "nearest_even", "floor")[k % 3])
                 for a in A for k in range(1, 9)]
        want += [max(0, min(2 ** b - 1, a)) for b in range(2, 32, 4) for a in A]
        assert got == want


def test_fused_quantizer_says_once_why_it_falls_back(monkeypatch):
    import warnings
    from types import SimpleNamespace

    from fixq.numerics import fused

    def broken():
        raise ImportError("no module named triton")
    monkeypatch.setattr(fused, "_build", broken)
    monkeypatch.setattr(fused, "_WHY_NOT", None)
    x = SimpleNamespace(is_cuda=True, dtype=torch.float32, is_contiguous=lambda: True)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert not fused.fused_available(x, "half_up") and not fused.fused_available(x, "half_up")
    msgs = [str(m.message) for m in w if issubclass(m.category, RuntimeWarning)]
    assert len(msgs) == 1 and "no module named triton" in msgs[0]


def test_emitter_table_check_names_the_table():
    from fixq.planning.safety import check_table
    check_table("ws_c2", "uint8_t", [0, 62, 255])
    with pytest.raises(PlanError, match=r"ws_c2: value 256 does not fit uint8_t"):
        check_table("ws_c2", "uint8_t", [0, 256])
    with pytest.raises(PlanError, match=r"os_c2: value -129 does not fit int8_t"):
        check_table("os_c2", "int8_t", [-129])


def test_spread_cap_binds_on_no_real_plan(monkeypatch):
    """DESIGN §5a rule 1: D = 24 leaves the plans of real models alone (their tiny but
    nonzero partitions keep eq. 6's F): the same plans with the cap lifted are identical."""
    import importlib
    cal = importlib.import_module("fixq.algorithms.calibrate")  # fixq.calibrate is the function; this is the module
    from fixq.graph.capture import capture
    from fixq.data.zoo import CifarResNet, build_model, load_weights
    from helpers import plan_for
    from shared_data import SHARED, resnet_weights
    nets = [(build_model("lenet-digits")[0], (1, 8, 8))]
    if (SHARED / "models/cifar10-resnet").exists():
        nets.append((load_weights(CifarResNet(20), str(resnet_weights(20))), (3, 32, 32)))
    for model, shape in nets:
        g = capture(model, torch.randn(2, *shape))
        for cm in ("2D", "3D"):
            for method in ("maxabs", "mse"):
                for bits in (8, 4):
                    kw = dict(coeff_mode=cm, data_mode="3D", method=method, data_method=method, coeff_bits=bits)
                    capped = plan_for(g, shape, **kw).to_json()
                    with monkeypatch.context() as m:
                        m.setattr(cal, "bound_spread", lambda F, T, nz: bound_spread(F, T, nz, D=10 ** 6))
                        free = plan_for(g, shape, **kw).to_json()
                    assert capped == free, (type(model).__name__, kw)


def test_int32_rule_boundary():
    """The C's 32-bit loops: a dot product bound of exactly 2^31 - 1 fits, 2^31 does not;
    per-filter shifts count, and a shift above 30 always takes int64."""
    from fixq.planning.safety import sum_fits_int32
    z = torch.zeros(1, 2, dtype=torch.long)
    # 8-bit signed data: max |x| = 128 = 2^7
    assert sum_fits_int32(torch.tensor([[2 ** 23, 2 ** 23]]), z, 8) is False     # exactly 2^31
    assert sum_fits_int32(torch.tensor([[2 ** 23, 2 ** 23 - 1]]), z, 8) is True  # 2^31 - 2^7
    per_j = torch.tensor([[0, 3]])
    assert sum_fits_int32(torch.tensor([[2 ** 20, 2 ** 20]]), per_j, 8) is True   # (2^20 + 2^23) 2^7 < 2^31
    assert sum_fits_int32(torch.tensor([[2 ** 20, 2 ** 21]]), per_j, 8) is False  # (2^20 + 2^24) 2^7 > 2^31
    assert sum_fits_int32(torch.tensor([[1, 1]]), per_j, 8) is True
    assert sum_fits_int32(torch.tensor([[0, 0]]), torch.tensor([[0, 31]]), 8) is False

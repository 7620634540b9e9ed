import pytest
import torch
import torch.nn as nn

from fixq.planning.plan_io import load_plan
from fixq.numerics.formats import code_limits, exp2
from fixq.graph.ir import run_float
from fixq.planning.partitions import propagate_formats
from fixq.backends.simulate import Simulator
from fixq.data.zoo import CifarResNet, LeNet

from helpers import DepthwiseNet, make_graph, plan_for

SHAPE = (3, 16, 16)


@pytest.mark.parametrize("coeff_mode", ["4D", "3D", "2D"])
@pytest.mark.parametrize("data_mode", ["4D", "3D"])
@pytest.mark.parametrize("rounding", ["half_up", "nearest_even", "floor"])
def test_exact_outputs_on_format_grid(coeff_mode, data_mode, rounding):
    g = make_graph(DepthwiseNet(), SHAPE)
    plan = plan_for(g, SHAPE, coeff_mode=coeff_mode, data_mode=data_mode, rounding=rounding)
    sim = Simulator(g, plan, exact=True)
    env = sim.run(torch.randn(4, *SHAPE), keep=True)
    fmts = propagate_formats(g, plan.tensors)
    for name, v in env.items():
        T, F = fmts[name]
        codes = v * exp2(F, v).reshape(-1, *([1] * (v.dim() - 2))) if F.dim() else v * exp2(F, v)
        assert torch.equal(codes, torch.round(codes)), name          # integer multiples of 2**-F
        lo, hi = code_limits(T)  # [-2^(T-1), 2^(T-1)-1], or [0, 2^T-1] for an unsigned U(T,F)
        assert lo <= codes.min() and codes.max() <= hi, name  # inside T bits


def test_4d_3d_2d_identical_when_partitions_share_one_range():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    with torch.no_grad():
        w = torch.rand(6, 4, 3, 3) * 0.9
        w[:, :, 0, 0] = 1.7  # every 2D filter (hence every kernel) has max |w| = 1.7
        conv.weight.copy_(w)
    m = nn.Sequential(conv, nn.ReLU())
    g = make_graph(m, (4, 8, 8))
    x = torch.randn(3, 4, 8, 8)
    outs = [Simulator(g, plan_for(g, (4, 8, 8), coeff_mode=mode, coeff_bits=4), exact=True)(x)
            for mode in ("4D", "3D", "2D")]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])


def test_2d_beats_4d_with_an_outlier_filter():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.mul_(0.1)
        conv.weight[0, 0, 1, 1] = 5.0  # paper Fig. 3: one outlier ruins the 4D format
    g = make_graph(nn.Sequential(conv), (8, 8, 8))
    x = torch.randn(16, 8, 8, 8)
    ref = run_float(g, x)
    err = {m: (Simulator(g, plan_for(g, (8, 8, 8), coeff_mode=m, coeff_bits=4), exact=True)(x) - ref).pow(2).mean()
           for m in ("4D", "3D", "2D")}
    assert err["2D"] < err["3D"] < err["4D"]


def test_fast_mode_close_to_exact_and_mismatch_rate_small():
    g = make_graph(DepthwiseNet(), SHAPE)
    plan = plan_for(g, SHAPE, coeff_mode="2D", data_mode="3D")
    x = torch.randn(16, *SHAPE)
    e, f = Simulator(g, plan, exact=True)(x), Simulator(g, plan)(x)
    mismatch = (e.float() != f).float().mean().item()
    assert mismatch <= 0.01
    assert (e.float() - f).abs().max() <= 2 * 2.0 ** -min(plan.tensors[g.output].F)


def test_plan_json_round_trip_reproduces_outputs(tmp_path):
    g = make_graph(DepthwiseNet(), SHAPE)
    plan = plan_for(g, SHAPE, coeff_mode="2D", data_mode="3D", method="percentile:99.9")
    plan.save(tmp_path / "plan.json")
    loaded = load_plan(tmp_path / "plan.json")
    assert loaded == plan
    x = torch.randn(4, *SHAPE)
    assert torch.equal(Simulator(g, plan, exact=True)(x), Simulator(g, loaded, exact=True)(x))


# logit SQNR (dB) of the seeded random-weight ResNet-20 at 8 bits, measured (maxabs 16.0,
# percentile 16.8, mse 21.7, affine 35.9): the floors sit 1.5 dB below, so a lost bit (6 dB)
# anywhere fails the test
SQNR8 = {"maxabs": 14.5, "percentile:99.99": 15.3, "mse": 20.2, "affine": 34.4}


@pytest.mark.parametrize("method", ["maxabs", "percentile:99.99", "mse", "affine"])
def test_every_method_runs_and_stays_close(method):
    g = make_graph(CifarResNet(20), (3, 32, 32))
    same = dict(method=method, data_method=method, data_sign="signed")  # one method for both sides, signed data
    plan = plan_for(g, (3, 32, 32), **same)
    x = torch.randn(8, 3, 32, 32)
    f = run_float(g, x)

    def sqnr(p):
        q = Simulator(g, p, exact=True)(x)
        return float(10 * torch.log10(f.pow(2).sum() / (q - f).pow(2).sum()))
    s8 = sqnr(plan)
    assert s8 > SQNR8[method], (method, s8)
    # two bits fewer everywhere cost about 2 x 6 dB (measured 8.3 (mse) to 14.2 dB)
    s6 = sqnr(plan_for(g, (3, 32, 32), **same, coeff_bits=6, data_bits=6))
    assert s8 - s6 > 8, (method, s8, s6)
    assert plan.is_affine == (method == "affine")


def test_flp_sides_and_bits_matter():
    g = make_graph(LeNet(8), (1, 8, 8))
    x = torch.randn(8, 1, 8, 8)
    ref = run_float(g, x)
    full = Simulator(g, plan_for(g, (1, 8, 8), coeff_bits=None, data_bits=None), exact=True)(x)
    assert torch.allclose(full.float(), ref, atol=1e-5)  # <flp,flp> is the float model
    coeff_only = plan_for(g, (1, 8, 8), coeff_bits=8, data_bits=None)
    assert not coeff_only.tensors and all(lp.acc_F is None for lp in coeff_only.layers.values())
    e8 = (Simulator(g, coeff_only, exact=True)(x) - ref).abs().mean()
    e4 = (Simulator(g, plan_for(g, (1, 8, 8), coeff_bits=4, data_bits=None), exact=True)(x) - ref).abs().mean()
    assert 0 < e8 < e4


def test_narrow_accumulator_saturates_and_counts():
    g = make_graph(LeNet(8), (1, 8, 8))
    x = torch.randn(8, 1, 8, 8) * 4
    plan = plan_for(g, (1, 8, 8), acc_bits=12)
    sim = Simulator(g, plan, exact=True)
    sim(x)
    assert any(v.get("acc", 0) > 0 for v in sim.saturations().values())
    wrap = Simulator(g, plan_for(g, (1, 8, 8), acc_bits=12, acc_overflow="wrap"), exact=True)
    assert not torch.equal(wrap(x), sim(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_exact_equals_cpu_exact_and_fast_close():
    g = make_graph(DepthwiseNet(), SHAPE)
    plan = plan_for(g, SHAPE, coeff_mode="2D", data_mode="3D")
    x = torch.randn(64, *SHAPE)
    cpu = Simulator(g, plan, exact=True)(x)
    gpu = Simulator(g, plan, exact=True, device="cuda")(x).cpu()
    assert torch.equal(cpu, gpu)
    fast = Simulator(g, plan, device="cuda")(x).cpu()
    assert (fast.double() != cpu).double().mean() <= 0.01


def test_nan_activation_names_the_layer():
    from fixq.algorithms.calibrate import CalibrationError
    g = make_graph(LeNet(8), (1, 8, 8))
    from fixq.algorithms.calibrate import calibrate
    from fixq.planning.plan import QuantConfig
    g.node("conv1").weight.mul_(1e10)
    x = torch.full((4, 1, 8, 8), 1e30)  # finite input, conv1 overflows float32
    with pytest.raises(CalibrationError, match="layer 'conv1' produced NaN or Inf"):
        calibrate(g, [(x, None)], QuantConfig(), show_progress=False)
    x = torch.randn(4, 1, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(CalibrationError, match="images contain NaN"):
        calibrate(g, [(x, None)], QuantConfig(), show_progress=False)


def test_empty_calibration_set_is_refused():
    from fixq.algorithms.calibrate import CalibrationError, calibrate
    from fixq.planning.plan import QuantConfig
    g = make_graph(LeNet(8), (1, 8, 8))
    with pytest.raises(CalibrationError, match="empty"):
        calibrate(g, [], QuantConfig(), show_progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rounding", ["half_up", "floor"])
def test_cuda_fused_kernel_equals_torch_formula(rounding):
    import fixq.numerics.fused as fused
    g = make_graph(CifarResNet(20), (3, 32, 32))
    plan = plan_for(g, (3, 32, 32), coeff_mode="2D", data_mode="3D", acc_bits=16, rounding=rounding)
    x = torch.randn(32, 3, 32, 32, device="cuda") * 2
    a = Simulator(g, plan, device="cuda")
    ya = a(x)
    fused.ENABLED = False
    try:
        b = Simulator(g, plan, device="cuda")
        yb = b(x)
    finally:
        fused.ENABLED = True
    assert torch.equal(ya, yb)
    assert a.saturations() == b.saturations()


def test_data_mse_uses_a_second_pass_even_from_a_generator():
    """Regression: calibration batches given as a one-shot generator must still reach the
    mse pass (it used to see none and silently fall back to maxabs)."""
    from fixq.algorithms.calibrate import calibrate, observe, plan_from
    from fixq.planning.plan import LayerConfig, QuantConfig
    g = make_graph(CifarResNet(20), (3, 32, 32))
    x = torch.randn(32, 3, 32, 32)
    x[0, 0, 0, 0] = 20.0  # an input outlier: mse trades it for resolution
    gen = ((x[i:i + 8], None) for i in range(0, 32, 8))
    cfg = QuantConfig(LayerConfig(method="mse", data_method="mse", data_mode="3D"))
    p_mse = calibrate(g, gen, cfg, show_progress=False)
    obs = observe(g, [(x, None)], show_progress=False)
    p_max = plan_from(obs, QuantConfig(LayerConfig(method="maxabs", data_method="maxabs", data_mode="3D")))
    assert p_mse.tensors[g.input].F[0] > p_max.tensors[g.input].F[0]
    assert plan_from(obs, cfg) == p_mse  # one observation serves every configuration

"""Learned rounding and bias correction (issue #18): the guard on a single layer, codes inside
their partition ranges, JSON round trip, bit-exact simulation / engine / C with learned codes
(plain, mixed 8/4 and K-means residuals), a mismatched weights file refused, bias correction
to within one bias LSB."""
import shutil

import pytest
import torch
import torch.nn as nn

from fixq.planning.plan_io import load_plan, plan_from_json
from fixq.algorithms.calibrate import observe, plan_from
from fixq.planning.coeffs import coeff_grid, layer_codes, layer_values, weights_digest
from fixq.backends.engine import Engine, compile_layer
from fixq.graph.capture import capture
from fixq.graph.ir import pre_activation
from fixq.algorithms.kmeans import cluster_kernels
from fixq.algorithms.learned import RoundingOptions, learn_rounding
from fixq.planning.plan import LayerConfig, PlanError, QuantConfig
from fixq.planning.plan_schema import check_plan_graph
from fixq.backends.simulate import Simulator

from helpers import DepthwiseNet, make_graph


class OneConv(nn.Module):
    def __init__(self, act=True):
        super().__init__()
        self.conv = nn.Conv2d(6, 12, 3, padding=1)
        self.act = act

    def forward(self, x):
        y = self.conv(x)
        return torch.relu(y) if self.act else y


def _one_layer(act=True, seed=0, **cfg):
    torch.manual_seed(seed)
    g = capture(OneConv(act).eval(), torch.randn(2, 6, 8, 8))
    x = torch.rand(64, 6, 8, 8) * 2 - 0.5  # inputs with a nonzero mean: rounding errors shift the output mean
    obs = observe(g, [(x, None)], show_progress=False)
    return g, x, plan_from(obs, QuantConfig(LayerConfig(coeff_bits=4, coeff_mode=cfg.pop("mode", "2D"), **cfg)))


def _quant_input(g, plan, x):
    sim = Simulator(g, plan, exact=True)
    return sim.requant(g.input, x.double())


def test_learned_rounding_never_worse_than_nearest_and_codes_stay_in_range():
    g, x, plan = _one_layer()
    n = g.layers()[0]
    learned, rows = learn_rounding(g, plan, x, RoundingOptions(iters=300, bias_correction=False), show_progress=False)
    assert rows[0]["kept"] == "learned" and learned.layers[n.name].codes.up is not None
    # the layer's output error on the calibration data, computed here independently (float64)
    xq = _quant_input(g, plan, x)
    ref = pre_activation(n, x.double(), n.weight.double(), n.bias.double()).clamp(min=0)
    errs = {}
    for name, p in (("nearest", plan), ("learned", learned)):
        w = layer_values(n, p.layers[n.name], p.rounding)
        errs[name] = float(((pre_activation(n, xq, w, n.bias.double()).clamp(min=0) - ref) ** 2).sum())
    assert errs["learned"] < errs["nearest"]
    # every code inside its partition's range, and one of the two grid points around x 2**F
    lp = learned.layers[n.name]
    q = layer_codes(n, lp, learned.rounding)
    grid = coeff_grid(n, lp)
    assert bool(((q >= grid.lo) & (q <= grid.hi)).all())
    fl = torch.floor(grid.scaled())
    inside = (q == fl) | (q == fl + 1) | (q == grid.lo) | (q == grid.hi)
    assert bool(inside.all())
    assert int((q != layer_codes(n, plan.layers[n.name], plan.rounding)).sum()) == rows[0]["changed_codes"] > 0
    assert torch.equal(compile_layer(n, learned, Engine(g, learned).fmts, learned.rounding).w, q)


def test_guard_keeps_nearest_when_learning_cannot_help():
    g, x, plan = _one_layer()
    # one Adam step with a huge learning rate and a strong regulariser: a worse layer, refused by the guard
    bad = RoundingOptions(iters=1, lr=50.0, warmup=0.0, reg=10.0, bias_correction=False)
    learned, rows = learn_rounding(g, plan, x, bad, show_progress=False)
    assert rows[0]["learned_error"] > rows[0]["nearest_error"] and rows[0]["kept"] == "nearest"
    assert learned.layers["conv"].codes is None


def test_bias_correction_leaves_at_most_one_bias_lsb_per_channel():
    g, x, plan = _one_layer(act=False)
    n = g.layers()[0]
    xq = _quant_input(g, plan, x)
    ref = pre_activation(n, x.double(), n.weight.double(), n.bias.double())
    dims = (0, 2, 3)

    def mean_err(p):
        lp = p.layers[n.name]
        from fixq.planning.coeffs import bias_codes
        b = bias_codes(n, lp, p.rounding).double() * torch.pow(2.0, -lp.bias.F_tensor().double())
        return (pre_activation(n, xq, layer_values(n, lp, p.rounding), b) - ref).mean(dim=dims), lp.bias

    before, bf0 = mean_err(plan)
    corrected, _ = learn_rounding(g, plan, x, RoundingOptions(learned=False), show_progress=False)
    after, bf = mean_err(corrected)
    lsb = torch.pow(2.0, -bf.F_tensor().double())
    assert bool((after.abs() <= lsb).all())
    assert int((before.abs() > torch.pow(2.0, -bf0.F_tensor().double())).sum()) >= 6  # there was an error to fix
    assert float(after.abs().mean()) < 0.1 * float(before.abs().mean())
    assert corrected.layers[n.name].codes.up is None and len(corrected.layers[n.name].codes.bias) == 12


def test_bias_less_layer_is_reported_not_silently_skipped():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(4, 5, 1)).eval()
    g = capture(m, torch.randn(2, 3, 8, 8))
    x = torch.rand(32, 3, 8, 8)
    plan = plan_from(observe(g, [(x, None)], show_progress=False), QuantConfig(LayerConfig(coeff_bits=4)))
    out, rows = learn_rounding(g, plan, x, RoundingOptions(learned=False), show_progress=False)
    no_bias, with_bias = g.layers()
    assert no_bias.bias is None and with_bias.bias is not None
    by = {r["layer"]: r for r in rows}
    assert by[no_bias.name]["bias"].startswith("not corrected") and "no bias" in by[no_bias.name]["bias"]
    assert by[with_bias.name]["bias"] == "corrected"
    assert any("bias correction not applied" in t for t in out.layers[no_bias.name].notes)
    assert out.layers[no_bias.name].codes is None and out.layers[with_bias.name].codes.bias is not None


def _rich_plan(learned=True):
    """DepthwiseNet (depthwise, grouped, linear, concat) at 4 bits 2D with one mixed 8/4 layer and one
    K-means layer (learned residual codes)."""
    shape = (3, 16, 16)
    torch.manual_seed(3)  # the weights too, not whatever an earlier test left in the global generator
    g = make_graph(DepthwiseNet(), shape)  # (seed 3: every layer, K-means stem included, keeps learned codes)
    torch.manual_seed(2)
    x = torch.randn(48, *shape)
    obs = observe(g, [(x, None)], show_progress=False)
    bits = torch.full(tuple(g.node("pw").weight.shape[:2]), 4, dtype=torch.int64)
    bits[::2] = 8
    plan = plan_from(obs, QuantConfig(LayerConfig(coeff_bits=4, coeff_mode="2D", data_mode="3D")), "t",
                     filter_bits={"pw": bits}, kmeans={"stem": cluster_kernels(g.node("stem").weight, 3)})
    out, rows = learn_rounding(g, plan, x, RoundingOptions(iters=60, learned=learned), show_progress=False)
    return g, shape, plan, out, rows


def test_learned_plan_round_trips_json_and_is_bit_exact(tmp_path):
    g, shape, plan, learned, rows = _rich_plan()
    assert {r["layer"] for r in rows if r["kept"] == "learned"} >= {"stem"}  # K-means residuals learned too
    learned.save(tmp_path / "p.json")
    back = load_plan(tmp_path / "p.json")
    assert back == learned
    check_plan_graph(back, g)
    torch.manual_seed(5)
    xt = torch.randn(6, *shape) * 1.5
    sim, eng = Simulator(g, back, exact=True), Engine(g, back)
    ys = sim(xt)
    assert torch.equal(eng.dequantize(eng.run(eng.quantize_input(xt))), ys)
    assert not torch.equal(ys, Simulator(g, plan, exact=True)(xt))  # the decided codes change the output
    fast = Simulator(g, back)(xt.float())
    assert torch.allclose(fast.double(), ys, atol=1e-4)
    # plans without decided codes keep their JSON: no "codes" key appears
    assert all("codes" not in v for v in plan.to_json()["layers"].values())


@pytest.mark.skipif(shutil.which("cc") is None or shutil.which("make") is None, reason="needs a C compiler and make")
def test_learned_plan_c_equals_engine(tmp_path):
    from test_export_c import c_vs_engine
    g, shape, _, learned, _ = _rich_plan()
    c_vs_engine(g, learned, shape, tmp_path, n=8)


def test_mismatched_weights_are_refused(tmp_path):
    g, x, plan = _one_layer()
    learned, _ = learn_rounding(g, plan, x, RoundingOptions(iters=30), show_progress=False)
    n = g.layers()[0]
    assert learned.layers[n.name].codes.digest == weights_digest(n)
    with torch.no_grad():
        n.weight[0, 0, 0, 0] += 1e-3
    for make in (lambda: Simulator(g, learned), lambda: Engine(g, learned), lambda: check_plan_graph(learned, g)):
        with pytest.raises(PlanError, match="digest"):
            make()
    d = learned.to_json()
    d["layers"]["conv"]["codes"]["up"] = "not base64!"
    with pytest.raises(PlanError, match="codes.up"):
        plan_from_json(d)


def test_sampled_pixels_are_the_layer_output():
    """The optimiser's im2col rows (strided, padded, dilated, grouped convs and a linear layer)
    times the weights give the layer's pre-activation at the sampled pixels."""
    from fixq.graph.ir import run_float
    from fixq.algorithms.learned import _samples
    shape = (3, 16, 16)
    g = make_graph(DepthwiseNet(), shape)
    x = torch.randn(5, *shape)
    env = run_float(g, x, keep=True)
    for n in g.layers():
        xin = env[n.inputs[0]]
        y = pre_activation(n, xin, bias=None)
        X, Y = _samples(n, xin, y, RoundingOptions(samples=300), torch.Generator().manual_seed(1))
        groups = X.shape[1]
        w = n.weight.reshape(groups, n.weight.shape[0] // groups, -1)
        got = torch.einsum("pgk,gnk->pgn", X, w).reshape(X.shape[0], -1)
        assert X.shape[0] == min(300, y.numel() // y.shape[1])
        assert torch.allclose(got, Y, atol=1e-5), n.name


def _cli(capsys, tmp_path, digits_dir, cmd, *extra):
    from fixq.app.cli import main
    out = tmp_path / cmd
    argv = [cmd, "--model", "lenet-digits", "--calib", str(digits_dir), "--calib-size", "64", "--eval",
            str(digits_dir), "--eval-size", "200", "--out", str(out), "--quiet", "--learned-rounding",
            "--rounding-iters", "20", *map(str, extra)]
    code = main(argv)
    return code, capsys.readouterr(), out


@pytest.mark.parametrize("cmd,extra,plan_file", [
    ("quantize", ["--coeff-bits", "4", "--coeff-mode", "2D"], "plan.json"),
    ("sweep", ["--coeff-bits", "4", "--coeff-mode", "2D,3D"], "plan-01.json"),
    ("mixed", ["--exclude", "none", "--low-bits", "2", "--target-drop", "5", "--trials", "3"], "plan.json"),
    ("kmeans", ["--k", "conv2=3"], "plan.json"),
])
def test_cli_learned_rounding_on_every_command(capsys, tmp_path, digits_dir, cmd, extra, plan_file):
    code, cap, out = _cli(capsys, tmp_path, digits_dir, cmd, *extra)
    assert code == 0, cap.err
    plan = load_plan(out / plan_file)
    guard = None
    if cmd in ("mixed", "kmeans"):  # the saved plan is bias-corrected unless that raised the tuning error
        import json
        guard = json.loads((out / "report.json").read_text())["coefficient_codes"]["bias_guard"]
    assert any(lp.codes is not None and lp.codes.bias is not None
               for lp in plan.layers.values()) == (guard is None or guard["kept"])
    assert any("learned rounding" in x for x in plan.notes)
    if cmd == "kmeans":  # the clustered layer's residual codes were decided too
        assert plan.layers["conv2"].kmeans is not None and plan.layers["conv2"].codes is not None
    if cmd != "sweep":
        import json
        rep = json.loads((out / "report.json").read_text())
        assert rep["coefficient_codes"]["layers"] and "Coefficient codes" in (out / "report.md").read_text()
        if cmd in ("mixed", "kmeans"):  # the report says which inputs the code bank was learned with
            assert rep["coefficient_codes"]["bank_inputs"] == "sequential"
        if cmd != "kmeans":  # mixed trials run with the codes learned before the search (kmeans: test_learned_bank)
            assert rep["coefficient_codes"].get("in_search", False) == (cmd == "mixed")


def test_cli_refuses_contradictory_bias_flags(capsys, tmp_path, digits_dir):
    code, cap, _ = _cli(capsys, tmp_path, digits_dir, "quantize", "--bias-correction", "--no-bias-correction")
    assert code == 2 and "contradict" in cap.err

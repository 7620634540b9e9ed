"""K-means clustered kernels (issue #7): clustering, reconstruction, complexity, bit-exact
simulation / engine / C, refusals and the command."""
import json
import math
import shutil

import pytest
import torch

from fixq.planning.plan_io import load_plan, plan_from_json
from fixq.algorithms.calibrate import observe, plan_from
from fixq.app.cli import main
from fixq.algorithms.acceptance import resolution, resolution_text
from fixq.analysis.complexity import analyze
from fixq.backends.engine import Engine
from fixq.algorithms.kmeans import KMeansError, check_K, cluster_kernels, kmeans_layer, layer_savings
from fixq.planning.coeffs import basis_values, kmeans_residual
from fixq.algorithms.kmeans_search import candidate_Ks, kmeans_layers, parse_k
from fixq.planning.plan import LayerConfig, QuantConfig
from fixq.backends.simulate import Simulator
from fixq.data.zoo import CifarResNet

from helpers import DepthwiseNet, make_graph, spy_first_trial


def test_clustering_is_deterministic_for_a_seed():
    torch.manual_seed(0)
    w = torch.randn(40, 8, 3, 3)
    a, b = cluster_kernels(w, 5, seed=3), cluster_kernels(w, 5, seed=3)
    assert torch.equal(a.centers, b.centers) and torch.equal(a.assign, b.assign)
    assert a.centers.shape == (5, 8, 3, 3) and set(a.assign.tolist()) <= set(range(5))


@pytest.mark.parametrize("mode", ["4D", "3D", "2D"])
def test_basis_plus_residual_is_the_float_kernel(mode):
    torch.manual_seed(1)
    w = torch.randn(24, 6, 3, 3) * 0.1
    km, rf = kmeans_layer(w, cluster_kernels(w, 4), 8, 4, mode, "maxabs")
    Gq = basis_values(km, (6, 3, 3))[km.assign_tensor()]
    assert torch.equal(Gq + kmeans_residual(w, km), w.double())
    assert rf.T == 4 and km.basis.T == 8 and km.K == 4


def test_K_out_of_range_is_refused():
    for K in (0, 24, 30):
        with pytest.raises(KMeansError, match="layer 'c'"):
            check_K(K, 24, "layer 'c'")
    with pytest.raises(KMeansError, match="below N"):
        cluster_kernels(torch.randn(4, 2, 1, 1), 4)
    assert candidate_Ks(64) == [1, 2, 4, 8, 16] and candidate_Ks(3) == [1] and candidate_Ks(2) == []


def _kmeans_plan(g, x, ks, mode="2D", **cfg):
    obs = observe(g, [(x, None)], show_progress=False)
    km = {n: cluster_kernels(g.node(n).weight, K) for n, K in ks.items()}
    return plan_from(obs, QuantConfig(LayerConfig(coeff_mode=mode, **cfg)), "t", kmeans=km)


def test_complexity_matches_the_formula():
    g = make_graph(CifarResNet(20), (3, 32, 32))
    x = torch.randn(8, 3, 32, 32)
    name = "layer3.1.conv1"
    N = g.node(name).weight.shape[0]
    for K in (1, 3, 10):
        plan = _kmeans_plan(g, x, {name: K}, mode="3D")
        base = _kmeans_plan(g, x, {}, mode="3D")
        c = {r.name: r for r in analyze(g, plan).layers}[name]
        b = {r.name: r for r in analyze(g, base).layers}[name]
        assert 1 - c.rel_complexity_mmacs / b.rel_complexity_mmacs == pytest.approx((0.5 * N - K) / N, abs=1e-12)
        assert layer_savings(N, K) == (0.5 * N - K) / N
        Mg, H, W = g.node(name).weight.shape[1:]
        assert c.coeff_storage_bits == (K * 8 + N * 4) * Mg * H * W + N * max(1, (K - 1).bit_length())


@pytest.mark.parametrize("mode,dm,A", [("2D", "3D", 32), ("3D", "4D", 20), ("4D", "4D", 16)])
def test_kmeans_bit_exact_sim_engine(mode, dm, A, tmp_path):
    g = make_graph(CifarResNet(20), (3, 32, 32))
    torch.manual_seed(4)
    x = torch.randn(8, 3, 32, 32)
    plan = _kmeans_plan(g, x, {"layer1.0.conv2": 3, "layer2.1.conv1": 5, "layer3.2.conv2": 2, "linear": 2}, mode,
                        data_mode=dm, acc_bits=A)
    plan.save(tmp_path / "p.json")
    assert load_plan(tmp_path / "p.json").to_json() == plan.to_json()
    xt = torch.randn(4, 3, 32, 32) * 1.5
    sim, eng = Simulator(g, plan, exact=True), Engine(g, plan)
    assert torch.equal(eng.dequantize(eng.run(eng.quantize_input(xt))), sim(xt))
    assert eng.layers["layer2.1.conv1"].basis.w.shape[0] == 5


@pytest.mark.skipif(shutil.which("cc") is None or shutil.which("make") is None, reason="needs cc and make")
def test_kmeans_runs_in_c(tmp_path):
    from test_export_c import c_vs_engine
    g = make_graph(DepthwiseNet(), (3, 16, 16))
    x = torch.randn(16, 3, 16, 16)
    plan = _kmeans_plan(g, x, {"stem": 3, "pw": 2, "fc": 2}, data_mode="3D", acc_bits=24)
    res, _ = c_vs_engine(g, plan, (3, 16, 16), tmp_path)
    assert "fixq_conv_sums(&KB_stem" in (res.out / "model.c").read_text()


def test_grouped_and_missing_layers_are_refused():
    g = make_graph(DepthwiseNet(), (3, 16, 16))
    assert kmeans_layers(g) == ["pw"]  # stem and fc excluded (first, last), dw and grp are grouped
    assert kmeans_layers(g, exclude="first") == ["pw", "fc"]  # the paper's exclusion (--paper)
    with pytest.raises(KMeansError, match="'dw' is a grouped/depthwise conv"):
        kmeans_layers(g, "pw,dw")
    with pytest.raises(KMeansError, match="'nope'"):
        kmeans_layers(g, "nope")
    with pytest.raises(KMeansError, match="layer 'pw'.*K=8"):
        parse_k("pw=8", ["pw"], g)
    with pytest.raises(KMeansError, match="grouped conv"):
        _kmeans_plan(g, torch.randn(4, 3, 16, 16), {"grp": 2})


def _km(capsys, digits_dir, out, *extra):
    argv = ["kmeans", "--model", "lenet-digits", "--calib", str(digits_dir), "--calib-size", "64",
            "--eval", str(digits_dir), "--eval-size", "300", "--out", str(out), "--quiet", *map(str, extra)]
    code = main(argv)
    return code, capsys.readouterr()


def test_cli_kmeans_reports_tables(capsys, tmp_path, digits_dir):
    code, cap = _km(capsys, digits_dir, tmp_path / "k", "--k", "conv2=3,fc1=2")
    assert code == 0, cap.err
    rep = json.loads((tmp_path / "k" / "report.json").read_text())
    assert rep["layers"]["conv2"]["k"] == 3 and rep["layers"]["conv2"]["layer_savings_pct"] == pytest.approx(
        100 * (16 - 3) / 32)
    assert [r["plan"].split(" ")[0] for r in rep["table4"]["rows"]] == ["2D-HQ", "2D-HQ", "K-means", "K-means"]
    assert {"float", "quant", "complexity"} <= set(rep) and "Network" in cap.out
    rows = rep["table4"]["rows"]
    for r in rows + rep["table6"]:
        assert r["logit_sqnr_db"] == pytest.approx(-10 * math.log10(r["logit_noise"]))
    n8, n4, nk = rows[0]["logit_noise"], rows[1]["logit_noise"], rows[3]["logit_noise"]
    assert n4 > n8  # 4-bit coefficients on conv2 add logit noise
    assert rep["table4"]["noise_recovered_pct"] == pytest.approx(100 * (n4 - nk) / (n4 - n8))
    assert "logit SQNR dB" in cap.out and "remove" in cap.out
    sweep = {r["K"]: r for r in rep["table4"]["sweep"]}
    assert set(sweep) == set(candidate_Ks(rep["table4"]["N"])) | {rep["table4"]["K"]}
    assert sweep[rep["table4"]["K"]]["logit_noise"] == nk
    for K, r in sweep.items():
        assert r["layer_savings_pct"] == pytest.approx(100 * (0.5 * rep["table4"]["N"] - K) / rep["table4"]["N"])
        assert r["noise_recovered_pct"] == pytest.approx(100 * (n4 - r["logit_noise"]) / (n4 - n8))
    assert "candidate K" in (tmp_path / "k" / "report.md").read_text()
    # a given K judges no trial: no resolution line (the auto search's: test_cli_kmeans_auto_meets_target)
    assert rep["target"]["resolution"] is None and "Resolution:" not in (tmp_path / "k" / "report.md").read_text()
    plan = load_plan(tmp_path / "k" / "plan.json")
    assert plan.layers["conv2"].kmeans.K == 3 and plan.layers["fc1"].kmeans.K == 2


@pytest.mark.parametrize("first_meets", [True, False])
@pytest.mark.parametrize("codes", [[], ["--no-learned-rounding"]])
def test_cli_kmeans_auto_meets_target(capsys, tmp_path, digits_dir, monkeypatch, codes, first_meets):
    """The automatic K search, learned codes (default) or nearest: the first trial (every layer at
    its smallest K) is kept when it meets the target; when it misses (made to here), every
    candidate is measured and the bisection keeps a trial that met it; report.md lists them."""
    calls = spy_first_trial(monkeypatch, first_meets)
    code, cap = _km(capsys, digits_dir, tmp_path / "k", "--target-drop", "1.0", *codes)
    assert code == 0, cap.err
    assert calls[0], "the first trial must meet the target on the digits for this test to check both paths"
    rep = json.loads((tmp_path / "k" / "report.json").read_text())
    trials = rep["k_search"]["trials"]
    ok = [t for t in trials if t["meets_target"]]
    assert all(t["top1_error"] <= rep["target"]["top1_error"] for t in ok)
    assert rep["layers"], "the auto-K search clustered no layer: nothing was checked"
    assert {n: d["k"] for n, d in rep["layers"].items()} in [t["ks"] for t in ok]
    assert trials[0]["beta"] is None and len({json.dumps(t["ks"], sort_keys=True) for t in trials}) == len(trials)
    md = (tmp_path / "k" / "report.md").read_text()
    if first_meets:
        assert len(trials) == 1 and rep["k_search"]["noise"] == {} and "met the target, so it was kept" in md
    else:
        assert len(trials) > 1 and rep["k_search"]["noise"] and "missed the target" in md
    assert md.count("| smallest K ") == 1 and ("learned residual codes" in md) == (codes == [])
    assert rep["options"]["learned_rounding"] is (codes == [])  # what ran, not the parser's None
    # what the tuning images resolve, from the all-base plan's tuning error (its drop vs float)
    res, allowed = rep["target"]["resolution"], rep["target"]["top1_error"] - rep["float"]["top1_error_tune"]
    assert res["n"] == rep["n_tune"] and res["allowed"] == pytest.approx(allowed) and res["margin_z"] == 1.0
    assert res == resolution(rep["n_tune"], res["base_drop"], res["allowed"], 1.0)
    assert resolution_text(res, "the all-8-bit plan") in md


@pytest.mark.parametrize("extra,msg", [(["--k", "0"], "at least 1"), (["--k", "conv2=64"], "K=64"),
                                       (["--layers", "conv9"], "'conv9'")])
def test_cli_kmeans_bad_input_exit_2(capsys, tmp_path, digits_dir, extra, msg):
    code, cap = _km(capsys, digits_dir, tmp_path / "k", *extra)
    assert code == 2 and msg in cap.err


# ---- <4b,4b> residuals (issue #20): the residual kernels read their own 4-bit data format ----

def _kmeans44(g, x, ks, mode="2D", rounding="half_up", **cfg):
    obs = observe(g, [(x, None)], show_progress=False)
    km = {n: cluster_kernels(g.node(n).weight, K) for n, K in ks.items()}
    return plan_from(obs, QuantConfig(LayerConfig(coeff_mode=mode, **cfg), rounding), "t", kmeans=km,
                     kmeans_bits=(8, 4, 4))


@pytest.mark.parametrize("mode,dm,method", [("2D", "3D", "mse"), ("3D", "4D", "maxabs")])
def test_kmeans_44_bit_exact_sim_engine(mode, dm, method, tmp_path):
    g = make_graph(CifarResNet(20), (3, 32, 32))
    torch.manual_seed(4)
    x = torch.randn(8, 3, 32, 32)
    ks = {"layer1.0.conv2": 3, "layer2.1.conv1": 5, "linear": 2}
    plan = _kmeans44(g, x, ks, mode, data_mode=dm, data_method=method)
    for n in ks:
        d = plan.layers[n].kmeans.data
        assert d is not None and d.T == 4 and d.granularity == dm
    plan.save(tmp_path / "p.json")
    assert load_plan(tmp_path / "p.json").to_json() == plan.to_json()
    xt = torch.randn(4, 3, 32, 32) * 1.5
    sim, eng = Simulator(g, plan, exact=True), Engine(g, plan)
    got = sim(xt)
    assert torch.equal(eng.dequantize(eng.run(eng.quantize_input(xt))), got)
    assert eng.saturations()["layer2.1.conv1"]["data"] == sim.saturations()["layer2.1.conv1"]["data"]
    fast = Simulator(g, plan, exact=False)(xt).double()
    assert (fast.argmax(1) == got.argmax(1)).all()
    # the residual branch really reads 4-bit data: the outputs differ from the <4b,8b> plan's
    obs = observe(g, [(x, None)], show_progress=False)
    p48 = plan_from(obs, plan.config, "t", kmeans={n: cluster_kernels(g.node(n).weight, K) for n, K in ks.items()})
    assert not torch.equal(Simulator(g, p48, exact=True)(xt), got)
    assert "data" not in plan_from(obs, plan.config, "t", kmeans={"linear": cluster_kernels(
        g.node("linear").weight, 2)}).to_json()["layers"]["linear"]["kmeans"]  # <4b,8b> plans keep their JSON


def test_kmeans_44_complexity_is_hand_computed():
    g = make_graph(CifarResNet(20), (3, 32, 32))
    x = torch.randn(8, 3, 32, 32)
    name, K = "layer3.1.conv1", 6
    plan = _kmeans44(g, x, {name: K}, mode="3D")
    c = {r.name: r for r in analyze(g, plan).layers}[name]
    # 64 kernels of 64x3x3 on 8x8 outputs: K basis kernels at <8b,8b> (1 per MAC) + 64 residuals at <4b,4b> (0.25)
    macs_per_kernel = 64 * 3 * 3 * 8 * 8
    assert c.rel_complexity_mmacs == pytest.approx((K * 1.0 + 64 * 0.25) * macs_per_kernel / 1e6, rel=1e-12)
    assert layer_savings(64, K, residual_data_bits=4) == pytest.approx((0.75 * 64 - K) / 64)
    assert "on 4b data" in c.coeff_bits


@pytest.mark.skipif(shutil.which("cc") is None or shutil.which("make") is None, reason="needs cc and make")
@pytest.mark.parametrize("dm", ["3D", "4D"])
def test_kmeans_44_runs_in_c(tmp_path, dm):
    from test_export_c import c_vs_engine
    g = make_graph(DepthwiseNet(), (3, 16, 16))
    x = torch.randn(16, 3, 16, 16)
    plan = _kmeans44(g, x, {"stem": 3, "pw": 2, "fc": 2}, data_mode=dm, acc_bits=24)
    res, _ = c_vs_engine(g, plan, (3, 16, 16), tmp_path)
    src = (res.out / "model.c").read_text()
    assert src.count("fixq_requant(") >= 3
    info = json.loads((res.out / "export.json").read_text())  # the residual inputs live in the caller's arena
    assert "static FIXQ_ACT_T" not in src and info["rx_bytes"] > 0 and res.act_bytes >= info["rx_bytes"]
    assert res.ram_bytes == res.arena_bytes >= res.act_bytes + info["kmeans_bytes"]
    xt = torch.randn(4, 3, 16, 16)
    eng = Engine(g, plan)
    assert torch.equal(eng.dequantize(eng.run(eng.quantize_input(xt))), Simulator(g, plan, exact=True)(xt))


def test_kmeans_44_qdq_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    from fixq.backends.onnx_out import compare_qdq, export_qdq
    g = make_graph(DepthwiseNet(), (3, 16, 16))
    torch.manual_seed(2)
    x = torch.randn(16, 3, 16, 16)
    plan = _kmeans44(g, x, {"pw": 2, "fc": 2}, rounding="nearest_even", data_mode="3D")
    export_qdq(g, plan, tmp_path / "k.onnx")
    cmp = compare_qdq(tmp_path / "k.onnx", g, plan, torch.randn(32, 3, 16, 16))
    assert cmp["max_diff_output_steps"] == 0 and cmp["agreement_top1_pct"] == 100.0


def test_kmeans_44_plan_schema_refuses_a_wrong_grid():
    from fixq.planning.plan import PlanError
    from fixq.planning.plan_schema import check_plan_graph
    g = make_graph(DepthwiseNet(), (3, 16, 16))
    plan = _kmeans44(g, torch.randn(8, 3, 16, 16), {"pw": 2}, data_mode="3D")
    d = plan.to_json()
    assert d["layers"]["pw"]["kmeans"]["data"]["T"] == 4
    d["layers"]["pw"]["kmeans"]["data"].update(F=[1, 2], shape=[2])
    with pytest.raises(PlanError, match=r"kmeans\.data\.shape"):
        check_plan_graph(plan_from_json(d), g)


def test_cli_kmeans_44(capsys, tmp_path, digits_dir):
    code, cap = _km(capsys, digits_dir, tmp_path / "k", "--k", "conv2=3,fc1=2", "--residual-data-bits", "4")
    assert code == 0, cap.err
    rep = json.loads((tmp_path / "k" / "report.json").read_text())
    assert "<4b,4b> residuals" in rep["table4"]["rows"][3]["plan"] and "<4b,4b>" in rep["table6"][-1]["plan"]
    assert "<4b,8b> residuals" in rep["table4"]["rows"][4]["plan"] and "<4b,8b>" in rep["table6"][-2]["plan"]
    assert rep["layers"]["conv2"]["layer_savings_pct"] == pytest.approx(100 * (0.75 * 32 - 3) / 32)
    plan = load_plan(tmp_path / "k" / "plan.json")
    assert plan.layers["conv2"].kmeans.data.T == 4 and plan.layers["fc1"].kmeans.data.T == 4

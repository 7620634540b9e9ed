"""K-means clustered kernels (issue #7): clustering, reconstruction, complexity, bit-exact
simulation / engine / C, refusals and the command."""
import json
import math
import shutil

import pytest
import torch

from fixq.calibrate import observe, plan_from
from fixq.cli import main
from fixq.complexity import analyze
from fixq.engine import Engine
from fixq.kmeans import (KMeansError, basis_values, check_K, cluster_kernels, kmeans_layer, layer_savings,
                         residual)
from fixq.kmeans_search import candidate_Ks, kmeans_layers, parse_k
from fixq.plan import LayerConfig, QuantConfig, QuantPlan
from fixq.simulate import Simulator
from fixq.zoo import CifarResNet

from helpers import DepthwiseNet, make_graph


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
    assert torch.equal(Gq + residual(w, km), w.double())
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
    assert QuantPlan.load(tmp_path / "p.json").to_json() == plan.to_json()
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
    assert kmeans_layers(g) == ["pw", "fc"]  # stem excluded (first), dw and grp are grouped
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
    plan = QuantPlan.load(tmp_path / "k" / "plan.json")
    assert plan.layers["conv2"].kmeans.K == 3 and plan.layers["fc1"].kmeans.K == 2


def test_cli_kmeans_auto_meets_target(capsys, tmp_path, digits_dir):
    code, cap = _km(capsys, digits_dir, tmp_path / "k", "--target-drop", "1.0")
    assert code == 0, cap.err
    rep = json.loads((tmp_path / "k" / "report.json").read_text())
    ok = [t for t in rep["k_search"]["trials"] if t["meets_target"]]
    assert all(t["top1_error"] <= rep["target"]["top1_error"] for t in ok)
    assert rep["layers"], "the auto-K search clustered no layer: nothing was checked"
    assert {n: d["k"] for n, d in rep["layers"].items()} in [t["ks"] for t in ok]


@pytest.mark.parametrize("extra,msg", [(["--k", "0"], "at least 1"), (["--k", "conv2=64"], "K=64"),
                                       (["--layers", "conv9"], "'conv9'")])
def test_cli_kmeans_bad_input_exit_2(capsys, tmp_path, digits_dir, extra, msg):
    code, cap = _km(capsys, digits_dir, tmp_path / "k", *extra)
    assert code == 2 and msg in cap.err

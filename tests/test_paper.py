"""``--paper`` (issue #20): the paper's choices in one switch, field by field, and the FC 4D rule."""
import argparse
import json
import math

import pytest
import torch

from fixq.planning.plan_io import load_plan, plan_from_json
from fixq.algorithms.calibrate import calibrate
from fixq.app.cli import main
from fixq.app.parser import explicit_options
from fixq.app.common import make_config
from fixq.graph.ir import QUANT_POINTS, Linear
from fixq.app.paper import apply_paper
from fixq.planning.plan import LayerConfig, PlanError, QuantConfig

from helpers import DepthwiseNet, make_graph


def _eq6(m: float, T: int) -> int:
    """Paper eq. 6 written out: I = ceil(log2 max|x|), F = T - 1 - I (all-zero: T - 1)."""
    return T - 1 if m == 0 else T - 1 - math.ceil(math.log2(m))


def _paper_config(**explicit):
    a = argparse.Namespace(method=None, data_method=None, data_sign="auto", rounding="nearest_even", acc_bits=24,
                           acc_overflow="wrap", bias_bits=16, fc_mode="auto", coeff_bits="8", data_bits="8",
                           coeff_mode="3D", data_mode="4D")
    for k, v in explicit.items():
        setattr(a, k, v)
    info = apply_paper(a, "quantize", set(explicit))
    cfg = make_config(a.coeff_bits, a.data_bits, a.coeff_mode, a.data_mode, a.method, a.bias_bits, a.acc_bits,
                      a.acc_overflow, a.rounding, data_method=a.data_method, data_sign=a.data_sign,
                      fc_mode=a.fc_mode)
    return cfg, info



def _float_env(g, plan, x):
    """Every node's float output on ``x``, computed here from the graph's float rules."""
    from fixq.graph.ir import FLOAT_RULES, apply_act, pre_activation
    env = {g.input: x}
    with torch.no_grad():
        for n in g.nodes:
            if n.inputs:
                args = [env[i] for i in n.inputs]
                env[n.name] = apply_act(pre_activation(n, *args), n.act) if n.name in plan.layers else \
                    FLOAT_RULES[type(n)](n, *args)
    return env

def test_paper_plan_matches_the_papers_rules_field_by_field():
    g = make_graph(DepthwiseNet(), (3, 16, 16))
    torch.manual_seed(3)
    x = torch.randn(32, 3, 16, 16)
    cfg, info = _paper_config()
    assert info["departures"] == []
    d = cfg.default
    assert (d.method, d.effective_data_method, d.data_sign, d.bias_bits, d.acc_bits, d.acc_overflow, d.fc_mode,
            cfg.rounding) == ("maxabs", "maxabs", "signed", 8, 32, "saturate", "4D", "half_up")
    plan = calibrate(g, [(x, None)], cfg, show_progress=False)
    # data: signed Q(8,F), one format per tensor, F from eq. 6 over the calibration images
    env = _float_env(g, plan, x)
    checked = 0
    for n in g.nodes:
        if isinstance(n, QUANT_POINTS) and n.name in plan.tensors:
            f = plan.tensors[n.name]
            assert f.signed and f.T == 8 and f.granularity == "4D", n.name
            assert f.F == (_eq6(float(env[n.name].abs().max()), 8),), n.name
            checked += 1
    assert checked >= 6
    for n in g.layers():
        lp = plan.layers[n.name]
        w = n.weight.detach().double()
        if isinstance(n, Linear):  # §3: fully connected layers only 4D
            assert lp.weight.granularity == "4D" and lp.weight.F == (_eq6(float(w.abs().max()), 8),)
        else:  # coefficients 3D as asked, eq. 6 per kernel
            assert lp.weight.granularity == "3D"
            assert list(lp.weight.F) == [_eq6(float(k.abs().max()), 8) for k in w]
        assert lp.bias.T == 8 and list(lp.bias.F) == [_eq6(abs(float(b)), 8) for b in n.bias.detach().double()]
        assert lp.acc_bits == 32 and lp.acc_overflow == "saturate"
    assert any("fc_mode 4D" in s for s in plan.layers["fc"].notes)


def test_explicit_options_win_and_are_named():
    cfg, info = _paper_config(data_sign="auto", method="mse")
    assert cfg.default.data_sign == "auto" and cfg.default.method == "mse" and cfg.default.data_method == "mse"
    assert sorted(info["departures"]) == ["--data-sign auto", "--method mse"]
    cfg, info = _paper_config(data_method="mse")  # the data alone: coefficients stay maxabs
    assert (cfg.default.method, cfg.default.data_method, info["departures"]) == ("maxabs", "mse", ["--data-method mse"])
    assert explicit_options(["sweep", "--model", "m", "--calib", "c", "--eval", "e", "--out", "o", "--paper",
                             "--acc-b", "24"]) >= {"paper", "acc_bits"}


@pytest.mark.parametrize("command", ["mixed", "kmeans", "quantize"])
def test_paper_turns_learned_rounding_off_unless_given(command):
    """The searches learn rounding by default; --paper rounds to nearest (eq. 4) and says so,
    and an explicit --learned-rounding wins and is named as a departure."""
    a = argparse.Namespace(learned_rounding=None if command != "quantize" else False, paper=True)
    info = apply_paper(a, command, set())
    assert a.learned_rounding is False and any("rounded to nearest" in u for u in info["used"])
    a = argparse.Namespace(learned_rounding=True, paper=True)
    info = apply_paper(a, command, {"learned_rounding"})
    assert a.learned_rounding is True and info["departures"] == ["--learned-rounding"]
    assert explicit_options([command, "--model", "m", "--calib", "c", "--eval", "e", "--out", "o", "--paper",
                             "--learned-rounding"]) >= {"paper", "learned_rounding"}


def test_fc_mode_4d_and_its_json():
    g = make_graph(DepthwiseNet(), (3, 16, 16))
    x = torch.randn(16, 3, 16, 16)
    base = calibrate(g, [(x, None)], QuantConfig(LayerConfig(coeff_mode="3D")), show_progress=False)
    fc4 = calibrate(g, [(x, None)], QuantConfig(LayerConfig(coeff_mode="3D", fc_mode="4D")), show_progress=False)
    assert base.layers["fc"].weight.granularity == "3D" and fc4.layers["fc"].weight.granularity == "4D"
    assert fc4.layers["pw"].weight == base.layers["pw"].weight
    assert "fc_mode" not in base.to_json()["config"]["default"]  # default left out: old plans keep their bytes
    assert fc4.to_json()["config"]["default"]["fc_mode"] == "4D"
    assert plan_from_json(json.loads(json.dumps(fc4.to_json()))).config.default.fc_mode == "4D"
    with pytest.raises(PlanError, match="fully connected mode"):
        LayerConfig(fc_mode="2D")
    from fixq.algorithms.calibrate import observe, plan_from
    obs = observe(g, [(x, None)], show_progress=False)
    mixed = torch.full((5, 32), 8)
    mixed[0, 0] = 4
    with pytest.raises(PlanError, match="'fc' is fully connected"):
        plan_from(obs, QuantConfig(LayerConfig(fc_mode="4D")), filter_bits={"fc": mixed})
    p = plan_from(obs, QuantConfig(LayerConfig(fc_mode="4D")), filter_bits={"fc": torch.full((5, 32), 4)})
    assert p.layers["fc"].weight.granularity == "4D" and p.layers["fc"].weight.T == 4


def test_cli_paper_report_says_so(capsys, tmp_path, digits_dir):
    argv = ["quantize", "--model", "lenet-digits", "--calib", str(digits_dir), "--calib-size", "64", "--eval",
            str(digits_dir), "--eval-size", "100", "--out", str(tmp_path / "q"), "--paper", "--rounding", "floor"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "paper's choices were used" in out and "--rounding floor" in out
    rep = json.loads((tmp_path / "q" / "report.json").read_text())
    assert rep["paper"]["departures"] == ["--rounding floor"]
    assert "paper's choices were used" in (tmp_path / "q" / "report.md").read_text()
    plan = load_plan(tmp_path / "q" / "plan.json")
    d = plan.config.default
    assert (d.data_sign, d.effective_data_method, d.fc_mode, plan.rounding) == ("signed", "maxabs", "4D", "floor")
    assert all(f.signed for f in plan.tensors.values())
    assert {plan.layers[n].weight.granularity for n in ("fc1", "fc2")} == {"4D"}


def test_cli_paper_names_config_file_departures(capsys, tmp_path, digits_dir):
    cfg = tmp_path / "over.json"
    cfg.write_text(json.dumps({"fc*": {"data_method": "mse", "coeff_bits": 4}, "conv1": {"bias_bits": 8}}))
    argv = ["quantize", "--model", "lenet-digits", "--calib", str(digits_dir), "--calib-size", "64", "--eval",
            str(digits_dir), "--eval-size", "64", "--out", str(tmp_path / "q"), "--paper", "--config", str(cfg)]
    assert main(argv) == 0
    rep = json.loads((tmp_path / "q" / "report.json").read_text())
    assert rep["paper"]["departures"] == ["--config 'fc*': data_method mse"]  # bias_bits 8 is the paper's
    assert "--config 'fc*': data_method mse" in capsys.readouterr().out
    plan = load_plan(tmp_path / "q" / "plan.json")
    assert plan.config.for_layer("fc1").data_method == "mse" and plan.config.default.data_method == "maxabs"


def test_cli_mixed_paper_keeps_fc_layers_whole(capsys, tmp_path, digits_dir):
    """fc_mode 4D under --paper: the energy search leaves fully connected layers at base bits."""
    argv = ["mixed", "--model", "lenet-digits", "--calib", str(digits_dir), "--calib-size", "64", "--eval",
            str(digits_dir), "--eval-size", "300", "--out", str(tmp_path / "m"), "--paper", "--trials", "3",
            "--strategy", "global", "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "m" / "report.json").read_text())
    assert "first and last layers kept at base bits (§5, Table 3)" in rep["paper"]["used"]
    assert rep["order"] == "energy" and "lowest-energy 2D filters low first (§5)" in rep["paper"]["used"]
    plan = load_plan(tmp_path / "m" / "plan.json")
    assert plan.layers["fc1"].weight.granularity == "4D" and plan.layers["fc1"].weight.T == 8
    names = list(plan.layers)  # §5: the first and the last layer stay at base bits, whatever the search did
    for n in (names[0], names[-1]):
        assert set(plan.layers[n].weight.bits().reshape(-1).tolist()) == {8}, n
    assert any(4 in plan.layers[n].weight.bits().reshape(-1).tolist() for n in names[1:-1])  # the search did lower others


def test_cli_kmeans_paper_table4_with_float_elsewhere(capsys, tmp_path, digits_dir):
    """--paper on kmeans: Table 4 with every other layer in floating point (the paper's Table 4)."""
    argv = ["kmeans", "--model", "lenet-digits", "--calib", str(digits_dir), "--calib-size", "64", "--eval",
            str(digits_dir), "--eval-size", "300", "--out", str(tmp_path / "k"), "--k", "conv2=3,fc1=2", "--paper",
            "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "k" / "report.json").read_text())
    t4 = rep["table4"]
    assert t4["others"] == "flp" and "every other layer in floating point" in (tmp_path / "k" / "report.md").read_text()
    base_net = rep["table6"][0]["rel_complexity_mmacs"]
    base_layer = t4["rows"][0]["layer_rel_complexity_mmacs"]
    for r in t4["rows"]:  # network savings: this layer's savings over the all-base network
        assert r["network_savings_pct"] == pytest.approx(100 * (base_layer - r["layer_rel_complexity_mmacs"]) / base_net)
    for r in rep["table6"]:  # Table 6 is the whole network: savings from its own complexity, not Table 4's rule
        assert r["network_savings_pct"] == pytest.approx(100 * (1 - r["rel_complexity_mmacs"] / base_net))
    assert rep["table6"][1]["network_savings_pct"] > 10  # the all-4-bit set of the clustered layers saves a lot
    # one layer quantized, the rest float: less logit noise than the whole 2D-HQ <8b,8b> network
    assert t4["rows"][0]["logit_sqnr_db"] > rep["table6"][0]["logit_sqnr_db"]
    from fixq.algorithms.kmeans_search import only_layer_config
    g = make_graph(DepthwiseNet(), (3, 16, 16))
    cfg = only_layer_config(g, QuantConfig(LayerConfig(coeff_mode="2D")), "pw")
    assert cfg.for_layer("pw").coeff_bits == 8 and cfg.for_layer("grp").coeff_bits is None
    assert cfg.for_layer("fc").data_bits is None and cfg.for_layer(g.node("pw").inputs[0]).data_bits == 8


def test_paper_residual_data_formats_are_eq6_at_4_bits():
    """``<4b,4b>`` residuals under --paper: each residual branch's own data format is signed
    Q(4,F) with F from eq. 6 over the calibration images, beside the input's Q(8,F)."""
    from fixq.algorithms.kmeans import cluster_kernels
    from fixq.algorithms.observe import observe
    from fixq.algorithms.calibrate import plan_from
    from fixq.planning.partitions import input_point
    g = make_graph(DepthwiseNet(), (3, 16, 16))
    torch.manual_seed(5)
    x = torch.randn(32, 3, 16, 16)
    cfg, _ = _paper_config(coeff_mode="2D")
    km = {n: cluster_kernels(g.node(n).weight, 2) for n in ("stem", "pw", "fc")}
    plan = plan_from(observe(g, [(x, None)], show_progress=False), cfg, "t", kmeans=km, kmeans_bits=(8, 4, 4))
    env = _float_env(g, plan, x)
    for name in km:
        q = input_point(g, name)
        m = float(env[q].abs().max())
        d = plan.layers[name].kmeans.data
        assert (d.T, d.signed, d.granularity) == (4, True, "4D"), name
        assert d.F == (_eq6(m, 4),) and plan.tensors[q].F == (_eq6(m, 8),), (name, m)


def test_mixed_order_noise_by_default_energy_under_paper():
    """--order: noise by default, the paper's energy order under --paper unless given explicitly."""
    from fixq.app.parser import build_parser
    base = ["mixed", "--model", "m", "--calib", "c", "--eval", "e", "--out", "o"]
    assert build_parser().parse_args(base).order == "noise"
    a = argparse.Namespace(order="noise", paper=True)
    assert apply_paper(a, "mixed", set())["used"] == ["lowest-energy 2D filters low first (§5)"] and a.order == "energy"
    a = argparse.Namespace(order="noise", paper=True)
    assert apply_paper(a, "mixed", {"order"})["departures"] == ["--order noise"] and a.order == "noise"
    a = argparse.Namespace(order="noise", paper=True)
    apply_paper(a, "kmeans", set())
    assert a.order == "noise"  # kmeans has no order


def test_kmeans_paper_excludes_the_first_layer(capsys, tmp_path, digits_dir):
    """§6 / Table 6: under --paper every layer but the first is clustered, whatever --exclude
    defaulted to; an explicit --exclude still wins (and is named as a departure)."""
    a = argparse.Namespace(exclude="none", rounding="half_up", paper=True)
    info = apply_paper(a, "kmeans", set())
    assert a.exclude == "first" and "first layer not clustered (§6, Table 6)" in info["used"]
    a = argparse.Namespace(exclude="none", paper=True)
    assert apply_paper(a, "kmeans", {"exclude"})["departures"] == ["--exclude none"] and a.exclude == "none"
    argv = ["kmeans", "--model", "lenet-digits", "--calib", str(digits_dir), "--calib-size", "64", "--eval",
            str(digits_dir), "--eval-size", "200", "--out", str(tmp_path / "k"), "--k", "2", "--paper", "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err
    plan = load_plan(tmp_path / "k" / "plan.json")
    first = next(iter(plan.layers))
    assert plan.layers[first].kmeans is None
    assert all(lp.kmeans is not None for n, lp in plan.layers.items() if n != first)

"""Energy-based 8/4-bit mixed precision (issue #6): energies, threshold rule, tuner, plans
that run bit-exactly in simulation, engine and C, and the errors users get."""
import json
import shutil

import pytest
import torch

from fixq.planning.plan_io import load_plan
from fixq.algorithms.calibrate import observe, plan_from
from fixq.app.cli import main
from fixq.analysis.complexity import analyze
from fixq.algorithms.acceptance import resolution, resolution_text
from fixq.backends.engine import Engine
from fixq.algorithms.mixed import (MixedError, Trial, eligible_layers, filter_bits, filter_energies, low_precision_mask,
                                   tune_threshold)
from fixq.planning.plan import LayerConfig, QuantConfig
from fixq.backends.simulate import Simulator

from helpers import DepthwiseNet, make_graph


def test_threshold_rule_hand_example():
    E = torch.tensor([[10.0, 1.0, 4.0], [0.0, 60.0, 25.0]])  # total 100; sorted 0,1,4,10,25,60
    # cumulative shares: 0, .01, .05, .15, .40, 1.0
    assert low_precision_mask(E, 0.0).sum() == 0
    assert low_precision_mask(E, 0.05).tolist() == [[False, True, False], [True, False, False]]
    assert low_precision_mask(E, 0.0501).tolist() == [[False, True, True], [True, False, False]]
    assert low_precision_mask(E, 0.40).tolist() == [[True, True, True], [True, False, False]]
    assert low_precision_mask(E, 1.0).all()
    bits = filter_bits({"l": E}, 0.15, 8, 4)["l"]
    assert bits.tolist() == [[8, 4, 4], [4, 8, 8]]
    with pytest.raises(MixedError, match="threshold"):
        low_precision_mask(E, 1.5)


def test_tuner_never_returns_a_plan_missing_the_target():
    # a non-monotone error curve: the tuner may only return trials that met the target
    curve = lambda f: 10 + (3 if 0.07 < f < 0.09 else 0) + 8 * f  # noqa: E731
    r = tune_threshold(lambda f: Trial(f, "global", curve(f), 100 - f, f, f, curve(f) <= 11.0), target=11.0,
                       max_trials=20)
    assert r.best is not None and r.best.top1_error <= 11.0 and r.best.meets_target
    assert r.best.f == max(t.f for t in r.trials if t.meets_target)
    assert len(r.trials) <= 21 and r.trials[1].f == 1.0  # the budget, plus the probe at f = 1
    none = tune_threshold(lambda f: Trial(f, "global", 20.0, 1, 0, 0, False), target=11.0)
    assert none.best is None and len(none.trials) == 1


def test_tuner_never_measures_a_threshold_twice():
    """0.025 + 0.0125 = 0.037500000000000006 and 0.03125 + 0.00625 = 0.0375: the second is the
    threshold that already missed, so it counts as a miss without spending a trial."""
    seen = []

    def ev(f):
        seen.append(f)
        return Trial(f, "global", 10.0, 100 * (1 - f), 100 * f, 100 * f, f < 0.035)
    r = tune_threshold(ev, target=11.0, max_trials=20)
    assert sorted(round(f, 9) for f in seen) == sorted(set(round(f, 9) for f in seen)), seen
    assert 0.03125 in seen and r.best.f < 0.035


def test_tuner_stops_at_once_when_the_top_of_the_range_meets_the_target():
    seen = []

    def ev(f):
        seen.append(f)
        return Trial(f, "global", 10.0, 100 * (1 - f), 100 * f, 100 * f, True)
    r = tune_threshold(ev, target=11.0)
    assert seen == [0.0, 1.0] and r.best.f == 1.0 and "top of the range" in r.stop_reason


def _plan_with_bits(g, x, bits, **cfg):
    obs = observe(g, [(x, None)], show_progress=False)
    return plan_from(obs, QuantConfig(LayerConfig(coeff_mode="2D", **cfg)), "t", filter_bits=bits)


def test_mixed_plan_bit_exact_sim_engine_and_json_roundtrip(tmp_path):
    g = make_graph(DepthwiseNet(), (3, 16, 16))
    torch.manual_seed(2)
    x = torch.randn(16, 3, 16, 16)
    E = filter_energies(g, [x], show_progress=False)
    bits = filter_bits({k: E[k] for k in ("pw", "grp", "fc")}, 0.3)
    assert all((b == 4).any() and (b == 8).any() for b in bits.values())
    plan = _plan_with_bits(g, x, bits, data_mode="3D", acc_bits=20)
    w = plan.layers["grp"].weight
    assert w.T == 8 and w.bits().tolist() == bits["grp"].tolist()
    plan.save(tmp_path / "p.json")
    assert load_plan(tmp_path / "p.json").to_json() == plan.to_json()
    xt = torch.randn(6, 3, 16, 16) * 1.5
    sim, eng = Simulator(g, plan, exact=True), Engine(g, plan)
    assert torch.equal(eng.dequantize(eng.run(eng.quantize_input(xt))), sim(xt))
    # the 4-bit filters really are 4-bit codes
    L = eng.layers["grp"]
    low = bits["grp"] == 4
    assert int(L.w[low].abs().max()) <= 8 and int(L.w[~low].abs().max()) > 8
    # complexity: each 2D filter costs its own bits
    c = {r.name: r for r in analyze(g, plan).layers}
    n4 = int(low.sum())
    per = c["grp"].P * c["grp"].H * c["grp"].W
    assert c["grp"].rel_complexity_mmacs == pytest.approx(per * (n4 * 0.5 + (low.numel() - n4)) / 1e6)


@pytest.mark.skipif(shutil.which("cc") is None or shutil.which("make") is None, reason="needs cc and make")
def test_mixed_plan_runs_in_c(tmp_path):
    from test_export_c import c_vs_engine
    g = make_graph(DepthwiseNet(), (3, 16, 16))
    x = torch.randn(16, 3, 16, 16)
    E = filter_energies(g, [x], show_progress=False)
    plan = _plan_with_bits(g, x, filter_bits({k: E[k] for k in ("stem", "pw", "grp")}, 0.5))
    c_vs_engine(g, plan, (3, 16, 16), tmp_path)


def test_filter_bits_shape_is_checked():
    g = make_graph(DepthwiseNet(), (3, 16, 16))
    with pytest.raises(ValueError, match="layer 'pw'.*2D filters"):
        _plan_with_bits(g, torch.randn(4, 3, 16, 16), {"pw": torch.full((3, 3), 4)})


def test_bad_layers_and_empty_probe():
    g = make_graph(DepthwiseNet(), (3, 16, 16))
    assert eligible_layers(g) == ["dw", "pw", "grp"]
    assert eligible_layers(g, "first,pw") == ["dw", "grp", "fc"]
    assert eligible_layers(g, "first,last,depthwise") == ["pw", "grp"]  # grp: 2 groups of 8 inputs, not depthwise
    mult = make_graph(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 16, 3, groups=8),
                                          torch.nn.Conv2d(16, 8, 1, groups=2)), (3, 8, 8))
    assert len(eligible_layers(mult, "none")) == 3
    assert [mult.node(n).groups for n in eligible_layers(mult, "depthwise")] == [1, 2]  # depth multiplier 2: dropped
    with pytest.raises(MixedError, match="'nope'.*stem, dw, pw, grp, fc"):
        eligible_layers(g, "first,nope")
    with pytest.raises(MixedError, match="probe set is empty"):
        filter_energies(g, [torch.zeros(0, 3, 16, 16)], show_progress=False)
    from fixq.algorithms.mixed_search import MixedOptions
    with pytest.raises(MixedError, match="--order is 'noise' or 'energy', got 'bad'"):
        MixedOptions(order="bad")


def _mixed(capsys, digits_dir, out, *extra):
    argv = ["mixed", "--model", "lenet-digits", "--calib", str(digits_dir), "--calib-size", "64",
            "--eval", str(digits_dir), "--eval-size", "300", "--out", str(out), "--quiet",
            "--exclude", "none", *map(str, extra)]
    code = main(argv)
    return code, capsys.readouterr()


def test_cli_mixed_meets_target_on_tuning_images(capsys, tmp_path, digits_dir):
    # the energy-threshold tuner itself, on nearest codes (learned codes: tests/test_learned_bank.py)
    code, cap = _mixed(capsys, digits_dir, tmp_path / "m", "--low-bits", 2, "--target-drop", 1.0, "--trials", 8,
                       "--no-learned-rounding")
    assert code == 0, cap.err
    rep = json.loads((tmp_path / "m" / "report.json").read_text())
    assert {"float", "quant", "complexity", "low_precision_filters_pct", "trials"} <= set(rep)
    assert rep["order"] == "noise" and "add the least noise energy go low first" in (tmp_path / "m" / "report.md").read_text()
    best = [t for t in rep["trials"] if t["strategy"] == rep["strategy"] and t["meets_target"]]
    assert best and all(t["top1_error"] <= rep["target"]["top1_error"] for t in best)
    assert rep["complexity"]["savings_pct"] == max(t["savings_pct"] for t in best)
    assert rep["complexity"]["savings_pct"] > 0 and 0 < rep["low_precision_filters_pct"]["overall"] < 100
    assert "Conservative" in cap.out and "Aggressive" in cap.out
    plan = load_plan(tmp_path / "m" / "plan.json")
    assert any(lp.weight.Tp is not None for lp in plan.layers.values())
    # what the tuning images resolve: from the all-base plan's drop (its f = 0 trial, no margin)
    res, f0 = rep["target"]["resolution"], rep["trials"][0]
    assert f0["f"] == 0 and res["n"] == rep["n_tune"] and res["base_drop"] == pytest.approx(f0["drop_bound"])
    want = resolution(rep["n_tune"], f0["drop_bound"], rep["target"]["top1_error"] - rep["float"]["top1_error_tune"])
    assert res["max_discordant"] == want["max_discordant"] >= 0
    assert resolution_text(res, "the all-8-bit plan") in (tmp_path / "m" / "report.md").read_text()


@pytest.mark.parametrize("extra,msg", [
    (["--target-error", "0"], "below the float model's own error"),
    (["--probe-size", "0"], "probe set is empty"),
    (["--exclude", "conv9"], "'conv9'"),
    (["--low-bits", "8"], "must be below --base-bits"),
])
def test_cli_mixed_bad_input_exit_2(capsys, tmp_path, digits_dir, extra, msg):
    code, cap = _mixed(capsys, digits_dir, tmp_path / "m", *extra)
    assert code == 2 and msg in cap.err



def test_resumed_simulation_equals_the_whole_run_on_a_residual_net():
    """Simulator.run_from at a layer, on the live tensors of the base plan's run of the same
    batch, gives exactly the outputs of the one-layer-low plan's own run (skip tensors kept)."""
    from fixq.data.zoo import CifarResNet
    torch.manual_seed(0)
    g = make_graph(CifarResNet(20).eval(), (3, 32, 32))
    x = torch.randn(8, 3, 32, 32)
    cfg = QuantConfig(LayerConfig(coeff_mode="2D"))
    obs = observe(g, [(x, None)], histograms=True, show_progress=False)
    base = Simulator(g, plan_from(obs, cfg))
    index = {n.name: i for i, n in enumerate(g.nodes)}
    names = ["layer1.0.conv1", "layer2.0.conv1", "layer2.2.conv2", "layer3.1.conv1", "linear"]
    sims = {index[k]: Simulator(g, plan_from(obs, cfg, filter_bits={k: torch.full(
        tuple(g.node(k).weight.shape[:2]), 2, dtype=torch.int64)})) for k in names}
    got = {}
    base.run(x, before=lambda i, env: got.__setitem__(i, sims[i].run_from(i, env)) if i in sims else None)
    assert set(got) == set(sims)
    for i, sim in sims.items():
        assert torch.equal(got[i], sim(x)), g.nodes[i].name
        assert not torch.equal(got[i], base(x)), g.nodes[i].name  # the low layer changed the output


def test_measure_each_shares_a_node_and_stops_after_its_last_fork(digits_dir, monkeypatch):
    """Several plans on one node (K-means candidates: one per K) and plans on other nodes each
    get the numbers of their own simulation, none measured on its own; with ``base`` the
    first pass runs whole and keeps the base plan's measurement, later passes (and passes
    without ``base``) stop at their last fork: the base run returns nothing (issue #16)."""
    from fixq.algorithms.pipeline import open_session
    from fixq.algorithms.search import PlanBench, base_config
    from fixq.backends.simulate import Simulator
    s = open_session("lenet-digits", str(digits_dir), str(digits_dir), calib_size=40, eval_size=60, batch_size=16,
                     workers=0, show_progress=False)
    bench = PlanBench(s, base_config(QuantConfig(), 8))
    names = eligible_layers(s.graph, ())
    assert len(names) >= 2

    def low(k, b):
        return bench.plan(filter_bits={k: torch.full(tuple(s.graph.node(k).weight.shape[:2]), b, dtype=torch.int64)})
    plans = {(names[0], 2): low(names[0], 2), (names[0], 4): low(names[0], 4), (names[1], 2): low(names[1], 2)}
    returned, run, alone = [], Simulator.run, []
    monkeypatch.setattr(Simulator, "run", lambda self, *a, **k: (returned.append(run(self, *a, **k)), returned[-1])[1])
    measure = PlanBench.measure
    monkeypatch.setattr(PlanBench, "measure", lambda self, p, *a: (alone.append(p), measure(self, p, *a))[1])
    first = bench.measure_each(plans, "tune", 30)  # no base: stops at names[1]'s forks
    assert returned and all(r is None for r in returned) and ("tune", 30) not in bench._base_measured
    returned.clear()
    got = bench.measure_each(plans, "tune", 30, base=True)  # the base pass runs whole and is kept
    assert returned and all(r is not None for r in returned) and ("tune", 30) in bench._base_measured
    returned.clear()
    again = bench.measure_each(plans, "tune", 30, base=True)
    assert returned and all(r is None for r in returned)  # kept: stopped at the last fork
    assert not alone  # every plan forked from the base pass; none measured on its own
    for k, p in plans.items():
        e1, e5, lg = measure(bench, p, "tune", 30)
        for res in (first[k], got[k], again[k]):
            assert (res[0], res[1]) == (e1, e5) and torch.equal(res[2], lg), k
    assert not torch.equal(got[(names[0], 2)][2], got[(names[0], 4)][2])


def test_measure_many_builds_each_run_of_plans_when_it_comes(digits_dir, monkeypatch):
    """measure_many builds at most ``size`` plans before each measure_each pass (not all of
    them up front), passes every key through exactly once, keeps what ``keep`` returns, and
    gets the numbers measure_each gives (issue #16)."""
    from fixq.algorithms.pipeline import open_session
    from fixq.algorithms.search import PlanBench, base_config
    s = open_session("lenet-digits", str(digits_dir), str(digits_dir), calib_size=40, eval_size=60, batch_size=16,
                     workers=0, show_progress=False)
    bench = PlanBench(s, base_config(QuantConfig(), 8))
    names = eligible_layers(s.graph, ())
    keys = [(n, b) for n in names for b in (2, 3)]
    built, runs, each = [], [], PlanBench.measure_each

    def maker(k):
        def make():
            built.append(k)
            return bench.plan(filter_bits={k[0]: torch.full(tuple(s.graph.node(k[0]).weight.shape[:2]), k[1],
                                                            dtype=torch.int64)})
        return make
    monkeypatch.setattr(PlanBench, "measure_each", lambda self, plans, *a: (
        runs.append((list(plans), list(built), a)), each(self, plans, *a))[1])
    got = bench.measure_many({k: maker(k) for k in keys}, "tune", 30, keep=lambda r: (r[0], r[2].sum().item()),
                             size=3)
    assert [r[0] for r in runs] == [keys[i:i + 3] for i in range(0, len(keys), 3)]
    assert all(b == keys[:i * 3 + len(r)] for i, (r, b, _) in enumerate(runs))  # built only when its run came
    assert all(a == ("tune", 30, False) for _, _, a in runs)
    assert list(got) == keys
    ref = each(bench, {k: maker(k)() for k in keys}, "tune", 30)
    for k in keys:
        assert got[k] == (ref[k][0], ref[k][2].sum().item()), k
    runs.clear()
    whole = bench.measure_many({k: maker(k) for k in keys[:2]}, "tune", 30, base=True)  # keep=None: all of it
    assert [a for _, _, a in runs] == [("tune", 30, True)] and ("tune", 30) in bench._base_measured
    for k in keys[:2]:
        assert whole[k][:2] == ref[k][:2] and torch.equal(whole[k][2], ref[k][2]), k


def test_sensitivity_is_one_base_pass_and_equals_separate_measurements(capsys, tmp_path, digits_dir, monkeypatch):
    """Per-layer sensitivity resumes one base simulation per batch at each layer
    (PlanBench.measure_each) and gets the numbers separate simulations give; a plan that
    differs elsewhere too is measured on its own (issue #16)."""
    from fixq.algorithms.pipeline import open_session
    from fixq.algorithms.search import PlanBench, base_config
    s = open_session("lenet-digits", str(digits_dir), str(digits_dir), calib_size=40, eval_size=60, batch_size=16,
                     workers=0, show_progress=False)
    bench = PlanBench(s, base_config(QuantConfig(), 8))
    names = eligible_layers(s.graph, ())
    low = {k: torch.full(tuple(s.graph.node(k).weight.shape[:2]), 2, dtype=torch.int64) for k in names}
    plans = {k: bench.plan(filter_bits={k: low[k]}) for k in names}
    plans[names[0]] = bench.plan(filter_bits={names[0]: low[names[0]], names[-1]: low[names[-1]]})  # not one layer
    calls, measure = [], PlanBench.measure
    monkeypatch.setattr(PlanBench, "measure", lambda self, p, part="tune", limit=None: (
        calls.append((id(p), limit)), measure(self, p, part, limit))[1])
    got = bench.measure_each(plans, "tune", 30, base=True)
    assert calls == [(id(plans[names[0]]), 30)]  # only the plan that differs in two layers
    for k in names:
        e1, e5, lg = measure(bench, plans[k], "tune", 30)
        assert (got[k][0], got[k][1]) == (e1, e5) and torch.equal(got[k][2], lg), k
    kept = bench._base_measured[("tune", 30)]  # the base pass's own result, kept as the base plan's
    bench._base_measured.clear()
    e1, e5, lg = measure(bench, bench.base_plan, "tune", 30)  # simulated again
    assert (kept[0], kept[1]) == (e1, e5) and torch.equal(kept[2], lg)
    calls.clear()
    code, cap = _mixed(capsys, digits_dir, tmp_path / "m", "--low-bits", 2, "--trials", 2)
    assert code == 0, cap.err
    rep = json.loads((tmp_path / "m" / "report.json").read_text())
    assert len(rep["sensitivity"]) >= 2 and len([c for c in calls if c[1] is not None]) == 1  # the base, once


def test_per_layer_sensitivity_noises_and_thresholds(capsys, tmp_path, digits_dir):
    """report.json's sensitivity: output_noise = ||logits(l low) - float||^2 / ||float||^2, which
    the per-layer thresholds use, and added_noise = ||logits(l low) - logits(all base)||^2 /
    ||float||^2, the part layer l adds (reported; DESIGN §8 says why it does not set f_l)."""
    from fixq.algorithms.mixed import layer_thresholds
    from fixq.algorithms.pipeline import open_session
    from fixq.algorithms.search import PlanBench, base_config
    code, cap = _mixed(capsys, digits_dir, tmp_path / "m", "--low-bits", 2, "--trials", 4, "--strategy", "per-layer",
                       "--no-learned-rounding", "--sensitivity-size", 64)  # fewer than the 150 tuning images
    assert code == 0, cap.err
    rep = json.loads((tmp_path / "m" / "report.json").read_text())
    s = open_session("lenet-digits", str(digits_dir), str(digits_dir), calib_size=64, eval_size=300, workers=0,
                     show_progress=False)
    bench = PlanBench(s, base_config(QuantConfig(), 8))
    names = eligible_layers(s.graph, "none")
    base = bench.measure(bench.base_plan, "tune", 64)[2]
    ref = bench.parts["tune"][2][:base.shape[0]].double()
    added, noise = {}, {}
    for k in names:
        lg = bench.measure(bench.plan(filter_bits={k: torch.full(tuple(s.graph.node(k).weight.shape[:2]), 2)}),
                           "tune", 64)[2].double()
        added[k] = float(((lg - base.double()) ** 2).sum() / (ref ** 2).sum())
        got = rep["sensitivity"][k]
        assert got["added_noise"] == pytest.approx(added[k], rel=1e-9), k
        noise[k] = float(((lg - ref) ** 2).sum() / (ref ** 2).sum())
        assert got["output_noise"] == pytest.approx(noise[k], rel=1e-9), k
    best = [t for t in rep["trials"] if t["meets_target"]]
    f = min(best, key=lambda t: (t["rel_complexity_mmacs"], t["top1_error"]))["f"]
    assert rep["strategy"] == "per-layer" and 0 < f
    assert base.shape[0] == 64
    want = layer_thresholds(noise, f)
    assert want != pytest.approx(layer_thresholds(added, f), rel=1e-9)  # the two rules differ here
    assert rep["thresholds"] == pytest.approx(want, rel=1e-12)
    with pytest.raises(MixedError, match="finite noise"):
        layer_thresholds({"a": 1.0, "b": float("nan")}, 0.5)

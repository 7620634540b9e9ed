"""Learned low-bit codes reused by the mixed-precision trials (CodeBank, issue #18): a layer's bank
codes are what learned rounding decides for it with the earlier layers low and decided
(``bank_inputs="sequential"``) or alone with the rest at the base bits (``"base"``); a trial's
low filters get exactly those codes, its base-bit filters nearest rounding, and the trial plan
runs bit-exact in simulation and engine."""
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

from fixq.algorithms.calibrate import observe, plan_from
from fixq.algorithms.learned import RoundingOptions, learn_rounding
from fixq.algorithms.learned_bank import CodeBank
from fixq.backends.engine import Engine
from fixq.backends.simulate import Simulator
from fixq.graph.capture import capture
from fixq.planning.coeffs import coeff_grid, layer_codes
from fixq.planning.plan import LayerConfig, QuantConfig

from helpers import spy_first_trial

OPTS = RoundingOptions(iters=60, samples=2048, batch=256, bias_correction=False)


class TwoConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 4)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        return self.fc(torch.flatten(nn.functional.avg_pool2d(x, 2), 1))


def _setup():
    torch.manual_seed(0)
    g = capture(TwoConv().eval(), torch.randn(2, 3, 8, 8))
    x = torch.rand(48, 3, 8, 8) * 2 - 0.5
    obs = observe(g, [(x, None)], show_progress=False)
    cfg = QuantConfig(LayerConfig(coeff_bits=8, coeff_mode="2D"))

    def plan(bits):
        return plan_from(obs, cfg, filter_bits={k: torch.full(tuple(g.node(k).weight.shape[:2]), v, dtype=torch.int64)
                                                if isinstance(v, int) else v for k, v in bits.items()})
    return g, x, plan


@pytest.mark.parametrize("inputs", ["base", "sequential"])
def test_bank_codes_are_each_layer_learned_on_its_inputs(inputs):
    g, x, plan = _setup()
    base, opts = plan({}), replace(OPTS, bank_inputs=inputs)
    bank = CodeBank(g, plan({"c1": 4, "c2": 4}), base, x, opts, ["c1", "c2"], show_progress=False)
    assert [r["layer"] for r in bank.rows] == ["c1", "c2"] and "c2" in bank.codes  # fc is not a bank layer
    # c2 learned in a plan where c1 stays at 8 bits: its input is the base plan's ("base")
    alone, _ = learn_rounding(g, plan({"c2": 4}), x, OPTS, show_progress=False, only={"c2"})
    # learning both layers in one plan feeds c2 from the 4-bit c1 with its learned codes ("sequential")
    both, _ = learn_rounding(g, plan({"c1": 4, "c2": 4}), x, OPTS, show_progress=False)
    n = g.node("c2")
    mine, other = (alone, both) if inputs == "base" else (both, alone)
    assert torch.equal(bank.codes["c2"][2], layer_codes(n, mine.layers["c2"], mine.rounding))
    assert not torch.equal(bank.codes["c2"][2], layer_codes(n, other.layers["c2"], other.rounding))
    assert ("earlier layers" in bank.note) == (inputs == "sequential")


def test_trial_takes_bank_codes_on_low_filters_only_and_runs_bit_exact():
    g, x, plan = _setup()
    bank = CodeBank(g, plan({"c1": 4, "c2": 4}), plan({}), x, OPTS, ["c1", "c2"], show_progress=False)
    mix = torch.full((6, 8), 8, dtype=torch.int64)
    mix[::2] = 4  # every other output channel of c2 low
    trial = plan({"c2": mix})
    got = bank.apply(trial)
    assert got.layers["c1"] == trial.layers["c1"]  # all 8-bit: nothing from the bank
    n, lp = g.node("c2"), got.layers["c2"]
    assert lp.weight == trial.layers["c2"].weight and lp.codes is not None  # formats unchanged
    codes, near = layer_codes(n, lp, got.rounding), coeff_grid(n, trial.layers["c2"]).nearest(got.rounding)
    low = (mix == 4)[:, :, None, None].expand_as(codes)
    assert torch.equal(codes[low], bank.codes["c2"][2][low])
    assert torch.equal(codes[~low], near[~low])
    assert not torch.equal(codes, near)  # the bank changed something the trial measures
    gr = coeff_grid(n, lp)
    assert bool(((codes >= gr.lo) & (codes <= gr.hi)).all())
    assert any("decided before the search" in s for s in got.notes)
    xt = torch.randn(5, 3, 8, 8)
    ys = Simulator(g, got, exact=True)(xt)
    eng = Engine(g, got)
    assert torch.equal(eng.dequantize(eng.run(eng.quantize_input(xt))), ys)
    assert bank.apply(plan({})) is not None and bank.apply(plan({})).layers == plan({}).layers


def test_bias_correction_alone_keeps_the_plans_codes():
    g, x, plan = _setup()
    bank = CodeBank(g, plan({"c1": 4, "c2": 4}), plan({}), x, OPTS, ["c1", "c2"], show_progress=False)
    trial = bank.apply(plan({"c2": 4}))
    bc, rows = learn_rounding(g, trial, x, RoundingOptions(learned=False), show_progress=False)
    n = g.node("c2")
    assert torch.equal(layer_codes(n, bc.layers["c2"], bc.rounding), layer_codes(n, trial.layers["c2"], trial.rounding))
    assert bc.layers["c2"].codes.bias is not None
    assert {r["layer"]: r["kept"] for r in rows}["c2"] == "plan"


def test_bank_on_grouped_and_depthwise_layers_is_bit_exact():
    from helpers import DepthwiseNet, make_graph
    shape = (3, 16, 16)
    g = make_graph(DepthwiseNet().eval(), shape)
    torch.manual_seed(3)
    x = torch.randn(24, *shape)
    obs = observe(g, [(x, None)], show_progress=False)
    cfg = QuantConfig(LayerConfig(coeff_bits=8, coeff_mode="2D"))
    names = ["dw", "pw", "grp"]

    def plan(v):
        return plan_from(obs, cfg, filter_bits={k: torch.full(tuple(g.node(k).weight.shape[:2]), v, dtype=torch.int64)
                                                for k in names})
    bank = CodeBank(g, plan(4), plan(8), x, OPTS, names, show_progress=False)
    assert [r["layer"] for r in bank.rows] == names and bank.codes  # learned codes to check below
    got = bank.apply(plan(4))
    for k in bank.codes:
        assert torch.equal(layer_codes(g.node(k), got.layers[k], got.rounding), bank.codes[k][2])
    xt = torch.randn(4, *shape)
    eng = Engine(g, got)
    assert torch.equal(eng.dequantize(eng.run(eng.quantize_input(xt))), Simulator(g, got, exact=True)(xt))


def _spy_search(monkeypatch, digits_dir, module, bank_name, keep=lambda p, part: True):
    """``(session, banks, measured)`` for a search on the digits: ``banks`` gets the bank the search
    builds (``module.<bank_name>``), ``measured`` the plans it measures (of those measured one at a
    time, the ones ``keep(plan, part)`` accepts; every plan of measure_each); a bias-corrected plan
    is made to look worse, so the guard must refuse it."""
    from fixq.algorithms.pipeline import open_session
    from fixq.algorithms.search import PlanBench
    s = open_session("lenet-digits", str(digits_dir), str(digits_dir), calib_size=48, eval_size=120, batch_size=32,
                     workers=0, show_progress=False)
    banks, measured, each = [], [], PlanBench.measure_each
    orig_bank, orig_measure = getattr(module, bank_name), PlanBench.measure

    def spy_bank(*a, **k):
        banks.append(orig_bank(*a, **k))
        return banks[-1]
    monkeypatch.setattr(module, bank_name, spy_bank)

    def spy_measure(self, p, part="tune", *a):
        if keep(p, part):
            measured.append(p)
        e1, e5, lg = orig_measure(self, p, part, *a)
        return (100.0, 100.0, lg) if any("bias correction on" in x for x in p.notes) else (e1, e5, lg)
    monkeypatch.setattr(PlanBench, "measure", spy_measure)
    monkeypatch.setattr(PlanBench, "measure_each", lambda self, plans, *a, **k: (measured.extend(plans.values()),
                                                                                 each(self, plans, *a, **k))[1])
    return s, banks, measured


def test_search_mixed_measures_and_saves_the_bank_codes(digits_dir, monkeypatch):
    """search_mixed with learned rounding: every sensitivity and trial plan carries the bank's
    codes, the tuned plan is exactly bank.apply of its bits, and the final bias correction keeps
    those codes (only the biases change)."""
    from fixq.algorithms import mixed_search
    from fixq.algorithms.mixed_search import MixedOptions, search_mixed
    s, banks, measured = _spy_search(monkeypatch, digits_dir, mixed_search, "CodeBank")
    res = search_mixed(s, QuantConfig(), MixedOptions(low_bits=2, exclude="none", trials=3, target_drop=30.0,
                                                      sensitivity_size=40),
                       RoundingOptions(iters=30, samples=2048, batch=256))
    bank = banks[0]
    assert bank.codes and res.codes_in_search
    low_plans = [p for p in measured if any(lp.weight.Tp is not None and min(lp.weight.bits().flatten().tolist()) < 8
                                            for k, lp in p.layers.items() if k in bank.codes)]
    assert low_plans and all(any(p.layers[k].codes is not None for k in bank.codes) for p in low_plans)
    tuned = res.tuned.plan
    for k in bank.codes:  # the saved codes are the bank's on low filters, nearest elsewhere
        n, lp = s.graph.node(k), tuned.layers[k]
        bare = replace(lp, codes=None)
        assert torch.equal(layer_codes(n, lp, tuned.rounding),
                           layer_codes(n, bank.apply(replace(tuned, layers={**tuned.layers, k: bare})).layers[k],
                                       tuned.rounding))
    final = res.learned.plan
    for k, lp in tuned.layers.items():  # bias correction alone: the round-up bits are the tuned plan's
        if lp.codes is not None:
            assert final.layers[k].codes.up == lp.codes.up
    assert res.learned.label == "Tuned + bias correction"
    assert res.bias_guard["tune_top1_corrected"] == 100.0 and not res.bias_guard["kept"] and res.saved is res.tuned
    assert all("learned_in_bank" in r for r in res.codes_rows if r["layer"] in bank.codes)
    biases = [r["bias"] for r in res.codes_rows]  # the saved plan's biases are the model's: the rows say so
    assert "corrected" not in biases and "corrected, not kept (guard)" in biases


def _kmeans_setup():
    from fixq.algorithms.kmeans import cluster_kernels
    g, x, _ = _setup()
    obs = observe(g, [(x, None)], show_progress=False)
    cfg = QuantConfig(LayerConfig(coeff_bits=8, coeff_mode="2D"))

    def plan(ks, bits=(8, 4), seed=0):
        return plan_from(obs, cfg, kmeans={k: cluster_kernels(g.node(k).weight, K, seed, 2) for k, K in ks.items()},
                         kmeans_bits=bits)
    return g, x, plan


@pytest.mark.parametrize("inputs", ["base", "sequential"])
def test_kmeans_bank_codes_are_each_candidate_learned_on_its_inputs(inputs):
    from fixq.algorithms.learned_bank import KMeansCodeBank
    g, x, plan = _kmeans_setup()
    base, opts = plan({}), replace(OPTS, bank_inputs=inputs)
    # two passes as search_kmeans makes them: every layer's first candidate K, then the second
    bank = KMeansCodeBank(g, [(plan({"c1": 1, "c2": 1}), ["c1", "c2"]), (plan({"c2": 2}), ["c2"])], base, x, opts,
                          show_progress=False)
    assert sorted(bank.rows) == [("c1", 1), ("c2", 1), ("c2", 2)]
    assert ("c2", 1) in bank.codes and ("c2", 2) in bank.codes  # learned codes to compare below

    for K in (1, 2):  # c2 learned in a plan where c1 is not clustered: the input of "base", and of pass 2
        alone, _ = learn_rounding(g, plan({"c2": K}), x, OPTS, show_progress=False, only={"c2"})
        lp = alone.layers["c2"]
        assert (bank.codes[("c2", K)][2].up == lp.codes.up) == (inputs == "base" or K == 2)
        assert bank.codes[("c2", K)][0] == lp.kmeans  # the clustering the codes belong to
    both, _ = learn_rounding(g, plan({"c1": 1, "c2": 1}), x, OPTS, show_progress=False)  # c2 fed by clustered c1
    assert (both.layers["c2"].codes.up == bank.codes[("c2", 1)][2].up) == (inputs == "sequential")


def test_kmeans_trial_takes_bank_codes_only_for_its_clustering_and_runs_bit_exact():
    from fixq.algorithms.learned_bank import KMeansCodeBank
    g, x, plan = _kmeans_setup()
    bank = KMeansCodeBank(g, [(plan({"c2": 2}), ["c2"])], plan({}), x, OPTS, show_progress=False)
    assert ("c2", 2) in bank.codes
    trial = plan({"c1": 1, "c2": 2})
    got = bank.apply(trial)
    n, lp = g.node("c2"), got.layers["c2"]
    assert lp.weight == trial.layers["c2"].weight and lp.kmeans == trial.layers["c2"].kmeans  # formats unchanged
    assert lp.codes == bank.codes[("c2", 2)][2] and got.layers["c1"] == trial.layers["c1"]  # c1 at K=1: not banked
    codes, near = layer_codes(n, lp, got.rounding), coeff_grid(n, trial.layers["c2"]).nearest(got.rounding)
    assert not torch.equal(codes, near)  # the bank changed what the trial measures
    gr = coeff_grid(n, lp)
    assert bool(((codes >= gr.lo) & (codes <= gr.hi)).all())
    assert any("decided before they were measured" in s for s in got.notes)
    assert [r["kept"] for r in bank.report(got)] == ["learned"] and bank.report(trial)[0]["kept"] == "nearest"
    # another K, or other residual bits on the same K: another grid, so nearest rounding
    assert bank.apply(plan({"c2": 3})).layers["c2"].codes is None
    assert bank.apply(plan({"c2": 2}, (8, 3))).layers["c2"].codes is None
    # the same K and residual formats with the kernels assigned to the other basis: another offset, another grid
    km = trial.layers["c2"].kmeans
    flipped = replace(trial.layers["c2"], kmeans=replace(km, assign=tuple(1 - a for a in km.assign)))
    assert bank.apply(replace(trial, layers={**trial.layers, "c2": flipped})).layers["c2"].codes is None
    xt = torch.randn(5, 3, 8, 8)
    eng = Engine(g, got)
    assert torch.equal(eng.dequantize(eng.run(eng.quantize_input(xt))), Simulator(g, got, exact=True)(xt))


@pytest.mark.parametrize("first_meets", [True, False])
def test_search_kmeans_measures_and_saves_the_bank_codes(digits_dir, monkeypatch, first_meets):
    """search_kmeans with learned rounding: the first trial (every layer at its smallest K) runs
    with the first pass's codes, and when it meets the target it is kept with nothing else
    learned or measured; when it misses, every candidate is learned and measured, and the K
    candidates and the beta trials carry the bank's residual codes. The saved plan holds them,
    and a bias correction that looks worse on the tuning images is refused."""
    from fixq.algorithms import kmeans_search
    from fixq.algorithms.kmeans_search import KMeansOptions, candidate_Ks, search_kmeans
    # the search's own measurements, one at a time: on the tuning images, bias-corrected plans left out
    s, banks, measured = _spy_search(monkeypatch, digits_dir, kmeans_search, "KMeansCodeBank",
                                     lambda p, part: part == "tune" and not any("bias correction on" in x
                                                                                for x in p.notes))
    judged = spy_first_trial(monkeypatch, first_meets)  # the first trial is made to miss where the test says so
    res = search_kmeans(s, QuantConfig(), KMeansOptions(target_drop=30.0, sensitivity_size=40, restarts=1),
                        RoundingOptions(iters=60, samples=2048, batch=256))
    bank = banks[0]
    assert len(banks) == 1 and bank.codes and res.codes_in_search and res.ks
    smallest = {n.name: candidate_Ks(n.weight.shape[0])[0] for n in s.graph.layers()
                if n.name in res.trials[0]["ks"]}
    assert res.trials[0]["beta"] is None and res.trials[0]["ks"] == smallest and len(smallest) == 2
    assert judged[0], "the first trial must meet the 30-point target for this test to check both paths"
    if first_meets:  # kept at once: only the first pass learned, no candidate measured alone
        assert len(res.trials) == 1 and res.ks == smallest and res.noise == {}
        assert set(bank.rows) == set(smallest.items())
    else:
        assert len(res.trials) > 1 and not res.trials[0]["meets_target"] and res.noise
        assert all(t["beta"] is not None for t in res.trials[1:])
        # every candidate (layer, K) was learned
        assert set(bank.rows) == {(n, K) for n, d in res.noise.items() for K in d} > set(smallest.items())
    # each measured plan whose layer K has codes carries them
    hits = [(k, lp) for p in measured for k, lp in p.layers.items()
            if lp.kmeans is not None and (k, lp.kmeans.K) in bank.codes]
    assert hits and all(lp.codes == bank.codes[(k, lp.kmeans.K)][2] for k, lp in hits)
    assert not res.bias_guard["kept"] and res.bias_guard["tune_top1_corrected"] == 100.0
    assert res.table6[res.saved]["plan"].endswith("learned residual codes") and res.saved == len(res.table6) - 2
    for k, K in res.ks.items():  # the saved plan: the bank's codes, where the bank has them
        lp = res.plan.layers[k]
        assert lp.kmeans.K == K and (lp.codes == bank.codes[(k, K)][2] if (k, K) in bank.codes else lp.codes is None)
    labels = [r["plan"] for r in res.table6]
    assert any(x.endswith("nearest rounding") for x in labels) and labels[-1].endswith("+ bias correction")
    assert all(r["kept"] in ("learned", "nearest") for r in res.codes_rows if "learned_in_bank" in r)
    biases = [r["bias"] for r in res.codes_rows]  # the saved plan's biases are the model's: the rows say so
    assert "corrected" not in biases and "corrected, not kept (guard)" in biases


def test_rounding_options_refuse_the_4b4b_residual_branch(digits_dir):
    """<4b,4b> residuals read their own requantized input, which learned rounding and bias
    correction do not model: refused (by the search before any work, and by learn_rounding)."""
    from fixq.algorithms.kmeans import KMeansError
    from fixq.algorithms.kmeans_search import KMeansOptions, search_kmeans
    from fixq.planning.plan import PlanError
    g, x, plan = _kmeans_setup()
    with pytest.raises(PlanError, match="residual-data-bits"):
        learn_rounding(g, plan({"c2": 2}, (8, 4, 4)), x, OPTS, show_progress=False)
    with pytest.raises(KMeansError, match="residual-data-bits"):
        search_kmeans(None, QuantConfig(), KMeansOptions(residual_data_bits=4), RoundingOptions(learned=False))


@pytest.mark.parametrize("flag", ["--learned-rounding", "--bias-correction"])
def test_cli_kmeans_saves_and_reports_the_plan_the_guard_kept(capsys, tmp_path, digits_dir, monkeypatch, flag):
    """A bias correction that raises the tuning error is refused, with or without learned
    rounding: plan.json has the model's biases and the report's headline is that plan's row."""
    import json
    from fixq.algorithms.search import PlanBench
    from fixq.app.cli import main
    from fixq.planning.plan_io import load_plan
    orig = PlanBench.measure

    def worse(self, p, *a):
        e1, e5, lg = orig(self, p, *a)
        return (100.0, 100.0, lg) if any("bias correction on" in x for x in p.notes) else (e1, e5, lg)
    monkeypatch.setattr(PlanBench, "measure", worse)
    out = tmp_path / "k"
    argv = ["kmeans", "--model", "lenet-digits", "--calib", str(digits_dir), "--calib-size", "64", "--eval",
            str(digits_dir), "--eval-size", "200", "--out", str(out), "--quiet", "--k", "conv2=3", flag,
            "--rounding-iters", "20"]
    assert main(argv) == 0, capsys.readouterr().err
    rep = json.loads((out / "report.json").read_text())
    cc, t6 = rep["coefficient_codes"], rep["table6"]
    assert not cc["bias_guard"]["kept"] and t6[-1]["plan"].endswith("+ bias correction")
    assert cc["saved"] == t6[-2]["plan"] and rep["quant"]["top1_error"] == t6[-2]["top1_error"]
    assert rep["complexity"]["savings_pct"] == t6[-2]["network_savings_pct"]
    plan = load_plan(out / "plan.json")
    assert all(lp.codes is None or lp.codes.bias is None for lp in plan.layers.values())
    assert "not kept" in (out / "report.md").read_text()

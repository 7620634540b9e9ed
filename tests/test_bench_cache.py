"""Searches that compute only what a trial changes (issue #16): the prefix rule, the kept
prefix and the base reuse in PlanBench, and the fast CPU simulation (compiled one-pass
quantizer, channels-last) against the torch formula: same values, same saturation counts."""
from dataclasses import replace

import pytest
import torch

from fixq.algorithms.bench_cache import PrefixCache, changed_nodes, first_change
from fixq.algorithms.calibrate import observe, plan_from
from fixq.backends.simulate import Simulator
from fixq.data.zoo import CifarResNet
from fixq.numerics import fused_cpu
from fixq.numerics.formats import Word, fake_quantize
from fixq.planning.plan import LayerConfig, QuantConfig

from helpers import make_graph, plan_for


def _resnet_plans():
    torch.manual_seed(0)
    g = make_graph(CifarResNet(20).eval(), (3, 32, 32))
    obs = observe(g, [(torch.randn(8, 3, 32, 32), None)], show_progress=False)
    cfg = QuantConfig(LayerConfig(coeff_mode="2D"))
    return g, obs, cfg, plan_from(obs, cfg)


def test_first_change_names_the_first_node_a_plan_computes_differently():
    g, obs, cfg, base = _resnet_plans()
    index = {n.name: i for i, n in enumerate(g.nodes)}
    N = len(g.nodes)
    for name in ("layer1.0.conv1", "layer2.1.conv2", "linear"):
        low = plan_from(obs, cfg, filter_bits={name: torch.full(tuple(g.node(name).weight.shape[:2]), 4)})
        assert first_change(g, low, base) == index[name] and first_change(g, base, low) == index[name]
    two = plan_from(obs, cfg, filter_bits={k: torch.full(tuple(g.node(k).weight.shape[:2]), 4)
                                           for k in ("layer1.0.conv1", "layer3.0.conv2")})
    assert changed_nodes(g, two, base) == [index["layer1.0.conv1"], index["layer3.0.conv2"]]
    # notes (plan-wide or a layer's) and the model name change nothing computed
    lp = base.layers["layer1.0.conv1"]
    noted = replace(base, notes=("x",), model="other", layers={**base.layers, lp.name: replace(lp, notes=("y",))})
    assert first_change(g, noted, base) == N and changed_nodes(g, noted, base) == []
    # a data format changed at an add: that node
    add = next(n.name for n in g.nodes if n.name.startswith("add"))
    t = base.tensors[add]
    moved = replace(base, tensors={**base.tensors, add: replace(t, F=tuple(f + 1 for f in t.F))})
    assert first_change(g, moved, base) == index[add]
    # anything plan-wide: the first node
    assert first_change(g, replace(base, config=replace(cfg, rounding="floor")), base) == 0
    assert changed_nodes(g, replace(base, config=replace(cfg, rounding="floor")), base) is None
    assert first_change(g, replace(base, float_ops=("linear",)), base) == 0
    assert first_change(g, replace(base, tensors={**base.tensors, "nowhere": t}), base) == 0


def test_prefix_cache_keeps_exact_values_and_respects_its_budget():
    q = torch.tensor([3, -128, 127, 0], dtype=torch.float32) * 2.0 ** -7  # 8-bit codes: bfloat16-exact
    wide = torch.tensor([1023.0, -4.0]) * 2.0 ** -3                       # 10 significant bits: kept as float32
    c = PrefixCache(5, [4, 2], budget_mb=1)
    c.keep(0, {"a": q})
    assert not c.complete
    c.keep(1, {"a": wide})
    got = dict(c.local())
    assert c.complete and got[0]["a"].dtype == torch.float32 and torch.equal(got[0]["a"], q)
    assert torch.equal(got[1]["a"], wide) and c._env[0]["a"][0].dtype == torch.bfloat16
    assert c._env[1]["a"][0].dtype == torch.float32
    small = PrefixCache(5, [4], budget_mb=1e-6)
    small.keep(0, {"a": q})
    assert small.over and not small.complete and small.bytes == 0


def _bench(digits_dir, **kw):
    from fixq.algorithms.pipeline import open_session
    from fixq.algorithms.search import PlanBench, base_config
    s = open_session("lenet-digits", str(digits_dir), str(digits_dir), calib_size=40, eval_size=96, batch_size=16,
                     workers=0, show_progress=False)
    return PlanBench(s, base_config(QuantConfig(), 8), **kw)


def test_trials_resume_the_kept_prefix_with_the_numbers_of_a_full_run(digits_dir, monkeypatch):
    from fixq.algorithms.mixed import eligible_layers
    from fixq.data.stream import ImageStream
    bench, plain = _bench(digits_dir), _bench(digits_dir, cache_mb=0)
    g = bench.session.graph
    names = [n.name for n in g.nodes if n.name in eligible_layers(g, ())]
    low = {k: torch.full(tuple(g.node(k).weight.shape[:2]), 2, dtype=torch.int64) for k in names}
    late = bench.plan(filter_bits={names[-1]: low[names[-1]]})
    later_too = bench.plan(filter_bits={names[-1]: low[names[-1]][:, :1].expand_as(low[names[-1]]) * 0 + 3})
    early = bench.plan(filter_bits={names[1]: low[names[1]]})
    k_late, k_early = first_change(g, late, bench.base_plan), first_change(g, early, bench.base_plan)
    assert 0 < k_early < k_late < len(g.nodes)
    for p in (early, late, later_too):   # the first keeps at k_early, the others resume there
        a, b = bench.measure(p), plain.measure(p)
        assert (a[0], a[1]) == (b[0], b[1]) and torch.equal(a[2], b[2])
    assert bench._prefix[("tune", None)].start == k_early and bench._prefix[("tune", None)].complete
    assert ("tune", None) not in plain._prefix
    other = _bench(digits_dir)  # a complete later prefix is not dropped for an earlier trial
    for p in (late, early):
        assert torch.equal(other.measure(p)[2], plain.measure(p)[2])
    assert other._prefix[("tune", None)].start == k_late and other._prefix[("tune", None)].complete

    reads = []
    orig = ImageStream.local
    monkeypatch.setattr(ImageStream, "local", lambda self: (reads.append(1), orig(self))[1])
    for p in (late, early):  # resumed from the kept tensors: no image decoded
        a, b = bench.measure(p), plain.measure(p)
        assert torch.equal(a[2], b[2])
    assert len(reads) == 2  # the plain bench's two passes only
    base = bench.measure(bench.base_plan)
    same = replace(bench.base_plan, notes=("mixed precision: 0 filters low",))
    assert bench.measure(same) is base and len(reads) == 2  # the base's measurement, reused

    tiny = _bench(digits_dir, cache_mb=1e-6)
    a = tiny.measure(late)
    assert torch.equal(a[2], plain.measure(late)[2]) and not tiny._prefix[("tune", None)].complete


def test_cache_budget_comes_from_the_environment(monkeypatch):
    from fixq.algorithms.bench_cache import default_budget_mb
    monkeypatch.setenv("FIXQ_SEARCH_CACHE_MB", "12.5")
    assert default_budget_mb() == 12.5
    for bad in ("lots", "-1"):
        monkeypatch.setenv("FIXQ_SEARCH_CACHE_MB", bad)
        with pytest.raises(ValueError, match="FIXQ_SEARCH_CACHE_MB"):
            default_budget_mb()


def _compiler() -> bool:
    import shutil
    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))


def _ties(shape, F, T, seed=0):
    """Values on and around rounding ties and past both saturation limits, for scale 2**F."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = (0, 2 ** int(T) - 1) if not getattr(T, "signed", True) else (-2 ** (int(T) - 1), 2 ** (int(T) - 1) - 1)
    k = torch.randint(lo - 20, hi + 20, shape, generator=g).float()
    frac = torch.tensor([0.0, 0.5, -0.5, 0.25, 0.4999999, 0.5000001])[torch.randint(0, 6, shape, generator=g)]
    return (k + frac) * torch.pow(2.0, -F)


@pytest.mark.parametrize("rounding", ["half_up", "floor"])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("T", [8, Word(8, signed=False), 16])
def test_compiled_cpu_quantizer_equals_the_torch_formula(rounding, relu, T):
    C = 16
    F = torch.randint(-2, 9, (C,)).float().reshape(1, C, 1, 1)
    x = _ties((64, C, 16, 16), F, T)
    assert x.numel() >= fused_cpu.MIN_NUMEL and fused_cpu.cpu_fused_available(x, rounding)
    for xin, s in ((x, torch.pow(2.0, F)), (x.contiguous(memory_format=torch.channels_last), torch.pow(2.0, F)),
                   (x, torch.tensor(16.0))):
        got = fused_cpu.cpu_fused_fake_quantize(xin, s, T, rounding, relu)
        if got is None and not _compiler():
            pytest.skip(f"no C++ compiler for torch.compile here ({fused_cpu._WHY_NOT})")
        assert got is not None, fused_cpu._WHY_NOT
        ref = fake_quantize(torch.clamp(xin, min=0) if relu else xin, torch.log2(s), T, rounding)
        assert torch.equal(got[0], ref[0]) and int(got[1]) == int(ref[1]) > 0


@pytest.mark.parametrize("acc_bits", [32, 14])
def test_fast_cpu_simulation_equals_the_plain_one(acc_bits, monkeypatch):
    """Compiled quantizer + channels-last kernels: the same logits and saturation counts."""
    import fixq.backends.simulate as simulate
    g = make_graph(CifarResNet(20).eval(), (3, 32, 32))
    plan = plan_for(g, (3, 32, 32), coeff_mode="2D", data_mode="3D", acc_bits=acc_bits)
    x = torch.randn(48, 3, 32, 32) * 2
    calls = []
    orig = simulate.cpu_fused_fake_quantize
    monkeypatch.setattr(simulate, "cpu_fused_fake_quantize", lambda *a: (calls.append(1), orig(*a))[1])
    a, b = Simulator(g, plan), Simulator(g, plan, fast_cpu=True)
    ya, yb = a(x), b(x)
    assert calls and (fused_cpu._WHY_NOT is None or not _compiler())  # the compiled path ran where it can
    assert torch.equal(ya, yb) and a.saturations() == b.saturations()
    assert any(v for d in a.saturations().values() for v in d.values())  # saturations were compared, not zeros
    assert not Simulator(g, plan, exact=True, fast_cpu=True).fast_cpu  # never in the exact mode
    assert b.channels_last and all(b._prep[n.name]["cl"] == (b._bounds[n.name] < 2.0 ** 24)
                                   for n in g.nodes if n.name in b._bounds and n.name.startswith("layer"))


@pytest.mark.parametrize("data_bits", [16, None])
def test_fast_cpu_keeps_the_standard_layout_where_float32_sums_can_round(data_bits):
    """16-bit or float data: sums of the layers and pools may round in float32, and
    channels-last would add in another order; the fast mode then keeps the layout (same
    logits as the plain simulation, bit for bit)."""
    g = make_graph(CifarResNet(20).eval(), (3, 32, 32))
    plan = plan_for(g, (3, 32, 32), coeff_mode="2D", data_mode="3D", data_bits=data_bits)
    x = torch.randn(48, 3, 32, 32) * 2
    a, b = Simulator(g, plan), Simulator(g, plan, fast_cpu=True)
    assert not b.channels_last and torch.equal(a(x), b(x)) and a.saturations() == b.saturations()


def test_kept_prefixes_share_one_budget(digits_dir):
    """The tuning and test parts' kept tensors together stay within cache_mb."""
    from fixq.algorithms.mixed import eligible_layers
    bench = _bench(digits_dir)
    g = bench.session.graph
    name = [n.name for n in g.nodes if n.name in eligible_layers(g, ())][-1]
    plan = bench.plan(filter_bits={name: torch.full(tuple(g.node(name).weight.shape[:2]), 2, dtype=torch.int64)})
    bench.measure(plan, "tune")
    one = bench._prefix[("tune", None)].bytes
    assert one > 0
    tight = _bench(digits_dir, cache_mb=1.5 * one / 2 ** 20)
    a, b = tight.measure(plan, "tune"), tight.measure(plan, "test")
    kept = [c for c in tight._prefix.values() if c.complete]
    assert len(kept) == 1 and sum(c.bytes for c in tight._prefix.values()) <= 1.5 * one
    assert torch.equal(a[2], bench.measure(plan, "tune")[2]) and torch.equal(b[2], bench.measure(plan, "test")[2])


@pytest.mark.parametrize("net,shape", [("depthwise", (3, 16, 16)), ("resnet20", (3, 32, 32))])
def test_derived_simulator_equals_a_fresh_one(net, shape):
    """Simulator.derive re-proves and re-prepares only the changed layers (and drops their
    activation bounds at the old accumulator format): same outputs, counts and bounds as a
    simulator built whole; the base simulator is left as it was."""
    from helpers import DepthwiseNet
    model = DepthwiseNet() if net == "depthwise" else CifarResNet(20)
    g = make_graph(model.eval(), shape)
    x = torch.randn(16, *shape) * 2
    obs = observe(g, [(x, None)], show_progress=False)
    cfg = QuantConfig(LayerConfig(coeff_mode="2D", acc_bits=16))
    base = plan_from(obs, cfg)
    bsim = Simulator(g, base)
    y0 = bsim(x)  # caches activation bounds at the base plan's accumulator formats
    moved_clamp = False
    for n in [n for n in g.nodes if n.name in base.layers][:6]:
        low = plan_from(obs, cfg, filter_bits={n.name: torch.full(tuple(n.weight.shape[:2]), 4, dtype=torch.int64)})
        assert changed_nodes(g, low, base) == [g.nodes.index(n)]
        d, f = bsim.derive(low, [n.name]), Simulator(g, low)
        stale = [k for k in d._prep if isinstance(k, tuple) and k[:2] == ("act", n.name)]
        assert not stale  # clamp bounds cached at the old accumulator format are not reused
        assert torch.equal(d(x), f(x)) and d.saturations() == f.saturations() and d._bounds == f._bounds, n.name
        moved_clamp |= n.act not in (None, (0.0, None)) and low.layers[n.name].acc_F != base.layers[n.name].acc_F
    assert moved_clamp == (net == "depthwise")  # a ReLU6 layer whose accumulator format moved was checked
    bsim.reset_counts()
    assert torch.equal(bsim(x), y0) and bsim.plan is base


@pytest.mark.parametrize("net,shape", [("depthwise", (3, 16, 16)), ("resnet20", (3, 32, 32))])
@pytest.mark.parametrize("fc_mode", ["auto", "4D"])
def test_replan_is_plan_from_for_the_layers_it_names(net, shape, fc_mode, monkeypatch):
    """A trial plan built as a transform of the base plan (replan: only the named layers
    planned and proved again) equals plan_from's whole plan, as objects and as JSON bytes:
    mixed bits (depthwise and fully connected layers included), K-means with and without
    its own residual data format; and it refuses what plan_from refuses, naming the layer."""
    import json
    from fixq.algorithms.calibrate import replan
    from fixq.algorithms.kmeans import cluster_kernels
    from fixq.planning.plan import PlanError
    from helpers import DepthwiseNet
    model = DepthwiseNet() if net == "depthwise" else CifarResNet(20)
    g = make_graph(model.eval(), shape)
    obs = observe(g, [(torch.randn(16, *shape) * 2, None)], histograms=True, show_progress=False)
    cfg = QuantConfig(LayerConfig(coeff_mode="2D", acc_bits=20, fc_mode=fc_mode))
    base = plan_from(obs, cfg)
    gen = torch.Generator().manual_seed(3)
    layers = list(base.layers)
    cases = [dict(filter_bits={layers[i]: torch.randint(3, 9, tuple(g.node(layers[i]).weight.shape[:2]), generator=gen)
                               for i in (1, 2)})]
    fc = layers[-1]
    cases.append(dict(filter_bits={fc: torch.full(tuple(g.node(fc).weight.shape[:2]), 4, dtype=torch.int64)}))
    km = next(k for k in layers[1:] if g.node(k).groups == 1 and g.node(k).weight.shape[0] >= 4)
    cl = cluster_kernels(g.node(km).weight, 2, restarts=1)
    cases += [dict(kmeans={km: cl}, kmeans_bits=(8, 4)), dict(kmeans={km: cl}, kmeans_bits=(8, 4, 4)), {}]
    from fixq.algorithms import calibrate
    proved, lower_layer = [], calibrate.lower_layer
    monkeypatch.setattr(calibrate, "lower_layer", lambda n, *a: (proved.append(n.name), lower_layer(n, *a))[1])
    for kw in cases:
        whole = plan_from(obs, cfg, **kw)
        proved.clear()
        part = replan(obs, base, **kw)
        assert sorted(proved) == sorted({**kw.get("filter_bits", {}), **kw.get("kmeans", {})})  # those proved again
        assert part == whole and json.dumps(part.to_json()) == json.dumps(whole.to_json()), kw
        assert all(part.layers[k] is base.layers[k] for k in layers if k not in {**kw.get("filter_bits", {}),
                                                                                 **kw.get("kmeans", {})})
    bad = {layers[1]: torch.full((1, 1), 4, dtype=torch.int64)}
    with pytest.raises(PlanError, match=layers[1]) as e1:
        plan_from(obs, cfg, filter_bits=bad)
    with pytest.raises(PlanError, match=layers[1]) as e2:
        replan(obs, base, filter_bits=bad)
    assert str(e1.value) == str(e2.value)

"""Bounded working set of one batch (issue 14): structure, not memory numbers. The SQNR pass
frees each side's tensors at their last use, the simulator requantizes a layer's output in the
buffer the convolution made, and the mse range search never copies a whole activation."""
from __future__ import annotations

import weakref

import torch

import fixq.algorithms.observe as ob
import fixq.analysis.evaluate as ev
import fixq.backends.simulate as sm
from fixq.backends.simulate import Simulator
from fixq.graph.ir import QUANT_POINTS, Flatten, Slice

from helpers import DepthwiseNet, make_graph, plan_for

SHAPE = (3, 16, 16)


def test_lockstep_frees_fixed_point_inputs_before_the_float_node_runs(monkeypatch):
    """When the float rule of node n runs, no fixed-point tensor whose users have all run
    (n included) is alive: the two passes never hold both sides' inputs and outputs at once."""
    g = make_graph(DepthwiseNet(), SHAPE)
    sim = Simulator(g, plan_for(g, SHAPE, data_mode="3D"))
    order = {n.name: k for k, n in enumerate(g.nodes)}
    users = g.users()
    views = {i for n in g.nodes if isinstance(n, (Flatten, Slice)) for i in n.inputs}  # a view keeps its base
    q_refs: dict[str, weakref.ref] = {}
    inside_sim, checked = [False], []

    def sim_rule(rule):
        def run(s, n, *xs):
            inside_sim[0] = True  # some simulation rules call float rules themselves
            try:
                y = rule(s, n, *xs)
            finally:
                inside_sim[0] = False
            q_refs[n.name] = weakref.ref(y)
            return y
        return run

    def float_rule(rule):
        def run(n, *xs):
            if not inside_sim[0]:
                for name, ref in q_refs.items():
                    done = all(u in order and order[u] <= order[n.name] for u in users[name])
                    if done and name != g.output and name not in views:
                        assert ref() is None, f"fixed-point {name!r} still alive when float {n.name!r} runs"
                        checked.append(name)
            return rule(n, *xs)
        return run

    for k, rule in list(ev.SIM_RULES.items()):
        monkeypatch.setitem(ev.SIM_RULES, k, sim_rule(rule))
    for k, rule in list(ev.FLOAT_RULES.items()):
        monkeypatch.setitem(ev.FLOAT_RULES, k, float_rule(rule))
    points = [n.name for n in g.nodes if isinstance(n, QUANT_POINTS)]
    with torch.no_grad():  # as evaluate_quant runs it
        out, sums = ev._lockstep(sim, torch.randn(4, *SHAPE), points)
    assert out.shape == (4, 5) and set(sums) == set(points)
    assert len(set(checked)) >= 5  # most nodes were checked at their last user


def test_layer_output_is_requantized_in_the_convolution_buffer(monkeypatch):
    """A conv/linear rule's output (accumulator step, clamp, requantization) is written over the
    tensor the convolution returned: no second tensor of the layer's output size."""
    g = make_graph(DepthwiseNet(), SHAPE)
    plan = plan_for(g, SHAPE, n=32, seed=1, data_method="maxabs")
    torch.manual_seed(1)
    x = torch.randn(32, *SHAPE)  # the calibration images: maxabs formats hold them (few saturations)
    made: dict[str, int] = {}
    real = sm.pre_activation

    def pre(n, xin, *a):
        y = real(n, xin, *a)
        made[n.name] = y.data_ptr()
        return y
    monkeypatch.setattr(sm, "pre_activation", pre)
    for exact in (False, True):
        sim = Simulator(g, plan, exact=exact)
        env = sim.run(x, keep=True)
        sat = sim.saturations()
        ok = [n.name for n in g.layers() if not any(sat.get(n.name, {}).values())]  # a clamp makes a new tensor
        assert len(ok) >= 4, sat
        for name in ok:
            assert env[name].data_ptr() == made[name], (exact, name)


def test_mse_search_copies_no_whole_activation(monkeypatch):
    """The mse pass reads blocks straight from each activation: the whole-tensor (C, N*H*W)
    copy (``_per_channel``) is never made, and each block equals that copy's columns."""
    g = make_graph(DepthwiseNet(), SHAPE)
    torch.manual_seed(2)
    obs = ob.observe(g, [(torch.randn(8, *SHAPE), None)], show_progress=False)
    want = [(n.name, 8, mode, True) for n in g.nodes if isinstance(n, QUANT_POINTS) for mode in ("3D", "4D")]
    whole = obs.mse_F(want, "half_up")

    def boom(x):
        raise AssertionError(f"whole activation {tuple(x.shape)} copied")
    monkeypatch.setattr(ob, "_per_channel", boom)
    monkeypatch.setattr(ob, "MSE_CHUNK", 50)  # blocks that straddle images
    obs.mse_cache = {}
    small = obs.mse_F(want, "half_up")
    assert all(torch.equal(small[r], whole[r]) for r in want)


def test_channel_block_equals_the_per_channel_columns():
    torch.manual_seed(3)
    for shape in [(3, 4, 5, 6), (5, 7), (2, 3, 1, 1), (4, 2, 3, 3)]:
        t = torch.randn(*shape)
        t3 = t.reshape(shape[0], shape[1], -1)
        full = ob._per_channel(t)
        for step in (1, 4, 7, full.shape[1], full.shape[1] + 3):
            for j in range(0, full.shape[1], step):
                b = ob._channel_block(t3, j, step)
                old = full[:, j:j + step].double()  # what the search summed before blocks (same layout)
                assert b.dtype == torch.float64 and b.stride() == old.stride(), (shape, step, j)
                assert torch.equal(b, old), (shape, step, j)


def test_mse_block_sums_keep_the_old_summation_order():
    """The float64 error sums of the mse search are bit-identical to the whole-copy code's,
    also for (N, C) classifier outputs, whose per-channel matrix is a column-major view."""
    torch.manual_seed(4)
    for shape in [(128, 1000), (64, 96, 7, 7), (32, 300, 1, 1)]:
        t = torch.randn(*shape) * 3
        t3 = t.reshape(shape[0], shape[1], -1)
        full = ob._per_channel(t)
        step = max(1, ob.MSE_CHUNK // shape[1])
        for j in range(0, full.shape[1], step):
            old = full[:, j:j + step].double()
            new = ob._channel_block(t3, j, step)
            q_old, q_new = (c.mul(8).floor_().div_(8) for c in (old, new))
            e_old, e_new = (q - c for q, c in ((q_old, old), (q_new, new)))
            assert torch.equal((e_new * e_new).sum(dim=1), (e_old * e_old).sum(dim=1)), (shape, j)
            assert torch.equal((e_new * e_new).sum(), (e_old * e_old).sum()), (shape, j)

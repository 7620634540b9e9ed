"""The one lowering (issue #16): ``lower(graph, plan)`` gives the ordered steps with every
integer table; the engine runs exactly those tables; ``with_layer`` re-lowers one layer and
reuses the rest; an unprovable plan is refused by the lowering, naming the layer."""
from dataclasses import replace

import pytest
import torch

from fixq.backends.engine import Engine
from fixq.backends.lowering import LayerInts, Program, lower
from fixq.backends.simulate import Simulator
from fixq.graph.ir import Conv, Input, Linear
from fixq.planning.plan import PlanError

from helpers import DepthwiseNet, make_graph, plan_for

SHAPE = (3, 16, 16)


def _setup():
    g = make_graph(DepthwiseNet().eval(), SHAPE)
    return g, plan_for(g, SHAPE, coeff_mode="2D")


def test_steps_follow_the_graph_and_hold_every_layers_tables():
    g, plan = _setup()
    prog = lower(g, plan)
    assert isinstance(prog, Program)
    assert [s.node.name for s in prog.steps] == [n.name for n in g.nodes if not isinstance(n, Input)]
    layers = [n.name for n in g.nodes if isinstance(n, (Conv, Linear))]
    assert list(prog.layers) == layers and all(isinstance(L, LayerInts) for L in prog.layers.values())
    assert set(prog.bounds) == set(layers) and all(0 < b < 2.0 ** 62 for b in prog.bounds.values())


def test_engine_runs_the_lowered_tables_and_matches_the_simulation():
    g, plan = _setup()
    eng = Engine(g, plan)
    assert all(eng.layers[k] is L for k, L in eng.program.layers.items())
    x = torch.randn(4, *SHAPE)
    assert torch.equal(eng.dequantize(eng.run(eng.quantize_input(x))), Simulator(g, plan, exact=True)(x))


def test_with_layer_relowers_only_that_layer():
    g, plan = _setup()
    prog = lower(g, plan)
    lp = plan.layers["pw"]
    plan2 = replace(plan, layers={**plan.layers, "pw": replace(lp, acc_bits=lp.acc_bits + 4)})
    p2 = prog.with_layer(plan2, "pw")
    fresh = lower(g, plan2)
    for k, L in p2.layers.items():
        if k == "pw":
            assert L.A == lp.acc_bits + 4 and L is not prog.layers[k]
            assert all(torch.equal(getattr(L, f), getattr(fresh.layers[k], f)) for f in ("w", "wshift", "bias", "S"))
        else:
            assert L is prog.layers[k]  # reused, not compiled again


def test_the_lowering_refuses_an_unprovable_plan_naming_the_layer():
    g, plan = _setup()
    lp = plan.layers["pw"]
    F = torch.tensor(lp.weight.F).reshape(-1)
    bad = replace(lp, weight=replace(lp.weight, F=tuple([int(F[0]) + 80] + F[1:].tolist())))
    with pytest.raises(PlanError, match="pw"):
        lower(g, replace(plan, layers={**plan.layers, "pw": bad}))


def test_proofs_keep_bounds_only_and_the_simulation_keeps_no_layer_tables(monkeypatch):
    import gc
    import fixq.backends.lowering as lowering
    g, plan = _setup()
    full, slim = lower(g, plan), lower(g, plan, keep=False)
    assert slim.layers == {} and slim.bounds == full.bounds
    calls = []
    monkeypatch.setattr(lowering, "compile_table", lambda *a: calls.append(a))
    assert lowering.check_plan(g, plan) == full.bounds and calls == []  # a proof compiles no tables
    del full, slim
    gc.collect()
    sim = Simulator(g, plan)
    gc.collect()
    assert sim._bounds and not any(type(o) in (LayerInts, Program) for o in gc.get_objects())


def test_with_layer_refuses_an_unknown_layer_or_other_data_formats():
    g, plan = _setup()
    prog = lower(g, plan)
    with pytest.raises(KeyError, match="nope"):
        prog.with_layer(plan, "nope")
    k = next(iter(plan.tensors))
    other = replace(plan, tensors={kk: v for kk, v in plan.tensors.items() if kk != k})
    with pytest.raises(PlanError, match="other data formats"):
        prog.with_layer(other, "pw")

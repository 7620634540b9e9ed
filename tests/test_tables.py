"""Segmented table functions (issue #21, DESIGN §5b): inputs wider than MAX_TABLE_BITS keep
the dense table's definition, stored as segments; the lookup equals the float64 table on
every input code, and the simulation, the engine and the generated C agree bit for bit."""
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as Fn

from fixq.planning.elementwise import (MAX_SEGMENTED_BITS, MAX_TABLE_BITS, STEP_LIMIT, TableInts, compile_table,
                                       segment_table, unary_table)
from fixq.backends.engine import Engine, EngineError
from fixq.numerics.formats import Word
from fixq.graph.ir import Table
from fixq.backends.simulate import Simulator

from helpers import make_graph, plan_for
from test_engine import _nonzero

HAS_CC = shutil.which("cc") is not None and shutil.which("make") is not None
OPS = ["sigmoid", "hardswish", "silu", "tanh", "gelu"]
# (Tin, Fin, Tout, Fout): signed and unsigned inputs, outputs that saturate or not
FORMATS = [(Word(12), 8, Word(12), 10), (Word(12, False), 9, Word(8), 6), (Word(16), 11, Word(16), 13),
           (Word(16, False), 12, Word(8, False), 7), (Word(16), 9, Word(12), 11)]


def _codes(Tin):
    lo = 0 if not Tin.signed else -2 ** (int(Tin) - 1)
    return torch.arange(lo, lo + 2 ** int(Tin), dtype=torch.int64)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("rounding", ["half_up", "nearest_even", "floor"])
def test_segments_equal_the_dense_table_on_every_code(op, rounding):
    for Tin, Fin, Tout, Fout in FORMATS:
        t = unary_table(op, None, Tin, Fin, Tout, Fout, rounding)  # the float64 definition
        q = _codes(Tin)
        start, code, step, shift, sat = segment_table(t, int(q[0]))
        seg = SimpleNamespace(start=start, code=code, step=step, shift=shift, sat=sat,
                              offset=torch.tensor([0, len(start)]))
        ti = TableInts(None, None, torch.zeros(1, dtype=torch.int64), int(q[0]), Tin, Tout, None, None, seg)
        y, events = ti.lookup(q.reshape(1, 1, -1))
        assert torch.equal(y.reshape(-1), t.codes), (op, Tin, Fin, Tout, Fout)
        assert int(events) == int(t.sat.sum())
        assert torch.equal(ti.dense()[1][0], t.sat)
        runs = 1 + int(((t.codes[1:] != t.codes[:-1]) | (t.sat[1:] != t.sat[:-1])).sum())
        assert 1 <= len(start) <= runs and int(start[0]) == int(q[0]) and bool((start[1:] > start[:-1]).all())
        assert int(step.abs().max()) <= STEP_LIMIT and 0 <= int(shift.min()) and int(shift.max()) <= int(Tin)


def test_linear_stretches_are_one_segment():
    t = unary_table("hardswish", None, Word(16), 10, Word(16), 10, "half_up")
    start, code, step, shift, _ = segment_table(t, -2 ** 15)  # 6 * 2**10 codes in -3 < x < 3
    assert len(start) < 3 * 2 ** 10 and int(start[-1]) == 3 * 2 ** 10  # x >= 3: y = x, one segment
    assert (int(step[-1]), int(shift[-1])) == (1, 0)
    t = unary_table("silu", None, Word(16), 9, Word(16), 6, "half_up")  # (nearest_even: runs of 7 and 9)
    start, code, step, shift, _ = segment_table(t, -2 ** 15)  # large x: y = x, 8 input codes per output code
    # the last segment is a partial run; the one before covers 36.7 <= x < 64
    assert (int(step[-2]), int(shift[-2])) == (1, 3) and int(start[-1] - start[-2]) > 2 ** 13
    assert len(start) < 2 ** 9
    assert len(segment_table(unary_table("relu6", None, Word(16), 10, Word(16), 10, "half_up"), -2 ** 15)[0]) == 3


def test_compile_table_per_channel_formats():
    """Channels with different (Fin, Fout): one segmented table each, found by the channel index."""
    n = SimpleNamespace(name="t", op="silu", alpha=None, inputs=["x"])
    fmts = {"x": (Word(14), torch.tensor([9, 10, 9, 11])), "t": (Word(14), torch.tensor([10, 10, 10, 12]))}
    ti = compile_table(n, fmts, 4, "nearest_even")
    assert ti.seg is not None and ti.tables is None and len(ti.seg.offset) == 4  # 3 distinct tables
    torch.manual_seed(0)
    q = torch.randint(-2 ** 13, 2 ** 13, (3, 4, 5, 5))
    q[0, :, 0, 0], q[0, :, 0, 1] = -2 ** 13, 2 ** 13 - 1  # both ends of the code range
    y, events = ti.lookup(q)
    want, sats = torch.empty_like(q), 0
    for c in range(4):
        t = unary_table("silu", None, Word(14), int(fmts["x"][1][c]), Word(14), int(fmts["t"][1][c]), "nearest_even")
        want[:, c] = t.codes[q[:, c] + 2 ** 13]
        sats += int(t.sat[q[:, c] + 2 ** 13].sum())
    assert torch.equal(y, want) and int(events) == sats
    n8 = SimpleNamespace(name="t", op="silu", alpha=None, inputs=["x"])  # <= 10 bits: the dense form, unchanged
    fmts8 = {"x": (Word(10), torch.tensor(6)), "t": (Word(8), torch.tensor(5))}
    assert compile_table(n8, fmts8, 2, "half_up").seg is None


def test_c_stores_the_smaller_exact_form():
    """A steep table at high output resolution (SiLU 12 -> 16 bits, F8 -> F12: a new output
    code at nearly every input code) is smaller dense; a 12 -> 12-bit one is smaller segmented."""
    from fixq.backends.export_c.emit_elementwise import _seg_bytes, table_form
    n = SimpleNamespace(name="t", op="silu", alpha=None, inputs=["x"])
    steep = compile_table(n, {"x": (Word(12), torch.tensor(8)), "t": (Word(16), torch.tensor(12))}, 1, "half_up")
    flat = compile_table(n, {"x": (Word(12), torch.tensor(8)), "t": (Word(12), torch.tensor(8))}, 1, "half_up")
    assert steep.seg is not None and flat.seg is not None
    assert _seg_bytes(steep) > 2 ** 12 * 2 and table_form(steep) == "dense"
    assert _seg_bytes(flat) < 2 ** 12 * 2 and table_form(flat) == "segmented"


class _Gates(nn.Module):
    """SiLU, hardswish, a sigmoid squeeze-and-excitation gate."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, 1, 1)
        self.c2 = nn.Conv2d(6, 6, 3, 1, 1, groups=6)
        self.g = nn.Conv2d(6, 6, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        y = Fn.silu(self.c1(x))
        y = Fn.hardswish(self.c2(y))
        y = y * torch.sigmoid(self.g(Fn.adaptive_avg_pool2d(y, 1)))
        return self.fc(torch.flatten(Fn.adaptive_avg_pool2d(y, 1), 1))


class _OnInput(nn.Module):
    """Table functions of the (quantized) input: every float32 value is exact there."""

    def forward(self, x):
        return torch.sigmoid(x) + Fn.hardswish(x) * torch.tanh(x)


SHAPE = (3, 8, 8)


@pytest.fixture(scope="module")
def gates():
    return make_graph(_Gates(), SHAPE)


@pytest.mark.parametrize("bits,dm,rounding", [(12, "4D", "half_up"), (16, "3D", "nearest_even"), (14, "4D", "floor")])
def test_sim_engine_bit_exact_wide(gates, bits, dm, rounding):
    g = gates
    plan = plan_for(g, SHAPE, n=8, data_mode=dm, data_bits=bits, coeff_bits=8, rounding=rounding)
    assert plan.float_ops == ()
    torch.manual_seed(7)
    x = torch.randn(4, *SHAPE) * 3  # beyond the calibration range: saturations happen
    sim, eng = Simulator(g, plan, exact=True), Engine(g, plan)
    assert all(eng.tables[n.name].seg is not None for n in g.nodes if isinstance(n, Table))
    ys = sim(x)
    assert torch.equal(eng.dequantize(eng.run(eng.quantize_input(x))), ys)
    sat = _nonzero(eng.saturations())
    assert sat == _nonzero(sim.saturations()) and any(k in sat for k in ("silu", "hardswish", "sigmoid")), sat


@pytest.mark.parametrize("bits", [12, 16])
def test_fast_sim_tables_exact(bits):
    g = make_graph(_OnInput(), (2, 6, 6))
    plan = plan_for(g, (2, 6, 6), n=8, data_bits=bits)
    assert plan.float_ops == ()
    torch.manual_seed(4)
    x = torch.randn(3, 2, 6, 6) * 4
    exact, fast = Simulator(g, plan, exact=True), Simulator(g, plan)
    assert torch.equal(fast(x).double(), exact(x))
    assert _nonzero(fast.saturations()) == _nonzero(exact.saturations())
    eng = Engine(g, plan)
    assert torch.equal(eng.dequantize(eng.run(eng.quantize_input(x))), exact(x))


@pytest.mark.skipif(not HAS_CC, reason="needs a C compiler (cc) and make")
def test_c_dense_form_of_a_wide_input_equals_the_engine(gates, tmp_path, monkeypatch):
    """The dense C kernel with a 12-bit input (what the emitter stores when it is smaller)."""
    import fixq.backends.export_c.emit_elementwise as ee
    from test_export_c import c_vs_engine
    monkeypatch.setattr(ee, "table_form", lambda ti: "dense")
    plan = plan_for(gates, SHAPE, n=8, data_mode="3D", data_bits=12, coeff_bits=8, rounding="nearest_even")
    res, totals = c_vs_engine(gates, plan, SHAPE, tmp_path, scale=3.0)
    text = (res.out / "model.c").read_text()
    assert "fixq_table(" in text and "fixq_table_seg(" not in text and totals["data"] > 0
    assert {t["entries"] for t in res.tables} == {2 ** 12}


@pytest.mark.skipif(not HAS_CC, reason="needs a C compiler (cc) and make")
@pytest.mark.parametrize("bits,dm,rounding", [(12, "4D", "half_up"), (16, "3D", "floor")])
def test_c_bit_exact_wide(gates, tmp_path, bits, dm, rounding):
    from test_export_c import c_vs_engine
    from fixq.backends.export_c.run import strict_build
    from fixq.backends.export_c.emit import CTYPE_BYTES
    from fixq.backends.export_c.emit_elementwise import table_form
    plan = plan_for(gates, SHAPE, n=8, data_mode=dm, data_bits=bits, coeff_bits=8, rounding=rounding)
    res, totals = c_vs_engine(gates, plan, SHAPE, tmp_path, scale=3.0)
    assert totals["data"] > 0
    assert {t["op"] for t in res.tables} == {"silu", "hardswish", "sigmoid"}
    eng = Engine(gates, plan)
    for t in res.tables:
        seg = eng.tables[t["node"]].seg
        dense = t["tables"] * t["entries"] * CTYPE_BYTES[t["ctype"]]
        assert t["entries"] == 2 ** bits and t["segments"] == len(seg.start) and 0 < t["bytes"] < dense, t
        assert table_form(eng.tables[t["node"]]) == "segmented"
    assert "fixq_table_seg(" in (res.out / "model.c").read_text()
    r = strict_build(res.out, extra=["-DFIXQ_COUNTS=1"])  # every runtime file, counters on
    assert r.returncode == 0, r.stderr


def test_qdq_refuses_wide_data(gates, tmp_path):
    pytest.importorskip("onnx")
    from fixq.backends.onnx_out import QDQError, export_qdq
    plan = plan_for(gates, SHAPE, n=8, data_bits=12)
    with pytest.raises(QDQError, match="12-bit data.*int8 activations"):
        export_qdq(gates, plan, tmp_path / "m.onnx")


class _Wide(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        return torch.sigmoid(self.c(x))


def test_beyond_the_segmented_bound_is_refused_with_node_and_fix():
    bits = MAX_SEGMENTED_BITS + 1
    g = make_graph(_Wide(), (2, 4, 4))
    plan = plan_for(g, (2, 4, 4), data_bits=bits)
    assert plan.float_ops == ("sigmoid",)
    assert any(f"wider than {MAX_SEGMENTED_BITS} bits" in s and "sigmoid" in s for s in plan.notes)
    assert Simulator(g, plan, exact=True)(torch.randn(2, 2, 4, 4)).shape == (2, 2, 4, 4)  # float between quantizers
    with pytest.raises(EngineError, match=f"node 'sigmoid' \\(sigmoid\\) has a {bits}-bit input.*dense up to "
                                          f"{MAX_TABLE_BITS} bits, segmented up to {MAX_SEGMENTED_BITS}") as e:
        Engine(g, plan)
    assert f"--data-bits {MAX_SEGMENTED_BITS}" in str(e.value) and "per-layer override on 'c'" in str(e.value)
    assert "power-of-two" not in str(e.value) and e.value.hint == ""

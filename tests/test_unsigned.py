"""Unsigned data formats U(T,F) (issue #13): the graph rule that chooses them, and bit-exact
parity of unsigned plans across the float64 simulation, the integer engine, the C code and
the QDQ ONNX export."""
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as Fn

from fixq.planning.plan_io import load_plan
from fixq.algorithms.calibrate import calibrate
from fixq.backends.engine import Engine
from fixq.numerics.formats import Word, code_limits, fake_quantize, saturate
from fixq.graph.ir import Add, AvgPool, Clamp, Concat, Conv, Flatten, Graph, Input, Linear, MaxPool, Pad, nonnegative_nodes
from fixq.planning.plan import Formats, LayerConfig, QuantConfig
from fixq.backends.simulate import Simulator

from helpers import DepthwiseNet, make_graph, plan_for
from test_engine import _nonzero


def _conv(name, inp, act=None):
    return Conv(name, (inp,), weight=torch.ones(2, 2, 1, 1), act=act)


def test_nonnegative_rule_on_a_hand_made_graph():
    g = Graph([
        Input("x", (2, 4, 4)),
        _conv("c_relu", "x", (0.0, None)),          # ReLU: >= 0
        _conv("c_relu6", "x", (0.0, 6.0)),          # ReLU6: >= 0
        _conv("c_tanh", "x", (-1.0, 1.0)),          # hardtanh: may be negative
        _conv("c_lin", "x"),                        # no activation
        MaxPool("mp", ("c_relu",)),                  # pools of >= 0 stay >= 0
        AvgPool("ap", ("c_tanh",)),                  # ... and of signed stay signed
        Add("add_pos", ("c_relu", "c_relu6")),       # sum of two >= 0
        Add("add_mix", ("c_relu", "c_lin")),         # may be negative
        Add("add_relu", ("c_relu", "c_lin"), act=(0.0, None)),  # fused ReLU
        Clamp("relu", ("c_lin",), lo=0.0, hi=None),  # standalone ReLU
        Pad("pad", ("relu",), pads=(1, 1, 1, 1)),   # zero padding
        Concat("cat_pos", ("mp", "add_pos")),
        Concat("cat_mix", ("mp", "c_lin")),
        Flatten("flat", ("cat_pos",)),
        Linear("fc", ("flat",), weight=torch.ones(3, 4)),
    ], "x", "fc")
    assert nonnegative_nodes(g) == {"c_relu", "c_relu6", "mp", "add_pos", "add_relu", "relu", "pad", "cat_pos",
                                    "flat"}


def test_plan_makes_exactly_the_nonnegative_quant_points_unsigned():
    g = make_graph(DepthwiseNet(), (3, 16, 16))
    nonneg = nonnegative_nodes(g)
    for method in ("maxabs", "mse", "percentile:99.99"):
        auto = plan_for(g, (3, 16, 16), data_method=method)
        signed = plan_for(g, (3, 16, 16), data_method=method, data_sign="signed")
        unsigned = {k for k, f in auto.tensors.items() if not f.signed}
        assert unsigned == set(auto.tensors) & nonneg and len(unsigned) >= 4
        assert all(f.signed for f in signed.tensors.values())
        if method == "maxabs":  # same range, one more magnitude bit: F grows by exactly 1
            for k in unsigned:
                assert [a - b for a, b in zip(auto.tensors[k].F, signed.tensors[k].F)] == [1] * len(auto.tensors[k].F)
    assert auto.tensors[g.input].signed  # the normalised image can be negative


def test_unsigned_codes_and_saturation():
    u = Word(4, signed=False)
    assert code_limits(u) == (0, 15) and code_limits(Word(4)) == (-8, 7)
    q, ev = saturate(torch.tensor([-3, 0, 15, 16, 40]), u)
    assert q.tolist() == [0, 0, 15, 15, 15] and int(ev) == 3
    y, _ = fake_quantize(torch.tensor([0.26, 3.96, 7.0]), 2, Word(4, signed=False))
    assert y.tolist() == [0.25, 3.75, 3.75]  # U(4,2): step 1/4, largest 15/4


def test_plan_json_round_trip_keeps_signedness(tmp_path):
    g = make_graph(DepthwiseNet(), (3, 16, 16))
    plan = plan_for(g, (3, 16, 16))
    plan.save(tmp_path / "p.json")
    back = load_plan(tmp_path / "p.json")
    assert {k: f.signed for k, f in back.tensors.items()} == {k: f.signed for k, f in plan.tensors.items()}
    text = (tmp_path / "p.json").read_text()
    assert '"signed": false' in text and '"signed": true' not in text  # signed is the default, left out
    assert Formats(8, "4D", (3,)).word.signed and str(Formats(8, "4D", (3,), signed=False).word) == "U8"


@pytest.mark.parametrize("cm,dm,rounding", [("3D", "4D", "half_up"), ("2D", "3D", "nearest_even"),
                                            ("4D", "3D", "floor")])
def test_unsigned_engine_equals_exact_simulation(cm, dm, rounding):
    g = make_graph(DepthwiseNet(), (3, 16, 16))
    plan = plan_for(g, (3, 16, 16), coeff_mode=cm, data_mode=dm, rounding=rounding)
    assert any(not f.signed for f in plan.tensors.values())
    torch.manual_seed(5)
    x = torch.randn(16, 3, 16, 16) * 2.0  # beyond the calibration range: saturations too
    sim = Simulator(g, plan, exact=True)
    want = sim(x)
    eng = Engine(g, plan)
    trace = eng.run(eng.quantize_input(x), keep=True)
    assert torch.equal(eng.dequantize(trace[g.output]), want)
    assert _nonzero(eng.saturations()) == _nonzero(sim.saturations()) != {}
    used_high = False
    for name, f in plan.tensors.items():
        if not f.signed:
            t = trace[name]
            assert int(t.min()) >= 0 and int(t.max()) <= 255
            used_high |= int(t.max()) > 127  # the bit a signed format would waste
    assert used_high


@pytest.mark.skipif(shutil.which("cc") is None or shutil.which("make") is None, reason="needs cc and make")
@pytest.mark.parametrize("sign", ["auto", "signed"])
def test_unsigned_c_equals_engine(tmp_path, sign):
    from test_export_c import c_vs_engine
    g = make_graph(DepthwiseNet(), (3, 16, 16))
    plan = plan_for(g, (3, 16, 16), coeff_mode="2D", data_mode="3D", data_sign=sign)
    res, _ = c_vs_engine(g, plan, (3, 16, 16), tmp_path, scale=2.0)
    # 0..255 codes do not fit int8_t: unsigned 8-bit data is stored as int16_t
    assert res.act_type == ("int16_t" if sign == "auto" else "int8_t")


class _ReluNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = Fn.max_pool2d(Fn.relu(self.c1(x)), 2)
        x = Fn.avg_pool2d(Fn.relu(self.c2(x)), 2)
        return self.fc(torch.flatten(x, 1))


def test_unsigned_qdq_onnx_agrees_with_simulation(tmp_path):
    pytest.importorskip("onnxruntime", reason="ONNX support needs `pip install fixq[onnx]`")
    onnx = pytest.importorskip("onnx", reason="ONNX support needs `pip install fixq[onnx]`")
    from fixq.backends.onnx_out import compare_qdq, export_qdq
    g = make_graph(_ReluNet(), (3, 16, 16))
    torch.manual_seed(2)
    x = torch.randn(400, 3, 16, 16)
    plan = calibrate(g, [(x[:64], None)], QuantConfig(LayerConfig(), "nearest_even"), show_progress=False)
    assert sum(not f.signed for f in plan.tensors.values()) >= 3
    m = export_qdq(g, plan, tmp_path / "u.onnx")
    onnx.checker.check_model(m)
    zps = [i for i in m.graph.initializer if "_zp__" in i.name]
    assert any(i.data_type == onnx.TensorProto.UINT8 for i in zps)
    cmp = compare_qdq(tmp_path / "u.onnx", g, plan, x)
    assert cmp["agreement_top1_pct"] >= 99.5 and cmp["max_diff_output_steps"] <= 1

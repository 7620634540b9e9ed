"""Mobile-CNN ops (issue #21, DESIGN §5b): table-driven unary functions, tensor multiply
(squeeze-and-excitation), channel shuffle. Capture, both simulation precisions, the
integer engine, the generated C and QDQ ONNX agree bit for bit."""
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as Fn

from fixq.planning.elementwise import unary_table
from fixq.backends.engine import Engine
from fixq.numerics.formats import Word, round_values
from fixq.graph.capture import UnsupportedOpError, capture
from fixq.graph.ir import UNARY_FUNCS, ChannelShuffle, Conv, Mul, Table, run_float
from fixq.backends.simulate import Simulator

from helpers import make_graph, plan_for
from test_engine import _nonzero

HAS_CC = shutil.which("cc") is not None and shutil.which("make") is not None


class MobileNet(nn.Module):
    """Hardswish, SiLU, squeeze-and-excitation (sigmoid gate, both operand orders),
    hardsigmoid x tanh, channel shuffle, GELU on a linear layer."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, 1, 1)
        self.bn = nn.BatchNorm2d(8)
        self.hs = nn.Hardswish()
        self.c2 = nn.Conv2d(8, 8, 3, 1, 1, groups=8)
        self.fc1 = nn.Conv2d(8, 4, 1)
        self.fc2 = nn.Conv2d(4, 8, 1)
        self.c3 = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = self.hs(self.bn(self.c1(x)))
        y = Fn.silu(self.c2(x))
        w = torch.sigmoid(self.fc2(torch.relu(self.fc1(Fn.adaptive_avg_pool2d(y, 1)))))
        y = w * y
        y = Fn.hardsigmoid(self.c3(y)) * torch.tanh(self.c3(y))
        y = Fn.channel_shuffle(y, 2)
        return Fn.gelu(self.fc(torch.flatten(Fn.adaptive_avg_pool2d(y, 1), 1)))


SHAPE = (3, 16, 16)


@pytest.fixture(scope="module")
def mobile_graph():
    return make_graph(MobileNet(), SHAPE)


def test_capture_lowers_every_op(mobile_graph):
    kinds = {type(n) for n in mobile_graph.nodes}
    assert {Table, Mul, ChannelShuffle} <= kinds
    assert sorted(n.op for n in mobile_graph.nodes if isinstance(n, Table)) == \
        ["gelu", "hardsigmoid", "hardswish", "sigmoid", "silu", "tanh"]


@pytest.mark.parametrize("op", sorted(UNARY_FUNCS))
@pytest.mark.parametrize("rounding", ["half_up", "nearest_even", "floor"])
def test_table_is_the_rounded_float_function(op, rounding):
    """Every entry is the float64 function of the input code's value, rounded once into the
    output format (the table's only error), saturated where it does not fit."""
    for Tin, Fin, Tout, Fout in [(Word(8), 4, Word(8), 5), (Word(6, False), 3, Word(8), 6), (Word(4), 1, Word(5), 2)]:
        t = unary_table(op, None, Tin, Fin, Tout, Fout, rounding)
        lo, hi = (0, 2 ** int(Tin) - 1) if not Tin.signed else (-2 ** (int(Tin) - 1), 2 ** (int(Tin) - 1) - 1)
        assert t.codes.numel() == 2 ** int(Tin)
        x = torch.arange(lo, hi + 1, dtype=torch.float64) / 2 ** Fin
        exact = UNARY_FUNCS[op](x, None) * 2 ** Fout
        qlo, qhi = -2 ** (int(Tout) - 1), 2 ** (int(Tout) - 1) - 1
        inside = (exact >= qlo) & (exact <= qhi)
        err = (t.codes.double() - exact)[inside]
        assert bool(((err > -1) & (err <= 0)).all() if rounding == "floor" else (err.abs() <= 0.5).all())
        assert bool((t.codes >= qlo).all() and (t.codes <= qhi).all())
        r = round_values(exact, rounding)
        assert torch.equal(t.sat, (r < qlo) | (r > qhi))
        assert torch.equal(t.codes.double(), r.clamp(qlo, qhi))


@pytest.mark.parametrize("dm,bits,rounding", [("4D", 8, "half_up"), ("3D", 8, "nearest_even"), ("3D", 4, "floor"),
                                              ("4D", 6, "half_up")])
def test_sim_engine_bit_exact(mobile_graph, dm, bits, rounding):
    g = mobile_graph
    plan = plan_for(g, SHAPE, n=8, data_mode=dm, data_bits=bits, coeff_bits=bits, rounding=rounding)
    assert plan.float_ops == ()
    torch.manual_seed(7)
    x = torch.randn(4, *SHAPE) * 3  # beyond the calibration range: saturations happen
    sim, eng = Simulator(g, plan, exact=True), Engine(g, plan)
    ys = sim(x)
    codes = eng.run(eng.quantize_input(x))
    assert torch.equal(eng.dequantize(codes), ys)
    sat = _nonzero(eng.saturations())
    assert sat == _nonzero(sim.saturations()), sat
    fast = Simulator(g, plan)  # float32: the same tables, on values (exact at these widths)
    assert torch.equal(fast(x).double(), ys)


def test_sign_rule_makes_gates_unsigned(mobile_graph):
    plan = plan_for(mobile_graph, SHAPE, n=8)
    assert not plan.tensors["sigmoid"].signed and not plan.tensors["hardsigmoid"].signed
    assert plan.tensors["hs"].signed and plan.tensors["tanh"].signed


@pytest.mark.skipif(not HAS_CC, reason="needs a C compiler (cc) and make")
@pytest.mark.parametrize("dm,bits,rounding", [("4D", 8, "half_up"), ("3D", 4, "nearest_even")])
def test_c_bit_exact(mobile_graph, tmp_path, dm, bits, rounding):
    from test_export_c import c_vs_engine
    g = mobile_graph
    plan = plan_for(g, SHAPE, n=8, data_mode=dm, data_bits=bits, coeff_bits=bits, rounding=rounding)
    res, totals = c_vs_engine(g, plan, SHAPE, tmp_path)
    assert totals["data"] > 0
    ops = {t["op"] for t in res.tables}
    assert ops == {"hardswish", "silu", "sigmoid", "hardsigmoid", "tanh", "gelu"}
    assert all(t["entries"] == 2 ** bits and t["bytes"] > 0 for t in res.tables)
    text = (res.out / "model.c").read_text()
    assert "fixq_table(" in text and "fixq_mul(" in text and "fixq_shuffle(" in text
    from fixq.backends.export_c.run import strict_build
    r = strict_build(res.out, extra=["-DFIXQ_COUNTS=1"])  # every runtime file, counters on
    assert r.returncode == 0, r.stderr


def test_qdq_onnx_exact(mobile_graph, tmp_path):
    pytest.importorskip("onnxruntime")
    from fixq.backends.onnx_out import compare_qdq, export_qdq
    for dm in ("4D", "3D"):
        plan = plan_for(mobile_graph, SHAPE, n=8, data_mode=dm, rounding="nearest_even")
        export_qdq(mobile_graph, plan, tmp_path / f"m{dm}.onnx")
        torch.manual_seed(2)
        r = compare_qdq(tmp_path / f"m{dm}.onnx", mobile_graph, plan, torch.randn(8, *SHAPE))
        # onnxruntime sums convs in float32 in its own order: exact only where those sums are
        # (DESIGN §11); a fresh-clone CI run saw 1 of 40 outputs one step apart, never more
        assert r["max_diff_output_steps"] <= 1.0 and r["outputs_differing"] <= 2, r


class _SE(nn.Module):
    """Both operand orders and a same-shape product (gating)."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(4, 4, 3, padding=1)
        self.g = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.c(x)
        s = Fn.hardsigmoid(self.g(Fn.adaptive_avg_pool2d(y, 1)))
        return (y * s) * torch.sigmoid(y) + s * y


def test_multiply_broadcast_both_orders_exact():
    g = make_graph(_SE(), (4, 8, 8))
    muls = [n for n in g.nodes if isinstance(n, Mul)]
    assert len(muls) == 3
    for dm in ("4D", "3D"):
        plan = plan_for(g, (4, 8, 8), n=8, data_mode=dm)
        x = torch.randn(3, 4, 8, 8) * 2
        sim, eng = Simulator(g, plan, exact=True), Engine(g, plan)
        assert torch.equal(eng.dequantize(eng.run(eng.quantize_input(x))), sim(x))


def test_multiply_unsupported_broadcast_is_refused():
    class Bad(nn.Module):
        def forward(self, x):
            return x * x[:, :1]
    with pytest.raises(UnsupportedOpError, match="multiply.*per-channel factor"):
        capture(Bad(), torch.randn(1, 4, 3, 3))


class _Shuffle(nn.Module):
    """torchvision ShuffleNetV2's channel_shuffle and chunk."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        x = self.c(x)
        x1, x2 = x.chunk(2, dim=1)
        x = torch.cat((x1, Fn.relu(self.b(x2))), dim=1)
        n, c, h, w = x.size()
        x = x.view(n, 2, c // 2, h, w)
        x = torch.transpose(x, 1, 2).contiguous()
        return x.view(n, -1, h, w)


def test_channel_shuffle_pattern_and_per_channel_formats():
    g = make_graph(_Shuffle(), (3, 6, 6))
    sh = [n for n in g.nodes if isinstance(n, ChannelShuffle)]
    assert len(sh) == 1 and sh[0].groups == 2
    plan = plan_for(g, (3, 6, 6), n=8, data_mode="3D")
    eng = Engine(g, plan)
    F_in, F_out = eng.F(sh[0].inputs[0]), eng.F(sh[0].name)
    assert F_out.tolist() == [F_in[j * 4 + i].item() for i in range(4) for j in range(2)]
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(eng.dequantize(eng.run(eng.quantize_input(x))), Simulator(g, plan, exact=True)(x))


def test_unsupported_transpose_names_the_node():
    class Bad(nn.Module):
        def forward(self, x):
            return x.view(1, 2, 2, 3, 3).transpose(3, 4).reshape(1, 4, 3, 3)
    with pytest.raises(UnsupportedOpError, match="transpose"):
        capture(Bad(), torch.randn(1, 4, 3, 3))


def test_per_channel_constant_scale_and_shift_fold_into_the_conv():
    """Caffe's Scale layer (x * c + d, per channel), as in the onnx package's densenet121."""
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3)
            self.register_buffer("s", torch.tensor([0.5, 2.0, -1.0, 3.0]).reshape(4, 1, 1))
            self.register_buffer("d", torch.tensor([0.1, 0.2, 0.3, 0.4]).reshape(4, 1, 1))

        def forward(self, x):
            return Fn.relu(self.c(x) * self.s + self.d)
    m = Scale()
    x = torch.randn(2, 3, 6, 6)
    g = capture(m, x)
    assert [type(n) for n in g.nodes] == [type(g.nodes[0]), Conv]
    assert torch.allclose(run_float(g, x), m(x), atol=1e-6)


# ---- torchvision mobile CNNs and the onnx package's graphs (random weights, fixed seed) ----
TORCHVISION = [  # (name, C export in the fast set); H = W = 16 keeps every stride-32 net valid
    ("mobilenet_v3_small", True), ("shufflenet_v2_x0_5", False),
    pytest.param("mnasnet0_5", False, marks=pytest.mark.slow),  # no new op: BN, ReLU, (depthwise) convs
    pytest.param("efficientnet_b0", True, marks=pytest.mark.slow),
    pytest.param("mobilenet_v3_large", True, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name,with_c", TORCHVISION)
def test_torchvision_mobile_nets_bit_exact(name, with_c, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    from conftest import set_bn_stats
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    shape = (3, 16, 16)
    set_bn_stats(model, torch.randn(4, *shape))
    g = capture(model, torch.randn(2, *shape))  # checks captured == model
    kinds = {type(n) for n in g.nodes}
    assert {"mobilenet_v3_small": {Table, Mul}, "efficientnet_b0": {Table, Mul}, "mobilenet_v3_large": {Table, Mul},
            "shufflenet_v2_x0_5": {ChannelShuffle}, "mnasnet0_5": set()}[name] <= kinds
    plan = plan_for(g, shape, n=4, data_method="maxabs")
    assert plan.float_ops == ()
    torch.manual_seed(5)
    x = torch.randn(2, *shape)
    sim, eng = Simulator(g, plan, exact=True), Engine(g, plan)
    assert torch.equal(eng.dequantize(eng.run(eng.quantize_input(x))), sim(x))
    assert _nonzero(sim.saturations()) == _nonzero(eng.saturations())
    if with_c and HAS_CC:
        from test_export_c import c_vs_engine
        res, _ = c_vs_engine(g, plan, shape, tmp_path, n=1)
        assert (name not in ("mobilenet_v3_small", "efficientnet_b0")) or res.tables


def test_zoo_lists_the_mobile_nets_with_their_preprocessing():
    from fixq.data.zoo import PRESETS, ZOO
    for n in ("mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "mnasnet0_5", "shufflenet_v2_x0_5"):
        e = ZOO[n]
        assert e.torchvision and e.needs_weights and "not bundled" in e.weights
        p = PRESETS[e.preprocess]
        assert (p.resize, p.crop) == (256, 224)
        assert p.interpolation == ("bicubic" if n == "efficientnet_b0" else "bilinear")


@pytest.mark.slow
@pytest.mark.parametrize("name,hw", [("light_shufflenet", 224), ("light_densenet121", 32), ("light_inception_v2", 64)])
def test_onnx_package_graphs_bit_exact(name, hw, tmp_path):
    """The onnx package's Caffe2 graphs: densenet121 and inception_v2 (per-channel Scale
    layers folded into convs), ShuffleNet v1 (Reshape/Transpose/Reshape channel shuffle;
    its reshapes fix 224x224)."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnx2torch")
    import os

    import numpy as np
    from fixq.data.onnx_in import load_onnx, prepare_onnx, redraw_weights
    src = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light", name + ".onnx")
    if not os.path.isfile(src):
        pytest.skip(f"{src} is not in this onnx package")
    m = redraw_weights(prepare_onnx(onnx.load(src)), seed=0)
    if m.graph.node[-1].op_type == "Softmax":
        m.graph.output[0].name = m.graph.node[-1].input[0]
        del m.graph.node[-1]
    onnx.save(m, str(tmp_path / "m.onnx"))
    net = load_onnx(tmp_path / "m.onnx")
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 3, hw, hw)).astype(np.float32))
    g = capture(net, x)
    assert not any(n.kind == "floatop" for n in g.nodes)
    if name == "light_shufflenet":
        assert any(isinstance(n, ChannelShuffle) for n in g.nodes)
    plan = plan_for(g, (3, hw, hw), n=2, data_method="maxabs")
    sim, eng = Simulator(g, plan, exact=True), Engine(g, plan)
    assert torch.equal(eng.dequantize(eng.run(eng.quantize_input(x))), sim(x))


@pytest.mark.skipif(not HAS_CC, reason="needs a C compiler (cc) and make")
def test_cli_quantize_and_export_c_list_the_tables(capsys, tmp_path, digits_dir):
    """A user model with hardswish and squeeze-and-excitation: quantize, then export-c
    prints every lookup table with its ROM (the float op is no longer refused)."""
    from test_cli import run
    f = tmp_path / "se.py"
    f.write_text("import torch, torch.nn as nn\n"
                 "class SE(nn.Module):\n"
                 "    def __init__(self):\n"
                 "        super().__init__()\n"
                 "        self.c, self.g, self.fc = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 1), nn.Linear(144, 10)\n"
                 "    def forward(self, x):\n"
                 "        y = nn.functional.hardswish(self.c(x))\n"
                 "        y = y * torch.sigmoid(self.g(nn.functional.adaptive_avg_pool2d(y, 1)))\n"
                 "        return self.fc(torch.flatten(y, 1))\n"
                 "def build():\n    return SE()\n")
    common = ["--model", f"{f}:build", "--input-shape", "1,8,8", "--preprocess", "digits"]
    code, _, _ = run(capsys, "quantize", *common, "--random-weights", "--calib", digits_dir, "--calib-size", 16,
                     "--eval", digits_dir, "--eval-size", 16, "--quiet", "--out", tmp_path / "u")
    assert code == 0
    code, out, err = run(capsys, "export-c", "--plan", tmp_path / "u" / "plan.json", *common, "--random-weights",
                         "--out", tmp_path / "c")
    assert code == 0, err
    assert "lookup tables: 2 nodes" in out and "hardswish (hardswish): 1 x 256" in out and "sigmoid (sigmoid)" in out


@pytest.mark.parametrize("scale", [1e-7, 1e-3, 1e3, 1e7])
@pytest.mark.parametrize("bits", [4, 8, 10])
def test_extreme_ranges_exact_or_refused(scale, bits):
    """Tables and products at far-off formats: engine == exact simulation, or a PlanError
    naming the node (never a silently wrong integer)."""
    from fixq.planning.plan import PlanError
    torch.manual_seed(3)
    m = _SE()
    with torch.no_grad():
        m.c.weight.mul_(scale)
        m.c.bias.mul_(scale)
    g = make_graph(m, (4, 8, 8))
    try:
        plan = plan_for(g, (4, 8, 8), n=8, data_bits=bits, coeff_bits=min(bits, 8), data_mode="3D")
        x = torch.randn(2, 4, 8, 8) * 2
        sim, eng = Simulator(g, plan, exact=True), Engine(g, plan)
        assert torch.equal(eng.dequantize(eng.run(eng.quantize_input(x))), sim(x))
        assert _nonzero(sim.saturations()) == _nonzero(eng.saturations())
    except PlanError as e:
        assert "node '" in str(e) or "layer '" in str(e)

"""Generated C == integer engine, bit for bit; runtime kernels op by op; compile flags."""
import shutil
import subprocess

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as Fn

from fixq.backends.engine import ENGINE_RULES, Engine, EngineError
from fixq.backends.export_c import C_EMITTERS, export_c, run_c_program
from fixq.backends.export_c.run import UBSAN_FLAGS, build
from fixq.graph.ir import FloatOp
from fixq.backends.simulate import SIM_RULES
from fixq.data.zoo import CifarResNet, LeNet, build_model, load_weights

from helpers import DepthwiseNet, make_graph, plan_for
from shared_data import resnet_weights

pytestmark = pytest.mark.skipif(shutil.which("cc") is None or shutil.which("make") is None,
                                reason="needs a C compiler (cc) and make")


def ubsan_compilers():
    """gcc (and clang where present) with -fsanitize=undefined -fno-sanitize-recover: every
    parity test runs the generated C under UBSan (a trip aborts the program, failing the test)."""
    return [cc for cc in ("gcc", "clang") if shutil.which(cc)] or [None]


def c_vs_engine(g, plan, shape, tmp_path, n=32, scale=1.5, seed=3, cc=None):
    res = export_c(g, plan, tmp_path / "c")
    cc = cc or ubsan_compilers()[0]
    build(res.out, cc=cc, cflags=UBSAN_FLAGS if cc else None)
    torch.manual_seed(seed)
    eng = Engine(g, plan)
    q = eng.quantize_input(torch.randn(n, *shape) * scale)
    want = eng.run(q).reshape(n, -1)
    got, sat = run_c_program(res.out, q)
    assert torch.equal(got, want)
    totals = {w: sum(v.get(w, 0) for k, v in eng.saturations().items() if k != g.input) for w in ("acc", "data")}
    assert sat == totals
    return res, totals


def test_registries_cover_the_same_ops():
    assert set(SIM_RULES) - {FloatOp} == set(ENGINE_RULES) == set(C_EMITTERS)


@pytest.mark.parametrize("cm,dm,A,bits", [("3D", "4D", 32, 8), ("2D", "3D", 24, 4), ("4D", "3D", 16, 8)])
def test_lenet_bundled(tmp_path, cm, dm, A, bits):
    model, _ = build_model("lenet-digits")
    from fixq.graph.capture import capture
    g = capture(model, torch.randn(2, 1, 8, 8))
    c_vs_engine(g, plan_for(g, (1, 8, 8), coeff_mode=cm, data_mode=dm, acc_bits=A, coeff_bits=bits), (1, 8, 8), tmp_path)


@pytest.mark.parametrize("rounding,overflow", [("floor", "wrap"), ("half_up", "wrap"), ("nearest_even", "saturate"),
                                               ("floor", "saturate")])
def test_parity_every_rounding_and_wrap(tmp_path, rounding, overflow):
    """C == engine with floor rounding and wrapping accumulators (narrow A so wraps happen),
    under UBSan; the engine equals the float64 simulation there too."""
    from fixq.backends.simulate import Simulator
    g = make_graph(DepthwiseNet(), (3, 16, 16))
    plan = plan_for(g, (3, 16, 16), coeff_mode="2D", data_mode="3D", acc_bits=12, acc_overflow=overflow,
                    rounding=rounding)
    _, totals = c_vs_engine(g, plan, (3, 16, 16), tmp_path, n=8, scale=3.0)
    assert totals["acc"] > 0
    torch.manual_seed(3)
    x = torch.randn(8, 3, 16, 16) * 3.0
    eng = Engine(g, plan)
    assert torch.equal(eng.dequantize(eng.run(eng.quantize_input(x))), Simulator(g, plan, exact=True)(x))


def test_depthwise_model_mixed_4_8_bits(tmp_path):
    from fixq.algorithms.calibrate import calibrate
    from fixq.planning.plan import LayerConfig, QuantConfig
    g = make_graph(DepthwiseNet(), (3, 16, 16))
    cfg = QuantConfig(LayerConfig(coeff_mode="2D"), overrides=(("dw", {"coeff_bits": 4}), ("grp", {"coeff_bits": 4})))
    plan = calibrate(g, [(torch.randn(16, 3, 16, 16), None)], cfg, show_progress=False)
    assert plan.layers["dw"].weight.T == 4 and plan.layers["pw"].weight.T == 8
    c_vs_engine(g, plan, (3, 16, 16), tmp_path)


def test_resnet20_accumulator_saturates(tmp_path):
    g = make_graph(CifarResNet(20), (3, 32, 32))
    _, totals = c_vs_engine(g, plan_for(g, (3, 32, 32), coeff_mode="2D", acc_bits=16), (3, 32, 32), tmp_path,
                            scale=3.0)
    assert totals["acc"] > 0


def test_resnet20_shared_weights(tmp_path):
    from fixq.graph.capture import capture
    m = load_weights(CifarResNet(20), str(resnet_weights(20)))
    g = capture(m, torch.randn(2, 3, 32, 32))
    res, _ = c_vs_engine(g, plan_for(g, (3, 32, 32), coeff_mode="3D", data_sign="signed"), (3, 32, 32), tmp_path)
    assert res.act_type == "int8_t" and res.ram_bytes < 64 * 1024
    # unsigned 8-bit data (the default) needs a 16-bit arena: same code, twice the RAM
    uns, _ = c_vs_engine(g, plan_for(g, (3, 32, 32), coeff_mode="3D"), (3, 32, 32), tmp_path / "u")
    assert uns.act_type == "int16_t" and uns.act_bytes == 2 * res.act_bytes
    assert all(v["acc"] == "int32" for v in res.layers.values())  # every 8-bit layer proved to fit int32
    n_w = sum(n.weight.numel() for n in g.layers())
    n_ch = sum(n.weight.shape[0] for n in g.layers())
    # int8 weights plus per-kernel tables (bias 8 B, shifts, bounds): no per-filter shift table in 3D
    assert n_w <= res.rom_bytes <= n_w + 40 * n_ch


class _Op(nn.Module):
    def __init__(self, f, cin=4):
        super().__init__()
        self.c = nn.Conv2d(3, cin, 3, padding=1)
        self.f = f

    def forward(self, x):
        return self.f(self, self.c(x))


OPS = {
    "conv_stride_dil_groups": lambda m, x: nn.functional.conv2d(x, m.c.weight[:4, :2].repeat(1, 1, 1, 1), None, 2, 2, 2, 2),
    "linear": lambda m, x: Fn.linear(torch.flatten(x, 1), m.c.weight.reshape(4, -1).repeat(1, 10)[:, :256]),
    "maxpool_ceil": lambda m, x: Fn.max_pool2d(x, 3, 2, 0, ceil_mode=True),
    "maxpool_pad_dil": lambda m, x: Fn.max_pool2d(x, 3, 1, 1, dilation=1),
    "avgpool_pad": lambda m, x: Fn.avg_pool2d(x, 3, 2, 1),
    "avgpool_ceil_nopad": lambda m, x: Fn.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False),
    "adaptive_down": lambda m, x: Fn.adaptive_avg_pool2d(x, (3, 5)),
    "adaptive_up": lambda m, x: Fn.adaptive_avg_pool2d(x[:, :, :2, :2], (7, 7)),
    "add_relu6": None,  # AddNet below
    "concat": lambda m, x: torch.cat([x, Fn.max_pool2d(x, 1)], 1),
    "clamp_relu6": lambda m, x: Fn.relu6(Fn.max_pool2d(x, 1)),
    "pad_spatial_channel": lambda m, x: Fn.pad(x, (1, 2, 0, 1, 2, 1)),
    "slice": lambda m, x: x[:, 1:4:2, ::2, 1::3],
}


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("dm", ["4D", "3D"])
def test_runtime_kernel_op_by_op(tmp_path, op, dm):
    if op == "add_relu6":
        class AddNet(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)

            def forward(self, x):
                return Fn.relu6(self.a(x) + self.b(x))
        model = AddNet()
    else:
        model = _Op(OPS[op])
    g = make_graph(model, (3, 8, 8))
    c_vs_engine(g, plan_for(g, (3, 8, 8), data_mode=dm, coeff_mode="2D", rounding="nearest_even"), (3, 8, 8),
                tmp_path, n=4, scale=2.0)


def test_compiles_with_strict_flags_on_gcc_and_clang(tmp_path):
    g = make_graph(DepthwiseNet(), (3, 16, 16))
    res = export_c(g, plan_for(g, (3, 16, 16)), tmp_path / "c")
    for cc in ("gcc", "clang"):
        if shutil.which(cc) is None:
            continue
        r = subprocess.run([cc, "-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-O2", "-o",
                            str(tmp_path / f"m_{cc}"), "-DFIXQ_COUNTS=1", "main.c", "model.c",
                            *sorted(p.name for p in res.out.glob("fixq_rt*.c"))], cwd=res.out,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    text = (res.out / "model.c").read_text()
    assert "malloc" not in text and "float" not in text and "double" not in text


def test_export_refuses_affine_and_float_ops(tmp_path):
    g = make_graph(LeNet(8), (1, 8, 8))
    with pytest.raises(EngineError, match="affine"):
        export_c(g, plan_for(g, (1, 8, 8), method="affine"), tmp_path / "a")


def test_cli_export_run_c_equals_quantize_logits(tmp_path, digits_dir, capsys):
    import numpy as np
    from fixq.app.cli import main
    q = tmp_path / "q"
    assert main(["quantize", "--model", "lenet-digits", "--calib", str(digits_dir), "--calib-size", "64",
                 "--eval", str(digits_dir), "--exact", "--coeff-mode", "2D", "--quiet",
                 "--save-logits", str(tmp_path / "q.npy"), "--out", str(q)]) == 0
    assert main(["export-c", "--plan", str(q / "plan.json"), "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "ROM" in out and "activations (int16_t)" in out  # LeNet's ReLU outputs are U(8,F)
    assert "unsigned 8-bit" in out and "--data-sign signed" in out  # the export says why, and the fix
    assert main(["run-c", str(tmp_path / "c"), "--data", str(digits_dir), "--images", str(q / "images.json"),
                 "--out", str(tmp_path / "c.npy")]) == 0
    a, b = np.load(tmp_path / "q.npy"), np.load(tmp_path / "c.npy")
    assert a.shape == b.shape == (536, 10) and (a == b).all()
    assert main(["quantize", "--model", "lenet-digits", "--calib", str(digits_dir), "--calib-size", "16",
                 "--eval", str(digits_dir), "--eval-size", "8", "--data-sign", "signed", "--quiet",
                 "--out", str(tmp_path / "s")]) == 0
    assert main(["export-c", "--plan", str(tmp_path / "s" / "plan.json"), "--out", str(tmp_path / "cs"),
                 "--no-build"]) == 0
    out = capsys.readouterr().out
    assert "activations (int8_t)" in out and "unsigned 8-bit" not in out
    assert main(["quantize", "--model", "lenet-digits", "--calib", str(digits_dir), "--calib-size", "16",
                 "--eval", str(digits_dir), "--eval-size", "8", "--method", "affine", "--quiet",
                 "--out", str(tmp_path / "aff")]) == 0
    assert main(["export-c", "--plan", str(tmp_path / "aff" / "plan.json"), "--out", str(tmp_path / "c2")]) == 2
    assert "affine" in capsys.readouterr().err


def test_accumulator_table(tmp_path):
    from fixq.analysis.accumulators import accumulator_table
    g = make_graph(CifarResNet(20), (3, 32, 32))
    plan = plan_for(g, (3, 32, 32))
    rows = accumulator_table(g, plan, torch.randn(16, 3, 32, 32))
    assert len(rows) == len(g.layers())
    for r in rows:
        assert 8 <= r.A_identical <= 32 and 2 <= r.A_exact <= 40


def test_wide_arena_note_only_when_unsigned_8_bit_words_cause_it():
    """The export-c note blames U(8,F) words only when no wider word (a tensor, or a K-means
    <4b,4b> residual branch's data, both in export_c's act_words) needs the int16_t arena."""
    from fixq.app.commands_int import wide_arena_reason
    from fixq.numerics.formats import Word
    u8, s8, s12 = Word(8, signed=False), Word(8), Word(12)
    assert "1 of 2 data words are unsigned 8-bit" in wide_arena_reason([s8, u8], "int16_t")
    assert wide_arena_reason([s8, u8], "int8_t") is None
    assert wide_arena_reason([s8, u8, s12], "int16_t") is None  # e.g. 12-bit residual data needs int16_t anyway
    assert wide_arena_reason([s8], "int16_t") is None


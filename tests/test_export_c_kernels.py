"""The int32 conv loop nests of the generated C (issue 17): the SSE2 kernel and the portable C
loops (-DFIXQ_NO_SIMD) both equal the engine on shapes that reach every edge of the blocking:
odd channel counts (a single last channel), row tails (ow % 4 != 0), dot lengths that are
not a multiple of 8, a last pass of fewer than FIXQ_ROWS rows, stride 2 in the ring, int16
weights, a residual add, and int64 layers beside int32 ones. The AVX2 kernels (taken at run
time on x86-64 CPUs with AVX2 where the dot length is a multiple of 8) against -DFIXQ_NO_AVX2
(SSE2) and -DFIXQ_NO_SIMD on the same program."""
import json
import platform
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as Fn

from fixq.backends.engine import Engine
from fixq.backends.export_c import export_c, run_c_program
from fixq.backends.export_c.run import UBSAN_FLAGS, build

from helpers import make_graph, plan_for

pytestmark = pytest.mark.skipif(shutil.which("cc") is None or shutil.which("make") is None,
                                reason="needs a C compiler (cc) and make")


class OddNet(nn.Module):
    """3 -> 7 -> 10 (stride 2) -> 10 (+ residual) -> 5 channels on a 11 x 13 input; ``ch`` and
    ``c4`` (kernel, padding, dilation of the last conv) give the other nets of this file."""

    def __init__(self, ch=(7, 10, 5), c4=(1, 0, 1)):
        super().__init__()
        a, b, c = ch
        self.c1 = nn.Conv2d(3, a, 3, 1, 1)
        self.c2 = nn.Conv2d(a, b, 3, 2, 1)
        self.c3 = nn.Conv2d(b, b, 3, 1, 1)
        self.c4 = nn.Conv2d(b, c, c4[0], padding=c4[1], dilation=c4[2])
        self.fc = nn.Linear(c * 6 * 7, 3)

    def forward(self, x):
        x = Fn.relu(self.c1(x))
        y = Fn.relu(self.c2(x))
        y = Fn.relu(self.c3(y) + y)
        return self.fc(torch.flatten(self.c4(y), 1))


def run_both(tmp_path, plan, g, shape, n=6, scale=2.0, builds=("", " -DFIXQ_NO_SIMD")):
    """C (SIMD where the host has it, then the portable loops) == engine; export.json's layers."""
    res = export_c(g, plan, tmp_path / "c")
    torch.manual_seed(5)
    eng = Engine(g, plan)
    q = eng.quantize_input(torch.randn(n, *shape) * scale)
    want = eng.run(q).reshape(n, -1)
    for extra in builds:
        build(res.out, cflags=UBSAN_FLAGS + extra)
        got, _ = run_c_program(res.out, q)
        assert torch.equal(got, want), f"C{extra or ' (SIMD where present)'} != engine"
    return json.loads((res.out / "export.json").read_text())["layers"]


def host_has_avx2() -> bool:
    """x86-64 Linux with the avx2 CPU flag (what __builtin_cpu_supports checks at run time)."""
    cpuinfo = Path("/proc/cpuinfo")
    if platform.machine() not in ("x86_64", "AMD64") or not cpuinfo.exists():
        return False
    return any(line.startswith("flags") and " avx2" in line for line in cpuinfo.read_text().splitlines())


class Avx2Net(OddNet):
    """Dot lengths of every AVX2 case: ring segments kw * cin of 3 * 8 = 24 (16 + 8, stride 2, rows
    of 7 outputs: a tail of 3) and 3 * 16 = 48 (+ residual); an im2col row (dilated) of K = 144
    into 9 channels (a single last one); 9 (c1) and 378 (fc) stay on SSE2; 11 x 13 input."""

    def __init__(self):
        super().__init__((8, 16, 9), (3, 2, 2))


@pytest.mark.skipif(not host_has_avx2(), reason="the AVX2 kernels run only on an x86-64 CPU with AVX2")
@pytest.mark.parametrize("bits", [8, 4, 12])
def test_avx2_kernels_equal_sse2_and_portable(tmp_path, bits):
    """int8 weights read as stored (8), packed 4-bit rows unpacked to int16 (4), int16 weights (12):
    the default build (AVX2 here), -DFIXQ_NO_AVX2 (SSE2) and -DFIXQ_NO_SIMD all equal the engine."""
    g = make_graph(Avx2Net(), (3, 11, 13))
    plan = plan_for(g, (3, 11, 13), coeff_mode="3D", coeff_bits=bits)  # one shift per kernel: fixq_sums32
    layers = run_both(tmp_path, plan, g, (3, 11, 13), n=8,
                      builds=("", " -DFIXQ_NO_AVX2", " -DFIXQ_NO_SIMD"))
    assert {v["acc"] for v in layers.values()} == {"int32"}
    assert [v["hwc"] for v in layers.values()] == [True, True, True, False, True]


@pytest.mark.parametrize("bits", [8, 4])
def test_int32_kernels_simd_and_portable(tmp_path, bits):
    g = make_graph(OddNet(), (3, 11, 13))
    plan = plan_for(g, (3, 11, 13), coeff_mode="3D", data_mode="3D", coeff_bits=bits)
    layers = run_both(tmp_path, plan, g, (3, 11, 13))
    assert {v["acc"] for v in layers.values()} == {"int32"}
    assert any(v.get("hwc") for v in layers.values())


@pytest.mark.parametrize("wb,db,acc", [(12, 8, "int32"), (16, 16, "int64")])
def test_int16_weights_and_int64_layers(tmp_path, wb, db, acc):
    """int16 weights read as stored by the int32 kernels (12-bit weights, 8-bit data), and
    16-bit plans whose sums take int64."""
    g = make_graph(OddNet(), (3, 11, 13))
    plan = plan_for(g, (3, 11, 13), coeff_mode="3D", data_mode="3D", coeff_bits=wb, data_bits=db)
    layers = run_both(tmp_path, plan, g, (3, 11, 13), scale=3.0)
    assert acc in {v["acc"] for v in layers.values()}
    assert {v["weights"] for v in layers.values()} == {"int16_t"}

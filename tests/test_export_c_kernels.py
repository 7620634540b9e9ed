"""The int32 conv loop nests of the generated C (issue 17): the SSE2 kernel and the portable C
loops (-DFIXQ_NO_SIMD) both equal the engine on shapes that reach every edge of the blocking:
odd channel counts (a single last channel), row tails (ow % 4 != 0), dot lengths that are
not a multiple of 8, a last pass of fewer than FIXQ_ROWS rows, stride 2 in the ring, int16
weights, a residual add, and int64 layers beside int32 ones."""
import json
import shutil

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
    """3 -> 7 -> 10 (stride 2) -> 10 (+ residual) -> 5 channels on a 11 x 13 input."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 7, 3, 1, 1)
        self.c2 = nn.Conv2d(7, 10, 3, 2, 1)
        self.c3 = nn.Conv2d(10, 10, 3, 1, 1)
        self.c4 = nn.Conv2d(10, 5, 1)
        self.fc = nn.Linear(5 * 6 * 7, 3)

    def forward(self, x):
        x = Fn.relu(self.c1(x))
        y = Fn.relu(self.c2(x))
        y = Fn.relu(self.c3(y) + y)
        return self.fc(torch.flatten(self.c4(y), 1))


def run_both(tmp_path, plan, g, shape, n=6, scale=2.0):
    """C (SSE2 where the host has it, then the portable loops) == engine; export.json's layers."""
    res = export_c(g, plan, tmp_path / "c")
    torch.manual_seed(5)
    eng = Engine(g, plan)
    q = eng.quantize_input(torch.randn(n, *shape) * scale)
    want = eng.run(q).reshape(n, -1)
    for extra in ("", " -DFIXQ_NO_SIMD"):
        build(res.out, cflags=UBSAN_FLAGS + extra)
        got, _ = run_c_program(res.out, q)
        assert torch.equal(got, want), f"C{extra or ' (SSE2 where present)'} != engine"
    return json.loads((res.out / "export.json").read_text())["layers"]


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

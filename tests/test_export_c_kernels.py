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
import subprocess
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


# ---- fixq_sums32 alone: every kernel on operands at the edge of the int32 contract ----

SUMS_HARNESS = r"""#include <stdio.h>
#include <stdlib.h>
static unsigned long fixq_test_taken[3];
#define FIXQ_TEST_TAKEN(k) (fixq_test_taken[k]++)
#include "fixq_rt_gemm.c"
static unsigned long long seed = 12345u;
static int rnd(int lo, int hi) { /* uniform in [lo, hi] (LCG), the extremes one draw in four each */
    unsigned r;
    seed = seed * 6364136223846793005ull + 1442695040888963407ull;
    r = (unsigned)(seed >> 33);
    if (r % 4u == 0u) { return lo; }
    if (r % 4u == 1u) { return hi; }
    return lo + (int)((r >> 2) % (unsigned)(hi - lo + 1));
}
int main(void) {
    /* ow, ns, seg, L, step, r0, w8, two rows: ring rows (hwc), im2col rows, one-row calls, tails */
    static const int cases[][8] = {
        {7, 5, 3, 24, 8, 2, 1, 1}, {9, 4, 3, 48, 16, 3, 0, 1}, {13, 3, 3, 9, 3, 1, 1, 1},
        {6, 1, 1, 144, 144, 0, 1, 1}, {5, 1, 1, 16, 16, 0, 0, 0}, {4, 1, 1, 504, 504, 0, 1, 1},
        {11, 6, 5, 40, 8, 4, 0, 1}, {3, 2, 2, 8, 8, 1, 1, 0}, {8, 1, 1, 378, 378, 0, 0, 1}};
    int c, extreme, bad = 0;
    for (extreme = 0; extreme < 2; extreme++) {
        for (c = 0; c < (int)(sizeof cases / sizeof cases[0]); c++) {
            int ow = cases[c][0], ns = cases[c][1], seg = cases[c][2], L = cases[c][3], step = cases[c][4];
            int r0 = cases[c][5], w8 = cases[c][6], two = cases[c][7], n = seg * L, i, ox, t, k;
            size_t rowlen = (size_t)((ow - 1) * step + L), nx = (size_t)ns * rowlen;
            /* the acc32 proof's bound: sum |w| |x| < 2^31 with |x| <= 2^15, so |w| <= B */
            long B = 2147483647L / ((long)n * 32768L), wneg = B < (w8 ? 128 : 32768) ? B : (w8 ? 128 : 32768);
            long wpos = wneg < (w8 ? 127 : 32767) ? wneg : (w8 ? 127 : 32767);
            /* exact sizes (AddressSanitizer sees any read past them) */
            int16_t *X = malloc(nx * sizeof *X), *W16 = malloc((size_t)(2 * n) * sizeof *W16);
            int8_t *W8 = malloc((size_t)(2 * n));
            int32_t *D0 = malloc((size_t)ow * sizeof *D0), *D1 = malloc((size_t)ow * sizeof *D1);
            for (i = 0; i < (int)nx; i++) { X[i] = (int16_t)(extreme ? -32768 : rnd(-32768, 32767)); }
            for (i = 0; i < 2 * n; i++) { /* extreme: row 0 all -wneg (sums n wneg 2^15, just below 2^31), row 1 +wpos */
                int v = extreme ? (i < n ? (int)-wneg : (int)wpos) : rnd((int)-wneg, (int)wpos);
                if (w8) { W8[i] = (int8_t)v; } else { W16[i] = (int16_t)v; }
            }
            fixq_sums32(ow, X, rowlen, r0, ns, seg, L, step, w8 ? (const void *)W8 : (const void *)W16,
                        two ? (w8 ? (const void *)(W8 + n) : (const void *)(W16 + n)) : NULL, w8, D0, D1);
            for (i = 0; i < (two ? 2 : 1); i++) {
                for (ox = 0; ox < ow; ox++) {
                    long long s = 0; /* the definition: int64, no blocking */
                    for (t = 0; t < seg; t++) {
                        for (k = 0; k < L; k++) {
                            long long w = w8 ? W8[i * n + t * L + k] : W16[i * n + t * L + k];
                            s += w * X[(size_t)((r0 + t) % ns) * rowlen + (size_t)(ox * step + k)];
                        }
                    }
                    if (s != (long long)(i ? D1[ox] : D0[ox])) { bad++; }
                    printf("%ld ", (long)(i ? D1[ox] : D0[ox]));
                }
            }
            if (extreme) { printf("| %lld", (long long)n * wneg * 32768); }
            printf("\n");
            free(X); free(W16); free(W8); free(D0); free(D1);
        }
    }
    printf("taken %lu %lu %lu bad %d\n", fixq_test_taken[0], fixq_test_taken[1], fixq_test_taken[2], bad);
    return bad != 0;
}
"""


def test_sums32_kernels_equal_the_definition_and_the_dispatch_is_taken(tmp_path):
    """fixq_sums32 alone, on ring and im2col shapes with row tails, one- and two-row calls,
    int8 and int16 weights, under AddressSanitizer and UBSan with exact-size buffers: random
    operands with the extremes drawn often, then every x = -2^15 against weights at the acc32
    bound (every partial sum of |w||x| below 2^31), so that the sums reach 2^31 - n 2^15 or
    closer: each build equals an int64 sum written out in the harness, and each takes the
    kernel it should (counted by the FIXQ_TEST_TAKEN hook): AVX2 for L % 8 == 0 where the CPU
    has it, else SSE2 on x86-64, the portable loops with -DFIXQ_NO_SIMD."""
    from fixq.backends.export_c.emit import RUNTIME_DIR
    (tmp_path / "fixq_config.h").write_text(
        "#define FIXQ_ACT_T int16_t\n#define FIXQ_W_T int16_t\n#define FIXQ_W_WS FIXQ_WS_I16\n"
        "#define FIXQ_MAC_T int16_t\n#define FIXQ_MAC_WS FIXQ_WS_I16\n")
    (tmp_path / "h.c").write_text(SUMS_HARNESS)
    x86 = platform.machine() in ("x86_64", "AMD64")
    outs = {}
    for tag, extra in (("default", []), ("sse2", ["-DFIXQ_NO_AVX2"]), ("portable", ["-DFIXQ_NO_SIMD"])):
        exe = tmp_path / tag
        subprocess.run(["cc", *UBSAN_FLAGS.replace("-fsanitize=undefined", "-fsanitize=address,undefined").split(),
                        "-Wno-unused-function", *extra, f"-I{tmp_path}",
                        f"-I{RUNTIME_DIR}", str(tmp_path / "h.c"), "-o", str(exe)], check=True)
        r = subprocess.run([str(exe)], capture_output=True, text=True)
        assert r.returncode == 0, f"{tag}: {r.stdout[-300:]} {r.stderr[-800:]}"
        *rows, last = r.stdout.strip().splitlines()
        outs[tag] = rows
        taken = [int(v) for v in last.split()[1:4]]
        assert last.endswith("bad 0") and sum(taken) == 18, (tag, last)
        if tag == "portable" or not x86:
            assert taken == [18, 0, 0], (tag, taken)
        elif tag == "sse2" or not host_has_avx2():
            assert taken == [0, 18, 0], (tag, taken)
        else:  # L % 8 == 0 in 7 of the 9 shapes (L = 9 and 378 stay on SSE2), each run twice
            assert taken == [0, 4, 14], (tag, taken)
    assert outs["default"] == outs["sse2"] == outs["portable"]
    near = 0
    for row in outs["default"][9:]:  # the extreme runs: row 0's sums are n wneg 2^15
        sums, want = row.split("|")
        assert int(sums.split()[0]) == int(want), row
        near += int(want) > 0.98 * 2 ** 31
    assert near == 5  # the int16 shapes and the int8 one of n = 504: within 2% of 2^31

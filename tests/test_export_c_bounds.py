"""The int32 fast paths of the C runtime (epilogue32 in fixq_rt_conv.c, add32 in fixq_rt.c)
must equal the general int64 paths for every clamp bound, including bounds on the far side of
int32 (a Hardtanh-like clamp with a large positive minimum, or an upper bound below -2^31, at a
wide accumulator). Found by review: both paths cut such a bound to 32 bits."""
import shutil
import subprocess

import pytest

from fixq.backends.export_c.emit import RUNTIME_DIR
from fixq.backends.export_c.run import UBSAN_FLAGS

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler (cc)")

CONFIG = """#ifndef FIXQ_CONFIG_H
#define FIXQ_CONFIG_H
#define FIXQ_ACT_T int16_t
#define FIXQ_W_T int16_t
#define FIXQ_W_WS FIXQ_WS_I16
#define FIXQ_MAC_T int16_t
#define FIXQ_MAC_WS FIXQ_WS_I16
#define FIXQ_DIV64 1
#define FIXQ_P48 1
#endif
"""

EPILOGUE = r"""#include <string.h>
#include <stdio.h>
#include "fixq_rt_conv.c"
static int one(int64_t lo, int has_lo, int64_t hi, int has_hi, int rnd) {
    static const uint8_t z8[1] = {0}; static const int8_t os20[1] = {20};
    static const int32_t b0[1] = {0};
    int64_t lot[1], hit[1]; int32_t d[4] = {0, 1000, -1000, 123456};
    int16_t y1[4], y2[4]; int64_t rs[4]; int k, bad = 0;
    fixq_conv_t p; memset(&p, 0, sizeof p);
    lot[0] = lo; hit[0] = hi;
    p.cin = p.cout = p.groups = 1; p.h = p.w = p.oh = 1; p.ow = 4; p.kh = p.kw = 1;
    p.wshift = z8; p.wshift_cols = 1; p.acc32 = 1; p.bias.t32 = b0; p.acc_shift = z8;
    if (has_lo) { p.lo.t64 = lot; }
    if (has_hi) { p.hi.t64 = hit; }
    p.out_shift = os20; p.acc_bits = 40; p.out_bits = 16; p.overflow = FIXQ_SATURATE; p.rounding = rnd;
    for (k = 0; k < 4; k++) { rs[k] = d[k]; }
    epilogue(&p, NULL, 0, 0, rs, y1, NULL);
    if (!epilogue32(&p, 0, 0, 4, d, 0, y2, NULL)) { return 0; } /* declined: the general path runs */
    for (k = 0; k < 4; k++) { if (y1[k] != y2[k]) { printf("d=%d general=%d int32=%d\n", d[k], y1[k], y2[k]); bad = 1; } }
    return bad;
}
int main(void) {
    int bad = 0;
    bad |= one(((int64_t)1 << 32) + 5, 1, 0, 0, FIXQ_FLOOR);          /* lo above int32 */
    bad |= one(((int64_t)1 << 31), 1, 0, 0, FIXQ_HALF_UP);
    bad |= one(0, 0, -((int64_t)1 << 32) - 3, 1, FIXQ_HALF_UP);       /* hi below int32 */
    bad |= one(0, 0, -((int64_t)1 << 31) - 1, 1, FIXQ_FLOOR);
    bad |= one(-5, 1, 7, 1, FIXQ_HALF_UP);                            /* ordinary bounds */
    printf(bad ? "MISMATCH\n" : "OK\n");
    return bad;
}
"""

ADD = r"""#include <stdio.h>
#include "fixq_rt.h"
static int one(int64_t lo, int has_lo, int64_t hi, int has_hi) {
    static const uint8_t s0[1] = {0}, s15[1] = {15}; static const int8_t os[1] = {20};
    int64_t lot[1], hit[1];
    int16_t a[2] = {100, -7}, b[2] = {3, 9}, y1[2], y2[2];
    fixq_add_t p = {1, 2, s0, s0, {NULL, NULL}, {NULL, NULL}, os, 16, FIXQ_HALF_UP};
    fixq_add_t q = {1, 2, s15, s15, {NULL, NULL}, {NULL, NULL}, os, 16, FIXQ_HALF_UP};
    lot[0] = lo; hit[0] = hi;
    if (has_lo) { p.lo.t64 = lot; q.lo.t64 = lot; }
    if (has_hi) { p.hi.t64 = hit; q.hi.t64 = hit; }
    fixq_add(&p, a, b, y1, NULL);   /* sa = sb = 0: the int32 path where its guard allows */
    fixq_add(&q, a, b, y2, NULL);   /* sa = sb = 15: the int64 path; the clamp makes v = the bound */
    if (y1[0] != y2[0] || y1[1] != y2[1]) { printf("%d %d vs %d %d\n", y1[0], y1[1], y2[0], y2[1]); return 1; }
    return 0;
}
int main(void) {
    int bad = one(0, 0, -((int64_t)1 << 32) - 3, 1) | one(0, 0, -((int64_t)1 << 31) - 1, 1)
            | one(((int64_t)1 << 32) + 5, 1, 0, 0);
    printf(bad ? "MISMATCH\n" : "OK\n");
    return bad;
}
"""


@pytest.mark.parametrize("name", ["epilogue32", "add32"])
def test_int32_paths_keep_far_bounds(tmp_path, name):
    src = EPILOGUE if name == "epilogue32" else ADD
    (tmp_path / "fixq_config.h").write_text(CONFIG)
    (tmp_path / f"{name}.c").write_text(src)
    others = [str(p) for p in sorted(RUNTIME_DIR.glob("fixq_rt*.c"))
              if not (name == "epilogue32" and p.name == "fixq_rt_conv.c")]  # included by the harness
    cmd = ["cc", *UBSAN_FLAGS.split(), "-Wno-unused-function", f"-I{tmp_path}", f"-I{RUNTIME_DIR}",
           str(tmp_path / f"{name}.c"), *others, "-o", str(tmp_path / name)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    r = subprocess.run([str(tmp_path / name)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr

/* fixq runtime: integer kernels of the fixq integer engine (DESIGN.md section 5).
 *
 * Notation: codes q at F fractional bits; T data bits; A accumulator bits.
 * round_shift(a, s): s > 0 rounded arithmetic right shift (half_up / nearest_even / floor),
 * s <= 0 exact left shift. sat(v, T): clamp (or wrap) to T-bit two's complement, counted.
 * A data word is T, or T | FIXQ_UNSIGNED for unsigned codes 0 .. 2^T - 1 (U(T,F) formats).
 * Sums are exact: in int32 where the exporter proved the layer's worst case fits
 * (fixq_conv_t.acc32), else in int64 (DESIGN section 5a). No heap, no floating point, no
 * mutable globals; activations are NCHW, batch 1, in a caller-owned arena.
 *
 * Saturation counters: kernels take `uint64_t *sat` (sat[0] accumulator, sat[1] data
 * events) or NULL. Every kernel file fixq_rt*.c is compiled with the model; every function
 * named fixq_* declared in a fixq_rt*.h header is renamed per model by fixq_config.h (two
 * models link into one program), so a new kernel file needs no registration.
 */
#ifndef FIXQ_RT_H
#define FIXQ_RT_H
#include <stdint.h>
#include <stddef.h>
#include "fixq_config.h" /* FIXQ_ACT_T, FIXQ_W_T: storage types; per-model symbol names */

#ifndef FIXQ_RESTRICT
#define FIXQ_RESTRICT restrict
#endif

enum { FIXQ_HALF_UP = 0, FIXQ_NEAREST_EVEN = 1, FIXQ_FLOOR = 2 };
enum { FIXQ_SATURATE = 0, FIXQ_WRAP = 1 };
enum { FIXQ_BITS_MASK = 0xff, FIXQ_UNSIGNED = 0x100 }; /* data word = T | FIXQ_UNSIGNED for U(T,F) */
/* weight storage of one layer: int8/int16/int32 codes, two 4-bit two's complement codes per
 * byte (low nibble first), or int4/int8 per 2D filter (fixq_wmix_t) */
enum { FIXQ_WS_I8 = 0, FIXQ_WS_I16 = 1, FIXQ_WS_I32 = 2, FIXQ_WS_P4 = 3, FIXQ_WS_P48 = 4 };
/* FIXQ_WS_P48: row i (output channel) from byte nib[row[i]] (row16, or row32 where a row starts
 * at 2^16 or later), a nibble stream (low nibble first): filters j = 0 .. cin/groups - 1 in
 * order, kh*kw codes each in (ky, kx) order, one nibble per code when the filter is narrow
 * (bit f % 8 of mask[f / 8], f = i * cin/groups + j), else two nibbles (low, high) per int8
 * code; every row starts on a byte */
typedef struct {
    const uint8_t *nib;
    const uint16_t *row16;
    const int32_t *row32;
    const uint8_t *mask;
} fixq_wmix_t;

/* 1 (the default): fixq_round_div (64-bit division) is compiled; the exporter defines 0 in
 * fixq_config.h when every average pool is proved to divide in 32 bits (div32) */
#ifndef FIXQ_DIV64
#define FIXQ_DIV64 1
#endif
/* 1 (the default): the int4/int8-per-2D-filter unpacking (FIXQ_WS_P48) is compiled; the
 * exporter defines 0 when no layer uses it */
#ifndef FIXQ_P48
#define FIXQ_P48 1
#endif

int64_t fixq_asr(int64_t a, int s);                       /* floor(a / 2^s), s >= 0 */
int64_t fixq_shl(int64_t a, int s);                       /* a * 2^s, s >= 0 (saturates: never in a proved model) */
/* defined for every int64 a and every int s (DESIGN section 5a): right shifts of any size,
 * left shifts through fixq_shl; the exporter emits only |s| <= 62 */
int64_t fixq_round_shift(int64_t a, int s, int rounding);
#if FIXQ_DIV64
int64_t fixq_round_div(int64_t n, int64_t d, int rounding); /* d > 0 */
#endif
int32_t fixq_round_div32(int32_t n, int32_t d, int rounding); /* d > 0, no 64-bit division */
int64_t fixq_sat(int64_t v, int word, int overflow, uint64_t *events); /* word: T [| FIXQ_UNSIGNED] */

/* a table of 32-bit values where they all fit, else 64-bit; both NULL: absent */
typedef struct { const int32_t *t32; const int64_t *t64; } fixq_tab_t;
#define FIXQ_TAB_HAS(t) ((t).t32 != NULL || (t).t64 != NULL)
#define FIXQ_TAB(t, i) ((t).t32 != NULL ? (int64_t)(t).t32[i] : (t).t64[i])

typedef struct {
    int cin, h, w, cout, groups, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow;
    const void *weight;       /* [cout][cin/groups][kh][kw] codes at Fw, stored as wstore
                               * (FIXQ_WS_P48: a fixq_wmix_t) */
    int wstore;               /* FIXQ_WS_*: packed rows are unpacked into the scratch */
    const uint8_t *wshift;    /* [cout][wshift_cols]: S - Fw - Fx */
    int wshift_cols;          /* cin/groups (2D formats or per-channel data), or 1 per kernel */
    int acc32;                /* 1: every partial sum proved below 2^31 (int32 loops) */
    int hwc;                  /* 1: weights [cout][kh][kw][cin/groups], rows of the input transposed
                               * to (x, channel) order: one shift per kernel, no dilation */
    fixq_tab_t bias;          /* [cout]: bias codes aligned to S */
    const uint8_t *acc_shift; /* [cout]: S - Facc */
    fixq_tab_t lo, hi;        /* [cout] activation bounds at Facc, or absent */
    const int8_t *out_shift;  /* [cout]: Facc - Fy */
    int acc_bits, out_bits, overflow, rounding; /* out_bits: data word, T [| FIXQ_UNSIGNED] */
    /* K-means layers (DESIGN section 9), else NULL: sum[i] += basis[assign[i]] << basis_shift[i],
     * basis: [K][oh][ow] exact basis sums from fixq_conv_sums (an arena buffer, fixq_conv's argument) */
    const int32_t *assign;    /* [cout]: l(i) */
    const uint8_t *basis_shift; /* [cout]: S - Sg[l(i)] */
} fixq_conv_t;
/* scratch bytes fixq_conv/fixq_conv_sums need (im2col row, sum row, unpacked weight row) */
size_t fixq_conv_scratch(const fixq_conv_t *p);
/* conv and linear (a linear layer is a 1x1 conv on a 1x1 map); scratch: fixq_conv_scratch(p)
 * bytes, 8-byte aligned */
void fixq_conv(const fixq_conv_t *p, const FIXQ_ACT_T *x, FIXQ_ACT_T *y, const int64_t *basis, void *scratch,
               uint64_t *sat);
/* the exact sums only (no bias, no rounding) into s[cout][oh][ow]: K-means basis maps */
void fixq_conv_sums(const fixq_conv_t *p, const FIXQ_ACT_T *x, int64_t *s, void *scratch);

typedef struct { int ch, h, w, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow; } fixq_maxpool_t;
void fixq_maxpool(const fixq_maxpool_t *p, const FIXQ_ACT_T *x, FIXQ_ACT_T *y);

typedef struct {
    int ch, h, w, oh, ow;
    const int16_t *h0, *h1, *w0, *w1; /* window [h0, h1) x [w0, w1), clipped to the input */
    const int32_t *div;               /* [oh][ow] divisor K */
    const int8_t *shift;              /* [ch]: Fy - Fx */
    int out_bits, rounding;
    int div32;                        /* 1: numerator and divisor proved below 2^31 */
} fixq_avgpool_t;
void fixq_avgpool(const fixq_avgpool_t *p, const FIXQ_ACT_T *x, FIXQ_ACT_T *y, uint64_t *sat);

typedef struct {
    int ch, hw;
    const uint8_t *sa, *sb;    /* [ch]: Fm - Fa, Fm - Fb, Fm = max(Fa, Fb) */
    fixq_tab_t lo, hi;         /* [ch] bounds at Fm, or absent */
    const int8_t *out_shift;   /* [ch]: Fm - Fy */
    int out_bits, rounding;
} fixq_add_t;
void fixq_add(const fixq_add_t *p, const FIXQ_ACT_T *a, const FIXQ_ACT_T *b, FIXQ_ACT_T *y, uint64_t *sat);

/* y = sat(round_shift(x, shift[c])) for ch channels of hw values (concat pieces) */
void fixq_requant(int ch, int hw, const int8_t *shift, int out_bits, int rounding,
                  const FIXQ_ACT_T *x, FIXQ_ACT_T *y, uint64_t *sat);
/* y = clamp(x, lo[c], hi[c]); lo or hi may be absent */
void fixq_clamp(int ch, int hw, fixq_tab_t lo, fixq_tab_t hi, const FIXQ_ACT_T *x, FIXQ_ACT_T *y);
/* zero padding of channels (c0 before, c1 after) and borders (top, bottom, left, right) */
void fixq_pad(int ch, int h, int w, int c0, int c1, int top, int bottom, int left, int right,
              const FIXQ_ACT_T *x, FIXQ_ACT_T *y);
/* y = x[cs::cst, hs::hst, ws::wst] with oc, oh, ow outputs */
void fixq_slice(int h, int w, int cs, int cst, int oc, int hs, int hst, int oh, int ws, int wst, int ow,
                const FIXQ_ACT_T *x, FIXQ_ACT_T *y);
/* the caller's input/output element types */
enum { FIXQ_IO_I8 = 0, FIXQ_IO_U8 = 1, FIXQ_IO_I16 = 2, FIXQ_IO_U16 = 3, FIXQ_IO_I32 = 4 };
/* copy n input codes into the arena; returns the number of codes outside [lo, hi] (not copied) */
int fixq_copy_in(int n, const void *src, int io, int64_t lo, int64_t hi, FIXQ_ACT_T *dst);
void fixq_copy_out(int n, const FIXQ_ACT_T *src, void *dst, int io);

/* a proved round_shift for 1 <= s <= 62 and |a| < 2^62 (DESIGN 5a): no branches on s's range */
static inline int64_t fixq_rshift_proved(int64_t a, int s, int rounding) {
    int64_t half = (int64_t)1 << (s - 1), v, q;
    if (rounding == FIXQ_FLOOR) {
        return a >= 0 ? a >> s : ~((~a) >> s);
    }
    v = a + half;
    q = v >= 0 ? v >> s : ~((~v) >> s);
    if (rounding == FIXQ_NEAREST_EVEN && (q & 1) && (((uint64_t)v & (((uint64_t)1 << s) - 1u)) == 0u)) {
        q -= 1; /* an exact half rounded up to an odd code: to the even neighbour */
    }
    return q;
}
/* a * 2^s for a proved |a| * 2^s < 2^62 and 0 <= s <= 62: one shift, no UB */
static inline int64_t fixq_shl_proved(int64_t a, int s) {
    return (int64_t)((uint64_t)a << s);
}
#endif

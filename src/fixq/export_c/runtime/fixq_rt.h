/* fixq runtime: integer kernels of the fixq integer engine (DESIGN.md section 5).
 *
 * Notation: codes q at F fractional bits; T data bits; A accumulator bits.
 * round_shift(a, s): s > 0 rounded arithmetic right shift (half_up / nearest_even / floor),
 * s <= 0 exact left shift. sat(v, T): clamp (or wrap) to T-bit two's complement, counted.
 * A data word is T, or T | FIXQ_UNSIGNED for unsigned codes 0 .. 2^T - 1 (U(T,F) formats).
 * Sums are exact in int64; no heap, no floating point. Activations are NCHW, batch 1.
 */
#ifndef FIXQ_RT_H
#define FIXQ_RT_H
#include <stdint.h>
#include <stddef.h>
#include "fixq_config.h" /* FIXQ_ACT_T, FIXQ_W_T: storage types chosen by the exporter */

enum { FIXQ_HALF_UP = 0, FIXQ_NEAREST_EVEN = 1, FIXQ_FLOOR = 2 };
enum { FIXQ_SATURATE = 0, FIXQ_WRAP = 1 };
enum { FIXQ_BITS_MASK = 0xff, FIXQ_UNSIGNED = 0x100 }; /* data word = T | FIXQ_UNSIGNED for U(T,F) */

typedef struct { uint64_t acc, data; } fixq_counts_t;

int64_t fixq_asr(int64_t a, int s);                       /* floor(a / 2^s), s >= 0 */
int64_t fixq_shl(int64_t a, int s);                       /* a * 2^s, s >= 0 (saturates: never in a proved model) */
/* defined for every int64 a and every int s (DESIGN section 5a): right shifts of any size,
 * left shifts through fixq_shl; the exporter emits only |s| <= 62 */
int64_t fixq_round_shift(int64_t a, int s, int rounding);
int64_t fixq_round_div(int64_t n, int64_t d, int rounding); /* d > 0 */
int64_t fixq_sat(int64_t v, int word, int overflow, uint64_t *events); /* word: T [| FIXQ_UNSIGNED] */

typedef struct {
    int cin, h, w, cout, groups, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow;
    const FIXQ_W_T *weight;   /* [cout][cin/groups][kh][kw] codes at Fw */
    const uint8_t *wshift;    /* [cout][wshift_cols]: S - Fw - Fx */
    int wshift_cols;          /* cin/groups (2D formats or per-channel data), or 1 per kernel */
    const int64_t *bias;      /* [cout]: bias codes aligned to S */
    const uint8_t *acc_shift; /* [cout]: S - Facc */
    const int64_t *lo, *hi;   /* [cout] activation bounds at Facc, or NULL */
    const int8_t *out_shift;  /* [cout]: Facc - Fy */
    int acc_bits, out_bits, overflow, rounding; /* out_bits: data word, T [| FIXQ_UNSIGNED] */
    /* K-means layers (DESIGN section 9), else NULL: sum[i] += basis[assign[i]] << basis_shift[i] */
    const int64_t *basis;     /* [K][oh][ow] exact basis sums from fixq_conv_sums */
    const int32_t *assign;    /* [cout]: l(i) */
    const uint8_t *basis_shift; /* [cout]: S - Sg[l(i)] */
} fixq_conv_t;
/* conv and linear (a linear layer is a 1x1 conv on a 1x1 map) */
void fixq_conv(const fixq_conv_t *p, const FIXQ_ACT_T *x, FIXQ_ACT_T *y, fixq_counts_t *c);
/* the exact sums only (no bias, no rounding) into s[cout][oh][ow]: K-means basis maps */
void fixq_conv_sums(const fixq_conv_t *p, const FIXQ_ACT_T *x, int64_t *s);

typedef struct { int ch, h, w, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow; } fixq_maxpool_t;
void fixq_maxpool(const fixq_maxpool_t *p, const FIXQ_ACT_T *x, FIXQ_ACT_T *y);

typedef struct {
    int ch, h, w, oh, ow;
    const int16_t *h0, *h1, *w0, *w1; /* window [h0, h1) x [w0, w1), clipped to the input */
    const int32_t *div;               /* [oh][ow] divisor K */
    const int8_t *shift;              /* [ch]: Fy - Fx */
    int out_bits, rounding;
} fixq_avgpool_t;
void fixq_avgpool(const fixq_avgpool_t *p, const FIXQ_ACT_T *x, FIXQ_ACT_T *y, fixq_counts_t *c);

typedef struct {
    int ch, hw;
    const uint8_t *sa, *sb;    /* [ch]: Fm - Fa, Fm - Fb, Fm = max(Fa, Fb) */
    const int64_t *lo, *hi;    /* [ch] bounds at Fm, or NULL */
    const int8_t *out_shift;   /* [ch]: Fm - Fy */
    int out_bits, rounding;
} fixq_add_t;
void fixq_add(const fixq_add_t *p, const FIXQ_ACT_T *a, const FIXQ_ACT_T *b, FIXQ_ACT_T *y, fixq_counts_t *c);

/* y = sat(round_shift(x, shift[c])) for ch channels of hw values (concat pieces) */
void fixq_requant(int ch, int hw, const int8_t *shift, int out_bits, int rounding,
                  const FIXQ_ACT_T *x, FIXQ_ACT_T *y, fixq_counts_t *c);
/* y = clamp(x, lo[c], hi[c]); lo or hi may be NULL */
void fixq_clamp(int ch, int hw, const int64_t *lo, const int64_t *hi, const FIXQ_ACT_T *x, FIXQ_ACT_T *y);
/* zero padding of channels (c0 before, c1 after) and borders (top, bottom, left, right) */
void fixq_pad(int ch, int h, int w, int c0, int c1, int top, int bottom, int left, int right,
              const FIXQ_ACT_T *x, FIXQ_ACT_T *y);
/* y = x[cs::cst, hs::hst, ws::wst] with oc, oh, ow outputs */
void fixq_slice(int h, int w, int cs, int cst, int oc, int hs, int hst, int oh, int ws, int wst, int ow,
                const FIXQ_ACT_T *x, FIXQ_ACT_T *y);
#endif

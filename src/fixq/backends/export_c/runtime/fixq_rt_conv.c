/* fixq runtime: convolution and linear kernels (DESIGN.md section 5; notation in fixq_rt.h).
 *
 * sum[i] = sum_j (sum_hw w[i,j] x[j]) << wshift[i,j], exact. Three loop nests:
 *  - hwc (cin/groups > 1, one shift per kernel, no dilation): the kh input rows an output row
 *    reads are kept transposed to [x][channel] with their zero padding (a ring of kh rows,
 *    each input row transposed once); an output is kh contiguous dot products of length
 *    kw * cin/groups against weights stored [cout][kh][kw][cin/groups];
 *  - im2col (other cin/groups > 1): one output row at a time, the receptive fields of the row are
 *    copied into the scratch (im2col, zeros for the padding), then each output is one
 *    contiguous dot product of length K = cin/groups * kh * kw (vectorisable);
 *  - depthwise (cin/groups == 1): a row of sums accumulates kh * kw scaled input rows, the
 *    padded border cut off by the range of valid outputs, outside the inner loop.
 * Both run in int32 when the exporter proved every partial sum below 2^31 (acc32), else in
 * int64. Packed weight rows (4-bit, or 4/8-bit per 2D filter) are unpacked into the scratch
 * before use.
 */
#include "fixq_rt.h"

/* the operand type of the dot products (im2col rows, unpacked weight rows): int16 where
 * activations and weights fit 16 bits, so that compilers use 16x16->32 multiply-adds */
#ifndef FIXQ_MAC_T
#define FIXQ_MAC_T int32_t
#define FIXQ_MAC_WS FIXQ_WS_I32
#endif

#define FIXQ_ALIGN8(n) (((n) + 7u) & ~(size_t)7u)

static int conv_k(const fixq_conv_t *p) {
    return (p->cin / p->groups) * p->kh * p->kw;
}

/* padded width of the hwc rows: every column an output reads */
static int hwc_width(const fixq_conv_t *p) {
    int a = p->pw + p->w, b = (p->ow - 1) * p->sw + p->kw;
    return a > b ? a : b;
}

static size_t col_bytes(const fixq_conv_t *p) {
    size_t mg = (size_t)(p->cin / p->groups), ow = (size_t)p->ow;
    if (p->hwc) {
        return FIXQ_ALIGN8((size_t)p->kh * (size_t)hwc_width(p) * mg * sizeof(FIXQ_MAC_T));
    }
    return mg > 1 ? FIXQ_ALIGN8((size_t)conv_k(p) * ow * sizeof(FIXQ_MAC_T)) : 0u;
}

size_t fixq_conv_scratch(const fixq_conv_t *p) {
    size_t k = (size_t)conv_k(p), ow = (size_t)p->ow;
    return col_bytes(p) + 2u * 8u * ow + FIXQ_ALIGN8(k * sizeof(FIXQ_MAC_T));
}

/* outputs o in [lo, hi) with 0 <= o * s + off < n_in, at most n_out */
static void valid_range(int n_out, int n_in, int s, int off, int *lo, int *hi) {
    int a = off < 0 ? (-off + s - 1) / s : 0;
    int b = n_in - off <= 0 ? 0 : (n_in - off + s - 1) / s;
    if (b > n_out) {
        b = n_out;
    }
    if (a > b) {
        a = b;
    }
    *lo = a;
    *hi = b;
}

#if FIXQ_P48 /* compiled only into models with a FIXQ_WS_P48 layer (fixq_config.h) */
/* nibble n of the stream b (low nibble first) */
static unsigned nibble(const uint8_t *b, size_t n) {
    return ((unsigned)b[n >> 1] >> ((n & 1u) * 4u)) & 15u;
}

/* FIXQ_WS_P48 row i (fixq_rt.h) into buf in the layer's weight order */
static const FIXQ_MAC_T *mixed_row(const fixq_conv_t *p, int i, FIXQ_MAC_T *buf) {
    const fixq_wmix_t *m = (const fixq_wmix_t *)p->weight;
    const uint8_t *b = m->nib + (m->row16 != NULL ? (size_t)m->row16[i] : (size_t)m->row32[i]);
    int mg = p->cin / p->groups, khw = p->kh * p->kw, j, t;
    int step = p->hwc ? mg : 1, stride = p->hwc ? 1 : khw; /* buf[t * step + j * stride] */
    size_t n = 0;
    for (j = 0; j < mg; j++) {
        size_t f = (size_t)i * (size_t)mg + (size_t)j;
        FIXQ_MAC_T *d = buf + j * stride;
        if ((m->mask[f >> 3] >> (f & 7u)) & 1u) {
            for (t = 0; t < khw; t++, n++) {
                unsigned u = nibble(b, n);
                d[t * step] = (FIXQ_MAC_T)((int32_t)u - (int32_t)((u & 8u) << 1));
            }
        } else {
            for (t = 0; t < khw; t++, n += 2) {
                unsigned u = nibble(b, n) | (nibble(b, n + 1) << 4);
                d[t * step] = (FIXQ_MAC_T)((int32_t)u - (int32_t)((u & 128u) << 1));
            }
        }
    }
    return buf;
}
#endif

/* the K weight codes of output channel i, as FIXQ_MAC_T (unpacked or widened into buf) */
static const FIXQ_MAC_T *weight_row(const fixq_conv_t *p, int i, int K, FIXQ_MAC_T *buf) {
    size_t e0 = (size_t)i * (size_t)K;
    int k;
    if (p->wstore == FIXQ_MAC_WS) {
        return (const FIXQ_MAC_T *)p->weight + e0;
    }
#if FIXQ_P48
    if (p->wstore == FIXQ_WS_P48) {
        return mixed_row(p, i, buf);
    }
#endif
    for (k = 0; k < K; k++) {
        size_t e = e0 + (size_t)k;
        int32_t v;
        if (p->wstore == FIXQ_WS_P4) {
            unsigned nib = ((unsigned)((const uint8_t *)p->weight)[e >> 1] >> ((e & 1u) * 4u)) & 15u;
            v = (int32_t)nib - (int32_t)((nib & 8u) << 1);
        } else if (p->wstore == FIXQ_WS_I8) {
            v = ((const int8_t *)p->weight)[e];
        } else if (p->wstore == FIXQ_WS_I16) {
            v = ((const int16_t *)p->weight)[e];
        } else {
            v = ((const int32_t *)p->weight)[e];
        }
        buf[k] = (FIXQ_MAC_T)v;
    }
    return buf;
}

static int32_t dot32(const FIXQ_MAC_T *FIXQ_RESTRICT w, const FIXQ_MAC_T *FIXQ_RESTRICT x, int n) {
    int32_t s = 0;
    int k;
    for (k = 0; k < n; k++) {
        s += (int32_t)w[k] * (int32_t)x[k];
    }
    return s;
}

/* four dot products of length K sharing the weight row: x0..x3 are `step` apart; added to out */
static void dot32x4(const FIXQ_MAC_T *FIXQ_RESTRICT w, const FIXQ_MAC_T *FIXQ_RESTRICT x, int K, int step,
                    int32_t *out) {
    int32_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    const FIXQ_MAC_T *x1 = x + step, *x2 = x + 2 * step, *x3 = x + 3 * step;
    int k;
    for (k = 0; k < K; k++) {
        int32_t wk = w[k];
        s0 += wk * (int32_t)x[k];
        s1 += wk * (int32_t)x1[k];
        s2 += wk * (int32_t)x2[k];
        s3 += wk * (int32_t)x3[k];
    }
    out[0] += s0;
    out[1] += s1;
    out[2] += s2;
    out[3] += s3;
}

static int64_t dot64(const FIXQ_MAC_T *FIXQ_RESTRICT w, const FIXQ_MAC_T *FIXQ_RESTRICT x, int n) {
    int64_t s = 0;
    int k;
    for (k = 0; k < n; k++) {
        s += (int64_t)w[k] * (int64_t)x[k];
    }
    return s;
}

/* the receptive fields of output row oy, group g: col[ox][k], k = (j, ky, kx) as the weights;
 * written in order, the padding as zeros */
static void im2col_row(const fixq_conv_t *p, const FIXQ_ACT_T *x, int g, int oy, FIXQ_MAC_T *FIXQ_RESTRICT col) {
    int mg = p->cin / p->groups, j, ky, kx, ox;
    size_t plane = (size_t)p->h * (size_t)p->w;
    const FIXQ_ACT_T *xg = x + (size_t)(g * mg) * plane;
    FIXQ_MAC_T *c = col;
    for (ox = 0; ox < p->ow; ox++) {
        int ix0 = ox * p->sw - p->pw;
        int inside_x = ix0 >= 0 && ix0 + (p->kw - 1) * p->dw < p->w;
        for (j = 0; j < mg; j++) {
            const FIXQ_ACT_T *xj = xg + (size_t)j * plane;
            for (ky = 0; ky < p->kh; ky++) {
                int iy = oy * p->sh - p->ph + ky * p->dh;
                if (iy < 0 || iy >= p->h) {
                    for (kx = 0; kx < p->kw; kx++) {
                        *c++ = 0;
                    }
                } else if (inside_x && p->kw == 3 && p->dw == 1) {
                    const FIXQ_ACT_T *xr = xj + (size_t)iy * (size_t)p->w + ix0;
                    c[0] = xr[0];
                    c[1] = xr[1];
                    c[2] = xr[2];
                    c += 3;
                } else if (inside_x) {
                    const FIXQ_ACT_T *xr = xj + (size_t)iy * (size_t)p->w + ix0;
                    for (kx = 0; kx < p->kw; kx++) {
                        *c++ = xr[kx * p->dw];
                    }
                } else {
                    const FIXQ_ACT_T *xr = xj + (size_t)iy * (size_t)p->w;
                    for (kx = 0; kx < p->kw; kx++) {
                        int ix = ix0 + kx * p->dw;
                        *c++ = (ix >= 0 && ix < p->w) ? xr[ix] : 0;
                    }
                }
            }
        }
    }
}

/* exact sums of output channel i along one output row, from its im2col row */
static void dense_row(const fixq_conv_t *p, const FIXQ_MAC_T *col, const FIXQ_MAC_T *wr, int i, int64_t *rs) {
    int K = conv_k(p), ox, j;
    if (p->wshift_cols == 1) {
        int s = p->wshift[i];
        if (p->acc32) {
            int32_t d[4];
            for (ox = 0; ox + 4 <= p->ow; ox += 4) {
                d[0] = d[1] = d[2] = d[3] = 0;
                dot32x4(wr, col + (size_t)ox * (size_t)K, K, K, d);
                rs[ox] = fixq_shl_proved((int64_t)d[0], s);
                rs[ox + 1] = fixq_shl_proved((int64_t)d[1], s);
                rs[ox + 2] = fixq_shl_proved((int64_t)d[2], s);
                rs[ox + 3] = fixq_shl_proved((int64_t)d[3], s);
            }
            for (; ox < p->ow; ox++) {
                rs[ox] = fixq_shl_proved((int64_t)dot32(wr, col + (size_t)ox * (size_t)K, K), s);
            }
        } else {
            for (ox = 0; ox < p->ow; ox++) {
                rs[ox] = fixq_shl_proved(dot64(wr, col + (size_t)ox * (size_t)K, K), s);
            }
        }
        return;
    }
    {
        int khw = p->kh * p->kw, mg = p->cin / p->groups;
        const uint8_t *ws = p->wshift + (size_t)i * (size_t)p->wshift_cols;
        for (ox = 0; ox < p->ow; ox++) {
            const FIXQ_MAC_T *c = col + (size_t)ox * (size_t)K;
            if (p->acc32) { /* acc32 also proves every wshift <= 30 here */
                int32_t s = 0;
                for (j = 0; j < mg; j++) {
                    s += dot32(wr + j * khw, c + j * khw, khw) * ((int32_t)1 << ws[j]);
                }
                rs[ox] = s;
            } else {
                int64_t s = 0;
                for (j = 0; j < mg; j++) {
                    s += fixq_shl_proved(dot64(wr + j * khw, c + j * khw, khw), ws[j]);
                }
                rs[ox] = s;
            }
        }
    }
}

/* padded input row r (input row r - ph, zeros outside) of group g as dst[x][j] */
static void hwc_fill(const fixq_conv_t *p, const FIXQ_ACT_T *x, int g, int r, FIXQ_MAC_T *FIXQ_RESTRICT dst) {
    int mg = p->cin / p->groups, wp = hwc_width(p), iy = r - p->ph, j, ix;
    size_t plane = (size_t)p->h * (size_t)p->w, n = (size_t)wp * (size_t)mg, k;
    if (iy < 0 || iy >= p->h) {
        for (k = 0; k < n; k++) {
            dst[k] = 0;
        }
        return;
    }
    for (k = 0; k < (size_t)p->pw * (size_t)mg; k++) {
        dst[k] = 0;
    }
    for (k = (size_t)(p->pw + p->w) * (size_t)mg; k < n; k++) {
        dst[k] = 0;
    }
    for (j = 0; j < mg; j++) {
        const FIXQ_ACT_T *xr = x + (size_t)(g * mg + j) * plane + (size_t)iy * (size_t)p->w;
        FIXQ_MAC_T *d = dst + (size_t)p->pw * (size_t)mg + (size_t)j;
        for (ix = 0; ix < p->w; ix++) {
            d[(size_t)ix * (size_t)mg] = (FIXQ_MAC_T)xr[ix];
        }
    }
}

/* exact sums of output channel i along output row oy from the ring of transposed rows */
static void hwc_row(const fixq_conv_t *p, const FIXQ_MAC_T *ring, const FIXQ_MAC_T *wr, int i, int oy,
                    int64_t *rs) {
    int mg = p->cin / p->groups, L = p->kw * mg, wp = hwc_width(p), step = p->sw * mg, ky, ox;
    int s = p->wshift[i];
    size_t rowlen = (size_t)wp * (size_t)mg;
    if (p->acc32) {
        int32_t d[4];
        for (ox = 0; ox + 4 <= p->ow; ox += 4) {
            d[0] = d[1] = d[2] = d[3] = 0;
            for (ky = 0; ky < p->kh; ky++) {
                const FIXQ_MAC_T *xr = ring + (size_t)((oy * p->sh + ky) % p->kh) * rowlen;
                dot32x4(wr + ky * L, xr + (size_t)ox * (size_t)step, L, step, d);
            }
            rs[ox] = fixq_shl_proved((int64_t)d[0], s);
            rs[ox + 1] = fixq_shl_proved((int64_t)d[1], s);
            rs[ox + 2] = fixq_shl_proved((int64_t)d[2], s);
            rs[ox + 3] = fixq_shl_proved((int64_t)d[3], s);
        }
        for (; ox < p->ow; ox++) {
            int32_t t = 0;
            for (ky = 0; ky < p->kh; ky++) {
                const FIXQ_MAC_T *xr = ring + (size_t)((oy * p->sh + ky) % p->kh) * rowlen;
                t += dot32(wr + ky * L, xr + (size_t)ox * (size_t)step, L);
            }
            rs[ox] = fixq_shl_proved((int64_t)t, s);
        }
    } else {
        for (ox = 0; ox < p->ow; ox++) {
            int64_t t = 0;
            for (ky = 0; ky < p->kh; ky++) {
                const FIXQ_MAC_T *xr = ring + (size_t)((oy * p->sh + ky) % p->kh) * rowlen;
                t += dot64(wr + ky * L, xr + (size_t)ox * (size_t)step, L);
            }
            rs[ox] = fixq_shl_proved(t, s);
        }
    }
}

/* exact sums of output channel i (one input channel) along one output row */
static void depthwise_row(const fixq_conv_t *p, const FIXQ_ACT_T *x, const FIXQ_MAC_T *wr, int i, int oy,
                          void *acc, int64_t *rs) {
    int g = i / (p->cout / p->groups), ky, kx, ox, a, b;
    const FIXQ_ACT_T *xg = x + (size_t)g * (size_t)p->h * (size_t)p->w;
    int32_t *a32 = (int32_t *)acc;
    int64_t *a64 = (int64_t *)acc;
    for (ox = 0; ox < p->ow; ox++) {
        if (p->acc32) {
            a32[ox] = 0;
        } else {
            a64[ox] = 0;
        }
    }
    for (ky = 0; ky < p->kh; ky++) {
        int iy = oy * p->sh - p->ph + ky * p->dh;
        const FIXQ_ACT_T *xr;
        if (iy < 0 || iy >= p->h) {
            continue;
        }
        xr = xg + (size_t)iy * (size_t)p->w;
        for (kx = 0; kx < p->kw; kx++) {
            int off = kx * p->dw - p->pw, sw = p->sw;
            int32_t wv = wr[ky * p->kw + kx];
            valid_range(p->ow, p->w, sw, off, &a, &b);
            if (p->acc32 && sw == 1) {
                for (ox = a; ox < b; ox++) {
                    a32[ox] += wv * (int32_t)xr[ox + off];
                }
            } else if (p->acc32) {
                for (ox = a; ox < b; ox++) {
                    a32[ox] += wv * (int32_t)xr[ox * sw + off];
                }
            } else {
                for (ox = a; ox < b; ox++) {
                    a64[ox] += (int64_t)wv * (int64_t)xr[ox * sw + off];
                }
            }
        }
    }
    {
        int s = p->wshift[(size_t)i * (size_t)p->wshift_cols];
        for (ox = 0; ox < p->ow; ox++) {
            rs[ox] = fixq_shl_proved(p->acc32 ? (int64_t)a32[ox] : a64[ox], s);
        }
    }
}

/* bias, K-means basis, accumulator rounding and saturation, activation clamp, output format */
static void epilogue(const fixq_conv_t *p, const int64_t *basis, int i, int oy, const int64_t *rs, FIXQ_ACT_T *y,
                     uint64_t *sat) {
    int ox, as = p->acc_shift[i], os = p->out_shift[i], rnd = p->rounding;
    int64_t bias = FIXQ_TAB(p->bias, i), bs = 0;
    int has_lo = FIXQ_TAB_HAS(p->lo), has_hi = FIXQ_TAB_HAS(p->hi);
    int64_t lo = has_lo ? FIXQ_TAB(p->lo, i) : 0, hi = has_hi ? FIXQ_TAB(p->hi, i) : 0;
    int ab = p->acc_bits & FIXQ_BITS_MASK, yb = p->out_bits & FIXQ_BITS_MASK;
    int64_t amax = ((int64_t)1 << (ab - 1)) - 1, amin = -amax - 1;
    int64_t ymax = (p->out_bits & FIXQ_UNSIGNED) ? ((int64_t)1 << yb) - 1 : ((int64_t)1 << (yb - 1)) - 1;
    int64_t ymin = (p->out_bits & FIXQ_UNSIGNED) ? 0 : -ymax - 1;
    const int64_t *bm = NULL;
    FIXQ_ACT_T *yr = y + ((size_t)i * (size_t)p->oh + (size_t)oy) * (size_t)p->ow;
    if (basis) {
        bm = basis + ((size_t)p->assign[i] * (size_t)p->oh + (size_t)oy) * (size_t)p->ow;
        bs = p->basis_shift[i];
    }
    for (ox = 0; ox < p->ow; ox++) {
        int64_t v = rs[ox] + bias;
        if (bm) {
            v += fixq_shl_proved(bm[ox], (int)bs);
        }
        if (as > 0) {
            v = fixq_rshift_proved(v, as, rnd);
        }
        if (v < amin || v > amax) {
            v = fixq_sat(v, p->acc_bits, p->overflow, sat);
        }
        if (has_lo && v < lo) {
            v = lo;
        }
        if (has_hi && v > hi) {
            v = hi;
        }
        v = os > 0 ? fixq_rshift_proved(v, os, rnd) : fixq_shl_proved(v, -os);
        if (v < ymin || v > ymax) {
            v = fixq_sat(v, p->out_bits, FIXQ_SATURATE, sat ? sat + 1 : NULL);
        }
        yr[ox] = (FIXQ_ACT_T)v;
    }
}

static int64_t asr64(int64_t v, int s) { /* floor(v / 2^s), 0 <= s <= 62 */
    return v >= 0 ? v >> s : ~((~v) >> s);
}

/* the epilogue for half_up or floor rounding, a saturating accumulator and no K-means basis:
 * branch-free, saturation events counted by comparison */
static void epilogue_fast(const fixq_conv_t *p, int i, int oy, const int64_t *FIXQ_RESTRICT rs,
                          FIXQ_ACT_T *FIXQ_RESTRICT y, uint64_t *sat) {
    int ox, as = p->acc_shift[i], os = p->out_shift[i], up = p->rounding == FIXQ_HALF_UP;
    int ab = p->acc_bits & FIXQ_BITS_MASK, yb = p->out_bits & FIXQ_BITS_MASK;
    int64_t bias = FIXQ_TAB(p->bias, i) + (up && as > 0 ? (int64_t)1 << (as - 1) : 0);
    int64_t ho = up && os > 0 ? (int64_t)1 << (os - 1) : 0;
    int64_t amax = ((int64_t)1 << (ab - 1)) - 1, amin = -amax - 1;
    int64_t lo = FIXQ_TAB_HAS(p->lo) && FIXQ_TAB(p->lo, i) > amin ? FIXQ_TAB(p->lo, i) : amin;
    int64_t hi = FIXQ_TAB_HAS(p->hi) && FIXQ_TAB(p->hi, i) < amax ? FIXQ_TAB(p->hi, i) : amax;
    int64_t ymax = (p->out_bits & FIXQ_UNSIGNED) ? ((int64_t)1 << yb) - 1 : ((int64_t)1 << (yb - 1)) - 1;
    int64_t ymin = (p->out_bits & FIXQ_UNSIGNED) ? 0 : -ymax - 1;
    uint64_t ea = 0, ed = 0;
    FIXQ_ACT_T *yr = y + ((size_t)i * (size_t)p->oh + (size_t)oy) * (size_t)p->ow;
    if (lo > hi) { /* bounds outside the accumulator range: the general order of operations */
        epilogue(p, NULL, i, oy, rs, y, sat);
        return;
    }
    for (ox = 0; ox < p->ow; ox++) {
        int64_t v = asr64(rs[ox] + bias, as);
        ea += (uint64_t)((v < amin) | (v > amax));
        v = v < lo ? lo : v;
        v = v > hi ? hi : v;
        v = os >= 0 ? asr64(v + ho, os) : fixq_shl_proved(v, -os);
        ed += (uint64_t)((v < ymin) | (v > ymax));
        v = v < ymin ? ymin : v;
        v = v > ymax ? ymax : v;
        yr[ox] = (FIXQ_ACT_T)v;
    }
    if (sat) {
        sat[0] += ea;
        sat[1] += ed;
    }
}

/* y != NULL: the layer's outputs; else the exact sums into s (K-means basis maps) */
static void conv_epilogue(const fixq_conv_t *p, const int64_t *basis, int i, int oy, const int64_t *rs, FIXQ_ACT_T *y,
                          uint64_t *sat) {
    if (basis == NULL && p->overflow == FIXQ_SATURATE && p->rounding != FIXQ_NEAREST_EVEN) {
        epilogue_fast(p, i, oy, rs, y, sat);
    } else {
        epilogue(p, basis, i, oy, rs, y, sat);
    }
}

static void conv_run(const fixq_conv_t *p, const FIXQ_ACT_T *x, FIXQ_ACT_T *y, const int64_t *basis, int64_t *s,
                     void *scratch, uint64_t *sat) {
    int K = conv_k(p), mg = p->cin / p->groups, ng = p->cout / p->groups, g, i, oy;
    unsigned char *base = (unsigned char *)scratch;
    size_t cb = col_bytes(p);
    FIXQ_MAC_T *col = (FIXQ_MAC_T *)(void *)base;
    int64_t *rs = (int64_t *)(void *)(base + cb);
    void *acc = (void *)(base + cb + 8u * (size_t)p->ow);
    FIXQ_MAC_T *wbuf = (FIXQ_MAC_T *)(void *)(base + cb + 16u * (size_t)p->ow);
    for (g = 0; g < p->groups; g++) {
        if (p->hwc) {
            size_t rowlen = (size_t)hwc_width(p) * (size_t)mg;
            int next = 0, r;
            for (oy = 0; oy < p->oh; oy++) {
                int r0 = oy * p->sh;
                for (r = next > r0 ? next : r0; r < r0 + p->kh; r++) {
                    hwc_fill(p, x, g, r, col + (size_t)(r % p->kh) * rowlen);
                }
                next = r0 + p->kh;
                for (i = g * ng; i < (g + 1) * ng; i++) {
                    hwc_row(p, col, weight_row(p, i, K, wbuf), i, oy, rs);
                    if (y) {
                        conv_epilogue(p, basis, i, oy, rs, y, sat);
                    } else {
                        int ox;
                        for (ox = 0; ox < p->ow; ox++) {
                            s[((size_t)i * (size_t)p->oh + (size_t)oy) * (size_t)p->ow + (size_t)ox] = rs[ox];
                        }
                    }
                }
            }
        } else if (mg > 1) {
            for (oy = 0; oy < p->oh; oy++) {
                im2col_row(p, x, g, oy, col);
                for (i = g * ng; i < (g + 1) * ng; i++) {
                    dense_row(p, col, weight_row(p, i, K, wbuf), i, rs);
                    if (y) {
                        conv_epilogue(p, basis, i, oy, rs, y, sat);
                    } else {
                        int ox;
                        for (ox = 0; ox < p->ow; ox++) {
                            s[((size_t)i * (size_t)p->oh + (size_t)oy) * (size_t)p->ow + (size_t)ox] = rs[ox];
                        }
                    }
                }
            }
        } else {
            for (i = g * ng; i < (g + 1) * ng; i++) {
                const FIXQ_MAC_T *wr = weight_row(p, i, K, wbuf);
                for (oy = 0; oy < p->oh; oy++) {
                    depthwise_row(p, x, wr, i, oy, acc, rs);
                    if (y) {
                        conv_epilogue(p, basis, i, oy, rs, y, sat);
                    } else {
                        int ox;
                        for (ox = 0; ox < p->ow; ox++) {
                            s[((size_t)i * (size_t)p->oh + (size_t)oy) * (size_t)p->ow + (size_t)ox] = rs[ox];
                        }
                    }
                }
            }
        }
    }
}

void fixq_conv(const fixq_conv_t *p, const FIXQ_ACT_T *x, FIXQ_ACT_T *y, const int64_t *basis, void *scratch,
               uint64_t *sat) {
    conv_run(p, x, y, basis, NULL, scratch, sat);
}

void fixq_conv_sums(const fixq_conv_t *p, const FIXQ_ACT_T *x, int64_t *s, void *scratch) {
    conv_run(p, x, NULL, NULL, s, scratch, NULL);
}

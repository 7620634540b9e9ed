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
 * All run in int32 when the exporter proved every partial sum below 2^31 (acc32), else in
 * int64. Packed weight rows (4-bit, or 4/8-bit per 2D filter) are unpacked into the scratch
 * before use. The int32 dense nests (hwc, im2col) take two output channels at a time; hwc goes
 * in passes of FIXQ_ROWS output rows (the weight rows prepared once per pass); their dot
 * products are fixq_sums32 (fixq_rt_gemm.c: register-blocked, SSE2 on x86-64), their epilogue
 * runs in int32 where the values are shown to fit (epilogue32), else in int64.
 */
#include "fixq_rt_gemm.h" /* fixq_rt.h, FIXQ_MAC_T, the int32 dot-product kernels */


#define FIXQ_ALIGN8(n) (((n) + 7u) & ~(size_t)7u)

static int conv_k(const fixq_conv_t *p) {
    return (p->cin / p->groups) * p->kh * p->kw;
}

/* output rows per pass of the hwc loop nest: the weight rows of a channel pair are prepared
 * (widened or unpacked) once per pass; the ring holds the input rows of a pass (fixq_conv_scratch
 * and its Python mirror, export_c/emit.py, use the same rule). fixq_config.h sets it to the value
 * the exporter sized the arena for (emit.HWC_ROWS); this fallback is for hand-made configs. */
#ifndef FIXQ_ROWS
#define FIXQ_ROWS 4
#endif

/* transposed input rows the hwc ring holds: every row of a pass of FIXQ_ROWS output rows */
static int ring_rows(const fixq_conv_t *p) {
    int r = p->oh < FIXQ_ROWS ? p->oh : FIXQ_ROWS;
    return p->kh + p->sh * (r - 1);
}

/* padded width of the hwc rows: every column an output reads */
static int hwc_width(const fixq_conv_t *p) {
    int a = p->pw + p->w, b = (p->ow - 1) * p->sw + p->kw;
    return a > b ? a : b;
}

static size_t col_bytes(const fixq_conv_t *p) {
    size_t mg = (size_t)(p->cin / p->groups), ow = (size_t)p->ow;
    if (p->hwc) {
        return FIXQ_ALIGN8((size_t)ring_rows(p) * (size_t)hwc_width(p) * mg * sizeof(FIXQ_MAC_T));
    }
    return mg > 1 ? FIXQ_ALIGN8((size_t)conv_k(p) * ow * sizeof(FIXQ_MAC_T)) : 0u;
}

size_t fixq_conv_scratch(const fixq_conv_t *p) {
    size_t k = (size_t)conv_k(p), ow = (size_t)p->ow;
    return col_bytes(p) + (8u + 8u * FIXQ_ROWS) * ow + FIXQ_ALIGN8(2u * k * sizeof(FIXQ_MAC_T));
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
/* FIXQ_WS_P48 row i (fixq_rt.h) into buf in the layer's weight order; one loop per filter kind
 * and nibble parity (n: the stream position in nibbles) */
static const FIXQ_MAC_T *mixed_row(const fixq_conv_t *p, int i, FIXQ_MAC_T *buf) {
    const fixq_wmix_t *m = (const fixq_wmix_t *)p->weight;
    const uint8_t *b = m->nib + (m->row16 != NULL ? (size_t)m->row16[i] : (size_t)m->row32[i]);
    int mg = p->cin / p->groups, khw = p->kh * p->kw, j, t;
    int step = p->hwc ? mg : 1, stride = p->hwc ? 1 : khw; /* buf[t * step + j * stride] */
    size_t n = 0, f0 = (size_t)i * (size_t)mg;
    if (khw == 1) { /* 1x1 filters (pointwise convs, linear layers): one code each, buf[j] */
        for (j = 0; j < mg; j++) { /* branch-free (the kinds alternate unpredictably); h is read
                                    * inside the row (the last code may be a narrow one) */
            size_t f = f0 + (size_t)j;
            unsigned narrow = ((unsigned)m->mask[f >> 3] >> (f & 7u)) & 1u;
            unsigned u = ((unsigned)b[n >> 1] >> ((unsigned)(n & 1u) * 4u)) & 15u;
            unsigned h = ((unsigned)b[narrow ? n >> 1 : (n + 1u) >> 1] >> ((unsigned)((n + 1u) & 1u) * 4u)) & 15u;
            int32_t v4 = (int32_t)(u ^ 8u) - 8, v8 = (int32_t)((u | (h << 4)) ^ 128u) - 128;
            buf[j] = (FIXQ_MAC_T)(narrow ? v4 : v8);
            n += 2u - narrow;
        }
        return buf;
    }
    for (j = 0; j < mg; j++) {
        size_t f = f0 + (size_t)j;
        FIXQ_MAC_T *d = buf + j * stride;
        const uint8_t *c = b + (n >> 1);
        if ((m->mask[f >> 3] >> (f & 7u)) & 1u) { /* 4-bit codes: low nibble first, two per byte */
            const uint8_t *q = c;
            t = 0;
            if (n & 1u) { /* the first code is the high nibble of c[0] */
                d[0] = (FIXQ_MAC_T)((int32_t)(((unsigned)q[0] >> 4) ^ 8u) - 8);
                q++;
                t = 1;
            }
            for (; t + 1 < khw; t += 2, q++) {
                d[t * step] = (FIXQ_MAC_T)((int32_t)(((unsigned)q[0] & 15u) ^ 8u) - 8);
                d[(t + 1) * step] = (FIXQ_MAC_T)((int32_t)(((unsigned)q[0] >> 4) ^ 8u) - 8);
            }
            if (t < khw) {
                d[t * step] = (FIXQ_MAC_T)((int32_t)(((unsigned)q[0] & 15u) ^ 8u) - 8);
            }
            n += (size_t)khw;
        } else if ((n & 1u) == 0u) { /* int8 codes on byte boundaries */
            for (t = 0; t < khw; t++) {
                d[t * step] = (FIXQ_MAC_T)((int32_t)(c[t] ^ 128u) - 128);
            }
            n += 2u * (size_t)khw;
        } else { /* int8 codes straddling bytes: high nibble of c[t], low nibble of c[t + 1] */
            for (t = 0; t < khw; t++) {
                unsigned u = ((unsigned)c[t] >> 4) | (((unsigned)c[t + 1] & 15u) << 4);
                d[t * step] = (FIXQ_MAC_T)((int32_t)(u ^ 128u) - 128);
            }
            n += 2u * (size_t)khw;
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
    if (p->wstore == FIXQ_WS_I8) { /* a loop of its own: vectorised */
        const int8_t *FIXQ_RESTRICT w = (const int8_t *)p->weight + e0;
        FIXQ_MAC_T *FIXQ_RESTRICT b = buf;
        for (k = 0; k < K; k++) {
            b[k] = (FIXQ_MAC_T)w[k];
        }
        return buf;
    }
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
        for (ox = 0; ox < p->ow; ox++) { /* int64 (the int32 sums: rows32) */
            rs[ox] = fixq_shl_proved(dot64(wr, col + (size_t)ox * (size_t)K, K), s);
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
    j = 0;
#if FIXQ_SSE2
    if (sizeof(FIXQ_ACT_T) == 2u && sizeof(FIXQ_MAC_T) == 2u) { /* 8 channels x 8 columns at a time */
        for (; j + 8 <= mg; j += 8) {
            const int16_t *xr = (const int16_t *)(const void *)(x + (size_t)(g * mg + j) * plane +
                                                                (size_t)iy * (size_t)p->w);
            int16_t *d = (int16_t *)(void *)(dst + (size_t)p->pw * (size_t)mg + (size_t)j);
            int q;
            for (ix = 0; ix + 8 <= p->w; ix += 8) {
                fixq_transpose8(xr + ix, plane, d + (size_t)ix * (size_t)mg, (size_t)mg);
            }
            for (; ix < p->w; ix++) {
                for (q = 0; q < 8; q++) {
                    d[(size_t)ix * (size_t)mg + (size_t)q] = xr[(size_t)q * plane + (size_t)ix];
                }
            }
        }
    }
#endif
    for (; j < mg; j++) {
        const FIXQ_ACT_T *xr = x + (size_t)(g * mg + j) * plane + (size_t)iy * (size_t)p->w;
        FIXQ_MAC_T *d = dst + (size_t)p->pw * (size_t)mg + (size_t)j;
        for (ix = 0; ix < p->w; ix++) {
            d[(size_t)ix * (size_t)mg] = (FIXQ_MAC_T)xr[ix];
        }
    }
}

/* exact sums of output channel i along output row oy from the ring of transposed rows (int64;
 * the int32 sums: rows32) */
static void hwc_row(const fixq_conv_t *p, const FIXQ_MAC_T *ring, int ns, const FIXQ_MAC_T *wr, int i, int oy,
                    int64_t *rs) {
    int mg = p->cin / p->groups, L = p->kw * mg, step = p->sw * mg, ky, ox;
    int s = p->wshift[i];
    size_t rowlen = (size_t)hwc_width(p) * (size_t)mg;
    for (ox = 0; ox < p->ow; ox++) {
        int64_t t = 0;
        for (ky = 0; ky < p->kh; ky++) {
            const FIXQ_MAC_T *xr = ring + (size_t)((oy * p->sh + ky) % ns) * rowlen;
            t += dot64(wr + ky * L, xr + (size_t)ox * (size_t)step, L);
        }
        rs[ox] = fixq_shl_proved(t, s);
    }
}

/* exact sums of output channel i (one input channel) along one output row: in acc (int32 for
 * acc32, else int64), shifted into rs unless rs is NULL */
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
    for (kx = 0; kx < p->kw; kx++) { /* the valid outputs of column kx: the same for every ky */
        int off = kx * p->dw - p->pw, sw = p->sw;
        if (sw == 1) {
            a = off < 0 ? (-off < p->ow ? -off : p->ow) : 0;
            b = p->w - off < p->ow ? p->w - off : p->ow;
            b = b < a ? a : b;
        } else {
            valid_range(p->ow, p->w, sw, off, &a, &b);
        }
        for (ky = 0; ky < p->kh; ky++) {
            int iy = oy * p->sh - p->ph + ky * p->dh;
            const FIXQ_ACT_T *xr;
            int32_t wv = wr[ky * p->kw + kx];
            if (iy < 0 || iy >= p->h) {
                continue;
            }
            xr = xg + (size_t)iy * (size_t)p->w;
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
    if (rs != NULL) {
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
 * branch-free, saturation events counted by comparison; n outputs from output row oy on (rows of
 * ow: consecutive in y); sums rs, or d << s (d != NULL, the int32 loop nests; rs is then
 * unused); returns 0 (nothing written) where the bounds lie outside the
 * accumulator range: the general epilogue's order of operations then */
static int epilogue_fast(const fixq_conv_t *p, int i, int oy, int n, const int64_t *FIXQ_RESTRICT rs,
                         const int32_t *FIXQ_RESTRICT d, int s, FIXQ_ACT_T *FIXQ_RESTRICT y, uint64_t *sat) {
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
    if (lo > hi) { /* bounds outside the accumulator range: the general epilogue's order */
        return 0;
    }
    for (ox = 0; ox < n; ox++) {
        int64_t v = asr64((d != NULL ? fixq_shl_proved((int64_t)d[ox], s) : rs[ox]) + bias, as);
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
    return 1;
}

/* the loop of epilogue32: y[k] = clamp(asr(clamp(asr((d[k] << s) + c[0], as), c[3], c[4]) + c[5], os),
 * c[6], c[7]) for k < n, events outside [c[1], c[2]] (accumulator) into ev[0], outside [c[6], c[7]]
 * (data) into ev[1]; compiled twice where FIXQ_AVX2 (a plain one, and one vectorised for AVX2) */
#define FIXQ_EPI32_LOOP(NAME, ATTR)                                                                   \
    ATTR static void NAME(int n, const int32_t *FIXQ_RESTRICT d, int s, int as, int os, const int32_t *c, \
                          FIXQ_ACT_T *FIXQ_RESTRICT y, uint32_t *ev) {                                \
        int32_t b = c[0], am = c[1], ax = c[2], lo = c[3], hi = c[4], ho = c[5], ym = c[6], yx = c[7];    \
        uint32_t ea = 0, ed = 0;                                                                      \
        int k;                                                                                        \
        for (k = 0; k < n; k++) {                                                                     \
            int32_t v = asr32((int32_t)((uint32_t)d[k] << s) + b, as);                                \
            ea += (uint32_t)((v < am) | (v > ax));                                                    \
            v = v < lo ? lo : v;                                                                      \
            v = v > hi ? hi : v;                                                                      \
            v = asr32(v + ho, os);                                                                    \
            ed += (uint32_t)((v < ym) | (v > yx));                                                    \
            v = v < ym ? ym : v;                                                                      \
            v = v > yx ? yx : v;                                                                      \
            y[k] = (FIXQ_ACT_T)v;                                                                     \
        }                                                                                             \
        ev[0] = ea;                                                                                   \
        ev[1] = ed;                                                                                   \
    }
/* the bits of every |d[k]| (of ~d[k] for d[k] < 0), k < n: -(m + 1) <= d[k] <= m */
#define FIXQ_EPI32_BITS(NAME, ATTR)                                                                   \
    ATTR static uint32_t NAME(int n, const int32_t *FIXQ_RESTRICT d) {                                \
        uint32_t m = 0;                                                                               \
        int k;                                                                                        \
        for (k = 0; k < n; k++) {                                                                     \
            m |= (uint32_t)(d[k] < 0 ? ~d[k] : d[k]);                                                 \
        }                                                                                             \
        return m;                                                                                     \
    }
FIXQ_EPI32_LOOP(epi32_loop, )
FIXQ_EPI32_BITS(epi32_bits, )
#if FIXQ_AVX2
FIXQ_EPI32_LOOP(epi32_avx2, FIXQ_AVX2_FN)
FIXQ_EPI32_BITS(epi32_bits_avx2, FIXQ_AVX2_FN)
#endif

/* epilogue_fast on int32 sums d << s, computed in int32 where the rows allow it: every
 * intermediate value is bounded first (a bound on the sums' magnitudes, the bias, the bounds
 * clipped to int32, which v never leaves); returns 0 (nothing written) otherwise */
static int epilogue32(const fixq_conv_t *p, int i, int oy, int n, const int32_t *FIXQ_RESTRICT d, int s,
                      FIXQ_ACT_T *FIXQ_RESTRICT y, uint64_t *sat) {
    int as = p->acc_shift[i], os = p->out_shift[i], up = p->rounding == FIXQ_HALF_UP;
    int ab = p->acc_bits & FIXQ_BITS_MASK, yb = p->out_bits & FIXQ_BITS_MASK;
    int64_t bias = FIXQ_TAB(p->bias, i) + (up && as > 0 ? (int64_t)1 << (as - 1) : 0);
    int64_t ho = up && os > 0 ? (int64_t)1 << (os - 1) : 0, i32min = -(int64_t)2147483647 - 1;
    int64_t amax = ((int64_t)1 << (ab - 1)) - 1, amin = -amax - 1, i32max = 2147483647;
    int64_t lo = FIXQ_TAB_HAS(p->lo) && FIXQ_TAB(p->lo, i) > amin ? FIXQ_TAB(p->lo, i) : amin;
    int64_t hi = FIXQ_TAB_HAS(p->hi) && FIXQ_TAB(p->hi, i) < amax ? FIXQ_TAB(p->hi, i) : amax;
    int64_t ymax = (p->out_bits & FIXQ_UNSIGNED) ? ((int64_t)1 << yb) - 1 : ((int64_t)1 << (yb - 1)) - 1;
    int64_t ymin = (p->out_bits & FIXQ_UNSIGNED) ? 0 : -ymax - 1;
    int64_t vmax;
    int64_t dmin, dmax;
    int32_t c[8];
    uint32_t ea, ed, m, ev[2];
    FIXQ_ACT_T *yr = y + ((size_t)i * (size_t)p->oh + (size_t)oy) * (size_t)p->ow;
    if (lo > hi || s > 30 || as > 30 || os < 0 || os > 30 || ab < 2 || yb > 31) {
        return 0;
    }
#if FIXQ_AVX2
    m = FIXQ_HAS_AVX2() ? epi32_bits_avx2(n, d) : epi32_bits(n, d);
#else
    m = epi32_bits(n, d);
#endif
    dmin = -(int64_t)m - 1;
    dmax = (int64_t)m;
    lo = lo > i32min ? lo : i32min;
    hi = hi < i32max ? hi : i32max;
    if (lo > hi) { /* a bound on the far side of int32 (lo > 2^31 - 1 or hi < -2^31): the general path */
        return 0;
    }
    if (fixq_shl_proved(dmin, s) + bias < i32min || fixq_shl_proved(dmax, s) + bias > i32max) {
        return 0;
    }
    vmax = asr64(fixq_shl_proved(dmax, s) + bias, as);
    vmax = vmax < lo ? lo : vmax;
    if ((vmax > hi ? hi : vmax) + ho > i32max) {
        return 0;
    }
    /* v = d << s + bias in [dmin << s + bias, dmax << s + bias]: int32 (dmin < 0 <= dmax, so the
     * bias alone fits too); after the shift and the clamp v <= clamp(vmax), so v + ho is int32 */
    c[0] = (int32_t)bias;
    c[1] = (int32_t)(amin > i32min ? amin : i32min);
    c[2] = (int32_t)(amax < i32max ? amax : i32max);
    c[3] = (int32_t)lo;
    c[4] = (int32_t)hi;
    c[5] = (int32_t)ho;
    c[6] = (int32_t)ymin;
    c[7] = (int32_t)ymax;
#if FIXQ_AVX2
    if (FIXQ_HAS_AVX2()) {
        epi32_avx2(n, d, s, as, os, c, yr, ev);
    } else {
        epi32_loop(n, d, s, as, os, c, yr, ev);
    }
#else
    epi32_loop(n, d, s, as, os, c, yr, ev);
#endif
    ea = ev[0];
    ed = ev[1];
    if (sat) {
        sat[0] += ea;
        sat[1] += ed;
    }
    return 1;
}

/* y != NULL: the layer's outputs; else the exact sums into s (K-means basis maps) */
static void conv_epilogue(const fixq_conv_t *p, const int64_t *basis, int i, int oy, const int64_t *rs, FIXQ_ACT_T *y,
                          uint64_t *sat) {
    if (!(basis == NULL && p->overflow == FIXQ_SATURATE && p->rounding != FIXQ_NEAREST_EVEN &&
          epilogue_fast(p, i, oy, p->ow, rs, NULL, 0, y, sat))) {
        epilogue(p, basis, i, oy, rs, y, sat);
    }
}

/* output row oy of channel i from its exact sums rs: the layer's outputs (y), else into s */
static void row_out(const fixq_conv_t *p, const int64_t *basis, int i, int oy, const int64_t *rs, FIXQ_ACT_T *y,
                    int64_t *s, uint64_t *sat) {
    int ox;
    if (y) {
        conv_epilogue(p, basis, i, oy, rs, y, sat);
        return;
    }
    for (ox = 0; ox < p->ow; ox++) {
        s[((size_t)i * (size_t)p->oh + (size_t)oy) * (size_t)p->ow + (size_t)ox] = rs[ox];
    }
}

/* row_out for output rows oy .. oy + nr - 1 of channel i from their int32 sums d[nr][ow],
 * shifted by the kernel's wshift (rs: an int64 row of scratch) */
static void rows_out32(const fixq_conv_t *p, const int64_t *basis, int i, int oy, int nr, const int32_t *d,
                       int64_t *rs, FIXQ_ACT_T *y, int64_t *s, uint64_t *sat) {
    int ox, r, sh = p->wshift[i], n = nr * p->ow;
    if (y && basis == NULL && p->overflow == FIXQ_SATURATE && p->rounding != FIXQ_NEAREST_EVEN &&
        (epilogue32(p, i, oy, n, d, sh, y, sat) || epilogue_fast(p, i, oy, n, NULL, d, sh, y, sat))) {
        return;
    }
    for (r = 0; r < nr; r++) {
        for (ox = 0; ox < p->ow; ox++) {
            rs[ox] = fixq_shl_proved((int64_t)d[r * p->ow + ox], sh);
        }
        row_out(p, basis, i, oy + r, rs, y, s, sat);
    }
}

/* the weight rows of channels i and i + 1 (if i + 1 < end) for the int32 loop nests: read as
 * stored where the kernels take the storage (FIXQ_MAC_T or int8 codes), else unpacked into
 * wbuf (2 K codes); returns the number of rows, 1 or 2 */
static int pair_rows(const fixq_conv_t *p, int i, int end, FIXQ_MAC_T *wbuf, const void **w0, const void **w1,
                     int *w8) {
    int K = conv_k(p), n = i + 1 < end ? 2 : 1;
    size_t e = (size_t)i * (size_t)K;
    *w8 = 0;
    *w1 = NULL;
    if (p->wstore == FIXQ_MAC_WS) {
        *w0 = (const FIXQ_MAC_T *)p->weight + e;
        if (n == 2) {
            *w1 = (const FIXQ_MAC_T *)p->weight + e + (size_t)K;
        }
    } else if (p->wstore == FIXQ_WS_I8) {
        *w8 = 1;
        *w0 = (const int8_t *)p->weight + e;
        if (n == 2) {
            *w1 = (const int8_t *)p->weight + e + (size_t)K;
        }
    } else {
        *w0 = weight_row(p, i, K, wbuf);
        if (n == 2) {
            *w1 = weight_row(p, i + 1, K, wbuf + K);
        }
    }
    return n;
}

/* output rows oy0 .. oy1 - 1 of group g from the hwc ring (ns rows): int32 sums of two
 * channels at a time (acc32, d: [2][FIXQ_ROWS][ow] int32), else int64 one channel at a time */
static void hwc_rows(const fixq_conv_t *p, const FIXQ_MAC_T *ring, int ns, int g, int oy0, int oy1,
                     const int64_t *basis, int32_t *d, int64_t *rs, FIXQ_MAC_T *wbuf, FIXQ_ACT_T *y, int64_t *s,
                     uint64_t *sat) {
    int mg = p->cin / p->groups, ng = p->cout / p->groups, end = (g + 1) * ng, i, n, oy, w8;
    size_t rowlen = (size_t)hwc_width(p) * (size_t)mg, d1off = (size_t)FIXQ_ROWS * (size_t)p->ow;
    const void *w0, *w1;
    for (i = g * ng; i < end; i += n) {
        if (!p->acc32) {
            const FIXQ_MAC_T *wr = weight_row(p, i, conv_k(p), wbuf);
            n = 1;
            for (oy = oy0; oy < oy1; oy++) {
                hwc_row(p, ring, ns, wr, i, oy, rs);
                row_out(p, basis, i, oy, rs, y, s, sat);
            }
            continue;
        }
        n = pair_rows(p, i, end, wbuf, &w0, &w1, &w8);
        for (oy = oy0; oy < oy1; oy++) {
            int32_t *dr = d + (size_t)(oy - oy0) * (size_t)p->ow;
            fixq_sums32(p->ow, ring, rowlen, oy * p->sh, ns, p->kh, p->kw * mg, p->sw * mg, w0, w1, w8, dr, dr + d1off);
        }
        rows_out32(p, basis, i, oy0, oy1 - oy0, d, rs, y, s, sat);
        if (n == 2) {
            rows_out32(p, basis, i + 1, oy0, oy1 - oy0, d + d1off, rs, y, s, sat);
        }
    }
}

static void conv_run(const fixq_conv_t *p, const FIXQ_ACT_T *x, FIXQ_ACT_T *y, const int64_t *basis, int64_t *s,
                     void *scratch, uint64_t *sat) {
    int K = conv_k(p), mg = p->cin / p->groups, ng = p->cout / p->groups, g, i, n, oy, w8;
    unsigned char *base = (unsigned char *)scratch;
    size_t cb = col_bytes(p);
    FIXQ_MAC_T *col = (FIXQ_MAC_T *)(void *)base;
    int64_t *rs = (int64_t *)(void *)(base + cb);
    void *acc = (void *)(base + cb + 8u * (size_t)p->ow); /* [2][FIXQ_ROWS][ow] int32, or a depthwise row */
    int32_t *d = (int32_t *)acc;
    FIXQ_MAC_T *wbuf = (FIXQ_MAC_T *)(void *)(base + cb + (8u + 8u * FIXQ_ROWS) * (size_t)p->ow);
    const void *w0, *w1;
    for (g = 0; g < p->groups; g++) {
        if (p->hwc) { /* passes of FIXQ_ROWS output rows; each input row transposed once */
            size_t rowlen = (size_t)hwc_width(p) * (size_t)mg;
            int ns = ring_rows(p), next = 0, r, oy0, oy1;
            for (oy0 = 0; oy0 < p->oh; oy0 = oy1) {
                oy1 = oy0 + FIXQ_ROWS < p->oh ? oy0 + FIXQ_ROWS : p->oh;
                for (r = next > oy0 * p->sh ? next : oy0 * p->sh; r < (oy1 - 1) * p->sh + p->kh; r++) {
                    hwc_fill(p, x, g, r, col + (size_t)(r % ns) * rowlen);
                }
                next = (oy1 - 1) * p->sh + p->kh;
                hwc_rows(p, col, ns, g, oy0, oy1, basis, d, rs, wbuf, y, s, sat);
            }
        } else if (mg > 1) {
            for (oy = 0; oy < p->oh; oy++) {
                im2col_row(p, x, g, oy, col);
                for (i = g * ng; i < (g + 1) * ng; i += n) {
                    if (p->acc32 && p->wshift_cols == 1) {
                        n = pair_rows(p, i, (g + 1) * ng, wbuf, &w0, &w1, &w8);
                        fixq_sums32(p->ow, col, 0, 0, 1, 1, K, K, w0, w1, w8, d, d + p->ow);
                        rows_out32(p, basis, i, oy, 1, d, rs, y, s, sat);
                        if (n == 2) {
                            rows_out32(p, basis, i + 1, oy, 1, d + p->ow, rs, y, s, sat);
                        }
                    } else {
                        n = 1;
                        dense_row(p, col, weight_row(p, i, K, wbuf), i, rs);
                        row_out(p, basis, i, oy, rs, y, s, sat);
                    }
                }
            }
        } else {
            for (i = g * ng; i < (g + 1) * ng; i++) {
                const FIXQ_MAC_T *wr = weight_row(p, i, K, wbuf);
                for (oy = 0; oy < p->oh && p->acc32; oy += FIXQ_ROWS) { /* int32 sums, FIXQ_ROWS rows */
                    int r, nr = p->oh - oy < FIXQ_ROWS ? p->oh - oy : FIXQ_ROWS;
                    for (r = 0; r < nr; r++) {
                        depthwise_row(p, x, wr, i, oy + r, d + (size_t)r * (size_t)p->ow, NULL);
                    }
                    rows_out32(p, basis, i, oy, nr, d, rs, y, s, sat);
                }
                for (oy = 0; oy < p->oh && !p->acc32; oy++) {
                    depthwise_row(p, x, wr, i, oy, acc, rs);
                    row_out(p, basis, i, oy, rs, y, s, sat);
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

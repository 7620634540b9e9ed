/* fixq runtime: scalar arithmetic and the element-wise/pooling kernels; see fixq_rt.h for
 * the notation. Convolutions are in fixq_rt_conv.c. */
#include "fixq_rt_gemm.h" /* fixq_rt.h, FIXQ_AVX2 */

int64_t fixq_asr(int64_t a, int s) {
    /* floor division by 2^s without relying on >> of negative numbers */
    if (s <= 0) {
        return a;
    }
    if (s > 62) {
        return a < 0 ? -1 : 0;
    }
    return a >= 0 ? (a >> s) : -(((-(a + 1)) >> s) + 1);
}

int64_t fixq_shl(int64_t a, int s) {
    /* a * 2^s for 0 <= s <= 62; the exporter proves |a| * 2^s < 2^62 (DESIGN 5a), so the
     * saturation below is never taken by an exported model: it only keeps C defined.
     * INT64_MAX / 2^s == INT64_MAX >> s and INT64_MIN / 2^s == -2^(63-s): no division */
    if (s <= 0 || a == 0) {
        return a;
    }
    if (s > 62) {
        return a > 0 ? INT64_MAX : INT64_MIN;
    }
    if (a > (INT64_MAX >> s)) {
        return INT64_MAX;
    }
    if (a < -((int64_t)1 << (63 - s))) {
        return INT64_MIN;
    }
    return (int64_t)((uint64_t)a << s);
}

int64_t fixq_round_shift(int64_t a, int s, int rounding) {
    int64_t q, r, half;
    if (s <= 0) {
        return fixq_shl(a, -s);
    }
    if (rounding == FIXQ_FLOOR) {
        return fixq_asr(a, s);
    }
    if (s > 63) {
        return 0; /* |a| < 2^63 <= 2^(s-1): rounds to 0 (a = -2^63 at s = 64 is a half: 0 too) */
    }
    if (s == 63) { /* q = floor(a / 2^63) in {-1, 0}, half = 2^62 */
        if (a >= 0) {
            return (a > ((int64_t)1 << 62) || (rounding == FIXQ_HALF_UP && a == ((int64_t)1 << 62))) ? 1 : 0;
        }
        return a >= -((int64_t)1 << 62) ? 0 : -1; /* r = a + 2^63; at r = half, q = -1 is odd: up */
    }
    q = fixq_asr(a, s);
    r = (int64_t)((uint64_t)a - ((uint64_t)q << s)); /* 0 <= r < 2^s, no signed overflow */
    half = (int64_t)1 << (s - 1);
    if (rounding == FIXQ_HALF_UP) {
        return q + (r >= half);
    }
    return q + (r > half || (r == half && (q & 1)));
}

#if FIXQ_DIV64
int64_t fixq_round_div(int64_t n, int64_t d, int rounding) {
    int64_t q = n / d, r;
    if ((n % d) != 0 && n < 0) {
        q -= 1; /* floor for d > 0 */
    }
    r = n - q * d; /* 0 <= r < d */
    if (rounding == FIXQ_FLOOR) {
        return q;
    }
    if (rounding == FIXQ_HALF_UP) {
        return q + (r >= d - r);
    }
    return q + (r > d - r || (r == d - r && (q & 1)));
}
#endif

int32_t fixq_round_div32(int32_t n, int32_t d, int rounding) {
    /* fixq_round_div for |n| < 2^31 - 1 and 0 < d < 2^31: 32-bit division only */
    int32_t q = n / d, r;
    if ((n % d) != 0 && n < 0) {
        q -= 1;
    }
    r = n - q * d;
    if (rounding == FIXQ_FLOOR) {
        return q;
    }
    if (rounding == FIXQ_HALF_UP) {
        return q + (r >= d - r);
    }
    return q + (r > d - r || (r == d - r && (q & 1)));
}

int64_t fixq_sat(int64_t v, int word, int overflow, uint64_t *events) {
    /* word: T (2..32) [| FIXQ_UNSIGNED] */
    int bits = word & FIXQ_BITS_MASK;
    int64_t hi, lo;
    if (word & FIXQ_UNSIGNED) { /* U(T,F): codes 0 .. 2^T - 1 */
        lo = 0;
        hi = ((int64_t)1 << bits) - 1;
    } else {
        hi = ((int64_t)1 << (bits - 1)) - 1;
        lo = -hi - 1;
    }
    if (v >= lo && v <= hi) {
        return v;
    }
    if (events) {
        *events += 1;
    }
    if (overflow == FIXQ_WRAP) { /* two's complement modulo 2^bits, in unsigned arithmetic */
        uint64_t m = ((uint64_t)v - (uint64_t)lo) & (((uint64_t)1 << bits) - 1);
        return (int64_t)m + lo;
    }
    return v > hi ? hi : lo;
}

static uint64_t *data_events(uint64_t *sat) {
    return sat ? sat + 1 : NULL;
}

void fixq_maxpool(const fixq_maxpool_t *p, const FIXQ_ACT_T *x, FIXQ_ACT_T *y) {
    int ch, oy, ox, ky, kx;
    for (ch = 0; ch < p->ch; ch++) {
        for (oy = 0; oy < p->oh; oy++) {
            for (ox = 0; ox < p->ow; ox++) {
                FIXQ_ACT_T m = 0;
                int any = 0;
                for (ky = 0; ky < p->kh; ky++) {
                    int iy = oy * p->sh - p->ph + ky * p->dh;
                    if (iy < 0 || iy >= p->h) {
                        continue;
                    }
                    for (kx = 0; kx < p->kw; kx++) {
                        int ix = ox * p->sw - p->pw + kx * p->dw;
                        FIXQ_ACT_T v;
                        if (ix < 0 || ix >= p->w) {
                            continue;
                        }
                        v = x[((size_t)ch * (size_t)p->h + (size_t)iy) * (size_t)p->w + (size_t)ix];
                        if (!any || v > m) {
                            m = v;
                        }
                        any = 1;
                    }
                }
                y[((size_t)ch * (size_t)p->oh + (size_t)oy) * (size_t)p->ow + (size_t)ox] = m;
            }
        }
    }
}

void fixq_avgpool(const fixq_avgpool_t *p, const FIXQ_ACT_T *x, FIXQ_ACT_T *y, uint64_t *sat) {
    int ch, oy, ox, iy, ix;
    for (ch = 0; ch < p->ch; ch++) {
        int sh = p->shift[ch];
        const FIXQ_ACT_T *xc = x + (size_t)ch * (size_t)p->h * (size_t)p->w;
        for (oy = 0; oy < p->oh; oy++) {
            for (ox = 0; ox < p->ow; ox++) {
                int64_t sum = 0, num, den, q;
                for (iy = p->h0[oy]; iy < p->h1[oy]; iy++) {
                    for (ix = p->w0[ox]; ix < p->w1[ox]; ix++) {
                        sum += xc[(size_t)iy * (size_t)p->w + (size_t)ix];
                    }
                }
                num = fixq_shl(sum, sh);
                den = fixq_shl((int64_t)p->div[oy * p->ow + ox], -sh);
#if FIXQ_DIV64
                if (p->div32) { /* both proved below 2^31 (DESIGN 5a): no 64-bit division */
                    q = fixq_round_div32((int32_t)num, (int32_t)den, p->rounding);
                } else {
                    q = fixq_round_div(num, den, p->rounding);
                }
#else /* FIXQ_DIV64 0: the exporter proved div32 for every pool */
                q = fixq_round_div32((int32_t)num, (int32_t)den, p->rounding);
#endif
                y[((size_t)ch * (size_t)p->oh + (size_t)oy) * (size_t)p->ow + (size_t)ox] =
                    (FIXQ_ACT_T)fixq_sat(q, p->out_bits, FIXQ_SATURATE, data_events(sat));
            }
        }
    }
}

/* the codes of data word `word` (T [| FIXQ_UNSIGNED]) */
static void word_limits(int word, int64_t *lo, int64_t *hi) {
    int bits = word & FIXQ_BITS_MASK;
    if (word & FIXQ_UNSIGNED) {
        *lo = 0;
        *hi = ((int64_t)1 << bits) - 1;
    } else {
        *hi = ((int64_t)1 << (bits - 1)) - 1;
        *lo = -*hi - 1;
    }
}

/* one channel of fixq_add in int32, for activations of at most 16 bits, alignment shifts <= 14
 * and 0 <= os <= 29 (half_up or floor), lo <= 2^30 and hi >= -2^30: |a << sa| + |b << sb| <= 2^30
 * and stays within [-2^30, 2^30] after the clamp, the rounding offset is below 2^29, the bounds
 * clipped to int32 (clipping a bound on the near side of the values changes no result); returns
 * the data saturation events. The loop is compiled twice where FIXQ_AVX2 (plain, and vectorised
 * for AVX2: taken where the CPU has it); c: lo, hi, the rounding offset, ylo, yhi in int32 */
#define FIXQ_ADD32(NAME, ATTR)                                                                            \
    ATTR static uint32_t NAME(int hw, const FIXQ_ACT_T *FIXQ_RESTRICT a, const FIXQ_ACT_T *FIXQ_RESTRICT b,   \
                              FIXQ_ACT_T *FIXQ_RESTRICT y, int sa, int sb, const int32_t *c, int os) {       \
        int32_t lo32 = c[0], hi32 = c[1], half = c[2], ylo32 = c[3], yhi32 = c[4];                          \
        uint32_t ev = 0;                                                                                  \
        int k;                                                                                            \
        for (k = 0; k < hw; k++) {                                                                        \
            int32_t v = (int32_t)((uint32_t)(int32_t)a[k] << sa) + (int32_t)((uint32_t)(int32_t)b[k] << sb); \
            v = v < lo32 ? lo32 : v;                                                                      \
            v = v > hi32 ? hi32 : v;                                                                      \
            v = asr32(v + half, os);                                                                      \
            ev += (uint32_t)((v < ylo32) | (v > yhi32));                                                  \
            v = v < ylo32 ? ylo32 : v;                                                                    \
            v = v > yhi32 ? yhi32 : v;                                                                    \
            y[k] = (FIXQ_ACT_T)v;                                                                         \
        }                                                                                                 \
        return ev;                                                                                        \
    }
FIXQ_ADD32(add32_loop, )
#if FIXQ_AVX2
FIXQ_ADD32(add32_avx2, FIXQ_AVX2_FN) /* the same loop vectorised for AVX2 (fixq_rt_gemm.h) */
#endif

static uint32_t add32(int hw, const FIXQ_ACT_T *a, const FIXQ_ACT_T *b, FIXQ_ACT_T *y, int sa, int sb, int64_t lo,
                      int64_t hi, int os, int rounding, int64_t ylo, int64_t yhi) {
    int32_t c[5];
    c[0] = (int32_t)(lo > -(int64_t)2147483647 - 1 ? lo : -(int64_t)2147483647 - 1);
    c[1] = (int32_t)(hi < 2147483647 ? hi : 2147483647);
    c[2] = rounding == FIXQ_HALF_UP && os > 0 ? (int32_t)1 << (os - 1) : 0;
    c[3] = (int32_t)ylo;
    c[4] = (int32_t)yhi;
#if FIXQ_AVX2
    if (FIXQ_HAS_AVX2()) {
        return add32_avx2(hw, a, b, y, sa, sb, c, os);
    }
#endif
    return add32_loop(hw, a, b, y, sa, sb, c, os);
}

void fixq_add(const fixq_add_t *p, const FIXQ_ACT_T *a, const FIXQ_ACT_T *b, FIXQ_ACT_T *y, uint64_t *sat) {
    int ch, k;
    int64_t ylo, yhi;
    word_limits(p->out_bits, &ylo, &yhi);
    for (ch = 0; ch < p->ch; ch++) {
        int has_lo = FIXQ_TAB_HAS(p->lo), has_hi = FIXQ_TAB_HAS(p->hi);
        int64_t lo = has_lo ? FIXQ_TAB(p->lo, ch) : INT64_MIN, hi = has_hi ? FIXQ_TAB(p->hi, ch) : INT64_MAX;
        int sa = p->sa[ch], sb = p->sb[ch], os = p->out_shift[ch];
        const FIXQ_ACT_T *ac = a + (size_t)ch * (size_t)p->hw, *bc = b + (size_t)ch * (size_t)p->hw;
        FIXQ_ACT_T *yc = y + (size_t)ch * (size_t)p->hw;
        if (sizeof(FIXQ_ACT_T) <= 2u && sa <= 14 && sb <= 14 && os >= 0 && os <= 29 && lo <= ((int64_t)1 << 30) &&
            hi >= -((int64_t)1 << 30) &&
            p->rounding != FIXQ_NEAREST_EVEN && (p->out_bits & FIXQ_BITS_MASK) <= 30) {
            uint32_t ev = add32(p->hw, ac, bc, yc, sa, sb, lo, hi, os, p->rounding, ylo, yhi);
            if (sat) {
                sat[1] += ev;
            }
            continue;
        }
        for (k = 0; k < p->hw; k++) {
            /* proved (DESIGN 5a): the aligned sum and the output shift stay below 2^62 */
            int64_t s = fixq_shl_proved(ac[k], sa) + fixq_shl_proved(bc[k], sb);
            if (s < lo) {
                s = lo;
            }
            if (s > hi) {
                s = hi;
            }
            s = os > 0 ? fixq_rshift_proved(s, os, p->rounding) : fixq_shl_proved(s, -os);
            if (s < ylo || s > yhi) {
                s = fixq_sat(s, p->out_bits, FIXQ_SATURATE, data_events(sat));
            }
            yc[k] = (FIXQ_ACT_T)s;
        }
    }
}

void fixq_requant(int ch, int hw, const int8_t *shift, int out_bits, int rounding,
                  const FIXQ_ACT_T *x, FIXQ_ACT_T *y, uint64_t *sat) {
    int i, k;
    for (i = 0; i < ch; i++) {
        for (k = 0; k < hw; k++) {
            size_t o = (size_t)i * (size_t)hw + (size_t)k;
            y[o] = (FIXQ_ACT_T)fixq_sat(fixq_round_shift(x[o], shift[i], rounding), out_bits, FIXQ_SATURATE,
                                        data_events(sat));
        }
    }
}

void fixq_clamp(int ch, int hw, fixq_tab_t lo, fixq_tab_t hi, const FIXQ_ACT_T *x, FIXQ_ACT_T *y) {
    int i, k;
    for (i = 0; i < ch; i++) {
        for (k = 0; k < hw; k++) {
            size_t o = (size_t)i * (size_t)hw + (size_t)k;
            int64_t v = x[o];
            if (FIXQ_TAB_HAS(lo) && v < FIXQ_TAB(lo, i)) {
                v = FIXQ_TAB(lo, i);
            }
            if (FIXQ_TAB_HAS(hi) && v > FIXQ_TAB(hi, i)) {
                v = FIXQ_TAB(hi, i);
            }
            y[o] = (FIXQ_ACT_T)v;
        }
    }
}

void fixq_pad(int ch, int h, int w, int c0, int c1, int top, int bottom, int left, int right,
              const FIXQ_ACT_T *x, FIXQ_ACT_T *y) {
    int oc = ch + c0 + c1, oh = h + top + bottom, ow = w + left + right, i, r, k;
    for (i = 0; i < oc; i++) {
        for (r = 0; r < oh; r++) {
            for (k = 0; k < ow; k++) {
                int ic = i - c0, ir = r - top, ik = k - left;
                int inside = ic >= 0 && ic < ch && ir >= 0 && ir < h && ik >= 0 && ik < w;
                y[((size_t)i * (size_t)oh + (size_t)r) * (size_t)ow + (size_t)k] =
                    inside ? x[((size_t)ic * (size_t)h + (size_t)ir) * (size_t)w + (size_t)ik] : 0;
            }
        }
    }
}

void fixq_slice(int h, int w, int cs, int cst, int oc, int hs, int hst, int oh, int ws, int wst, int ow,
                const FIXQ_ACT_T *x, FIXQ_ACT_T *y) {
    int i, r, k;
    for (i = 0; i < oc; i++) {
        for (r = 0; r < oh; r++) {
            for (k = 0; k < ow; k++) {
                y[((size_t)i * (size_t)oh + (size_t)r) * (size_t)ow + (size_t)k] =
                    x[((size_t)(cs + i * cst) * (size_t)h + (size_t)(hs + r * hst)) * (size_t)w + (size_t)(ws + k * wst)];
            }
        }
    }
}

static int64_t io_get(const void *src, int io, int k) {
    switch (io) {
    case FIXQ_IO_I8: return ((const int8_t *)src)[k];
    case FIXQ_IO_U8: return ((const uint8_t *)src)[k];
    case FIXQ_IO_I16: return ((const int16_t *)src)[k];
    case FIXQ_IO_U16: return ((const uint16_t *)src)[k];
    default: return ((const int32_t *)src)[k];
    }
}

int fixq_copy_in(int n, const void *src, int io, int64_t lo, int64_t hi, FIXQ_ACT_T *dst) {
    int k, bad = 0;
    for (k = 0; k < n; k++) {
        int64_t v = io_get(src, io, k);
        if (v < lo || v > hi) {
            bad++;
        } else {
            dst[k] = (FIXQ_ACT_T)v;
        }
    }
    return bad;
}

void fixq_copy_out(int n, const FIXQ_ACT_T *src, void *dst, int io) {
    int k;
    for (k = 0; k < n; k++) {
        switch (io) {
        case FIXQ_IO_I8: ((int8_t *)dst)[k] = (int8_t)src[k]; break;
        case FIXQ_IO_U8: ((uint8_t *)dst)[k] = (uint8_t)src[k]; break;
        case FIXQ_IO_I16: ((int16_t *)dst)[k] = (int16_t)src[k]; break;
        case FIXQ_IO_U16: ((uint16_t *)dst)[k] = (uint16_t)src[k]; break;
        default: ((int32_t *)dst)[k] = (int32_t)src[k]; break;
        }
    }
}

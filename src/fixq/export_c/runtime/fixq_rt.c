/* fixq runtime kernels; see fixq_rt.h for the notation. */
#include "fixq_rt.h"

int64_t fixq_asr(int64_t a, int s) {
    /* floor division by 2^s without relying on >> of negative numbers */
    if (s <= 0) return a;
    if (s > 62) return a < 0 ? -1 : 0;
    return a >= 0 ? (a >> s) : -(((-(a + 1)) >> s) + 1);
}

int64_t fixq_shl(int64_t a, int s) {
    /* a * 2^s for 0 <= s <= 62; the exporter proves |a| * 2^s < 2^62 (DESIGN 5a), so the
     * saturation below is never taken by an exported model: it only keeps C defined */
    int64_t m;
    if (s <= 0 || a == 0) return a;
    if (s > 62) return a > 0 ? INT64_MAX : INT64_MIN;
    m = (int64_t)1 << s;
    if (a > INT64_MAX / m) return INT64_MAX;
    if (a < INT64_MIN / m) return INT64_MIN;
    return a * m;
}

int64_t fixq_round_shift(int64_t a, int s, int rounding) {
    int64_t q, r, half;
    if (s <= 0) return fixq_shl(a, -s);
    if (rounding == FIXQ_FLOOR) return fixq_asr(a, s);
    if (s > 63) return 0; /* |a| < 2^63 <= 2^(s-1): rounds to 0 (a = -2^63 at s = 64 is a half: 0 too) */
    if (s == 63) {        /* q = floor(a / 2^63) in {-1, 0}, half = 2^62 */
        if (a >= 0) return (a > ((int64_t)1 << 62) || (rounding == FIXQ_HALF_UP && a == ((int64_t)1 << 62))) ? 1 : 0;
        return a >= -((int64_t)1 << 62) ? 0 : -1; /* r = a + 2^63; at r = half, q = -1 is odd: up */
    }
    q = fixq_asr(a, s);
    r = (int64_t)((uint64_t)a - ((uint64_t)q << s)); /* 0 <= r < 2^s, no signed overflow */
    half = (int64_t)1 << (s - 1);
    if (rounding == FIXQ_HALF_UP) return q + (r >= half);
    return q + (r > half || (r == half && (q & 1)));
}

int64_t fixq_round_div(int64_t n, int64_t d, int rounding) {
    int64_t q = n / d, r;
    if ((n % d) != 0 && n < 0) q -= 1; /* floor for d > 0 */
    r = n - q * d;                     /* 0 <= r < d */
    if (rounding == FIXQ_FLOOR) return q;
    if (rounding == FIXQ_HALF_UP) return q + (r >= d - r);
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
    if (v >= lo && v <= hi) return v;
    if (events) *events += 1;
    if (overflow == FIXQ_WRAP) { /* two's complement modulo 2^bits, in unsigned arithmetic */
        uint64_t m = ((uint64_t)v - (uint64_t)lo) & (((uint64_t)1 << bits) - 1);
        return (int64_t)m + lo;
    }
    return v > hi ? hi : lo;
}

/* exact sum of output i at (oy, ox): sum_j (sum_hw w[i,j] x[j]) << wshift[i,j] */
static int64_t conv_sum(const fixq_conv_t *p, const FIXQ_ACT_T *x, int i, int oy, int ox) {
    int mg = p->cin / p->groups, ng = p->cout / p->groups;
    int g = i / ng, j, ky, kx;
    const FIXQ_W_T *wi = p->weight + (size_t)i * mg * p->kh * p->kw;
    int64_t sum = 0;
    for (j = 0; j < mg; j++) {
        const FIXQ_ACT_T *xj = x + (size_t)(g * mg + j) * p->h * p->w;
        const FIXQ_W_T *wij = wi + (size_t)j * p->kh * p->kw;
        int64_t part = 0; /* filter partial sum p[i,j], exact */
        for (ky = 0; ky < p->kh; ky++) {
            int iy = oy * p->sh - p->ph + ky * p->dh;
            if (iy < 0 || iy >= p->h) continue;
            for (kx = 0; kx < p->kw; kx++) {
                int ix = ox * p->sw - p->pw + kx * p->dw;
                if (ix < 0 || ix >= p->w) continue;
                part += (int64_t)wij[ky * p->kw + kx] * (int64_t)xj[iy * p->w + ix];
            }
        }
        sum += fixq_shl(part, p->wshift[i * p->wshift_cols + (p->wshift_cols > 1 ? j : 0)]);
    }
    return sum;
}

void fixq_conv_sums(const fixq_conv_t *p, const FIXQ_ACT_T *x, int64_t *s) {
    int i, oy, ox;
    for (i = 0; i < p->cout; i++)
        for (oy = 0; oy < p->oh; oy++)
            for (ox = 0; ox < p->ow; ox++)
                s[((size_t)i * p->oh + oy) * p->ow + ox] = conv_sum(p, x, i, oy, ox);
}

void fixq_conv(const fixq_conv_t *p, const FIXQ_ACT_T *x, FIXQ_ACT_T *y, fixq_counts_t *c) {
    int i, oy, ox;
    for (i = 0; i < p->cout; i++) {
        for (oy = 0; oy < p->oh; oy++) {
            for (ox = 0; ox < p->ow; ox++) {
                int64_t sum = conv_sum(p, x, i, oy, ox), acc;
                if (p->basis) /* shared K-means basis map, aligned to S */
                    sum += fixq_shl(p->basis[((size_t)p->assign[i] * p->oh + oy) * p->ow + ox], p->basis_shift[i]);
                acc = fixq_round_shift(sum + p->bias[i], p->acc_shift[i], p->rounding);
                acc = fixq_sat(acc, p->acc_bits, p->overflow, &c->acc);
                if (p->lo && acc < p->lo[i]) acc = p->lo[i];
                if (p->hi && acc > p->hi[i]) acc = p->hi[i];
                acc = fixq_round_shift(acc, p->out_shift[i], p->rounding);
                y[((size_t)i * p->oh + oy) * p->ow + ox] =
                    (FIXQ_ACT_T)fixq_sat(acc, p->out_bits, FIXQ_SATURATE, &c->data);
            }
        }
    }
}

void fixq_maxpool(const fixq_maxpool_t *p, const FIXQ_ACT_T *x, FIXQ_ACT_T *y) {
    int ch, oy, ox, ky, kx;
    for (ch = 0; ch < p->ch; ch++)
        for (oy = 0; oy < p->oh; oy++)
            for (ox = 0; ox < p->ow; ox++) {
                int64_t m = INT64_MIN;
                for (ky = 0; ky < p->kh; ky++) {
                    int iy = oy * p->sh - p->ph + ky * p->dh;
                    if (iy < 0 || iy >= p->h) continue;
                    for (kx = 0; kx < p->kw; kx++) {
                        int ix = ox * p->sw - p->pw + kx * p->dw;
                        int64_t v;
                        if (ix < 0 || ix >= p->w) continue;
                        v = x[((size_t)ch * p->h + iy) * p->w + ix];
                        if (v > m) m = v;
                    }
                }
                y[((size_t)ch * p->oh + oy) * p->ow + ox] = (FIXQ_ACT_T)m;
            }
}

void fixq_avgpool(const fixq_avgpool_t *p, const FIXQ_ACT_T *x, FIXQ_ACT_T *y, fixq_counts_t *c) {
    int ch, oy, ox, iy, ix;
    for (ch = 0; ch < p->ch; ch++) {
        int sh = p->shift[ch];
        for (oy = 0; oy < p->oh; oy++)
            for (ox = 0; ox < p->ow; ox++) {
                int64_t sum = 0, num, den;
                for (iy = p->h0[oy]; iy < p->h1[oy]; iy++)
                    for (ix = p->w0[ox]; ix < p->w1[ox]; ix++)
                        sum += x[((size_t)ch * p->h + iy) * p->w + ix];
                num = fixq_shl(sum, sh);
                den = fixq_shl((int64_t)p->div[oy * p->ow + ox], -sh);
                y[((size_t)ch * p->oh + oy) * p->ow + ox] =
                    (FIXQ_ACT_T)fixq_sat(fixq_round_div(num, den, p->rounding), p->out_bits, FIXQ_SATURATE, &c->data);
            }
    }
}

void fixq_add(const fixq_add_t *p, const FIXQ_ACT_T *a, const FIXQ_ACT_T *b, FIXQ_ACT_T *y, fixq_counts_t *c) {
    int ch, k;
    for (ch = 0; ch < p->ch; ch++)
        for (k = 0; k < p->hw; k++) {
            size_t o = (size_t)ch * p->hw + k;
            int64_t s = fixq_shl(a[o], p->sa[ch]) + fixq_shl(b[o], p->sb[ch]);
            if (p->lo && s < p->lo[ch]) s = p->lo[ch];
            if (p->hi && s > p->hi[ch]) s = p->hi[ch];
            y[o] = (FIXQ_ACT_T)fixq_sat(fixq_round_shift(s, p->out_shift[ch], p->rounding), p->out_bits,
                                        FIXQ_SATURATE, &c->data);
        }
}

void fixq_requant(int ch, int hw, const int8_t *shift, int out_bits, int rounding,
                  const FIXQ_ACT_T *x, FIXQ_ACT_T *y, fixq_counts_t *c) {
    int i, k;
    for (i = 0; i < ch; i++)
        for (k = 0; k < hw; k++) {
            size_t o = (size_t)i * hw + k;
            y[o] = (FIXQ_ACT_T)fixq_sat(fixq_round_shift(x[o], shift[i], rounding), out_bits, FIXQ_SATURATE, &c->data);
        }
}

void fixq_clamp(int ch, int hw, const int64_t *lo, const int64_t *hi, const FIXQ_ACT_T *x, FIXQ_ACT_T *y) {
    int i, k;
    for (i = 0; i < ch; i++)
        for (k = 0; k < hw; k++) {
            size_t o = (size_t)i * hw + k;
            int64_t v = x[o];
            if (lo && v < lo[i]) v = lo[i];
            if (hi && v > hi[i]) v = hi[i];
            y[o] = (FIXQ_ACT_T)v;
        }
}

void fixq_pad(int ch, int h, int w, int c0, int c1, int top, int bottom, int left, int right,
              const FIXQ_ACT_T *x, FIXQ_ACT_T *y) {
    int oc = ch + c0 + c1, oh = h + top + bottom, ow = w + left + right, i, r, k;
    for (i = 0; i < oc; i++)
        for (r = 0; r < oh; r++)
            for (k = 0; k < ow; k++) {
                int ic = i - c0, ir = r - top, ik = k - left;
                int inside = ic >= 0 && ic < ch && ir >= 0 && ir < h && ik >= 0 && ik < w;
                y[((size_t)i * oh + r) * ow + k] = inside ? x[((size_t)ic * h + ir) * w + ik] : 0;
            }
}

void fixq_slice(int h, int w, int cs, int cst, int oc, int hs, int hst, int oh, int ws, int wst, int ow,
                const FIXQ_ACT_T *x, FIXQ_ACT_T *y) {
    int i, r, k;
    for (i = 0; i < oc; i++)
        for (r = 0; r < oh; r++)
            for (k = 0; k < ow; k++)
                y[((size_t)i * oh + r) * ow + k] = x[((size_t)(cs + i * cst) * h + hs + r * hst) * w + ws + k * wst];
}

/* fixq runtime: element-wise kernels; see fixq_rt_elementwise.h for the notation. */
#include "fixq_rt_elementwise.h"

void fixq_table(const fixq_table_t *p, const FIXQ_ACT_T *x, FIXQ_ACT_T *y, uint64_t *sat) {
    int bits = p->in_bits & FIXQ_BITS_MASK, ch, k;
    int64_t size = (int64_t)1 << bits;
    int64_t qmin = (p->in_bits & FIXQ_UNSIGNED) ? 0 : -(size >> 1);
    for (ch = 0; ch < p->ch; ch++) {
        int64_t base = (int64_t)p->index[ch] * size;
        const FIXQ_ACT_T *xc = x + (size_t)ch * (size_t)p->hw;
        FIXQ_ACT_T *yc = y + (size_t)ch * (size_t)p->hw;
        for (k = 0; k < p->hw; k++) {
            size_t e = (size_t)(base + ((int64_t)xc[k] - qmin));
            int64_t v = p->t8 ? (int64_t)p->t8[e] : p->u8 ? (int64_t)p->u8[e]
                      : p->t16 ? (int64_t)p->t16[e] : (int64_t)p->t32[e];
            yc[k] = (FIXQ_ACT_T)v;
            if (sat && p->flags && p->flags[e]) {
                sat[1] += 1u;
            }
        }
    }
}

void fixq_table_seg(const fixq_table_seg_t *p, const FIXQ_ACT_T *x, FIXQ_ACT_T *y, uint64_t *sat) {
    int32_t qmin = (p->in_bits & FIXQ_UNSIGNED) ? 0 : -((int32_t)1 << ((p->in_bits & FIXQ_BITS_MASK) - 1));
    int ch, k;
    for (ch = 0; ch < p->ch; ch++) {
        int32_t first = p->offset[p->index[ch]], last = p->offset[p->index[ch] + 1] - 1;
        const FIXQ_ACT_T *xc = x + (size_t)ch * (size_t)p->hw;
        FIXQ_ACT_T *yc = y + (size_t)ch * (size_t)p->hw;
        for (k = 0; k < p->hw; k++) {
            int32_t v = (int32_t)xc[k] - qmin, lo = first, hi = last; /* 0 <= v < 2^16 */
            int32_t c;
            size_t e;
            while (lo < hi) { /* start[lo] <= v, and v < start[hi + 1] when hi < last */
                int32_t mid = lo + (int32_t)((uint32_t)(hi - lo + 1) >> 1);
                if ((int32_t)p->start[mid] <= v) {
                    lo = mid;
                } else {
                    hi = mid - 1;
                }
            }
            e = (size_t)lo;
            c = p->c8 ? (int32_t)p->c8[e] : p->u8 ? (int32_t)p->u8[e] : p->c16 ? (int32_t)p->c16[e] : p->c32[e];
            if (p->step) { /* the exporter checked that every entry, hence this sum, is a T-bit code */
                c += (int32_t)p->step[e] * ((v - (int32_t)p->start[e]) >> (p->mode ? (p->mode[e] & 31u) : 0u));
            }
            yc[k] = (FIXQ_ACT_T)c;
            if (sat && p->mode && (p->mode[e] & 128u)) {
                sat[1] += 1u;
            }
        }
    }
}

void fixq_mul(const fixq_mul_t *p, const FIXQ_ACT_T *a, const FIXQ_ACT_T *b, FIXQ_ACT_T *y, uint64_t *sat) {
    int hw = p->hw_a > p->hw_b ? p->hw_a : p->hw_b, ch, k;
    uint64_t *events = sat ? sat + 1 : NULL;
    for (ch = 0; ch < p->ch; ch++) {
        const FIXQ_ACT_T *ac = a + (size_t)ch * (size_t)p->hw_a, *bc = b + (size_t)ch * (size_t)p->hw_b;
        FIXQ_ACT_T *yc = y + (size_t)ch * (size_t)hw;
        for (k = 0; k < hw; k++) {
            int64_t prod = (int64_t)ac[p->hw_a == 1 ? 0 : k] * (int64_t)bc[p->hw_b == 1 ? 0 : k]; /* exact */
            yc[k] = (FIXQ_ACT_T)fixq_sat(fixq_round_shift(prod, p->shift[ch], p->rounding), p->out_bits,
                                         FIXQ_SATURATE, events);
        }
    }
}

void fixq_shuffle(int ch, int hw, int groups, const FIXQ_ACT_T *x, FIXQ_ACT_T *y) {
    int per = ch / groups, i, j, k;
    for (i = 0; i < per; i++) {
        for (j = 0; j < groups; j++) {
            const FIXQ_ACT_T *src = x + (size_t)(j * per + i) * (size_t)hw;
            FIXQ_ACT_T *dst = y + (size_t)(i * groups + j) * (size_t)hw;
            for (k = 0; k < hw; k++) {
                dst[k] = src[k];
            }
        }
    }
}

/* fixq runtime: the int32 dot-product kernels of the conv loop nests (fixq_rt_gemm.h; DESIGN.md
 * section 5c). Notation in fixq_rt.h: codes at their formats, sums exact in int32 (the layers
 * that call these are proved to fit, acc32).
 */
#include "fixq_rt_gemm.h"

/* the register-blocked dot products of the int32 loop nests: NB (2 or 1) weight rows against
 * 4 input windows `step` apart (each x load serves NB rows, each w load 4 windows), length n,
 * added to o0[0..3] (and o1[0..3]); SUF _w8: the layer's int8 codes read as stored (widened
 * in the loop: no unpacked copy), _wm: FIXQ_MAC_T rows. gcc -O3 turns each loop into 16x16->32
 * multiply-adds (pmaddwd on SSE2) */
#define FIXQ_DOT_KERNELS(SUF, WT)                                                                 \
    static void dot2x4##SUF(const WT *FIXQ_RESTRICT w0, const WT *FIXQ_RESTRICT w1,               \
                            const FIXQ_MAC_T *FIXQ_RESTRICT x, int n, int step, int32_t *o0,      \
                            int32_t *o1) {                                                        \
        int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0;                   \
        const FIXQ_MAC_T *x1 = x + step, *x2 = x + 2 * step, *x3 = x + 3 * step;                  \
        int k;                                                                                    \
        for (k = 0; k < n; k++) {                                                                 \
            int32_t u = w0[k], v = w1[k];                                                         \
            a0 += u * (int32_t)x[k];                                                              \
            a1 += u * (int32_t)x1[k];                                                             \
            a2 += u * (int32_t)x2[k];                                                             \
            a3 += u * (int32_t)x3[k];                                                             \
            b0 += v * (int32_t)x[k];                                                              \
            b1 += v * (int32_t)x1[k];                                                             \
            b2 += v * (int32_t)x2[k];                                                             \
            b3 += v * (int32_t)x3[k];                                                             \
        }                                                                                         \
        o0[0] += a0;                                                                              \
        o0[1] += a1;                                                                              \
        o0[2] += a2;                                                                              \
        o0[3] += a3;                                                                              \
        o1[0] += b0;                                                                              \
        o1[1] += b1;                                                                              \
        o1[2] += b2;                                                                              \
        o1[3] += b3;                                                                              \
    }                                                                                             \
    static void dot1x4##SUF(const WT *FIXQ_RESTRICT w, const FIXQ_MAC_T *FIXQ_RESTRICT x, int n,  \
                            int step, int32_t *o) {                                               \
        int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;                                                   \
        const FIXQ_MAC_T *x1 = x + step, *x2 = x + 2 * step, *x3 = x + 3 * step;                  \
        int k;                                                                                    \
        for (k = 0; k < n; k++) {                                                                 \
            int32_t u = w[k];                                                                     \
            a0 += u * (int32_t)x[k];                                                              \
            a1 += u * (int32_t)x1[k];                                                             \
            a2 += u * (int32_t)x2[k];                                                             \
            a3 += u * (int32_t)x3[k];                                                             \
        }                                                                                         \
        o[0] += a0;                                                                               \
        o[1] += a1;                                                                               \
        o[2] += a2;                                                                               \
        o[3] += a3;                                                                               \
    }                                                                                             \
    static int32_t dot1##SUF(const WT *FIXQ_RESTRICT w, const FIXQ_MAC_T *FIXQ_RESTRICT x, int n) { \
        int32_t a = 0;                                                                            \
        int k;                                                                                    \
        for (k = 0; k < n; k++) {                                                                 \
            a += (int32_t)w[k] * (int32_t)x[k];                                                   \
        }                                                                                         \
        return a;                                                                                 \
    }

FIXQ_DOT_KERNELS(_w8, int8_t)
FIXQ_DOT_KERNELS(_wm, FIXQ_MAC_T)

/* the portable loops of fixq_sums32 (fixq_rt_gemm.h): weight rows w0 and w1 (w1 NULL: one), int8 codes
 * (w8) or FIXQ_MAC_T, into d0[ox] (d1[ox]) for ox < ow: seg segments of length L, segment t of
 * output ox at x + ((r0 + t) % ns) * rowlen + ox * step, weights w + t * L (the hwc ring of ns
 * rows: seg = kh; an im2col row: ns = seg = 1, L = step = K) */
static void sums32(int ow, const FIXQ_MAC_T *x, size_t rowlen, int r0, int ns, int seg, int L,
                   int step, const void *w0, const void *w1, int w8, int32_t *d0, int32_t *d1) {
    int ox, t, q, slot;
    for (ox = 0; ox + 4 <= ow; ox += 4) {
        for (q = 0; q < 4; q++) {
            d0[ox + q] = 0;
            if (w1) {
                d1[ox + q] = 0;
            }
        }
        for (t = 0, slot = r0 % ns; t < seg; t++, slot = slot + 1 < ns ? slot + 1 : 0) {
            const FIXQ_MAC_T *xr = x + (size_t)slot * rowlen + (size_t)ox * (size_t)step;
            size_t o = (size_t)t * (size_t)L;
            if (w8 && w1) {
                dot2x4_w8((const int8_t *)w0 + o, (const int8_t *)w1 + o, xr, L, step, d0 + ox, d1 + ox);
            } else if (w8) {
                dot1x4_w8((const int8_t *)w0 + o, xr, L, step, d0 + ox);
            } else if (w1) {
                dot2x4_wm((const FIXQ_MAC_T *)w0 + o, (const FIXQ_MAC_T *)w1 + o, xr, L, step, d0 + ox, d1 + ox);
            } else {
                dot1x4_wm((const FIXQ_MAC_T *)w0 + o, xr, L, step, d0 + ox);
            }
        }
    }
    for (; ox < ow; ox++) {
        int32_t a = 0, b = 0;
        for (t = 0, slot = r0 % ns; t < seg; t++, slot = slot + 1 < ns ? slot + 1 : 0) {
            const FIXQ_MAC_T *xr = x + (size_t)slot * rowlen + (size_t)ox * (size_t)step;
            size_t o = (size_t)t * (size_t)L;
            if (w8) {
                a += dot1_w8((const int8_t *)w0 + o, xr, L);
                b += w1 ? dot1_w8((const int8_t *)w1 + o, xr, L) : 0;
            } else {
                a += dot1_wm((const FIXQ_MAC_T *)w0 + o, xr, L);
                b += w1 ? dot1_wm((const FIXQ_MAC_T *)w1 + o, xr, L) : 0;
            }
        }
        d0[ox] = a;
        if (w1) {
            d1[ox] = b;
        }
    }
}

#if FIXQ_SSE2
/* x86-64 (SSE2 is part of its baseline): the int32 sums with explicit 16x16->32 multiply-adds
 * (pmaddwd) where FIXQ_MAC_T is int16; -DFIXQ_NO_SIMD keeps the portable loops above */
#include <emmintrin.h>
/* gcc and clang (the compilers that define __SSE2__): each kernel stays a function of its own;
 * inlined together into fixq_sums32 they spill accumulators to the stack (measured: -35%) */
#define FIXQ_NOINLINE __attribute__((noinline))

/* the four lane sums of a, b, c, e as one vector */
static __m128i hsum4(__m128i a, __m128i b, __m128i c, __m128i e) {
    __m128i ab0 = _mm_unpacklo_epi32(a, b), ab1 = _mm_unpackhi_epi32(a, b);
    __m128i ce0 = _mm_unpacklo_epi32(c, e), ce1 = _mm_unpackhi_epi32(c, e);
    __m128i ab = _mm_add_epi32(ab0, ab1), ce = _mm_add_epi32(ce0, ce1);
    return _mm_add_epi32(_mm_unpacklo_epi64(ab, ce), _mm_unpackhi_epi64(ab, ce));
}

#define FIXQ_LD(ptr) _mm_loadu_si128((const __m128i *)(const void *)(ptr))

/* the 8 x 8 int16 block x[r * xs + c] (r, c < 8) transposed into d[c * ds + r] */
void fixq_transpose8(const int16_t *x, size_t xs, int16_t *d, size_t ds) {
    __m128i r0 = FIXQ_LD(x), r1 = FIXQ_LD(x + xs), r2 = FIXQ_LD(x + 2u * xs), r3 = FIXQ_LD(x + 3u * xs);
    __m128i r4 = FIXQ_LD(x + 4u * xs), r5 = FIXQ_LD(x + 5u * xs), r6 = FIXQ_LD(x + 6u * xs);
    __m128i r7 = FIXQ_LD(x + 7u * xs);
    __m128i t0 = _mm_unpacklo_epi16(r0, r1), t1 = _mm_unpackhi_epi16(r0, r1);
    __m128i t2 = _mm_unpacklo_epi16(r2, r3), t3 = _mm_unpackhi_epi16(r2, r3);
    __m128i t4 = _mm_unpacklo_epi16(r4, r5), t5 = _mm_unpackhi_epi16(r4, r5);
    __m128i t6 = _mm_unpacklo_epi16(r6, r7), t7 = _mm_unpackhi_epi16(r6, r7);
    __m128i u0 = _mm_unpacklo_epi32(t0, t2), u1 = _mm_unpackhi_epi32(t0, t2);
    __m128i u2 = _mm_unpacklo_epi32(t1, t3), u3 = _mm_unpackhi_epi32(t1, t3);
    __m128i u4 = _mm_unpacklo_epi32(t4, t6), u5 = _mm_unpackhi_epi32(t4, t6);
    __m128i u6 = _mm_unpacklo_epi32(t5, t7), u7 = _mm_unpackhi_epi32(t5, t7);
    _mm_storeu_si128((__m128i *)(void *)d, _mm_unpacklo_epi64(u0, u4));
    _mm_storeu_si128((__m128i *)(void *)(d + ds), _mm_unpackhi_epi64(u0, u4));
    _mm_storeu_si128((__m128i *)(void *)(d + 2u * ds), _mm_unpacklo_epi64(u1, u5));
    _mm_storeu_si128((__m128i *)(void *)(d + 3u * ds), _mm_unpackhi_epi64(u1, u5));
    _mm_storeu_si128((__m128i *)(void *)(d + 4u * ds), _mm_unpacklo_epi64(u2, u6));
    _mm_storeu_si128((__m128i *)(void *)(d + 5u * ds), _mm_unpackhi_epi64(u2, u6));
    _mm_storeu_si128((__m128i *)(void *)(d + 6u * ds), _mm_unpacklo_epi64(u3, u7));
    _mm_storeu_si128((__m128i *)(void *)(d + 7u * ds), _mm_unpackhi_epi64(u3, u7));
}

/* 8 int8 codes at ptr as int16 lanes (sign-extended) */
static __m128i fixq_ld8(const int8_t *ptr) {
    __m128i b = _mm_loadl_epi64((const __m128i *)(const void *)ptr);
    return _mm_srai_epi16(_mm_unpacklo_epi8(b, b), 8);
}

/* sums32 for weight rows w0, w1 (both given; the same row twice where one is wanted) of WT
 * (int16_t, or int8_t widened in the loop: WLD): 2 channels x 4 outputs per step, every segment
 * accumulated in registers, one horizontal sum per 4 outputs; a row's last outputs (fewer than
 * 4) repeat output ox in the missing lanes */
#define FIXQ_SSE2_SUMS(NAME, WT, WLD)                                                                        \
    FIXQ_NOINLINE static void NAME(int ow, const int16_t *x, size_t rowlen, int r0, int ns, int seg,  \
                                   int L, int step, const WT *w0, const WT *w1, int32_t *d0, int32_t *d1) { \
        int ox, t, k, q, slot, L8 = L & ~7;                                                                  \
        for (ox = 0; ox < ow; ox += 4) {                                                                  \
            __m128i a0 = _mm_setzero_si128(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0; \
            int32_t ta[4] = {0, 0, 0, 0}, tb[4] = {0, 0, 0, 0}, ra[4], rb[4];                                \
            int np = ow - ox < 4 ? ow - ox : 4;                                                        \
            size_t o1 = np > 1 ? (size_t)step : 0u, o2 = np > 2 ? 2u * (size_t)step : 0u;                    \
            size_t o3 = np > 3 ? 3u * (size_t)step : 0u;                                                     \
            for (t = 0, slot = r0 % ns; t < seg; t++, slot = slot + 1 < ns ? slot + 1 : 0) {                 \
                const int16_t *x0 = x + (size_t)slot * rowlen + (size_t)ox * (size_t)step;                   \
                const int16_t *x1 = x0 + o1, *x2 = x0 + o2, *x3 = x0 + o3;                                   \
                const WT *u0 = w0 + (size_t)t * (size_t)L, *v0 = w1 + (size_t)t * (size_t)L;                 \
                for (k = 0; k < L8; k += 8) {                                                                \
                    __m128i u = WLD(u0 + k), v = WLD(v0 + k), z;                                             \
                    z = FIXQ_LD(x0 + k);                                                                     \
                    a0 = _mm_add_epi32(a0, _mm_madd_epi16(u, z));                                            \
                    b0 = _mm_add_epi32(b0, _mm_madd_epi16(v, z));                                            \
                    z = FIXQ_LD(x1 + k);                                                                     \
                    a1 = _mm_add_epi32(a1, _mm_madd_epi16(u, z));                                            \
                    b1 = _mm_add_epi32(b1, _mm_madd_epi16(v, z));                                            \
                    z = FIXQ_LD(x2 + k);                                                                     \
                    a2 = _mm_add_epi32(a2, _mm_madd_epi16(u, z));                                            \
                    b2 = _mm_add_epi32(b2, _mm_madd_epi16(v, z));                                            \
                    z = FIXQ_LD(x3 + k);                                                                     \
                    a3 = _mm_add_epi32(a3, _mm_madd_epi16(u, z));                                            \
                    b3 = _mm_add_epi32(b3, _mm_madd_epi16(v, z));                                            \
                }                                                                                            \
                for (; k < L; k++) {                                                                         \
                    int32_t u = u0[k], v = v0[k];                                                            \
                    ta[0] += u * x0[k];                                                                      \
                    ta[1] += u * x1[k];                                                                      \
                    ta[2] += u * x2[k];                                                                      \
                    ta[3] += u * x3[k];                                                                      \
                    tb[0] += v * x0[k];                                                                      \
                    tb[1] += v * x1[k];                                                                      \
                    tb[2] += v * x2[k];                                                                      \
                    tb[3] += v * x3[k];                                                                      \
                }                                                                                            \
            }                                                                                                \
            a0 = hsum4(a0, a1, a2, a3);                                                                      \
            b0 = hsum4(b0, b1, b2, b3);                                                                      \
            if (np == 4 && L8 == L) {                                                                        \
                _mm_storeu_si128((__m128i *)(void *)(d0 + ox), a0);                                          \
                _mm_storeu_si128((__m128i *)(void *)(d1 + ox), b0);                                          \
                continue;                                                                                    \
            }                                                                                                \
            _mm_storeu_si128((__m128i *)(void *)ra, a0);                                                     \
            _mm_storeu_si128((__m128i *)(void *)rb, b0);                                                     \
            for (q = 0; q < np; q++) {                                                                       \
                d0[ox + q] = ra[q] + ta[q];                                                                  \
                d1[ox + q] = rb[q] + tb[q];                                                                  \
            }                                                                                                \
        }                                                                                                    \
    }

FIXQ_SSE2_SUMS(sums32_sse2, int16_t, FIXQ_LD)
FIXQ_SSE2_SUMS(sums32_sse2_w8, int8_t, fixq_ld8)
#endif

#if FIXQ_AVX2
/* x86-64 CPUs with AVX2 (checked at run time in fixq_sums32; compiled without -march through
 * the target attribute): the SSE2 kernels above on 256-bit registers, 16 products per vpmaddwd.
 * Same pairs (k, k + 1) for even k as SSE2, the same wrapping adds: the same int32 sums */
#include <immintrin.h>

/* the eight lane sums of a, b, c, e (one output each) folded into one 128-bit vector */
FIXQ_AVX2_FN static __m128i hsum4x8(__m256i a, __m256i b, __m256i c, __m256i e) {
    __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, e));
    return _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
}

#define FIXQ_LD256(ptr) _mm256_loadu_si256((const __m256i *)(const void *)(ptr))
/* a 128-bit vector in the low half, zeros above */
#define FIXQ_ZX(v) _mm256_inserti128_si256(_mm256_setzero_si256(), (v), 0)

/* 16 int8 codes at ptr as int16 lanes (sign-extended) */
FIXQ_AVX2_FN static __m256i fixq_ld8x16(const int8_t *ptr) {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(const void *)ptr));
}

/* FIXQ_SSE2_SUMS on 256-bit registers for L % 8 == 0 (the caller takes SSE2 otherwise): 16
 * codes per step, then one step of 8 (upper half zero) where L % 16 == 8; no scalar tail, so the
 * eight accumulators stay in registers; WLD16 / WLD8 load 16 / 8 weights as int16 lanes */
#define FIXQ_AVX2_SUMS(NAME, WT, WLD16, WLD8)                                                                \
    FIXQ_AVX2_FN FIXQ_NOINLINE static void NAME(int ow, const int16_t *x, size_t rowlen, int r0, int ns, int seg, \
                                                int L, int step, const WT *w0, const WT *w1, int32_t *d0,   \
                                                int32_t *d1) {                                              \
        int ox, t, k, q, slot, L16 = L & ~15;                                                                \
        for (ox = 0; ox < ow; ox += 4) {                                                                     \
            __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0; \
            __m128i sa, sb;                                                                                  \
            int np = ow - ox < 4 ? ow - ox : 4;                                                              \
            size_t o1 = np > 1 ? (size_t)step : 0u, o2 = np > 2 ? 2u * (size_t)step : 0u;                    \
            size_t o3 = np > 3 ? 3u * (size_t)step : 0u;                                                     \
            for (t = 0, slot = r0 % ns; t < seg; t++, slot = slot + 1 < ns ? slot + 1 : 0) {                 \
                const int16_t *x0 = x + (size_t)slot * rowlen + (size_t)ox * (size_t)step;                   \
                const int16_t *x1 = x0 + o1, *x2 = x0 + o2, *x3 = x0 + o3;                                   \
                const WT *u0 = w0 + (size_t)t * (size_t)L, *v0 = w1 + (size_t)t * (size_t)L;                 \
                __m256i u, v, z;                                                                             \
                for (k = 0; k < L16; k += 16) {                                                              \
                    u = WLD16(u0 + k);                                                                       \
                    v = WLD16(v0 + k);                                                                       \
                    z = FIXQ_LD256(x0 + k);                                                                  \
                    a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(u, z));                                      \
                    b0 = _mm256_add_epi32(b0, _mm256_madd_epi16(v, z));                                      \
                    z = FIXQ_LD256(x1 + k);                                                                  \
                    a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(u, z));                                      \
                    b1 = _mm256_add_epi32(b1, _mm256_madd_epi16(v, z));                                      \
                    z = FIXQ_LD256(x2 + k);                                                                  \
                    a2 = _mm256_add_epi32(a2, _mm256_madd_epi16(u, z));                                      \
                    b2 = _mm256_add_epi32(b2, _mm256_madd_epi16(v, z));                                      \
                    z = FIXQ_LD256(x3 + k);                                                                  \
                    a3 = _mm256_add_epi32(a3, _mm256_madd_epi16(u, z));                                      \
                    b3 = _mm256_add_epi32(b3, _mm256_madd_epi16(v, z));                                      \
                }                                                                                            \
                if (k < L) {                                                                                 \
                    u = FIXQ_ZX(WLD8(u0 + k));                                                               \
                    v = FIXQ_ZX(WLD8(v0 + k));                                                               \
                    z = FIXQ_ZX(FIXQ_LD(x0 + k));                                                            \
                    a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(u, z));                                      \
                    b0 = _mm256_add_epi32(b0, _mm256_madd_epi16(v, z));                                      \
                    z = FIXQ_ZX(FIXQ_LD(x1 + k));                                                            \
                    a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(u, z));                                      \
                    b1 = _mm256_add_epi32(b1, _mm256_madd_epi16(v, z));                                      \
                    z = FIXQ_ZX(FIXQ_LD(x2 + k));                                                            \
                    a2 = _mm256_add_epi32(a2, _mm256_madd_epi16(u, z));                                      \
                    b2 = _mm256_add_epi32(b2, _mm256_madd_epi16(v, z));                                      \
                    z = FIXQ_ZX(FIXQ_LD(x3 + k));                                                            \
                    a3 = _mm256_add_epi32(a3, _mm256_madd_epi16(u, z));                                      \
                    b3 = _mm256_add_epi32(b3, _mm256_madd_epi16(v, z));                                      \
                }                                                                                            \
            }                                                                                                \
            sa = hsum4x8(a0, a1, a2, a3);                                                                    \
            sb = hsum4x8(b0, b1, b2, b3);                                                                    \
            if (np == 4) {                                                                                   \
                _mm_storeu_si128((__m128i *)(void *)(d0 + ox), sa);                                          \
                _mm_storeu_si128((__m128i *)(void *)(d1 + ox), sb);                                          \
            } else {                                                                                         \
                int32_t ra[4], rb[4];                                                                        \
                _mm_storeu_si128((__m128i *)(void *)ra, sa);                                                 \
                _mm_storeu_si128((__m128i *)(void *)rb, sb);                                                 \
                for (q = 0; q < np; q++) {                                                                   \
                    d0[ox + q] = ra[q];                                                                      \
                    d1[ox + q] = rb[q];                                                                      \
                }                                                                                            \
            }                                                                                                \
        }                                                                                                    \
    }

FIXQ_AVX2_SUMS(sums32_avx2, int16_t, FIXQ_LD256, FIXQ_LD)
FIXQ_AVX2_SUMS(sums32_avx2_w8, int8_t, fixq_ld8x16, fixq_ld8)
#endif

/* tests only (tests/test_export_c_kernels.py): which kernel a call took, 2 AVX2, 1 SSE2, 0 portable */
#ifndef FIXQ_TEST_TAKEN
#define FIXQ_TEST_TAKEN(k) ((void)0)
#endif

void fixq_sums32(int ow, const FIXQ_MAC_T *x, size_t rowlen, int r0, int ns, int seg, int L, int step,
                 const void *w0, const void *w1, int w8, int32_t *d0, int32_t *d1) {
#if FIXQ_AVX2
    if (sizeof(FIXQ_MAC_T) == 2u && L % 8 == 0 && FIXQ_HAS_AVX2()) { /* a load and a test */
        FIXQ_TEST_TAKEN(2);
        if (w8) {
            sums32_avx2_w8(ow, (const int16_t *)(const void *)x, rowlen, r0, ns, seg, L, step, (const int8_t *)w0,
                           (const int8_t *)(w1 != NULL ? w1 : w0), d0, d1);
        } else {
            sums32_avx2(ow, (const int16_t *)(const void *)x, rowlen, r0, ns, seg, L, step, (const int16_t *)w0,
                        (const int16_t *)(w1 != NULL ? w1 : w0), d0, d1);
        }
        return;
    }
#endif
#if FIXQ_SSE2
    if (sizeof(FIXQ_MAC_T) == 2u) {
        FIXQ_TEST_TAKEN(1);
        if (w8) {
            sums32_sse2_w8(ow, (const int16_t *)(const void *)x, rowlen, r0, ns, seg, L, step, (const int8_t *)w0,
                           (const int8_t *)(w1 != NULL ? w1 : w0), d0, d1);
        } else {
            sums32_sse2(ow, (const int16_t *)(const void *)x, rowlen, r0, ns, seg, L, step, (const int16_t *)w0,
                        (const int16_t *)(w1 != NULL ? w1 : w0), d0, d1);
        }
        return;
    }
#endif
    FIXQ_TEST_TAKEN(0);
    sums32(ow, x, rowlen, r0, ns, seg, L, step, w0, w1, w8, d0, d1);
}

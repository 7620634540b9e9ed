/* fixq runtime: the int32 dot-product kernels of the conv loop nests (fixq_rt_conv.c; DESIGN.md
 * section 5c). Portable C loops register-blocked 2 output channels x 4 outputs; on x86-64 (SSE2,
 * its baseline: no -march needed) the same sums with explicit 16x16->32 multiply-adds, and with
 * gcc/clang AVX2 kernels taken at run time on CPUs that have AVX2 (dot lengths L % 8 == 0),
 * unless -DFIXQ_NO_SIMD (or -DFIXQ_NO_AVX2: SSE2 only). Sums are int32: callers use them only
 * for layers proved to fit (acc32).
 */
#ifndef FIXQ_RT_GEMM_H
#define FIXQ_RT_GEMM_H
#include "fixq_rt.h"

/* the operand type of the dot products (im2col rows, unpacked weight rows): int16 where
 * activations and weights fit 16 bits, so that compilers use 16x16->32 multiply-adds */
#ifndef FIXQ_MAC_T
#define FIXQ_MAC_T int32_t
#define FIXQ_MAC_WS FIXQ_WS_I32
#endif

#if defined(__SSE2__) && !defined(FIXQ_NO_SIMD)
#define FIXQ_SSE2 1
#else
#define FIXQ_SSE2 0
#endif
/* gcc and clang on x86-64: AVX2 variants compiled beside the SSE2 kernels (target attribute, no
 * -march needed) and taken when the CPU has AVX2 (__builtin_cpu_supports, per call);
 * -DFIXQ_NO_AVX2 keeps SSE2; older compilers (gcc < 4.9, clang < 3.8) cannot use AVX2 intrinsics
 * inside target("avx2") functions and keep SSE2. __builtin_cpu_supports reads libgcc's (or
 * compiler-rt's) __cpu_model: a freestanding -nostdlib x86-64 build links -lgcc or sets FIXQ_NO_AVX2 */
#if defined(__clang__)
#define FIXQ_AVX2_CC ((__clang_major__ > 3) || (__clang_major__ == 3 && __clang_minor__ >= 8))
#elif defined(__GNUC__)
#define FIXQ_AVX2_CC ((__GNUC__ > 4) || (__GNUC__ == 4 && __GNUC_MINOR__ >= 9))
#else
#define FIXQ_AVX2_CC 0
#endif
#if FIXQ_SSE2 && defined(__x86_64__) && FIXQ_AVX2_CC && !defined(FIXQ_NO_AVX2)
#define FIXQ_AVX2 1
#else
#define FIXQ_AVX2 0
#endif
#if FIXQ_AVX2
/* a function compiled for AVX2 (plain C loops inside are vectorised on 256-bit registers); call
 * it only where FIXQ_HAS_AVX2() */
#define FIXQ_AVX2_FN __attribute__((target("avx2")))
#define FIXQ_HAS_AVX2() __builtin_cpu_supports("avx2")
#endif

/* floor(v / 2^s) for 0 <= s <= 31, without >> of a negative number: the int32 requantization
 * loops of fixq_rt.c (add32) and fixq_rt_conv.c (epilogue32) */
static inline int32_t asr32(int32_t v, int s) {
    return v >= 0 ? v >> s : ~((~v) >> s);
}

/* int32 sums of the output channels with weight rows w0 and w1 (w1 NULL: one channel), int8
 * codes (w8) or FIXQ_MAC_T, into d0[ox] (and d1[ox]) for ox < ow: seg segments of length L,
 * segment t of output ox at x + ((r0 + t) % ns) * rowlen + ox * step, weights w + t * L (the
 * hwc ring of ns rows: seg = kh; an im2col row: ns = seg = 1, L = step = K); d1 is written
 * (scratch) even when w1 is NULL */
void fixq_sums32(int ow, const FIXQ_MAC_T *x, size_t rowlen, int r0, int ns, int seg, int L, int step,
                 const void *w0, const void *w1, int w8, int32_t *d0, int32_t *d1);
/* FIXQ_SSE2 only: the 8 x 8 int16 block x[r * xs + c] (r, c < 8) transposed into d[c * ds + r] */
void fixq_transpose8(const int16_t *x, size_t xs, int16_t *d, size_t ds);
#endif

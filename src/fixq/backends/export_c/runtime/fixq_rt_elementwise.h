/* fixq runtime: element-wise kernels of mobile CNNs (DESIGN.md section 5b).
 *
 * Notation as in fixq_rt.h: codes at F fractional bits, data word T [| FIXQ_UNSIGNED],
 * round_shift and sat as there. Activations are NCHW, batch 1; no heap, no floating point, no
 * mutable globals; `uint64_t *sat` counts saturation events (sat[1]: data) or is NULL.
 * - table function: y = table[index[c]][x - qmin] (output codes computed by the exporter
 *   from the float function and the formats; qmin = -2^(T-1), or 0 for unsigned data)
 * - segmented table function (inputs wider than 10 bits, the same table stored losslessly):
 *   in table k = index[c], i = the last segment with start[i] <= x - qmin (binary search), then
 *   y = code[i] + step[i] * ((x - qmin - start[i]) >> shift[i])
 * - multiply: y = sat(round_shift(a * b, Fa + Fb - Fy)), one operand may be one value per
 *   channel (hw 1, broadcast over the other's hw)
 * - channel shuffle with g groups: output channel i*g + j is input channel j*(ch/g) + i
 */
#ifndef FIXQ_RT_ELEMENTWISE_H
#define FIXQ_RT_ELEMENTWISE_H
#include "fixq_rt.h"

typedef struct {
    int ch, hw;
    int in_bits;             /* input data word: T [| FIXQ_UNSIGNED]; each table has 2^T entries */
    const int8_t *t8;        /* [K][2^T] output codes: exactly one of t8, u8, t16, t32 is not NULL */
    const uint8_t *u8;
    const int16_t *t16;
    const int32_t *t32;
    const uint16_t *index;   /* [ch]: which of the K tables serves channel c */
    const uint8_t *flags;    /* [K][2^T]: 1 where the entry saturated (counted), or NULL: none did */
} fixq_table_t;
void fixq_table(const fixq_table_t *p, const FIXQ_ACT_T *x, FIXQ_ACT_T *y, uint64_t *sat);

typedef struct {
    int ch, hw;
    int in_bits;             /* input data word: T [| FIXQ_UNSIGNED], T <= 16 */
    const int32_t *offset;   /* [K+1]: table k is segments offset[k] .. offset[k+1]-1 */
    const uint16_t *start;   /* [S]: first input code of each segment minus qmin, ascending in a table from 0 */
    const int8_t *c8;        /* [S] output code at start: exactly one of c8, u8, c16, c32 is not NULL */
    const uint8_t *u8;
    const int16_t *c16;
    const int32_t *c32;
    const int8_t *step;      /* [S]: output code step per 2^shift input codes, or NULL: all 0 */
    const uint8_t *mode;     /* [S]: bits 0-4 shift, bit 7 set where the entries saturated (counted); NULL: all 0 */
    const uint16_t *index;   /* [ch]: which of the K tables serves channel c */
} fixq_table_seg_t;
void fixq_table_seg(const fixq_table_seg_t *p, const FIXQ_ACT_T *x, FIXQ_ACT_T *y, uint64_t *sat);

typedef struct {
    int ch, hw_a, hw_b;      /* values per channel of each operand: hw, or 1 (broadcast) */
    const int8_t *shift;     /* [ch]: Fa + Fb - Fy */
    int out_bits, rounding;
} fixq_mul_t;
void fixq_mul(const fixq_mul_t *p, const FIXQ_ACT_T *a, const FIXQ_ACT_T *b, FIXQ_ACT_T *y, uint64_t *sat);

void fixq_shuffle(int ch, int hw, int groups, const FIXQ_ACT_T *x, FIXQ_ACT_T *y);
#endif

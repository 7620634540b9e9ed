/* fixq: run the exported model on a file of inputs.
 *   ./model inputs.bin outputs.bin N
 * inputs.bin: N x FIXQ_IN_SIZE codes of FIXQ_ACT_T (NCHW, native endianness);
 * outputs.bin: N x FIXQ_OUT_SIZE int32 output codes. Saturation totals go to stderr. */
#include <stdio.h>
#include <stdlib.h>
#include "model.h"

int main(int argc, char **argv) {
    FILE *fi, *fo;
    long n, k;
    int j;
    uint64_t acc = 0, data = 0;
    if (argc != 4) {
        fprintf(stderr, "usage: %s inputs.bin outputs.bin N\n", argv[0]);
        return 2;
    }
    fi = fopen(argv[1], "rb");
    fo = fopen(argv[2], "wb");
    n = atol(argv[3]);
    if (!fi || !fo) {
        fprintf(stderr, "cannot open %s or %s\n", argv[1], argv[2]);
        return 2;
    }
    for (k = 0; k < n; k++) {
        const FIXQ_ACT_T *o;
        if (fread(fixq_model_input(), sizeof(FIXQ_ACT_T), FIXQ_IN_SIZE, fi) != FIXQ_IN_SIZE) {
            fprintf(stderr, "input %ld: file too short\n", k);
            return 2;
        }
        fixq_model_run();
        o = fixq_model_output();
        for (j = 0; j < FIXQ_OUT_SIZE; j++) {
            int32_t v = (int32_t)o[j];
            fwrite(&v, sizeof v, 1, fo);
        }
    }
    for (j = 0; j < FIXQ_N_NODES; j++) {
        acc += fixq_counts[j].acc;
        data += fixq_counts[j].data;
    }
    fprintf(stderr, "saturations acc %llu data %llu\n", (unsigned long long)acc, (unsigned long long)data);
    fclose(fi);
    fclose(fo);
    return 0;
}

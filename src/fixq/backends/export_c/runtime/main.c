/* fixq verification harness: run the exported model on a file of inputs.
 *   ./model inputs.bin outputs.bin N [codes|pixels]
 * codes (default): N x FIXQ_MODEL_IN_SIZE input codes of fixq_model_in_t (NCHW, native
 * endianness); pixels: N x FIXQ_MODEL_IN_SIZE uint8 pixels (CHW), turned into codes by
 * fixq_model_pixels(). outputs.bin: N x FIXQ_MODEL_OUT_SIZE int32 output codes.
 * Saturation totals (built with -DFIXQ_COUNTS=1) go to stderr. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "model.h"

static fixq_model_in_t in[FIXQ_MODEL_IN_SIZE];
static uint8_t pix[FIXQ_MODEL_IN_SIZE];
static fixq_model_out_t out[FIXQ_MODEL_OUT_SIZE];
FIXQ_MODEL_ARENA_DEFINE(arena);
#ifdef FIXQ_TICKS
uint64_t fixq_ticks(void); /* the target's clock (the Cortex-M4 start file: SysTick) */
#endif

int main(int argc, char **argv) {
    FILE *fi, *fo;
    long n, k;
    int j, pixels, st;
    fixq_model_ctx ctx;
#ifdef FIXQ_TICKS
    uint64_t ticks = 0, t0;
#endif
    if (argc != 4 && argc != 5) {
        fprintf(stderr, "usage: %s inputs.bin outputs.bin N [codes|pixels]\n", argv[0]);
        return 2;
    }
    pixels = argc == 5 && strcmp(argv[4], "pixels") == 0;
    fi = fopen(argv[1], "rb");
    fo = fopen(argv[2], "wb");
    n = atol(argv[3]);
    if (!fi || !fo) {
        fprintf(stderr, "cannot open %s or %s\n", argv[1], argv[2]);
        return 2;
    }
    if (fixq_model_init(&ctx, arena, sizeof arena) != FIXQ_OK) {
        fprintf(stderr, "fixq_model_init failed\n");
        return 2;
    }
    for (k = 0; k < n; k++) {
        if (pixels) {
            if (fread(pix, 1, FIXQ_MODEL_IN_SIZE, fi) != FIXQ_MODEL_IN_SIZE ||
                fixq_model_pixels(pix, FIXQ_CHW, in) != FIXQ_OK) {
                fprintf(stderr, "input %ld: file too short or no pixel table\n", k);
                return 2;
            }
        } else if (fread(in, sizeof in[0], FIXQ_MODEL_IN_SIZE, fi) != FIXQ_MODEL_IN_SIZE) {
            fprintf(stderr, "input %ld: file too short\n", k);
            return 2;
        }
#ifdef FIXQ_TICKS
        t0 = fixq_ticks();
        st = fixq_model_run(&ctx, in, out);
        ticks += fixq_ticks() - t0;
#else
        st = fixq_model_run(&ctx, in, out);
#endif
        if (st != FIXQ_OK) {
            fprintf(stderr, "input %ld: fixq_model_run returned %d\n", k, st);
            return 3;
        }
        for (j = 0; j < FIXQ_MODEL_OUT_SIZE; j++) {
            int32_t v = (int32_t)out[j];
            fwrite(&v, sizeof v, 1, fo);
        }
    }
#if FIXQ_COUNTS
    {
        uint64_t acc = 0, data = 0;
        for (j = 0; j < FIXQ_MODEL_N_NODES; j++) {
            acc += ctx.sat[j][0];
            data += ctx.sat[j][1];
        }
        fprintf(stderr, "saturations acc %llu data %llu\n", (unsigned long long)acc, (unsigned long long)data);
    }
#endif
#ifdef FIXQ_TICKS
    fprintf(stderr, "ticks %llu\n", (unsigned long long)ticks);
#endif
    fclose(fi);
    fclose(fo);
    return 0;
}

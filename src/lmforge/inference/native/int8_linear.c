/* Weight-only int8 linear layer for decoding: y = (x @ W^T) * scale (+ bias), where W is int8
 * (out x in, row-major), scale one float per output channel, x float32 (rows x in, rows small);
 * and the same for 4-bit weights in blocks of 32 with a scale and minimum each (int4_linear).
 *
 * Decoding multiplies each weight matrix by a handful of vectors, so the time is the time to read
 * the weights: int8 reads a quarter of float32's bytes. PyTorch's own weight-only int8 kernel has
 * no fast path on CPUs without AVX-512 (measured 27x slower than float32 on an AVX2 EPYC), hence
 * this one: each thread takes a contiguous band of output channels and streams its weight rows
 * once. The input rows are first rounded to int16 per block of 64 values (one float scale per
 * block: a relative error below 2e-5 of the block's largest value, far below int8 weights' own) so
 * that weights multiply with integer `madd`s, 16 products an instruction (int8_dot.h); each block's
 * weights are widened once and multiplied into up to 8 rows' sums held in registers, so the
 * weights are read once per call whatever the batch.
 *
 * float_linear multiplies float32 or bfloat16 weights (the latter widened to float32 in registers)
 * into float32 inputs, summed in float32: the product of the native decode step for float models.
 *
 * Built on first use with the system C compiler (-O3 -march=native -fopenmp, see __init__.py);
 * OpenMP resolves to the libgomp that PyTorch has already loaded, so both share one thread pool.
 */
#include <stdint.h>
#include <stdlib.h>

#include "int8_dot.h"

int wide_int8[2] = {0, 0}; /* the 256-bit loop until both have been timed (set_wide_products) */
int64_t amx_rows = 0;      /* no AMX tiles until enable_amx (int8_inputs.h) */

/* y = x @ W^T for one layer L (int8 or 4-bit) and `rows` rows of x. Returns 0, or -1 when memory
 * for the rounded input could not be had (y untouched). */
static int linear(const Linear *L, const float *x, float *y, int64_t rows, int threads) {
    int16_t *q = malloc(sizeof(int16_t) * rounded_values(rows, L->in)); /* shared by the threads below */
    float *qs = malloc(sizeof(float) * rounded_scales(rows, L->in));
    float *xsum = malloc(sizeof(float) * block_sums(rows, L->in));
    const int ok = q && qs && xsum;
    if (ok) {
        Team team = {0, 0};
#pragma omp parallel num_threads(threads)
        linear_rows(L, x, y, rows, q, qs, xsum, &team);
    }
    free(q), free(qs), free(xsum);
    return ok ? 0 : -1;
}

int int8_linear(const float *x, const int8_t *w, const float *scale, const float *bias, float *y, int64_t rows,
                int64_t in, int64_t out, int threads, int int8_inputs) {
    const Linear L = {w, scale, NULL, NULL, NULL, NULL, NULL, bias, in, out, int8_inputs};
    return linear(&L, x, y, rows, threads);
}

/* 4-bit weights (int8_dot.h's layout, half-precision scales and minima); in a multiple of 32. */
int int4_linear(const float *x, const uint8_t *w4, const uint16_t *block_scale, const uint16_t *block_min,
                const float *bias, float *y, int64_t rows, int64_t in, int64_t out, int threads) {
    const Linear L = {NULL, NULL, w4, block_scale, block_min, NULL, NULL, bias, in, out, 0};
    return linear(&L, x, y, rows, threads);
}

/* Float weights: float32 (`w32`) or bfloat16 (`w16`, the other NULL); the product in float32. */
int float_linear(const float *x, const float *w32, const uint16_t *w16, const float *bias, float *y, int64_t rows,
                 int64_t in, int64_t out, int threads) {
    const Linear L = {NULL, NULL, NULL, NULL, NULL, w32, w16, bias, in, out, 0};
    return linear(&L, x, y, rows, threads);
}

/* Which int8 products take the 512-bit VNNI loop (nonzero) or the 256-bit one, for one input row and
 * for several (native/__init__.py times both; they give the same results). Returns 1 where this
 * build has the 512-bit loop, else 0 (and the settings are ignored). */
int set_wide_products(int one_row, int several_rows) {
#ifdef HAVE_WIDE_PRODUCTS
    wide_int8[0] = one_row != 0, wide_int8[1] = several_rows != 0;
    return 1;
#else
    (void)one_row, (void)several_rows;
    return 0;
#endif
}

/* Int8 inputs (int8_inputs.h): 1 where this build has them, else 0 (and Linear's int8_inputs is
 * ignored: the inputs are rounded to int16). */
int has_int8_inputs(void) {
#ifdef HAVE_INT8_INPUTS
    return 1;
#else
    return 0;
#endif
}

/* From how many rows products with int8 inputs take AMX tiles (0: never). Returns 1 where this build
 * has AMX and Linux lets the process use it (asked once), else 0 (and the setting is ignored). */
int set_amx_rows(int64_t rows) {
#ifdef HAVE_AMX
    static int allowed = -1;
    if (allowed < 0) allowed = ask_for_amx();
    amx_rows = allowed ? rows : 0;
    return allowed;
#else
    (void)rows;
    return 0;
#endif
}

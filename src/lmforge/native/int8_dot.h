/* Int8 dot products shared by int8_linear.c (one linear layer) and decode_step.c (a whole decode
 * step): see int8_linear.c for why they look the way they do. `linear_rows` is an orphaned OpenMP
 * loop: it must be called from inside a parallel region, whose threads share its output rows.
 */
#ifndef LMFORGE_INT8_DOT_H
#define LMFORGE_INT8_DOT_H
#include <math.h>
#include <stdint.h>

#define ROUND_BLOCK 64 /* values that share one int16 scale (see dot_rows_int16) */
#define OUT_TILE 16    /* output channels whose weights a thread keeps in the L1 cache (linear_rows) */

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Inputs rounded to int16 per block of ROUND_BLOCK values (round_rows below): weights then multiply
 * with integer `madd`s, 16 products an instruction with the sums in int32, where widening them to
 * float does 8 an FMA. Measured on a Zen 3 core (576 x 1536 int8 matrix, 8 rows, weights in the
 * cache): 61 GMAC/s against 42 for float FMAs; blocks of 32 gave 54 (one float FMA per block is the
 * overhead) and of 192 46 (the widened weights no longer fit the registers). */

/* out[r] = sum over blocks b of (sum_k w[k] * q[r][k]) * qs[r][b] for R (at most 8) rows: each
 * block's weights are widened once and multiplied into every row. One float accumulator per row,
 * in the same order whatever R is, so a row's result does not depend on the rows beside it. */
static inline void dot_rows_int16(const int8_t *w, const int16_t *q, const float *qs, int64_t in, const int R,
                                  float *out) {
    const int64_t blocks = in / ROUND_BLOCK, scales = (in + ROUND_BLOCK - 1) / ROUND_BLOCK;
    __m256 acc[8];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        const int8_t *wb = w + b * ROUND_BLOCK;
        __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)wb));
        __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wb + 16)));
        __m256i w2 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wb + 32)));
        __m256i w3 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wb + 48)));
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            const __m256i *qb = (const __m256i *)(q + r * in + b * ROUND_BLOCK);
            __m256i sum = _mm256_add_epi32(
                _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256(qb)),
                                 _mm256_madd_epi16(w1, _mm256_loadu_si256(qb + 1))),
                _mm256_add_epi32(_mm256_madd_epi16(w2, _mm256_loadu_si256(qb + 2)),
                                 _mm256_madd_epi16(w3, _mm256_loadu_si256(qb + 3))));
            /* |sum| <= 8 * 128 * 32767 < 2^25: the conversion to float rounds by at most 2^-24 */
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(qs[r * scales + b]), acc[r]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        float total = hsum(acc[r]);
        if (blocks < scales) { /* the last, shorter block */
            int32_t tail = 0;
            for (int64_t k = blocks * ROUND_BLOCK; k < in; k++) tail += (int32_t)w[k] * q[r * in + k];
            total += (float)tail * qs[r * scales + blocks];
        }
        out[r] = total;
    }
}
#define HAVE_INT16_PATH 1

#else /* portable C: the compiler vectorises what it can for this CPU */
static float dot_int8(const int8_t *w, const float *x, int64_t n) {
    float sum = 0.0f;
    for (int64_t k = 0; k < n; k++) sum += (float)w[k] * x[k];
    return sum;
}
static void dot_rows(const int8_t *w, const float *x, int64_t in, const int R, float *out) {
    for (int r = 0; r < R; r++) out[r] = dot_int8(w, x + r * in, in);
}
#endif

#ifdef HAVE_INT16_PATH
/* Each of `rows` rows of x rounded to int16 per block of ROUND_BLOCK values (the last may be shorter):
 * q = round(x / s), s = max|x_block| / 32767, a relative error below 2e-5 of the block's largest
 * value, far below that of int8 weights. Shared among the threads of the enclosing region; the
 * barrier that ends the loop publishes q and qs to all of them. */
static void round_rows(const float *x, int64_t rows, int64_t in, int16_t *q, float *qs) {
    const int64_t scales = (in + ROUND_BLOCK - 1) / ROUND_BLOCK;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t b = 0; b < scales; b++) {
            const float *xb = x + r * in + b * ROUND_BLOCK;
            int16_t *qb = q + r * in + b * ROUND_BLOCK;
            const int64_t n = b * ROUND_BLOCK + ROUND_BLOCK <= in ? ROUND_BLOCK : in - b * ROUND_BLOCK;
            float largest = 0.0f;
            for (int64_t j = 0; j < n; j++) largest = fmaxf(largest, fabsf(xb[j]));
            float inverse = largest > 0.0f ? 32767.0f / largest : 0.0f;
            qs[r * scales + b] = largest / 32767.0f;
            for (int64_t j = 0; j < n; j++) qb[j] = (int16_t)lrintf(xb[j] * inverse);
        }
}
#endif

/* Room linear_rows needs for `rows` rounded input rows of `in` values: int16 values and float scales. */
static inline int64_t rounded_values(int64_t rows, int64_t in) { return rows * in; }
static inline int64_t rounded_scales(int64_t rows, int64_t in) { return rows * ((in + ROUND_BLOCK - 1) / ROUND_BLOCK); }

/* y (rows x out) = x (rows x in) @ w^T * scale (+ bias), shared among the threads of the enclosing
 * parallel region: each thread takes a band of output channels and reads their weights once for
 * all rows, 8 rows at a time. q/qs: room for the rounded input (rounded_values / rounded_scales;
 * unused by the portable build, whose products are in float). */
static void linear_rows(const float *x, const int8_t *w, const float *scale, const float *bias, float *y,
                        int64_t rows, int64_t in, int64_t out, int16_t *q, float *qs) {
#ifdef HAVE_INT16_PATH
    const int64_t scales = (in + ROUND_BLOCK - 1) / ROUND_BLOCK;
    round_rows(x, rows, in, q, qs);
#define PRODUCT(R) dot_rows_int16(wo, q + r0 * in, qs + r0 * scales, in, R, sums)
#else
    (void)q, (void)qs;
#define PRODUCT(R) dot_rows(wo, x + r0 * in, in, R, sums)
#endif
#ifdef HAVE_INT16_PATH
    if (rows == 1) {
#pragma omp for schedule(static)
        for (int64_t o = 0; o < out; o++) {
            float sum;
            dot_rows_int16(w + o * in, q, qs, in, 1, &sum);
            y[o] = sum * scale[o] + (bias ? bias[o] : 0.0f);
        }
        return;
    }
#endif
    /* Output channels in tiles of OUT_TILE: a tile's weights and a group of 8 input rows both stay in
     * the L1 cache while every pair meets (for a long prompt, the rows would not fit it whole). */
    const int64_t tiles = (out + OUT_TILE - 1) / OUT_TILE;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t tile_end = (t + 1) * OUT_TILE < out ? (t + 1) * OUT_TILE : out;
        for (int64_t r0 = 0; r0 < rows; r0 += 8) {
            const int64_t left = rows - r0;
            for (int64_t o = t * OUT_TILE; o < tile_end; o++) {
                const int8_t *wo = w + o * in;
                float b = bias ? bias[o] : 0.0f, sums[8];
                switch (left >= 8 ? 8 : (int)left) { /* R a constant: the sums stay in registers */
                case 8: PRODUCT(8); break;
                case 7: PRODUCT(7); break;
                case 6: PRODUCT(6); break;
                case 5: PRODUCT(5); break;
                case 4: PRODUCT(4); break;
                case 3: PRODUCT(3); break;
                case 2: PRODUCT(2); break;
                default: PRODUCT(1); break;
                }
                for (int64_t r = 0; r < 8 && r < left; r++) y[(r0 + r) * out + o] = sums[r] * scale[o] + b;
            }
        }
    }
#undef PRODUCT
}

#endif

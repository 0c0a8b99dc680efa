/* Int8 dot products shared by int8_linear.c (one linear layer) and decode_step.c (a whole decode
 * step): see int8_linear.c for why they look the way they do. `linear_rows` is an orphaned OpenMP
 * loop: it must be called from inside a parallel region, whose threads share its output rows.
 */
#ifndef LMFORGE_INT8_DOT_H
#define LMFORGE_INT8_DOT_H
#include <math.h>
#include <stdint.h>

#define MAX_INT16_IN 16384 /* the longest input row the int16 path rounds (room on the stack) */

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256 widen(__m128i eight_bytes) { /* low 8 int8 -> 8 float */
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eight_bytes));
}

/* sum_k w[k] * x[k] for int8 w */
static float dot_int8(const int8_t *w, const float *x, int64_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
           a3 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= n; k += 32) {
        __m256i w32 = _mm256_loadu_si256((const __m256i *)(w + k));
        __m128i lo = _mm256_castsi256_si128(w32), hi = _mm256_extracti128_si256(w32, 1);
        a0 = _mm256_fmadd_ps(widen(lo), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(widen(_mm_srli_si128(lo, 8)), _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(widen(hi), _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(widen(_mm_srli_si128(hi, 8)), _mm256_loadu_ps(x + k + 24), a3);
    }
    float sum = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < n; k++) sum += (float)w[k] * x[k];
    return sum;
}

/* sum over blocks of 32 of (sum_k w[k] * q[k]) * qs[block], q the input rounded to int16 */
static float dot_int16(const int8_t *w, const int16_t *q, const float *qs, int64_t blocks) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b < blocks; b++) {
        const int8_t *wb = w + b * 32;
        const int16_t *qb = q + b * 32;
        __m256i lo = _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)wb)),
                                       _mm256_loadu_si256((const __m256i *)qb));
        __m256i hi = _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wb + 16))),
                                       _mm256_loadu_si256((const __m256i *)(qb + 16)));
        __m256 block = _mm256_cvtepi32_ps(_mm256_add_epi32(lo, hi)); /* |sum| <= 4*127*32768 < 2^24: exact */
        if (b & 1)
            a1 = _mm256_fmadd_ps(block, _mm256_set1_ps(qs[b]), a1);
        else
            a0 = _mm256_fmadd_ps(block, _mm256_set1_ps(qs[b]), a0);
    }
    return hsum(_mm256_add_ps(a0, a1));
}
#define HAVE_INT16_PATH 1

/* out[r] = sum_k w[k] * x[r * in + k] for R (at most 8) rows: each 8 weights converted once */
static inline void dot_rows(const int8_t *w, const float *x, int64_t in, const int R, float *out) {
    __m256 acc[8];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= in; k += 8) {
        __m256 wf = widen(_mm_loadl_epi64((const __m128i *)(w + k)));
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) acc[r] = _mm256_fmadd_ps(wf, _mm256_loadu_ps(x + r * in + k), acc[r]);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        float sum = hsum(acc[r]);
        for (int64_t j = k; j < in; j++) sum += (float)w[j] * x[r * in + j];
        out[r] = sum;
    }
}
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

/* x rounded to int16 per block of 32: q = round(x / s), s = max|x_block| / 32767 */
static void round_to_int16(const float *x, int64_t in, int16_t *q, float *qs) {
    for (int64_t b = 0; b < in / 32; b++) {
        float largest = 0.0f;
        for (int j = 0; j < 32; j++) largest = fmaxf(largest, fabsf(x[b * 32 + j]));
        float inverse = largest > 0.0f ? 32767.0f / largest : 0.0f;
        qs[b] = largest / 32767.0f;
        for (int j = 0; j < 32; j++) q[b * 32 + j] = (int16_t)lrintf(x[b * 32 + j] * inverse);
    }
}

/* y (rows x out) = x (rows x in) @ w^T * scale (+ bias), shared among the threads of the enclosing
 * parallel region; q/qs: room for `in` int16 values and in/32 scales (the rounded input row). */
static void linear_rows(const float *x, const int8_t *w, const float *scale, const float *bias, float *y,
                        int64_t rows, int64_t in, int64_t out, int16_t *q, float *qs) {
#ifdef HAVE_INT16_PATH
    if (rows == 1 && in % 32 == 0 && in <= MAX_INT16_IN) {
#pragma omp single
        round_to_int16(x, in, q, qs); /* the implicit barrier after `single` publishes q to all threads */
#pragma omp for schedule(static)
        for (int64_t o = 0; o < out; o++)
            y[o] = dot_int16(w + o * in, q, qs, in / 32) * scale[o] + (bias ? bias[o] : 0.0f);
        return;
    }
#endif
#pragma omp for schedule(static)
    for (int64_t o = 0; o < out; o++) {
        const int8_t *wo = w + o * in;
        float b = bias ? bias[o] : 0.0f;
        if (rows == 1) {
            y[o] = dot_int8(wo, x, in) * scale[o] + b;
            continue;
        }
        float sums[8];
        for (int64_t r0 = 0; r0 < rows; r0 += 8) {
            int64_t left = rows - r0;
            const float *xr = x + r0 * in;
            switch (left >= 8 ? 8 : (int)left) { /* constant R: the sums stay in registers */
            case 8: dot_rows(wo, xr, in, 8, sums); break;
            case 7: dot_rows(wo, xr, in, 7, sums); break;
            case 6: dot_rows(wo, xr, in, 6, sums); break;
            case 5: dot_rows(wo, xr, in, 5, sums); break;
            case 4: dot_rows(wo, xr, in, 4, sums); break;
            case 3: dot_rows(wo, xr, in, 3, sums); break;
            case 2: dot_rows(wo, xr, in, 2, sums); break;
            default: dot_rows(wo, xr, in, 1, sums); break;
            }
            for (int64_t r = 0; r < 8 && r < left; r++) y[(r0 + r) * out + o] = sums[r] * scale[o] + b;
        }
    }
}

#endif

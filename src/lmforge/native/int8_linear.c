/* Weight-only int8 linear layer for decoding: y = (x @ W^T) * scale (+ bias), where W is int8
 * (out x in, row-major), scale one float per output channel, x float32 (rows x in, rows small).
 *
 * Decoding multiplies each weight matrix by a handful of vectors, so the time is the time to read
 * the weights: int8 reads a quarter of float32's bytes. PyTorch's own weight-only int8 kernel has
 * no fast path on CPUs without AVX-512 (measured 27x slower than float32 on an AVX2 EPYC), hence
 * this one: each thread takes a contiguous band of output channels and streams its weight rows
 * once, converting 32 int8 weights at a time to float and accumulating with FMA into four
 * independent sums (one sum would wait on the FMA latency). With several input rows the weight
 * row is converted once into a float buffer that stays in L1 and reused for every input row.
 *
 * Built on first use with the system C compiler (-O3 -march=native -fopenmp, see __init__.py);
 * OpenMP resolves to the libgomp that PyTorch has already loaded, so both share one thread pool.
 */
#include <stdint.h>
#include <stdlib.h>

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

/* sum_k w[k] * x[k] for float w (the converted weight row) */
static float dot_float(const float *w, const float *x, int64_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
           a3 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= n; k += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
    }
    float sum = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < n; k++) sum += w[k] * x[k];
    return sum;
}
#else /* portable C: the compiler vectorises what it can for this CPU */
static float dot_int8(const int8_t *w, const float *x, int64_t n) {
    float sum = 0.0f;
    for (int64_t k = 0; k < n; k++) sum += (float)w[k] * x[k];
    return sum;
}
static float dot_float(const float *w, const float *x, int64_t n) {
    float sum = 0.0f;
    for (int64_t k = 0; k < n; k++) sum += w[k] * x[k];
    return sum;
}
#endif

void int8_linear(const float *x, const int8_t *w, const float *scale, const float *bias, float *y,
                 int64_t rows, int64_t in, int64_t out, int threads) {
#pragma omp parallel num_threads(threads)
    {
        float *row = rows > 1 ? (float *)malloc(sizeof(float) * in) : NULL;
#pragma omp for schedule(static)
        for (int64_t o = 0; o < out; o++) {
            const int8_t *wo = w + o * in;
            float b = bias ? bias[o] : 0.0f;
            if (rows == 1) {
                y[o] = dot_int8(wo, x, in) * scale[o] + b;
                continue;
            }
            for (int64_t k = 0; k < in; k++) row[k] = (float)wo[k];
            for (int64_t r = 0; r < rows; r++) y[r * out + o] = dot_float(row, x + r * in, in) * scale[o] + b;
        }
        free(row);
    }
}

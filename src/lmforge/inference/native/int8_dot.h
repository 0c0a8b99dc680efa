/* Int8 and 4-bit dot products shared by int8_linear.c (one linear layer) and decode_step.c (a whole
 * decode step): see int8_linear.c for why they look the way they do. `linear_rows` is an orphaned
 * OpenMP loop: it must be called from inside a parallel region, whose threads share its output rows
 * and meet at the region's Team (team_wait) when it is done.
 */
#ifndef LMFORGE_INT8_DOT_H
#define LMFORGE_INT8_DOT_H
#include <math.h>
#include <omp.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>

/* Where the threads of a parallel region meet between operations (team_wait), in place of the
 * barrier that ends an `omp for`. Why: libgomp's own barrier spins only briefly, then sleeps in the
 * kernel, whenever it manages more threads than there are CPUs, which it does as soon as a second
 * thread runs OpenMP code (PyTorch's main thread has a team, the server's engine thread another).
 * Each of a decode step's ~300 barriers then costs a sleep and a wake-up: SmolLM2's one-row int8 step
 * measured 15.3 ms on the engine thread against 5.1 on the main thread (2-core Zen 4). Spinning here,
 * it takes the same time on either. A thread that waits long (its partner descheduled) yields the CPU
 * rather than spin through the other's time slice. */
typedef struct {
    atomic_int arrived; /* threads at the barrier in this phase */
    atomic_int phase;   /* barriers passed */
} Team;

#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#else
#define CPU_RELAX() ((void)0)
#endif
#define SPINS_BEFORE_YIELD 20000 /* ~0.3 ms of pause instructions */

/* Every thread of the enclosing parallel region calls it; it returns once all of them have, with
 * what each wrote before it visible to all (release by the last to arrive, acquire by the others). */
static void team_wait(Team *team) {
    const int threads = omp_get_num_threads();
    if (threads == 1) return;
    const int phase = atomic_load_explicit(&team->phase, memory_order_relaxed);
    if (atomic_fetch_add_explicit(&team->arrived, 1, memory_order_acq_rel) == threads - 1) {
        atomic_store_explicit(&team->arrived, 0, memory_order_relaxed);
        atomic_store_explicit(&team->phase, phase + 1, memory_order_release);
        return;
    }
    for (long spins = 0; atomic_load_explicit(&team->phase, memory_order_acquire) == phase; spins++) {
        if (spins < SPINS_BEFORE_YIELD)
            CPU_RELAX();
        else
            sched_yield();
    }
}

/* Whether int8 products take the 512-bit loop (dot_rows_int16_wide), [0] for one input row and [1]
 * for several: set by set_wide_products (int8_linear.c, which holds it) from the timings
 * native/__init__.py takes. (A 512-bit loop for float weights measured faster on its own but slower
 * inside a SmolLM2 decode step on a Zen 5, 25 against 17.5 ms at 8 rows: there is none.) */
extern int wide_int8[2];

#define ROUND_BLOCK 64 /* values that share one int16 scale (see dot_rows_int16) */
#define OUT_TILE 16    /* output channels whose weights a thread keeps in the L1 cache (linear_rows) */
#define INT4_BLOCK 32  /* 4-bit weights: values that share one scale and minimum */
/* With several input rows, the products ask for the weights of the output channel PREFETCH_ROWS
 * ahead while they work on this one: the hardware prefetcher alone left an 8-row decode step's
 * products waiting on memory (SmolLM2-shaped set on a Zen 4: 17.7 -> 13.7-14.0 ms at 8 rows,
 * 29.9 -> 26.3 at 16; 2, 4, 8 and 16 channels ahead measured alike). A single row is bound by
 * the memory's bandwidth, not its latency: there it measured no faster (and slower from 8 ahead).
 * Near a matrix's end the address runs past it: harmless, a prefetch never faults. */
#define PREFETCH_ROWS 4

/* A weight matrix as the kernels read it (out x in): int8 with one float scale per output channel,
 * or 4-bit in blocks of INT4_BLOCK along a row with a half-precision scale and minimum per block
 * (weight = scale * q + min, q in 0..15; inference.py's Int4Linear; llama.cpp's Q4_1). A block's 32
 * values take 16 bytes: byte j holds value j in its low four bits and value 16 + j in its high four. */
typedef struct {
    const int8_t *weight;  /* int8: out x in (NULL for the other kinds) */
    const float *scale;    /* int8: out */
    const uint8_t *weight4; /* 4-bit: out x in / 2 (NULL for the other kinds) */
    const uint16_t *block_scale, *block_min; /* 4-bit: out x in / INT4_BLOCK, IEEE half precision */
    const float *weight32;      /* float32: out x in (NULL for the other kinds) */
    const uint16_t *weight_bf16; /* bfloat16 (the top half of a float32's bits): out x in, or NULL */
    const float *bias;     /* out, or NULL */
    int64_t in, out;
    int64_t int8_inputs;   /* int8 weights: round the inputs to int8, not int16 (int8_inputs.h) */
} Linear;

/* Float weights (float32 or bfloat16) multiply float32 inputs as they are, FLOAT_ROWS input rows at
 * a time: each row keeps two accumulators (a single one would make one row's product wait on the
 * FMA's latency), and FLOAT_ROWS rows' accumulators and the weights fit the 16 vector registers. */
#define FLOAT_ROWS 4

static inline float bf16_to_float(uint16_t bits) {
    union {
        uint32_t u;
        float f;
    } value = {(uint32_t)bits << 16};
    return value.f;
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* out[r]: the sum of row r's accumulator and its last, shorter block when `in` is not a multiple of
 * ROUND_BLOCK (dot_rows_int16 and dot_rows_int16_wide end alike). */
static inline __attribute__((always_inline)) void finish_int16_rows(const __m256 *acc, const int8_t *w,
                                                                    const int16_t *q, const float *qs, int64_t in,
                                                                    const int R, float *out) {
    const int64_t blocks = in / ROUND_BLOCK, scales = (in + ROUND_BLOCK - 1) / ROUND_BLOCK;
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        float total = hsum(acc[r]);
        if (blocks < scales) {
            int32_t tail = 0;
            for (int64_t k = blocks * ROUND_BLOCK; k < in; k++) tail += (int32_t)w[k] * q[r * in + k];
            total += (float)tail * qs[r * scales + blocks];
        }
        out[r] = total;
    }
}

/* Inputs rounded to int16 per block of ROUND_BLOCK values (round_rows below): weights then multiply
 * with integer `madd`s, 16 products an instruction with the sums in int32, where widening them to
 * float does 8 an FMA. Measured on a Zen 3 core (576 x 1536 int8 matrix, 8 rows, weights in the
 * cache): 61 GMAC/s against 42 for float FMAs; blocks of 32 gave 54 (one float FMA per block is the
 * overhead) and of 192 46 (the widened weights no longer fit the registers). */

/* out[r] = sum over blocks b of (sum_k w[k] * q[r][k]) * qs[r][b] for R (at most 8) rows: each
 * block's weights are widened once and multiplied into every row. One float accumulator per row,
 * in the same order whatever R is, so a row's result does not depend on the rows beside it. */
/* always_inline: a product not inlined into linear_rows keeps its sums in memory, not in registers
 * (GCC declined the float one for its stack frame, and it ran at half speed) */
static inline __attribute__((always_inline)) void dot_rows_int16(const int8_t *w, const int16_t *q, const float *qs,
                                                                 int64_t in, const int R, float *out) {
    const int64_t blocks = in / ROUND_BLOCK, scales = (in + ROUND_BLOCK - 1) / ROUND_BLOCK;
    __m256 acc[8];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        const int8_t *wb = w + b * ROUND_BLOCK;
        if (R > 1) _mm_prefetch((const char *)(wb + PREFETCH_ROWS * in), _MM_HINT_T0);
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
    finish_int16_rows(acc, w, q, qs, in, R, out);
}
#define HAVE_INT16_PATH 1

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)

/* dot_rows_int16 with 512-bit integer products: a `madd` and VNNI's `dpwssd` multiply a block's 64
 * int16 pairs into 16 int32 sums, where the 256-bit loop needs four `madd`s and three adds. They
 * leave in lane j + 8 the sums the 256-bit loop adds to lane j (values 16..31 and 48..63 of the
 * block beside 0..15 and 32..47), so adding the upper half to the lower gives its eight int32 sums
 * exactly, and from there the float arithmetic is the same: the results are the 256-bit loop's bit
 * for bit, so a product may take either loop by its number of rows, and a row's result still never
 * depends on the rows beside it. */
static inline __attribute__((always_inline)) void dot_rows_int16_wide(const int8_t *w, const int16_t *q,
                                                                      const float *qs, int64_t in, const int R,
                                                                      float *out) {
    const int64_t blocks = in / ROUND_BLOCK, scales = (in + ROUND_BLOCK - 1) / ROUND_BLOCK;
    __m256 acc[8];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        const int8_t *wb = w + b * ROUND_BLOCK;
        if (R > 1) _mm_prefetch((const char *)(wb + PREFETCH_ROWS * in), _MM_HINT_T0);
        const __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)wb));
        const __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(wb + 32)));
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            const int16_t *qb = q + r * in + b * ROUND_BLOCK;
            const __m512i sums16 = _mm512_dpwssd_epi32(
                _mm512_madd_epi16(w0, _mm512_loadu_si512(qb)), w1, _mm512_loadu_si512(qb + 32));
            const __m256i sum = _mm256_add_epi32(_mm512_castsi512_si256(sums16), _mm512_extracti64x4_epi64(sums16, 1));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(qs[r * scales + b]), acc[r]);
        }
    }
    finish_int16_rows(acc, w, q, qs, in, R, out);
}
#define HAVE_WIDE_PRODUCTS 1
#endif
#ifndef HAVE_WIDE_PRODUCTS /* never called: `wide` is 0 in linear_rows */
#define dot_rows_int16_wide dot_rows_int16
#endif

/* The same for 4-bit weights: out[r] = sum over blocks b of 32 of (scale_b * sum_k q_w[k] * q[r][k] *
 * qs[r][b / 2] + min_b * xsum[r][b]), xsum the block's sum of the (unrounded) input; in a multiple
 * of INT4_BLOCK. Two blocks (one rounding block) at a time: their nibbles are widened to int16 and
 * their scales broadcast once for all rows, and each row's accumulator waits on one FMA per 64
 * values, not on two (one row's products are otherwise bound by that chain's latency). The minima
 * meet the block sums in a separate short dot product, eight blocks at a time. */
static inline __m256i widen_nibbles(const uint8_t *block, __m256i *high) {
    const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)block));
    *high = _mm256_srli_epi16(bytes, 4);                      /* values 16..31 of the block */
    return _mm256_and_si256(bytes, _mm256_set1_epi16(0x0F)); /* values 0..15 */
}

static inline __attribute__((always_inline)) void dot_rows_int4(const uint8_t *w4, const uint16_t *block_scale,
                                                                const uint16_t *block_min, const int16_t *q,
                                                                const float *qs, const float *xsum, int64_t in,
                                                                const int R, float *out) {
    const int64_t blocks = in / INT4_BLOCK, scales = (in + ROUND_BLOCK - 1) / ROUND_BLOCK;
    __m256 acc[8];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= blocks; b += 2) { /* |a block's sum| <= 32 * 15 * 32767 < 2^24: exact in float */
        __m256i high0, high1;
        if (R > 1) _mm_prefetch((const char *)(w4 + b * INT4_BLOCK / 2 + PREFETCH_ROWS * in / 2), _MM_HINT_T0);
        const __m256i low0 = widen_nibbles(w4 + b * INT4_BLOCK / 2, &high0);
        const __m256i low1 = widen_nibbles(w4 + (b + 1) * INT4_BLOCK / 2, &high1);
        const __m256 scale0 = _mm256_set1_ps(_cvtsh_ss(block_scale[b])),
                     scale1 = _mm256_set1_ps(_cvtsh_ss(block_scale[b + 1]));
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            const __m256i *qb = (const __m256i *)(q + r * in + b * INT4_BLOCK);
            __m256i sum0 = _mm256_add_epi32(_mm256_madd_epi16(low0, _mm256_loadu_si256(qb)),
                                            _mm256_madd_epi16(high0, _mm256_loadu_si256(qb + 1)));
            __m256i sum1 = _mm256_add_epi32(_mm256_madd_epi16(low1, _mm256_loadu_si256(qb + 2)),
                                            _mm256_madd_epi16(high1, _mm256_loadu_si256(qb + 3)));
            __m256 pair = _mm256_mul_ps(_mm256_cvtepi32_ps(sum0), scale0);
            pair = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum1), scale1, pair);
            acc[r] = _mm256_fmadd_ps(pair, _mm256_set1_ps(qs[r * scales + b / 2]), acc[r]);
        }
    }
    if (b < blocks) { /* an odd last block */
        __m256i high0;
        const __m256i low0 = widen_nibbles(w4 + b * INT4_BLOCK / 2, &high0);
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            const __m256i *qb = (const __m256i *)(q + r * in + b * INT4_BLOCK);
            __m256i sum0 = _mm256_add_epi32(_mm256_madd_epi16(low0, _mm256_loadu_si256(qb)),
                                            _mm256_madd_epi16(high0, _mm256_loadu_si256(qb + 1)));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum0),
                                     _mm256_set1_ps(_cvtsh_ss(block_scale[b]) * qs[r * scales + b / 2]), acc[r]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        const float *sums = xsum + r * blocks;
        __m256 m = _mm256_setzero_ps();
        int64_t j = 0;
        for (; j + 8 <= blocks; j += 8)
            m = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(block_min + j))),
                                _mm256_loadu_ps(sums + j), m);
        float minima = hsum(m);
        for (; j < blocks; j++) minima += _cvtsh_ss(block_min[j]) * sums[j];
        out[r] = hsum(acc[r]) + minima;
    }
}

/* Eight float32 weights, or eight bfloat16 ones widened to float32 (a bfloat16 is a float32's top
 * 16 bits: widening is a shift). `bf16` is a constant at every call, so each kind has its own loop. */
static inline __m256 load_weights8(const float *w32, const uint16_t *w16, int64_t k, const int bf16) {
    if (bf16)
        return _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(w16 + k))), 16));
    return _mm256_loadu_ps(w32 + k);
}

/* out[r] = sum_k w[k] * x[r][k] for R (at most FLOAT_ROWS) rows of float32 x, the weights float32
 * (w32) or bfloat16 (w16). Sixteen values a step, even and odd eights in two accumulators, in the
 * same order whatever R is, so a row's result does not depend on the rows beside it. Reading
 * bfloat16 weights halves the bytes a one-row product (decoding) waits for. */
static inline __attribute__((always_inline)) void dot_rows_float(const float *w32, const uint16_t *w16,
                                                                 const float *x, int64_t in, const int rows,
                                                                 const int bf16, float *out) {
    /* linear_rows asks for at most FLOAT_ROWS (its switch has larger cases for the integer kinds) */
    const int R = rows < FLOAT_ROWS ? rows : FLOAT_ROWS;
    __m256 even[FLOAT_ROWS], odd[FLOAT_ROWS];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) even[r] = odd[r] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= in; k += 16) {
        if (R > 1)
            _mm_prefetch(bf16 ? (const char *)(w16 + k + PREFETCH_ROWS * in)
                              : (const char *)(w32 + k + PREFETCH_ROWS * in),
                         _MM_HINT_T0);
        const __m256 w0 = load_weights8(w32, w16, k, bf16), w1 = load_weights8(w32, w16, k + 8, bf16);
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            even[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * in + k), even[r]);
            odd[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + r * in + k + 8), odd[r]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        float total = hsum(_mm256_add_ps(even[r], odd[r]));
        for (int64_t j = k; j < in; j++) total += (bf16 ? bf16_to_float(w16[j]) : w32[j]) * x[r * in + j];
        out[r] = total;
    }
}

#else /* portable C: the compiler vectorises what it can for this CPU */
static void dot_rows_float(const float *w32, const uint16_t *w16, const float *x, int64_t in, const int R,
                           const int bf16, float *out) {
    for (int r = 0; r < R; r++) {
        float sum = 0.0f;
        for (int64_t k = 0; k < in; k++) sum += (bf16 ? bf16_to_float(w16[k]) : w32[k]) * x[r * in + k];
        out[r] = sum;
    }
}
static float dot_int8(const int8_t *w, const float *x, int64_t n) {
    float sum = 0.0f;
    for (int64_t k = 0; k < n; k++) sum += (float)w[k] * x[k];
    return sum;
}
static void dot_rows(const int8_t *w, const float *x, int64_t in, const int R, float *out) {
    for (int r = 0; r < R; r++) out[r] = dot_int8(w, x + r * in, in);
}
/* IEEE half precision to float (no F16C instructions here) */
static float half_to_float(uint16_t h) {
    const int exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
    float value = exponent == 0    ? ldexpf((float)mantissa, -24)
                  : exponent == 31 ? (mantissa ? NAN : INFINITY)
                                   : ldexpf((float)(mantissa | 0x400), exponent - 25);
    return h & 0x8000 ? -value : value;
}

static void dot_rows_int4_float(const uint8_t *w4, const uint16_t *block_scale, const uint16_t *block_min,
                                const float *x, int64_t in, const int R, float *out) {
    for (int r = 0; r < R; r++) {
        float sum = 0.0f;
        for (int64_t k = 0; k < in; k++) {
            const int64_t b = k / INT4_BLOCK, j = k % INT4_BLOCK;
            const uint8_t byte = w4[b * INT4_BLOCK / 2 + j % (INT4_BLOCK / 2)];
            const int value = j < INT4_BLOCK / 2 ? byte & 0x0F : byte >> 4;
            sum += (half_to_float(block_scale[b]) * (float)value + half_to_float(block_min[b])) * x[r * in + k];
        }
        out[r] = sum;
    }
}
#endif

#ifdef HAVE_INT16_PATH
/* One full block of ROUND_BLOCK values rounded to int16 (what round_rows does value by value,
 * eight at a time: the scalar loop called libm's fmaxf and lrintf for every value, ~10% of an
 * 8-row decode step). The conversion rounds to nearest even, as lrintf does. */
static inline float round_block(const float *xb, int16_t *qb) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 largest8 = _mm256_setzero_ps();
    for (int j = 0; j < ROUND_BLOCK; j += 8)
        largest8 = _mm256_max_ps(largest8, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + j)));
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(largest8), _mm256_extractf128_ps(largest8, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float largest = _mm_cvtss_f32(m);
    const __m256 inverse = _mm256_set1_ps(largest > 0.0f ? 32767.0f / largest : 0.0f);
    for (int j = 0; j < ROUND_BLOCK; j += 16) {
        __m256i low = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + j), inverse));
        __m256i high = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + j + 8), inverse));
        /* packs interleaves the 128-bit halves; the permutation puts the 16 values back in order */
        _mm256_storeu_si256((__m256i *)(qb + j), _mm256_permute4x64_epi64(_mm256_packs_epi32(low, high), 0xD8));
    }
    return largest / 32767.0f;
}

/* Each of `rows` rows of x rounded to int16 per block of ROUND_BLOCK values (the last may be shorter):
 * q = round(x / s), s = max|x_block| / 32767, a relative error below 2e-5 of the block's largest
 * value, far below that of int8 weights. Shared among the threads of the enclosing region; the
 * team_wait after it (linear_rows) publishes q and qs to all of them. */
static void round_rows(const float *x, int64_t rows, int64_t in, int16_t *q, float *qs, float *xsum) {
    const int64_t scales = (in + ROUND_BLOCK - 1) / ROUND_BLOCK;
#pragma omp for schedule(static) nowait
    for (int64_t r = 0; r < rows; r++) {
        if (xsum) /* 4-bit weights: each block's sum of the input meets the block's minimum */
            for (int64_t b = 0; b < in / INT4_BLOCK; b++) {
                const float *xb = x + r * in + b * INT4_BLOCK;
                __m256 sum = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(xb), _mm256_loadu_ps(xb + 8)),
                                           _mm256_add_ps(_mm256_loadu_ps(xb + 16), _mm256_loadu_ps(xb + 24)));
                xsum[r * (in / INT4_BLOCK) + b] = hsum(sum);
            }
        for (int64_t b = 0; b < scales; b++) {
            const float *xb = x + r * in + b * ROUND_BLOCK;
            int16_t *qb = q + r * in + b * ROUND_BLOCK;
            const int64_t n = b * ROUND_BLOCK + ROUND_BLOCK <= in ? ROUND_BLOCK : in - b * ROUND_BLOCK;
            if (n == ROUND_BLOCK) {
                qs[r * scales + b] = round_block(xb, qb);
                continue;
            }
            float largest = 0.0f;
            for (int64_t j = 0; j < n; j++) largest = fmaxf(largest, fabsf(xb[j]));
            float inverse = largest > 0.0f ? 32767.0f / largest : 0.0f;
            qs[r * scales + b] = largest / 32767.0f;
            for (int64_t j = 0; j < n; j++) qb[j] = (int16_t)lrintf(xb[j] * inverse);
        }
    }
}
#endif

#include "int8_inputs.h"

/* Room linear_rows needs for `rows` rounded input rows of `in` values: int16 values (or int8 ones in
 * two layouts, int8_inputs.h) and float scales. */
static inline int64_t rounded_values(int64_t rows, int64_t in) {
#ifdef HAVE_INT8_INPUTS
    const int64_t bytes = int8_input_bytes(rows, in);
    return rows * in > bytes / 2 + 1 ? rows * in : bytes / 2 + 1;
#else
    return rows * in;
#endif
}
static inline int64_t rounded_scales(int64_t rows, int64_t in) { return rows * ((in + ROUND_BLOCK - 1) / ROUND_BLOCK); }
static inline int64_t block_sums(int64_t rows, int64_t in) { return rows * (in / INT4_BLOCK) + 1; }

/* y (rows x out) = x (rows x in) @ W^T (* scale) (+ bias), shared among the threads of the enclosing
 * parallel region: each thread takes a band of output channels and reads their weights once for
 * all rows, 8 rows at a time. q/qs/xsum: room for the rounded input (rounded_values, rounded_scales,
 * block_sums; unused by the portable build, whose products are in float). */
static void linear_rows(const Linear *L, const float *x, float *y, int64_t rows, int16_t *q, float *qs,
                        float *xsum, Team *team) {
    const int64_t in = L->in, out = L->out, int4 = L->weight4 != NULL;
    const int64_t floats = L->weight32 != NULL || L->weight_bf16 != NULL; /* no rounding, no scales */
#ifdef HAVE_INT8_INPUTS
    if (L->int8_inputs && L->weight) {
        linear_rows_int8_inputs(L, x, y, rows, q, team);
        return;
    }
#endif
#ifdef HAVE_INT16_PATH
#ifdef HAVE_WIDE_PRODUCTS
    const int wide = !floats && !int4 && wide_int8[rows > 1]; /* the 512-bit loop, where measured faster */
#else
    const int wide = 0;
#endif
    const int64_t group = floats ? FLOAT_ROWS : 8; /* input rows whose sums stay in registers */
    const int64_t scales = (in + ROUND_BLOCK - 1) / ROUND_BLOCK, blocks = in / INT4_BLOCK;
    if (!floats) {
        round_rows(x, rows, in, q, qs, int4 ? xsum : NULL);
        team_wait(team);
    }
#define PRODUCT(R)                                                                                            \
    if (L->weight_bf16)                                                                                       \
        dot_rows_float(NULL, L->weight_bf16 + o * in, x + r0 * in, in, R, 1, sums);                          \
    else if (L->weight32)                                                                                     \
        dot_rows_float(L->weight32 + o * in, NULL, x + r0 * in, in, R, 0, sums);                             \
    else if (int4)                                                                                            \
        dot_rows_int4(L->weight4 + o * in / 2, L->block_scale + o * blocks, L->block_min + o * blocks,       \
                      q + r0 * in, qs + r0 * scales, xsum + r0 * blocks, in, R, sums);                        \
    else if (wide)                                                                                            \
        dot_rows_int16_wide(L->weight + o * in, q + r0 * in, qs + r0 * scales, in, R, sums);                 \
    else                                                                                                      \
        dot_rows_int16(L->weight + o * in, q + r0 * in, qs + r0 * scales, in, R, sums)
#else
    const int64_t group = floats ? FLOAT_ROWS : 8;
    (void)q, (void)qs, (void)xsum;
#define PRODUCT(R)                                                                                            \
    if (L->weight_bf16)                                                                                       \
        dot_rows_float(NULL, L->weight_bf16 + o * in, x + r0 * in, in, R, 1, sums);                          \
    else if (L->weight32)                                                                                     \
        dot_rows_float(L->weight32 + o * in, NULL, x + r0 * in, in, R, 0, sums);                             \
    else if (int4)                                                                                            \
        dot_rows_int4_float(L->weight4 + o * in / 2, L->block_scale + o * (in / INT4_BLOCK),                  \
                            L->block_min + o * (in / INT4_BLOCK), x + r0 * in, in, R, sums);                  \
    else                                                                                                      \
        dot_rows(L->weight + o * in, x + r0 * in, in, R, sums)
#endif
    if (rows == 1) { /* the plain loop: measured 5% faster than the tiled one for one row (decoding) */
        const int64_t r0 = 0;
#pragma omp for schedule(static) nowait
        for (int64_t o = 0; o < out; o++) {
            float sums[1];
            PRODUCT(1);
            y[o] = sums[0] * (int4 || floats ? 1.0f : L->scale[o]) + (L->bias ? L->bias[o] : 0.0f);
        }
        team_wait(team);
        return;
    }
    /* Output channels in tiles of OUT_TILE: a tile's weights and a group of 8 input rows both stay in
     * the L1 cache while every pair meets (for a long prompt, the rows would not fit it whole). */
    const int64_t tiles = (out + OUT_TILE - 1) / OUT_TILE;
#pragma omp for schedule(static) nowait
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t tile_end = (t + 1) * OUT_TILE < out ? (t + 1) * OUT_TILE : out;
        for (int64_t r0 = 0; r0 < rows; r0 += group) {
            const int64_t left = rows - r0;
            for (int64_t o = t * OUT_TILE; o < tile_end; o++) {
                float b = L->bias ? L->bias[o] : 0.0f, sums[8];
                switch (left >= group ? (int)group : (int)left) { /* R a constant: the sums stay in registers */
                case 8: PRODUCT(8); break;
                case 7: PRODUCT(7); break;
                case 6: PRODUCT(6); break;
                case 5: PRODUCT(5); break;
                case 4: PRODUCT(4); break;
                case 3: PRODUCT(3); break;
                case 2: PRODUCT(2); break;
                default: PRODUCT(1); break;
                }
                const float channel_scale = int4 || floats ? 1.0f : L->scale[o];
                for (int64_t r = 0; r < group && r < left; r++) y[(r0 + r) * out + o] = sums[r] * channel_scale + b;
            }
        }
    }
    team_wait(team);
#undef PRODUCT
}

#endif

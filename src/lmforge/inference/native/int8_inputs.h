/* Int8 weights times int8 inputs (a Linear with `int8_inputs` set): every input row is rounded to
 * int8 with one scale for the whole row, q = round(x * 127 / max|x|), and the products sum exactly
 * in int32; y = (float)sum * row_scale * channel_scale + bias. Where the int16 inputs of int8_dot.h
 * cost one `madd` per 32 products (512-bit), these take one VNNI `vpdpbusd` per 64, and on CPUs with
 * AMX one `tdpbssd` multiplies a tile of 16 output channels by 16 input rows over 64 values (16,384
 * products an instruction): a step of 16 rows then costs about what reading the weights once costs,
 * as a one-row step does.
 *
 * Because the sums are exact integers, the VNNI loop and the AMX tiles give the same bits, so a
 * product takes either by its number of rows (set_amx_rows, timed by native/__init__.py) and a row's
 * result never depends on the rows beside it. Included by int8_dot.h; built only where the compiler
 * targets AVX-512 VNNI (HAVE_INT8_INPUTS), AMX where it also targets AMX-INT8 (HAVE_AMX).
 */
#ifndef LMFORGE_INT8_INPUTS_H
#define LMFORGE_INT8_INPUTS_H

#if defined(HAVE_WIDE_PRODUCTS)
#define HAVE_INT8_INPUTS 1
#include <string.h>

/* Rows from which products take AMX tiles (0: never); set by set_amx_rows (int8_linear.c). */
extern int64_t amx_rows;

#define TILE_ROWS 16 /* input rows in a tile; output channels in a tile */
#define TILE_K 64    /* input values (bytes) in a tile row */

static inline int64_t padded_rows(int64_t rows) { return (rows + TILE_ROWS - 1) / TILE_ROWS * TILE_ROWS; }

/* The one place a sum becomes an output, so that every path rounds alike. */
static inline float int8_input_result(int32_t sum, float row_scale, float channel_scale, float bias) {
    return fmaf((float)sum * row_scale, channel_scale, bias);
}

/* Row r of x rounded to int8 (q8, row-major) with its scale (qs); where `packed` is not NULL, also
 * written into AMX's input layout: per group of 16 rows, the rows' 4-byte words interleaved (word w
 * of row r of the group at word w * 16 + r), which is a tile's 16 rows of 64 bytes per 64 values. */
static void round_row_int8(const float *x, int64_t in, int8_t *q8, float *qs, uint32_t *packed) {
    __m512 largest16 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= in; k += 16) largest16 = _mm512_max_ps(largest16, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
    float largest = _mm512_reduce_max_ps(largest16);
    for (; k < in; k++) largest = fmaxf(largest, fabsf(x[k]));
    const float inverse = largest > 0.0f ? 127.0f / largest : 0.0f;
    *qs = largest / 127.0f;
    const __m512 scale = _mm512_set1_ps(inverse);
    for (k = 0; k + 16 <= in; k += 16) /* rounds to nearest even, saturates (never needed: |q| <= 127) */
        _mm_storeu_si128((__m128i *)(q8 + k),
                         _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k), scale))));
    for (; k < in; k++) q8[k] = (int8_t)lrintf(x[k] * inverse);
    if (packed)
        for (int64_t w = 0; w < in / 4; w++) memcpy(packed + w * TILE_ROWS, q8 + 4 * w, 4);
}

/* Every row of x rounded (round_row_int8), shared among the threads of the enclosing region; with
 * `packed`, the padding rows of the last group of 16 are zeros there. */
static void round_rows_int8(const float *x, int64_t rows, int64_t in, int8_t *q8, float *qs, uint32_t *packed) {
    const int64_t all = packed ? padded_rows(rows) : rows;
#pragma omp for schedule(static) nowait
    for (int64_t r = 0; r < all; r++) {
        uint32_t *group = packed ? packed + (r / TILE_ROWS) * TILE_ROWS * (in / 4) + r % TILE_ROWS : NULL;
        if (r < rows) {
            round_row_int8(x + r * in, in, q8 + r * in, qs + r, group);
        } else {
            for (int64_t w = 0; w < in / 4; w++) group[w * TILE_ROWS] = 0;
        }
    }
}

/* sums[r] = sum_k w[k] * q[r][k] exactly, for R (at most 8) rows, by `vpdpbusd` (unsigned times
 * signed bytes): the inputs go in as q + 128 (q ^ 0x80) and 128 * sum_k w[k] comes off. A last
 * block shorter than 64 values is read with a mask (zeros beyond the row: nothing read past it). */
static inline __attribute__((always_inline)) void dot_rows_int8_inputs(const int8_t *w, const int8_t *q, int64_t in,
                                                                       const int R, int32_t *sums) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512i acc[8], offset = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_si512();
    for (int64_t k = 0; k < in; k += 64) {
        const __mmask64 mask = in - k >= 64 ? ~(__mmask64)0 : ((__mmask64)1 << (in - k)) - 1;
        if (R > 1) _mm_prefetch((const char *)(w + k + PREFETCH_ROWS * in), _MM_HINT_T0);
        const __m512i wk = _mm512_maskz_loadu_epi8(mask, w + k);
        offset = _mm512_dpbusd_epi32(offset, flip, wk);
#pragma GCC unroll 8
        for (int r = 0; r < R; r++)
            acc[r] = _mm512_dpbusd_epi32(acc[r], _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, q + r * in + k), flip), wk);
    }
    const int32_t shift = _mm512_reduce_add_epi32(offset);
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) sums[r] = _mm512_reduce_add_epi32(acc[r]) - shift;
}

/* Output channels [first, end) for every row by the VNNI loop, 8 rows at a time. */
static void vnni_channels(const Linear *L, const int8_t *q8, const float *qs, int64_t rows, int64_t first,
                          int64_t end, float *y) {
    const int64_t in = L->in, out = L->out;
    for (int64_t r0 = 0; r0 < rows; r0 += 8) {
        const int64_t left = rows - r0 < 8 ? rows - r0 : 8;
        for (int64_t o = first; o < end; o++) {
            int32_t sums[8];
            const int8_t *w = L->weight + o * in, *q = q8 + r0 * in;
            switch (left) { /* R a constant: the sums stay in registers */
            case 8: dot_rows_int8_inputs(w, q, in, 8, sums); break;
            case 7: dot_rows_int8_inputs(w, q, in, 7, sums); break;
            case 6: dot_rows_int8_inputs(w, q, in, 6, sums); break;
            case 5: dot_rows_int8_inputs(w, q, in, 5, sums); break;
            case 4: dot_rows_int8_inputs(w, q, in, 4, sums); break;
            case 3: dot_rows_int8_inputs(w, q, in, 3, sums); break;
            case 2: dot_rows_int8_inputs(w, q, in, 2, sums); break;
            default: dot_rows_int8_inputs(w, q, in, 1, sums); break;
            }
            const float b = L->bias ? L->bias[o] : 0.0f;
            for (int64_t r = 0; r < left; r++)
                y[(r0 + r) * out + o] = int8_input_result(sums[r], qs[r0 + r], L->scale[o], b);
        }
    }
}

#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define HAVE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>

/* The tile shapes: tile 0 the sums (16 channels x 16 rows of int32), tile 1 the weights (16 channels
 * x 64 bytes), tile 2 the inputs (16 words of 4 values x 16 rows). */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

/* Linux lets a process use AMX's tile data only once it has asked (arch_prctl); 1 if it may. */
static int ask_for_amx(void) {
    enum { ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18 };
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

/* Output channels in whole tiles of 16 (a band shared among the threads) for every row: per tile of
 * channels and group of 16 rows, one tdpbssd per 64 input values; in a multiple of 64. The tile
 * configuration is loaded on entry and released on return: PyTorch's oneDNN uses the same tiles on
 * the same threads with its own. */
static void amx_channels(const Linear *L, const uint32_t *packed, const float *qs, int64_t rows, int64_t tiles,
                         float *y) {
    const int64_t in = L->in, out = L->out, groups = padded_rows(rows) / TILE_ROWS;
    TileConfig config = {.palette = 1};
    for (int t = 0; t < 3; t++) config.colsb[t] = 64, config.rows[t] = 16;
    _tile_loadconfig(&config);
    int32_t sums[TILE_ROWS][TILE_ROWS]; /* [channel][row] */
#pragma omp for schedule(static) nowait
    for (int64_t t = 0; t < tiles; t++) {
        const int8_t *w = L->weight + t * TILE_ROWS * in;
        for (int64_t g = 0; g < groups; g++) {
            const uint32_t *inputs = packed + g * TILE_ROWS * (in / 4);
            _tile_zero(0);
            for (int64_t k = 0; k < in; k += TILE_K) {
                _tile_loadd(1, w + k, in);
                _tile_loadd(2, inputs + k / 4 * TILE_ROWS, TILE_K);
                _tile_dpbssd(0, 1, 2);
            }
            _tile_stored(0, sums, TILE_K);
            for (int64_t r = g * TILE_ROWS; r < rows && r < (g + 1) * TILE_ROWS; r++)
                for (int64_t c = 0; c < TILE_ROWS; c++) {
                    const int64_t o = t * TILE_ROWS + c;
                    y[r * out + o] = int8_input_result(sums[c][r % TILE_ROWS], qs[r], L->scale[o],
                                                       L->bias ? L->bias[o] : 0.0f);
                }
        }
    }
    _tile_release();
}
#endif

/* Room for int8 inputs of `rows` rows of `in` values: row-major, then AMX's layout. */
static inline int64_t int8_input_bytes(int64_t rows, int64_t in) { return rows * in + padded_rows(rows) * in + 64; }

/* y = x @ W^T for a Linear with int8 inputs, shared among the threads of the enclosing region (as
 * linear_rows, which calls it). q8: int8_input_bytes of room; qs: rows floats. */
static void linear_rows_int8_inputs(const Linear *L, const float *x, float *y, int64_t rows, int8_t *q8,
                                    float *qs, Team *team) {
    const int64_t in = L->in, out = L->out;
#ifdef HAVE_AMX
    const int amx = amx_rows > 0 && rows >= amx_rows && in % TILE_K == 0 && out >= TILE_ROWS;
#else
    const int amx = 0;
#endif
    uint32_t *packed = amx ? (uint32_t *)(q8 + rows * in + (64 - (uintptr_t)(q8 + rows * in) % 64) % 64) : NULL;
    round_rows_int8(x, rows, in, q8, qs, packed);
    team_wait(team);
    int64_t first = 0; /* the channels before it went to the tiles */
#ifdef HAVE_AMX
    if (amx) {
        amx_channels(L, packed, qs, rows, out / TILE_ROWS, y);
        first = out / TILE_ROWS * TILE_ROWS;
    }
#endif
    /* the rest (all of them without tiles) by the VNNI loop, a band of channels per thread */
    const int threads = omp_get_num_threads(), me = omp_get_thread_num();
    const int64_t band = (out - first + threads - 1) / threads;
    const int64_t start = first + me * band, end = start + band < out ? start + band : out;
    if (start < end) vnni_channels(L, q8, qs, rows, start, end, y);
    team_wait(team);
}

#endif /* HAVE_WIDE_PRODUCTS */
#endif

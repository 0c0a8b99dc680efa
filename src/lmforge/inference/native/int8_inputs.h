/* Int8 weights times int8 inputs (a Linear with `int8_inputs` set): every input row is rounded to
 * int8 per block of 64 values, q = round(x * 127 / max|x_block|) (one scale for a whole row cost
 * SmolLM2 3.3% of perplexity on tiny Shakespeare, blocks of 64 0.1%), the products of a block sum
 * exactly in int32, and the blocks' sums times their scales add up in float32. Where the int16
 * inputs of int8_dot.h cost one `madd` per 32 products (512-bit), these take one VNNI `vpdpbusd`
 * per 64, and on CPUs with AMX one `tdpbssd` multiplies a tile of 16 output channels by 16 input
 * rows over 64 values (16,384 products an instruction): a step of 16 rows then costs about what
 * reading the weights once costs, as a one-row step does.
 *
 * Because the block sums are exact integers and both add them up in the same order, the VNNI loop
 * and the AMX tiles give the same bits, so a product takes either by its number of rows
 * (set_amx_rows, timed by native/__init__.py) and a row's result never depends on the rows beside
 * it. Included by int8_dot.h; built only where the compiler targets AVX-512 VNNI (HAVE_INT8_INPUTS),
 * AMX where it also targets AMX-INT8 (HAVE_AMX).
 */
#ifndef LMFORGE_INT8_INPUTS_H
#define LMFORGE_INT8_INPUTS_H

#if defined(HAVE_WIDE_PRODUCTS)
#define HAVE_INT8_INPUTS 1
#include <string.h>

/* Rows from which products take AMX tiles (0: never); set by set_amx_rows (int8_linear.c). */
extern int64_t amx_rows;

#define TILE_ROWS 16 /* input rows in a tile; output channels in a tile */
#define TILE_K 64    /* input values (bytes) in a tile row, and in a block that shares one input scale */

static inline int64_t padded_rows(int64_t rows) { return (rows + TILE_ROWS - 1) / TILE_ROWS * TILE_ROWS; }
static inline int64_t input_blocks(int64_t in) { return (in + TILE_K - 1) / TILE_K; }
static inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }

/* Where the inputs go (int8_input_room lays them out in one buffer): q8 row-major (rows x in), qs
 * the scale of each row's blocks (rows x blocks); for AMX also `packed`, the rows in a tile's input
 * layout (per group of 16 rows, the rows' 4-byte words interleaved: word w of row r of the group at
 * w * 16 + r, so 64 values of 16 rows are one tile of 16 x 64 bytes), and `packed_scales`, the
 * scales by group, block and row (16 rows' scales of a block side by side). */
typedef struct {
    int8_t *q8;
    float *qs;
    uint32_t *packed;
    float *packed_scales;
} Int8Inputs;

/* Row `r` of x rounded to int8 per block of 64 values: q = round(x * 127 / max|x_block|). */
static void round_row_int8(const float *x, int64_t in, int64_t r, const Int8Inputs *to) {
    const int64_t blocks = input_blocks(in);
    int8_t *q8 = to->q8 + r * in;
    float *packed_scales =
        to->packed_scales ? to->packed_scales + (r / TILE_ROWS) * blocks * TILE_ROWS + r % TILE_ROWS : NULL;
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t k0 = b * TILE_K, n = in - k0 < TILE_K ? in - k0 : TILE_K;
        __m512 largest16 = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j += 16)
            largest16 =
                _mm512_max_ps(largest16, _mm512_abs_ps(_mm512_maskz_loadu_ps(first_lanes(n - j), x + k0 + j)));
        const float largest = _mm512_reduce_max_ps(largest16);
        const __m512 inverse = _mm512_set1_ps(largest > 0.0f ? 127.0f / largest : 0.0f);
        to->qs[r * blocks + b] = largest / 127.0f;
        if (packed_scales) packed_scales[b * TILE_ROWS] = largest / 127.0f;
        for (int64_t j = 0; j < n; j += 16) { /* rounds to nearest even; |q| <= 127 */
            const __mmask16 lanes = first_lanes(n - j);
            const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, x + k0 + j), inverse));
            _mm_mask_storeu_epi8(q8 + k0 + j, lanes, _mm512_cvtsepi32_epi8(q));
        }
    }
    if (to->packed) {
        uint32_t *group = to->packed + (r / TILE_ROWS) * TILE_ROWS * (in / 4) + r % TILE_ROWS;
        for (int64_t w = 0; w < in / 4; w++) memcpy(group + w * TILE_ROWS, q8 + 4 * w, 4);
    }
}

/* Every row of x rounded, shared among the threads of the enclosing region. For AMX the padding rows
 * of the last group of 16 get zero scales; their values are left as they are: a tile's column of
 * sums reads only its own row's inputs, and the padding rows' sums are never written out (zeroing
 * them, 4 bytes every 64, took 40% of a one-row product). */
static void round_rows_int8(const float *x, int64_t rows, int64_t in, const Int8Inputs *to) {
    const int64_t blocks = input_blocks(in);
    if (!to->packed) {
#pragma omp for schedule(static) nowait
        for (int64_t r = 0; r < rows; r++) round_row_int8(x + r * in, in, r, to);
        return;
    }
    /* A thread takes whole groups of 16 rows: the rows of a group share every cache line of the
     * tile layout, and two threads writing one line each took turns owning it (a 16-row product
     * measured slower on two threads than on one). */
#pragma omp for schedule(static) nowait
    for (int64_t g = 0; g < padded_rows(rows) / TILE_ROWS; g++)
        for (int64_t r = g * TILE_ROWS; r < (g + 1) * TILE_ROWS; r++) {
            if (r < rows) {
                round_row_int8(x + r * in, in, r, to);
                continue;
            }
            float *scales = to->packed_scales + g * blocks * TILE_ROWS + r % TILE_ROWS;
            for (int64_t b = 0; b < blocks; b++) scales[b * TILE_ROWS] = 0.0f;
        }
}

/* Lane c: the sum of the 16 int32 lanes of v[c] (exact: integer adds). */
static inline __m512i sum_lanes16(const __m512i *v) {
    __m512i a[8], b[4], c[2];
    for (int i = 0; i < 8; i++) /* per 128 bits: [v0 even, v1 even, v0 odd, v1 odd] */
        a[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]),
                                _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) /* per 128 bits: four vectors' sums over those 128 bits */
        b[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(a[2 * i], a[2 * i + 1]),
                                _mm512_unpackhi_epi64(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 2; i++) /* eight vectors' half sums */
        c[i] = _mm512_add_epi32(_mm512_shuffle_i32x4(b[2 * i], b[2 * i + 1], 0x88),
                                _mm512_shuffle_i32x4(b[2 * i], b[2 * i + 1], 0xDD));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(c[0], c[1], 0x88), _mm512_shuffle_i32x4(c[0], c[1], 0xDD));
}

/* The products of up to 16 output channels [o0, o0 + n) with every row, vectorised over the
 * channels: per block of 64 inputs, `vpdpbusd` (unsigned times signed bytes) sums each channel's 64
 * products (the inputs go in as q + 128, q ^ 0x80, and 128 * the block's weight sum comes off),
 * sum_lanes16 gives the 16 exact block sums, and acc = fma(sum, row's block scale, acc) block after
 * block: the order amx_channels keeps, so both give the same bits. A last block shorter than 64
 * values is read with a mask (nothing read past a row). offsets: room for input_blocks(in) vectors. */
static void vnni_channels16(const Linear *L, const Int8Inputs *inputs, int64_t rows, int64_t o0, int64_t n,
                            __m512i *offsets, float *y) {
    const int64_t in = L->in, out = L->out, blocks = input_blocks(in);
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const __mmask16 channels = first_lanes(n);
    const __m512 scale = _mm512_maskz_loadu_ps(channels, L->scale + o0);
    const __m512 bias = L->bias ? _mm512_maskz_loadu_ps(channels, L->bias + o0) : _mm512_setzero_ps();
    __m512i sums[16], weight_sums[16];
    for (int64_t r = 0; r < rows; r++) {
        const int8_t *q = inputs->q8 + r * in;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t k = b * TILE_K;
            const __mmask64 mask = in - k >= 64 ? ~(__mmask64)0 : ((__mmask64)1 << (in - k)) - 1;
            const __m512i x = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, q + k), flip);
            for (int c = 0; c < 16; c++) {
                const __m512i w = c < n ? _mm512_maskz_loadu_epi8(mask, L->weight + (o0 + c) * in + k)
                                        : _mm512_setzero_si512();
                sums[c] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), x, w);
                if (r == 0) weight_sums[c] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), flip, w);
            }
            if (r == 0) offsets[b] = sum_lanes16(weight_sums); /* the first row finds them, the others reuse */
            const __m512i total = _mm512_sub_epi32(sum_lanes16(sums), offsets[b]);
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), _mm512_set1_ps(inputs->qs[r * blocks + b]), acc);
        }
        _mm512_mask_storeu_ps(y + r * out + o0, channels, _mm512_fmadd_ps(acc, scale, bias));
    }
}

#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define HAVE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>

/* The tile shapes: tiles 0 and 1 sums (16 channels x 16 rows of int32), 2 and 3 weights (16 channels
 * x 64 bytes), 4 and 5 inputs (16 words of 4 values x 16 rows): two of each, so that the product of
 * one block runs while the sums of the one before are stored and scaled. */
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

/* Block b's sums into tile `sums` from weights in tile `weights` and inputs in `inputs` (literal
 * numbers: tile numbers are immediates). */
#define TILE_PRODUCT(sums, weights, inputs, w, x, b, in)                                                       \
    do {                                                                                                       \
        _tile_zero(sums);                                                                                      \
        _tile_loadd(weights, (w) + (b) * TILE_K, in);                                                          \
        _tile_loadd(inputs, (x) + (b) * TILE_K / 4 * TILE_ROWS, TILE_K);                                       \
        _tile_dpbssd(sums, weights, inputs);                                                                   \
    } while (0)

/* Output channels in whole tiles of 16 (shared among the threads) for every row: per tile of channels
 * and group of 16 rows, one tdpbssd per block of 64 inputs gives the 16 x 16 exact block sums, and
 * each channel's accumulator (a vector over the rows) takes them as vnni_channels16's does, so both
 * give the same bits. in: a multiple of 64. The tile configuration is loaded on entry and released on
 * return: PyTorch's oneDNN uses the same tiles on the same threads with its own. */
static void amx_channels(const Linear *L, const Int8Inputs *inputs, int64_t rows, int64_t tiles, float *y) {
    const int64_t in = L->in, out = L->out, blocks = in / TILE_K, groups = padded_rows(rows) / TILE_ROWS;
    TileConfig config = {.palette = 1};
    for (int t = 0; t < 6; t++) config.colsb[t] = 64, config.rows[t] = 16;
    _tile_loadconfig(&config);
    int32_t sums[2][TILE_ROWS][TILE_ROWS]; /* [channel][row], two blocks' */
    float results[TILE_ROWS][TILE_ROWS];
#pragma omp for schedule(static) nowait
    for (int64_t t = 0; t < tiles; t++) {
        const int8_t *w = L->weight + t * TILE_ROWS * in;
        for (int64_t g = 0; g < groups; g++) {
            const uint32_t *x = inputs->packed + g * TILE_ROWS * (in / 4);
            const float *scales = inputs->packed_scales + g * blocks * TILE_ROWS;
            __m512 acc[TILE_ROWS];
            for (int c = 0; c < TILE_ROWS; c++) acc[c] = _mm512_setzero_ps();
            /* Block b's product runs while block b - 1's sums are stored and block b - 2's are read
             * back (reading a tile's store at once stalls): sums alternate between two buffers. */
            TILE_PRODUCT(0, 2, 4, w, x, 0, in);
            for (int64_t b = 0; b <= blocks; b++) {
                if (b + 1 < blocks) { /* the next block's product, into the other tile */
                    if (b % 2) TILE_PRODUCT(0, 2, 4, w, x, b + 1, in);
                    else TILE_PRODUCT(1, 3, 5, w, x, b + 1, in);
                }
                if (b < blocks) {
                    if (b % 2) _tile_stored(1, sums[1], TILE_K);
                    else _tile_stored(0, sums[0], TILE_K);
                }
                if (b > 0) {
                    const __m512 scale = _mm512_loadu_ps(scales + (b - 1) * TILE_ROWS);
                    for (int c = 0; c < TILE_ROWS; c++)
                        acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(sums[(b - 1) % 2][c])), scale,
                                                 acc[c]);
                }
            }
            for (int c = 0; c < TILE_ROWS; c++) {
                const int64_t o = t * TILE_ROWS + c;
                _mm512_storeu_ps(results[c], _mm512_fmadd_ps(acc[c], _mm512_set1_ps(L->scale[o]),
                                                             _mm512_set1_ps(L->bias ? L->bias[o] : 0.0f)));
            }
            for (int64_t r = g * TILE_ROWS; r < rows && r < (g + 1) * TILE_ROWS; r++)
                for (int c = 0; c < TILE_ROWS; c++) y[r * out + t * TILE_ROWS + c] = results[c][r % TILE_ROWS];
        }
    }
    _tile_release();
}
#endif

/* Bytes of room for int8 inputs of `rows` rows of `in` values (int8_input_room's layout). */
static inline int64_t int8_input_bytes(int64_t rows, int64_t in) {
    const int64_t padded = padded_rows(rows), blocks = input_blocks(in);
    return rows * in + rows * blocks * 4 + padded * in + padded * blocks * 4 + 4 * 64;
}

static inline void *aligned64(void *p) { return (char *)p + (64 - (uintptr_t)p % 64) % 64; }

/* The parts of an Int8Inputs in `room` (int8_input_bytes of it), each on a 64-byte boundary. */
static Int8Inputs int8_input_room(void *room, int64_t rows, int64_t in, int amx) {
    const int64_t padded = padded_rows(rows), blocks = input_blocks(in);
    Int8Inputs to;
    to.q8 = aligned64(room);
    to.qs = aligned64(to.q8 + rows * in);
    to.packed = amx ? aligned64(to.qs + rows * blocks) : NULL;
    to.packed_scales = amx ? aligned64((char *)to.packed + padded * in) : NULL;
    return to;
}

/* y = x @ W^T for a Linear with int8 inputs, shared among the threads of the enclosing region (as
 * linear_rows, which calls it). room: int8_input_bytes(rows, in) bytes. */
static void linear_rows_int8_inputs(const Linear *L, const float *x, float *y, int64_t rows, void *room,
                                    Team *team) {
    const int64_t in = L->in, out = L->out;
#ifdef HAVE_AMX
    const int amx = amx_rows > 0 && rows >= amx_rows && in % TILE_K == 0 && out >= TILE_ROWS;
#else
    const int amx = 0;
#endif
    const Int8Inputs inputs = int8_input_room(room, rows, in, amx);
    round_rows_int8(x, rows, in, &inputs);
    team_wait(team);
    int64_t first = 0; /* the channels before it went to the tiles */
#ifdef HAVE_AMX
    if (amx) {
        amx_channels(L, &inputs, rows, out / TILE_ROWS, y);
        first = out / TILE_ROWS * TILE_ROWS;
    }
#endif
    /* the rest (all of them without tiles) by the VNNI loop, 16 channels at a time */
    __m512i offsets[input_blocks(in)];
#pragma omp for schedule(static) nowait
    for (int64_t o = first; o < out; o += 16)
        vnni_channels16(L, &inputs, rows, o, out - o < 16 ? out - o : 16, offsets, y);
    team_wait(team);
}

#endif /* HAVE_WIDE_PRODUCTS */
#endif

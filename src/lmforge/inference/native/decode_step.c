/* One decode step of a GPT model (models/gpt.py) in a single call: every row's next token
 * goes through embedding, n_layer pre-norm blocks, the final norm and the output head.
 *
 * Why: decoding a small model one token at a time from Python pays ~1,500 PyTorch operator calls
 * per token (SmolLM2: 30 layers of a dozen small operations), about as long as the arithmetic
 * itself. Here the whole step is one OpenMP parallel region: the threads share each matrix
 * product (linear_rows, int8_dot.h) and the attention, and meet at a spinning barrier between
 * operations (team_wait, int8_dot.h; every `omp for` is `nowait`).
 *
 * It computes what GPT.forward computes for one new token per row with a KV cache, for every
 * option of ModelConfig that changes inference: LayerNorm or RMSNorm (with their eps), learned /
 * sinusoidal / rotary positions, GELU / GELU-tanh / ReLU^2 / SwiGLU (gate and up fused), grouped-
 * query attention, QK-norm, biases, logit soft-capping; with int8, 4-bit, float32 or bfloat16 weights
 * (activations in float32 whatever the weights). The KV cache is the KVCache's own float32
 * memory: the new keys and values go into slot `slot` of every row, and each row attends to its
 * valid slots up to that one. decoding.py lays out the structures below and checks the model.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "int8_dot.h"

typedef struct {
    const float *weight, *bias; /* bias NULL for RMSNorm (and LayerNorm without bias) */
} Norm;

typedef struct {
    Norm ln_1, ln_2;
    Linear qkv, attn_out, up, down; /* up: c_fc, or SwiGLU's fused c_gate_up (gate rows, then up) */
} Layer;

enum { GELU = 0, GELU_TANH = 1, RELU2 = 2, SWIGLU = 3 };

typedef struct {
    int64_t n_layer, n_embd, n_head, n_kv_head, head_dim, hidden, vocab;
    int64_t rms_norm, activation, qk_norm, rotary;
    int64_t token_bf16;          /* the token table in bfloat16 (a bfloat16 model's own), else float32 */
    float norm_eps, logit_softcap;
    const void *token_table;     /* vocab x n_embd */
    const float *position_table; /* learned or sinusoidal positions (NULL with rotary) */
    const float *rope_inv_freq;  /* head_dim / 2 (rotary) */
    Norm ln_f;
    Linear head;
    const Layer *layers;
} Model;

typedef struct {
    float *k, *v;          /* (n_layer, rows, n_kv_head, capacity, head_dim), maybe a row-narrowed view */
    const uint8_t *valid;  /* (rows, capacity) bool, the new slot already marked */
    int64_t layer_stride;  /* elements between layers of k and v */
    int64_t row_stride;    /* elements between rows of k and v */
    int64_t valid_stride;  /* bytes between rows of valid */
    int64_t capacity, slot;
    int64_t chain;         /* 0: one new token per row; 1: the rows are consecutive tokens of one sequence
                            * (speculative decoding's check), sharing one cache row (strides 0): row r
                            * goes in slot `slot` + r and attends to the slots up to its own */
} Cache;

static void norm_row(const float *x, float *y, int64_t n, const float *weight, const float *bias,
                     int rms, float eps) {
    float mean = 0.0f, square = 0.0f;
    if (!rms) {
#pragma omp simd reduction(+ : mean)
        for (int64_t i = 0; i < n; i++) mean += x[i];
        mean /= (float)n;
    }
#pragma omp simd reduction(+ : square)
    for (int64_t i = 0; i < n; i++) square += (x[i] - mean) * (x[i] - mean);
    float inverse = 1.0f / sqrtf(square / (float)n + eps);
    for (int64_t i = 0; i < n; i++) {
        float value = (x[i] - mean) * inverse;
        if (weight) value *= weight[i];
        if (bias) value += bias[i];
        y[i] = value;
    }
}

/* Rotate pairs (first half, second half) of one head's channels by position * inv_freq. */
static void rotate(float *head, int64_t head_dim, const float *cos_table, const float *sin_table) {
    int64_t half = head_dim / 2;
    for (int64_t i = 0; i < half; i++) {
        float a = head[i], b = head[i + half];
        head[i] = a * cos_table[i] - b * sin_table[i];
        head[i + half] = b * cos_table[i] + a * sin_table[i];
    }
}

static float activate(float value, int64_t kind) {
    switch (kind) {
    case GELU_TANH:
        return 0.5f * value * (1.0f + tanhf(0.7978845608f * (value + 0.044715f * value * value * value)));
    case RELU2:
        return value > 0.0f ? value * value : 0.0f;
    default:
        return 0.5f * value * (1.0f + erff(value * 0.70710678f));
    }
}

/* out = softmax(query . keys[s] * scale over the valid slots s < seen) . values: one query head.
 * keys/values: (seen, head_dim) rows; score: room for `seen` floats. */
static void attend_portable(const float *query, const float *keys, const float *values, const uint8_t *valid,
                            int64_t seen, int64_t hd, float scale, float *score, float *out) {
    float largest = -INFINITY, total = 0.0f;
    for (int64_t s = 0; s < seen; s++) {
        if (!valid[s]) {
            score[s] = -INFINITY;
            continue;
        }
        const float *key = keys + s * hd;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < hd; i++) dot += query[i] * key[i];
        score[s] = dot * scale;
        largest = fmaxf(largest, score[s]);
    }
    for (int64_t s = 0; s < seen; s++) {
        score[s] = valid[s] ? expf(score[s] - largest) : 0.0f;
        total += score[s];
    }
    for (int64_t i = 0; i < hd; i++) out[i] = 0.0f;
    for (int64_t s = 0; s < seen; s++) {
        if (score[s] == 0.0f) continue;
        const float *value = values + s * hd;
        float p = score[s] / total;
#pragma omp simd
        for (int64_t i = 0; i < hd; i++) out[i] += p * value[i];
    }
}

#ifdef HAVE_INT16_PATH /* AVX2 and FMA */
/* e^x, 8 at a time (Cephes' expf: a degree-5 polynomial after taking out the power of two;
 * relative error ~1e-7), x clamped to [-87, 88]: below -87 it returns ~1e-38 rather than 0. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    __m256 power = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(power, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(power, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i two_to_power = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(power), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(two_to_power));
}

/* activate() eight values at a time: GELU through erf (Abramowitz & Stegun 7.1.26, absolute error
 * < 1.5e-7), GELU-tanh through e^x, ReLU^2. */
static inline __m256 activate8(__m256 v, int64_t kind) {
    const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
    if (kind == RELU2) {
        const __m256 positive = _mm256_max_ps(v, _mm256_setzero_ps());
        return _mm256_mul_ps(positive, positive);
    }
    if (kind == GELU_TANH) { /* tanh(u) = 1 - 2 / (e^(2u) + 1) */
        const __m256 u = _mm256_mul_ps(_mm256_set1_ps(0.7978845608f),
                                       _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), v), _mm256_mul_ps(v, v), v));
        const __m256 tanh_u = _mm256_sub_ps(
            one, _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(exp8(_mm256_add_ps(u, u)), one)));
        return _mm256_mul_ps(_mm256_mul_ps(half, v), _mm256_add_ps(one, tanh_u));
    }
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256 z = _mm256_mul_ps(v, _mm256_set1_ps(0.70710678f)), a = _mm256_andnot_ps(sign, z);
    const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), a, one));
    __m256 poly = _mm256_set1_ps(1.061405429f);
    poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(-1.453152027f));
    poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(1.421413741f));
    poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(-0.284496736f));
    poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(0.254829592f));
    poly = _mm256_mul_ps(poly, t);
    const __m256 erf_a = _mm256_fnmadd_ps(poly, exp8(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(a, a))), one);
    const __m256 erf_z = _mm256_or_ps(erf_a, _mm256_and_ps(sign, z)); /* erf(-a) = -erf(a) */
    return _mm256_mul_ps(_mm256_mul_ps(half, v), _mm256_add_ps(one, erf_z));
}

/* attend_portable for head_dim a multiple of 64, in registers: four slots' dot products at once
 * (one dependency chain each), e^x eight at a time, and the weighted sum of values kept in eight
 * registers per 64 channels. Measured on SmolLM2 at 8 rows x 200 slots: the portable loops took
 * a quarter of the step (their sums wait on each other, and expf runs one value at a time). */
static void attend_avx2(const float *query, const float *keys, const float *values, const uint8_t *valid,
                        int64_t seen, int64_t hd, float scale, float *score, float *out) {
    int64_t s = 0;
    for (; s + 4 <= seen; s += 4) {
        const float *key = keys + s * hd;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
               a3 = _mm256_setzero_ps();
        for (int64_t i = 0; i < hd; i += 8) {
            __m256 q = _mm256_loadu_ps(query + i);
            a0 = _mm256_fmadd_ps(q, _mm256_loadu_ps(key + i), a0);
            a1 = _mm256_fmadd_ps(q, _mm256_loadu_ps(key + hd + i), a1);
            a2 = _mm256_fmadd_ps(q, _mm256_loadu_ps(key + 2 * hd + i), a2);
            a3 = _mm256_fmadd_ps(q, _mm256_loadu_ps(key + 3 * hd + i), a3);
        }
        score[s] = hsum(a0) * scale, score[s + 1] = hsum(a1) * scale;
        score[s + 2] = hsum(a2) * scale, score[s + 3] = hsum(a3) * scale;
    }
    for (; s < seen; s++) {
        __m256 a = _mm256_setzero_ps();
        for (int64_t i = 0; i < hd; i += 8)
            a = _mm256_fmadd_ps(_mm256_loadu_ps(query + i), _mm256_loadu_ps(keys + s * hd + i), a);
        score[s] = hsum(a) * scale;
    }
    float largest = -INFINITY, total = 0.0f;
    for (s = 0; s < seen; s++)
        if (valid[s]) largest = fmaxf(largest, score[s]);
    for (s = 0; s + 8 <= seen; s += 8)
        _mm256_storeu_ps(score + s, exp8(_mm256_sub_ps(_mm256_loadu_ps(score + s), _mm256_set1_ps(largest))));
    for (; s < seen; s++) score[s] = expf(score[s] - largest);
    for (s = 0; s < seen; s++) {
        if (!valid[s]) score[s] = 0.0f;
        total += score[s];
    }
    const __m256 inverse = _mm256_set1_ps(1.0f / total);
    for (int64_t c = 0; c < hd; c += 64) {
        __m256 o[8];
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) o[j] = _mm256_setzero_ps();
        for (s = 0; s < seen; s++) {
            if (score[s] == 0.0f) continue;
            const __m256 p = _mm256_set1_ps(score[s]);
            const float *value = values + s * hd + c;
#pragma GCC unroll 8
            for (int j = 0; j < 8; j++) o[j] = _mm256_fmadd_ps(p, _mm256_loadu_ps(value + 8 * j), o[j]);
        }
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) _mm256_storeu_ps(out + c + 8 * j, _mm256_mul_ps(o[j], inverse));
    }
}
#endif

static void attend(const float *query, const float *keys, const float *values, const uint8_t *valid, int64_t seen,
                   int64_t hd, float scale, float *score, float *out) {
#ifdef HAVE_INT16_PATH
    if (hd % 64 == 0) {
        attend_avx2(query, keys, values, valid, seen, hd, scale, score, out);
        return;
    }
#endif
    attend_portable(query, keys, values, valid, seen, hd, scale, score, out);
}

/* The step; logits: rows x vocab. Returns 0, or -1 when scratch memory could not be had. */
int decode_step(const Model *m, const Cache *c, const int64_t *tokens, const int64_t *positions, int64_t rows,
                float *logits, int threads) {
    const int64_t C = m->n_embd, hd = m->head_dim, H = m->n_head, KV = m->n_kv_head, F = m->hidden;
    const int64_t qkv_width = (H + 2 * KV) * hd, up_width = m->activation == SWIGLU ? 2 * F : F;
    /* Slots attended to (the most of any row): the cached ones and the new one(s). */
    const int64_t seen = c->slot + (c->chain ? rows : 1);
    const int64_t widest = F > C ? F : C;
    /* Scratch: residual stream, normed input, q|k|v, attention output, MLP up and its activation,
     * rotary tables per row, attention scores per (row, head), the rounded int16 input rows. */
    float *x = malloc(sizeof(float) * rows * C), *normed = malloc(sizeof(float) * rows * C),
          *qkv = malloc(sizeof(float) * rows * qkv_width), *attended = malloc(sizeof(float) * rows * C),
          *up = malloc(sizeof(float) * rows * up_width), *act = malloc(sizeof(float) * rows * F),
          *rope = malloc(sizeof(float) * rows * hd), *scores = malloc(sizeof(float) * rows * H * seen),
          *qs = malloc(sizeof(float) * rounded_scales(rows, widest)),
          *xsum = malloc(sizeof(float) * block_sums(rows, widest));
    int16_t *q16 = malloc(sizeof(int16_t) * rounded_values(rows, widest));
    int failed = !x || !normed || !qkv || !attended || !up || !act || !rope || !scores || !qs || !q16 || !xsum;
    if (failed) goto done;

    Team team = {0, 0}; /* where the threads meet between operations (int8_dot.h) */
#pragma omp parallel num_threads(threads)
    {
        /* Embedding (+ positions), and each row's rotary cos|sin table. */
#pragma omp for schedule(static) nowait
        for (int64_t r = 0; r < rows; r++) {
            const float *token32 = (const float *)m->token_table + tokens[r] * C;
            const uint16_t *token16 = (const uint16_t *)m->token_table + tokens[r] * C;
            for (int64_t i = 0; i < C; i++)
                x[r * C + i] = (m->token_bf16 ? bf16_to_float(token16[i]) : token32[i]) +
                               (m->position_table ? m->position_table[positions[r] * C + i] : 0.0f);
            if (m->rotary)
                for (int64_t i = 0; i < hd / 2; i++) {
                    float angle = (float)positions[r] * m->rope_inv_freq[i];
                    rope[r * hd + i] = cosf(angle);
                    rope[r * hd + hd / 2 + i] = sinf(angle);
                }
        }
        team_wait(&team);
        for (int64_t l = 0; l < m->n_layer; l++) {
            const Layer *layer = &m->layers[l];
            float *k_cache = c->k + l * c->layer_stride, *v_cache = c->v + l * c->layer_stride;
#pragma omp for schedule(static) nowait
            for (int64_t r = 0; r < rows; r++)
                norm_row(x + r * C, normed + r * C, C, layer->ln_1.weight, layer->ln_1.bias, (int)m->rms_norm,
                         m->norm_eps);
            team_wait(&team);
            linear_rows(&layer->qkv, normed, qkv, rows, q16, qs, xsum, &team);
            /* Queries and new keys: QK-norm, rotation; the new key and value into the cache. */
#pragma omp for schedule(static) nowait
            for (int64_t r = 0; r < rows; r++) {
                float *row = qkv + r * qkv_width;
                for (int64_t h = 0; h < H + KV; h++) { /* query heads, then key heads */
                    float *head = row + h * hd;
                    if (m->qk_norm) /* no gain; F.layer_norm's eps 1e-5, F.rms_norm's float32 eps */
                        norm_row(head, head, hd, NULL, NULL, (int)m->rms_norm, m->rms_norm ? 1.1920929e-07f : 1e-5f);
                    if (m->rotary) rotate(head, hd, rope + r * hd, rope + r * hd + hd / 2);
                }
                for (int64_t h = 0; h < KV; h++) {
                    int64_t at = r * c->row_stride + (h * c->capacity + c->slot + (c->chain ? r : 0)) * hd;
                    for (int64_t i = 0; i < hd; i++) {
                        k_cache[at + i] = row[(H + h) * hd + i];
                        v_cache[at + i] = row[(H + KV + h) * hd + i];
                    }
                }
            }
            team_wait(&team);
            /* Attention of each (row, query head) over the row's valid slots. */
            const float scale = 1.0f / sqrtf((float)hd);
#pragma omp for collapse(2) schedule(static) nowait
            for (int64_t r = 0; r < rows; r++)
                for (int64_t h = 0; h < H; h++) {
                    int64_t base = r * c->row_stride + (h / (H / KV)) * c->capacity * hd;
                    attend(qkv + r * qkv_width + h * hd, k_cache + base, v_cache + base,
                           c->valid + r * c->valid_stride, c->slot + 1 + (c->chain ? r : 0), hd, scale,
                           scores + (r * H + h) * seen,
                           attended + r * C + h * hd);
                }
            team_wait(&team);
            linear_rows(&layer->attn_out, attended, normed, rows, q16, qs, xsum, &team);
#pragma omp for schedule(static) nowait
            for (int64_t i = 0; i < rows * C; i++) x[i] += normed[i];
            team_wait(&team);
            /* MLP */
#pragma omp for schedule(static) nowait
            for (int64_t r = 0; r < rows; r++)
                norm_row(x + r * C, normed + r * C, C, layer->ln_2.weight, layer->ln_2.bias, (int)m->rms_norm,
                         m->norm_eps);
            team_wait(&team);
            linear_rows(&layer->up, normed, up, rows, q16, qs, xsum, &team);
#ifdef HAVE_INT16_PATH
            if (m->activation == SWIGLU && F % 8 == 0) { /* SiLU(gate) * up, eight at a time */
#pragma omp for schedule(static) nowait
                for (int64_t c8 = 0; c8 < rows * F / 8; c8++) {
                    const int64_t r = c8 * 8 / F, j = c8 * 8 % F;
                    const __m256 gate = _mm256_loadu_ps(up + r * up_width + j);
                    const __m256 silu = _mm256_div_ps(
                        gate, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), gate))));
                    _mm256_storeu_ps(act + r * F + j, _mm256_mul_ps(silu, _mm256_loadu_ps(up + r * up_width + F + j)));
                }
            } else if (m->activation != SWIGLU && F % 8 == 0) {
#pragma omp for schedule(static) nowait
                for (int64_t i = 0; i < rows * F; i += 8)
                    _mm256_storeu_ps(act + i, activate8(_mm256_loadu_ps(up + i), m->activation));
            } else
#endif
#pragma omp for schedule(static) nowait
            for (int64_t i = 0; i < rows * F; i++) {
                if (m->activation == SWIGLU) {
                    int64_t r = i / F, j = i % F;
                    float gate = up[r * up_width + j];
                    act[i] = gate / (1.0f + expf(-gate)) * up[r * up_width + F + j];
                } else {
                    act[i] = activate(up[i], m->activation);
                }
            }
            team_wait(&team); /* after whichever loop computed the activation */
            linear_rows(&layer->down, act, normed, rows, q16, qs, xsum, &team);
#pragma omp for schedule(static) nowait
            for (int64_t i = 0; i < rows * C; i++) x[i] += normed[i];
            team_wait(&team);
        }
#pragma omp for schedule(static) nowait
        for (int64_t r = 0; r < rows; r++)
            norm_row(x + r * C, normed + r * C, C, m->ln_f.weight, m->ln_f.bias, (int)m->rms_norm, m->norm_eps);
        team_wait(&team);
        linear_rows(&m->head, normed, logits, rows, q16, qs, xsum, &team);
        if (m->logit_softcap > 0.0f) {
            const float cap = m->logit_softcap;
#pragma omp for schedule(static) nowait
            for (int64_t i = 0; i < rows * m->vocab; i++) logits[i] = cap * tanhf(logits[i] / cap);
        }
    } /* the region's own barrier ends the step */
done:
    free(x), free(normed), free(qkv), free(attended), free(up), free(act), free(rope), free(scores), free(qs);
    free(q16), free(xsum);
    return failed ? -1 : 0;
}

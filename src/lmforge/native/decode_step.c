/* One decode step of an int8 GPT model (models/gpt.py) in a single call: every row's next token
 * goes through embedding, n_layer pre-norm blocks, the final norm and the output head.
 *
 * Why: decoding a small model one token at a time from Python pays ~1,500 PyTorch operator calls
 * per token (SmolLM2: 30 layers of a dozen small operations), about as long as the arithmetic
 * itself. Here the whole step is one OpenMP parallel region: the threads share each matrix
 * product (linear_rows, int8_dot.h) and the attention, and meet at a barrier between operations.
 *
 * It computes what GPT.forward computes for one new token per row with a KV cache, for every
 * option of ModelConfig that changes inference: LayerNorm or RMSNorm (with their eps), learned /
 * sinusoidal / rotary positions, GELU / GELU-tanh / ReLU^2 / SwiGLU (gate and up fused), grouped-
 * query attention, QK-norm, biases, logit soft-capping. The KV cache is the KVCache's own float32
 * memory: the new keys and values go into slot `slot` of every row, and each row attends to its
 * valid slots up to that one. decoding.py lays out the structures below and checks the model.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "int8_dot.h"

typedef struct {
    const int8_t *weight; /* out x in */
    const float *scale;   /* one per output channel */
    const float *bias;    /* or NULL */
    int64_t in, out;
} Linear;

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
    float norm_eps, logit_softcap;
    const float *token_table;    /* vocab x n_embd */
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

/* The step; logits: rows x vocab. Returns 0, or -1 when scratch memory could not be had. */
int decode_step(const Model *m, const Cache *c, const int64_t *tokens, const int64_t *positions, int64_t rows,
                float *logits, int threads) {
    const int64_t C = m->n_embd, hd = m->head_dim, H = m->n_head, KV = m->n_kv_head, F = m->hidden;
    const int64_t qkv_width = (H + 2 * KV) * hd, up_width = m->activation == SWIGLU ? 2 * F : F;
    const int64_t seen = c->slot + 1; /* slots attended to: the cached ones and the new one */
    const int64_t widest = F > C ? F : C;
    /* Scratch: residual stream, normed input, q|k|v, attention output, MLP up and its activation,
     * rotary tables per row, attention scores per (row, head), the rounded int16 input row. */
    float *x = malloc(sizeof(float) * rows * C), *normed = malloc(sizeof(float) * rows * C),
          *qkv = malloc(sizeof(float) * rows * qkv_width), *attended = malloc(sizeof(float) * rows * C),
          *up = malloc(sizeof(float) * rows * up_width), *act = malloc(sizeof(float) * rows * F),
          *rope = malloc(sizeof(float) * rows * hd), *scores = malloc(sizeof(float) * rows * H * seen),
          *qs = malloc(sizeof(float) * (widest / 32 + 1));
    int16_t *q16 = malloc(sizeof(int16_t) * widest);
    int failed = !x || !normed || !qkv || !attended || !up || !act || !rope || !scores || !qs || !q16;
    if (failed) goto done;

#pragma omp parallel num_threads(threads)
    {
        /* Embedding (+ positions), and each row's rotary cos|sin table. */
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const float *token = m->token_table + tokens[r] * C;
            for (int64_t i = 0; i < C; i++)
                x[r * C + i] = token[i] + (m->position_table ? m->position_table[positions[r] * C + i] : 0.0f);
            if (m->rotary)
                for (int64_t i = 0; i < hd / 2; i++) {
                    float angle = (float)positions[r] * m->rope_inv_freq[i];
                    rope[r * hd + i] = cosf(angle);
                    rope[r * hd + hd / 2 + i] = sinf(angle);
                }
        }
        for (int64_t l = 0; l < m->n_layer; l++) {
            const Layer *layer = &m->layers[l];
            float *k_cache = c->k + l * c->layer_stride, *v_cache = c->v + l * c->layer_stride;
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; r++)
                norm_row(x + r * C, normed + r * C, C, layer->ln_1.weight, layer->ln_1.bias, (int)m->rms_norm,
                         m->norm_eps);
            linear_rows(normed, layer->qkv.weight, layer->qkv.scale, layer->qkv.bias, qkv, rows, C, qkv_width,
                        q16, qs);
            /* Queries and new keys: QK-norm, rotation; the new key and value into the cache. */
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; r++) {
                float *row = qkv + r * qkv_width;
                for (int64_t h = 0; h < H + KV; h++) { /* query heads, then key heads */
                    float *head = row + h * hd;
                    if (m->qk_norm) /* no gain; F.layer_norm's eps 1e-5, F.rms_norm's float32 eps */
                        norm_row(head, head, hd, NULL, NULL, (int)m->rms_norm, m->rms_norm ? 1.1920929e-07f : 1e-5f);
                    if (m->rotary) rotate(head, hd, rope + r * hd, rope + r * hd + hd / 2);
                }
                for (int64_t h = 0; h < KV; h++) {
                    int64_t at = r * c->row_stride + (h * c->capacity + c->slot) * hd;
                    for (int64_t i = 0; i < hd; i++) {
                        k_cache[at + i] = row[(H + h) * hd + i];
                        v_cache[at + i] = row[(H + KV + h) * hd + i];
                    }
                }
            }
            /* Attention of each (row, query head) over the row's valid slots. */
            const float scale = 1.0f / sqrtf((float)hd);
#pragma omp for collapse(2) schedule(static)
            for (int64_t r = 0; r < rows; r++)
                for (int64_t h = 0; h < H; h++) {
                    const float *query = qkv + r * qkv_width + h * hd;
                    int64_t base = r * c->row_stride + (h / (H / KV)) * c->capacity * hd;
                    const uint8_t *valid = c->valid + r * c->valid_stride;
                    float *score = scores + (r * H + h) * seen, largest = -INFINITY, total = 0.0f;
                    for (int64_t s = 0; s < seen; s++) {
                        if (!valid[s]) {
                            score[s] = -INFINITY;
                            continue;
                        }
                        const float *key = k_cache + base + s * hd;
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
                    float *out = attended + r * C + h * hd;
                    for (int64_t i = 0; i < hd; i++) out[i] = 0.0f;
                    for (int64_t s = 0; s < seen; s++) {
                        if (score[s] == 0.0f) continue;
                        const float *value = v_cache + base + s * hd;
                        float p = score[s] / total;
#pragma omp simd
                        for (int64_t i = 0; i < hd; i++) out[i] += p * value[i];
                    }
                }
            linear_rows(attended, layer->attn_out.weight, layer->attn_out.scale, layer->attn_out.bias, normed,
                        rows, C, C, q16, qs);
#pragma omp for schedule(static)
            for (int64_t i = 0; i < rows * C; i++) x[i] += normed[i];
            /* MLP */
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; r++)
                norm_row(x + r * C, normed + r * C, C, layer->ln_2.weight, layer->ln_2.bias, (int)m->rms_norm,
                         m->norm_eps);
            linear_rows(normed, layer->up.weight, layer->up.scale, layer->up.bias, up, rows, C, up_width, q16, qs);
#pragma omp for schedule(static)
            for (int64_t i = 0; i < rows * F; i++) {
                if (m->activation == SWIGLU) {
                    int64_t r = i / F, j = i % F;
                    float gate = up[r * up_width + j];
                    act[i] = gate / (1.0f + expf(-gate)) * up[r * up_width + F + j];
                } else {
                    act[i] = activate(up[i], m->activation);
                }
            }
            linear_rows(act, layer->down.weight, layer->down.scale, layer->down.bias, normed, rows, F, C, q16, qs);
#pragma omp for schedule(static)
            for (int64_t i = 0; i < rows * C; i++) x[i] += normed[i];
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++)
            norm_row(x + r * C, normed + r * C, C, m->ln_f.weight, m->ln_f.bias, (int)m->rms_norm, m->norm_eps);
        linear_rows(normed, m->head.weight, m->head.scale, m->head.bias, logits, rows, C, m->vocab, q16, qs);
        if (m->logit_softcap > 0.0f) {
            const float cap = m->logit_softcap;
#pragma omp for schedule(static)
            for (int64_t i = 0; i < rows * m->vocab; i++) logits[i] = cap * tanhf(logits[i] / cap);
        }
    }
done:
    free(x), free(normed), free(qkv), free(attended), free(up), free(act), free(rope), free(scores), free(qs);
    free(q16);
    return failed ? -1 : 0;
}

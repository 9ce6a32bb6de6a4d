/* Kernels: the serving copy's 4-bit and 8-bit matrix products, and a decoder layer's
 * MLP and attention halves built on them, for AVX2 + FMA CPUs.
 *
 * Built and loaded by rlhf_chat/model/native.py (a plain C library through
 * ctypes: no PyTorch headers, so it compiles in about a second). Why it
 * exists: on a CPU without AVX-512, torch's int4 kernel took 55% of a
 * decoding step, about three times what reading the weights costs.
 *
 * Numerics. The products multiply float32 activations by the weights exactly
 * as quantized.py's int4_values / int8_values give them in float32:
 *   int4: w = (q - 8) * scale + zero, scale and zero bf16 values, one rounding,
 *         computed as q * scale + (zero - 8 * scale): the product of a bf16 and
 *         a 4-bit integer is exact in float32, and so is the difference of two
 *         bf16 values less than 2^16 apart in magnitude, so it is the same number;
 *   int8: w = q * scale (exact), applied as scale * sum(q * x).
 * Only the order of the float32 additions differs from a dense matmul.
 *
 * Layouts (rows are output features, K the input width, K % 32 == 0):
 *   int4 nibbles (N, K / 2) bytes, two weights a byte, the first in the low
 *        nibble: each 32-bit word holds 8 weights, which the kernel spreads over
 *        the 8 lanes of a vector with one variable shift (no shuffles);
 *   int4 scales (N, K / 32, 2) float32: scale, zero (bf16 values, as torch's
 *        kernel rounds them, so that both kernels multiply by one set of weights);
 *   int8 weights (N, K) int8, scales (N) float32.
 *
 * The two one-call layer halves return 0, or -1 where their scratch memory could
 * not be had (nothing written then).
 *
 * Work is split over output rows between OpenMP threads (the runtime torch
 * already loaded, so the two share one pool); each thread walks its rows two
 * at a time against up to four activation rows, the activations in blocks
 * that stay in the L2 cache. With eight activation rows or more (a PPO
 * rollout, a prompt), a weight row meets eight at once where they fit the L1
 * cache: unpacking the 4-bit weights, not the multiply-adds, bounds the narrow
 * tile, and the wide one unpacks each weight once per eight rows, not per four
 * (a layer's products 1.2x faster at eight rows: bench/int4_tiles.py). Both tiles add
 * in the same order, so a row's output never depends on the rows beside it.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define GROUP 32
#define ROW_TILE 4     /* activation rows per register tile */
#define ROW_BLOCK 32   /* activation rows per cache block */
#define WIDE_TILE 8    /* activation rows per register tile of one weight row */
#ifndef WIDE_BYTES  /* built with -DWIDE_BYTES=0, no wide tile: bench/int4_tiles.py's same-run baseline */
#define WIDE_BYTES (24 * 1024)  /* the most activations a wide tile streams: they stay in a 32 KiB L1 */
#endif

static inline float horizontal_sum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

/* An int4 block's scale and its zero point less 8 scales, as vectors: w = q * scale + zero. */
static inline void int4_scale_zero(const float *scale_zero, __m256 *scale, __m256 *zero) {
    *scale = _mm256_broadcast_ss(scale_zero);
    *zero = _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), *scale, _mm256_broadcast_ss(scale_zero + 1));
}

/* The 8 weights of one 32-bit word of nibbles as a vector of 8 floats. */
static inline __m256 int4_vector(const uint8_t *nibbles, __m256 scale, __m256 zero) {
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), mask = _mm256_set1_epi32(0x0F);
    int32_t word;
    memcpy(&word, nibbles, sizeof word);  /* an unaligned, alias-safe load; one mov */
    __m256i lanes = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(word), shifts), mask);
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes), scale, zero);
}

/* The 32 weights of one int4 block as four vectors of 8 floats. */
static inline void int4_block(const uint8_t *nibbles, const float *scale_zero, __m256 w[4]) {
    __m256 scale, zero;
    int4_scale_zero(scale_zero, &scale, &zero);
    for (int i = 0; i < 4; i++) w[i] = int4_vector(nibbles + 4 * i, scale, zero);
}

/* out[m, n], out[m, n + 1] for m < rows (rows <= ROW_TILE), int4 weights. */
static inline __attribute__((always_inline)) void int4_tile(
    int rows, const float *x, int64_t k, const uint8_t *nib0, const uint8_t *nib1,
    const float *sz0, const float *sz1, float *out, int64_t n_out, int pair) {
    __m256 acc[ROW_TILE][2];
    for (int m = 0; m < rows; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < k / GROUP; b++) {
        __m256 w0[4], w1[4];
        int4_block(nib0 + b * 16, sz0 + b * 2, w0);
        int4_block(nib1 + b * 16, sz1 + b * 2, w1);
        for (int m = 0; m < rows; m++) {
            const float *xb = x + m * k + b * GROUP;
            for (int i = 0; i < 4; i++) {
                __m256 xv = _mm256_loadu_ps(xb + 8 * i);
                acc[m][0] = _mm256_fmadd_ps(w0[i], xv, acc[m][0]);
                acc[m][1] = _mm256_fmadd_ps(w1[i], xv, acc[m][1]);
            }
        }
    }
    for (int m = 0; m < rows; m++) {
        out[m * n_out] = horizontal_sum(acc[m][0]);
        if (pair) out[m * n_out + 1] = horizontal_sum(acc[m][1]);
    }
}

/* out[m, n] for m < WIDE_TILE, one int4 weight row against eight activation rows:
 * each weight vector is unpacked once for all of them, where the two-row tile above
 * unpacks it once per four. The same additions in the same order (block by block,
 * vector by vector), so the same sums. */
static inline __attribute__((always_inline)) void int4_wide_tile(
    const float *x, int64_t k, const uint8_t *nib, const float *sz, float *out, int64_t n_out) {
    __m256 acc[WIDE_TILE];
    for (int m = 0; m < WIDE_TILE; m++) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < k / GROUP; b++) {
        __m256 scale, zero;
        int4_scale_zero(sz + 2 * b, &scale, &zero);
        for (int i = 0; i < 4; i++) {
            __m256 w = int4_vector(nib + b * 16 + 4 * i, scale, zero);
            for (int m = 0; m < WIDE_TILE; m++)
                acc[m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * k + b * GROUP + 8 * i), acc[m]);
        }
    }
    for (int m = 0; m < WIDE_TILE; m++) out[m * n_out] = horizontal_sum(acc[m]);
}

/* Rows [m, end) of out against weight rows r0 and r1 (r1 == r0 for an odd last row),
 * in two-row tiles of up to four activation rows. */
static inline __attribute__((always_inline)) void int4_narrow_rows(
    const float *x, int64_t m, int64_t end, int64_t k, const uint8_t *nib0, const uint8_t *nib1,
    const float *sz0, const float *sz1, float *out, int64_t n, int64_t r0, int pair) {
    for (; m < end; m += ROW_TILE) {
        int rows = end - m < ROW_TILE ? (int)(end - m) : ROW_TILE;
        const float *xm = x + m * k;
        float *o = out + m * n + r0;
        switch (rows) {  /* constant row counts, so the compiler keeps the tile in registers */
            case 4: int4_tile(4, xm, k, nib0, nib1, sz0, sz1, o, n, pair); break;
            case 3: int4_tile(3, xm, k, nib0, nib1, sz0, sz1, o, n, pair); break;
            case 2: int4_tile(2, xm, k, nib0, nib1, sz0, sz1, o, n, pair); break;
            default: int4_tile(1, xm, k, nib0, nib1, sz0, sz1, o, n, pair); break;
        }
    }
}

/* out (M, N) = x (M, K) @ W.T, W the int4 layer (layouts above).
 *
 * Where eight activation rows fit the L1 cache (K <= 768), each weight row meets
 * them in wide tiles, and the rows left over in two-row tiles; otherwise every row
 * goes through two-row tiles, whose four activation rows fit it. */
void int4_matmul(const float *x, int64_t m_rows, int64_t k, const uint8_t *nibbles,
                 const float *scale_zero, int64_t n, float *out, int threads) {
    int64_t pairs = (n + 1) / 2;
    int wide = WIDE_TILE * k * (int64_t)sizeof(float) <= WIDE_BYTES;
    for (int64_t m0 = 0; m0 < m_rows; m0 += ROW_BLOCK) {  /* a block of activations, reused by every row */
        int64_t block = m_rows - m0 < ROW_BLOCK ? m_rows - m0 : ROW_BLOCK;
        int64_t wide_end = wide ? m0 + block / WIDE_TILE * WIDE_TILE : m0;
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t p = 0; p < pairs; p++) {
            int64_t r0 = 2 * p, r1 = r0 + 1 < n ? r0 + 1 : r0;  /* an odd last row pairs with itself */
            const uint8_t *nib0 = nibbles + r0 * (k / 2), *nib1 = nibbles + r1 * (k / 2);
            const float *sz0 = scale_zero + r0 * (k / GROUP) * 2, *sz1 = scale_zero + r1 * (k / GROUP) * 2;
            int pair = r1 != r0;
            for (int64_t m = m0; m < wide_end; m += WIDE_TILE) {
                int4_wide_tile(x + m * k, k, nib0, sz0, out + m * n + r0, n);
                if (pair) int4_wide_tile(x + m * k, k, nib1, sz1, out + m * n + r1, n);
            }
            int4_narrow_rows(x, wide_end, m0 + block, k, nib0, nib1, sz0, sz1, out, n, r0, pair);
        }
    }
}

/* out[m, n], out[m, n + 1] for m < rows, int8 weights. */
static inline __attribute__((always_inline)) void int8_tile(
    int rows, const float *x, int64_t k, const int8_t *w0, const int8_t *w1,
    float s0, float s1, float *out, int64_t n_out, int pair) {
    __m256 acc[ROW_TILE][2];
    for (int m = 0; m < rows; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t j = 0; j < k; j += 8) {
        __m256 a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w0 + j))));
        __m256 b = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w1 + j))));
        for (int m = 0; m < rows; m++) {
            __m256 xv = _mm256_loadu_ps(x + m * k + j);
            acc[m][0] = _mm256_fmadd_ps(a, xv, acc[m][0]);
            acc[m][1] = _mm256_fmadd_ps(b, xv, acc[m][1]);
        }
    }
    for (int m = 0; m < rows; m++) {
        out[m * n_out] = s0 * horizontal_sum(acc[m][0]);
        if (pair) out[m * n_out + 1] = s1 * horizontal_sum(acc[m][1]);
    }
}

/* out (M, N) = x (M, K) @ (scales[:, None] * W).T, W int8 (N, K), K % 8 == 0. */
void int8_matmul(const float *x, int64_t m_rows, int64_t k, const int8_t *weight,
                 const float *scales, int64_t n, float *out, int threads) {
    int64_t pairs = (n + 1) / 2;
    for (int64_t m0 = 0; m0 < m_rows; m0 += ROW_BLOCK) {  /* a block of activations, reused by every row */
        int64_t block = m_rows - m0 < ROW_BLOCK ? m_rows - m0 : ROW_BLOCK;
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t p = 0; p < pairs; p++) {
            int64_t r0 = 2 * p, r1 = r0 + 1 < n ? r0 + 1 : r0;
            for (int64_t m = m0; m < m0 + block; m += ROW_TILE) {
                int rows = m0 + block - m < ROW_TILE ? (int)(m0 + block - m) : ROW_TILE;
                const float *xm = x + m * k;
                float *o = out + m * n + r0;
                const int8_t *w0 = weight + r0 * k, *w1 = weight + r1 * k;
                int pair = r1 != r0;
                switch (rows) {
                    case 4: int8_tile(4, xm, k, w0, w1, scales[r0], scales[r1], o, n, pair); break;
                    case 3: int8_tile(3, xm, k, w0, w1, scales[r0], scales[r1], o, n, pair); break;
                    case 2: int8_tile(2, xm, k, w0, w1, scales[r0], scales[r1], o, n, pair); break;
                    default: int8_tile(1, xm, k, w0, w1, scales[r0], scales[r1], o, n, pair); break;
                }
            }
        }
    }
}

static void rms_norm_rows(const float *hidden, int64_t m_rows, int64_t h, const float *weight, float eps, float *out) {
    for (int64_t m = 0; m < m_rows; m++) {
        const float *row = hidden + m * h;
        float squares = 0.0f;
        for (int64_t j = 0; j < h; j++) squares += row[j] * row[j];
        float inverse = 1.0f / sqrtf(squares / (float)h + eps);
        for (int64_t j = 0; j < h; j++) out[m * h + j] = row[j] * inverse * weight[j];
    }
}

/* exp(x), 8 lanes: Cephes' expf (range reduction by ln 2, a degree-6 polynomial),
 * within 2 ulp of the C library's over the range that does not overflow. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f)), _mm256_set1_ps(88.3762626647949f));
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i power = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(power));
}

/* One decoder layer's MLP half, in one call: out (M, H) = hidden + down(silu(gate) * up),
 * [gate, up] = gate_up(rms_norm(hidden) * norm_weight), gate_up and down int4 layers
 * (gate_up's outputs: the I gate outputs, then the I up outputs). The Llama MLP, as
 * decoder.py computes it from torch's operations, without their dispatch between steps. */
int int4_mlp(const float *hidden, int64_t m_rows, int64_t h, const float *norm_weight, float eps,
             const uint8_t *gate_up_nibbles, const float *gate_up_scales, int64_t inter,
             const uint8_t *down_nibbles, const float *down_scales, float *out, int threads) {
    float *normed = malloc(m_rows * h * sizeof(float));
    float *gate_up = malloc(m_rows * 2 * inter * sizeof(float));
    float *act = malloc(m_rows * inter * sizeof(float));
    if (!normed || !gate_up || !act) {
        free(normed);
        free(gate_up);
        free(act);
        return -1;
    }
    rms_norm_rows(hidden, m_rows, h, norm_weight, eps, normed);
    int4_matmul(normed, m_rows, h, gate_up_nibbles, gate_up_scales, 2 * inter, gate_up, threads);
    for (int64_t m = 0; m < m_rows; m++) {
        const float *gate = gate_up + m * 2 * inter, *up = gate + inter;
        const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
        int64_t j = 0;
        for (; j + 8 <= inter; j += 8) {  /* silu(gate) * up = gate / (1 + exp(-gate)) * up */
            __m256 g = _mm256_loadu_ps(gate + j);
            __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_xor_ps(g, sign))));
            _mm256_storeu_ps(act + m * inter + j, _mm256_mul_ps(silu, _mm256_loadu_ps(up + j)));
        }
        for (; j < inter; j++) act[m * inter + j] = gate[j] / (1.0f + expf(-gate[j])) * up[j];
    }
    int4_matmul(act, m_rows, inter, down_nibbles, down_scales, h, out, threads);
    for (int64_t i = 0; i < m_rows * h; i++) out[i] += hidden[i];
    free(normed);
    free(gate_up);
    free(act);
    return 0;
}

/* Llama's rotary embedding of one head (half-split layout), in place. */
static void rotate_head(float *x, const float *cos, const float *sin, int64_t d) {
    int64_t half = d / 2;
    for (int64_t i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

static inline float dot(const float *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float total = horizontal_sum(acc);
    for (; i < n; i++) total += a[i] * b[i];
    return total;
}

/* One decoder layer's attention half for one new position per row, in one call:
 * out (R, H) = hidden + o(attention(rope(q), cache + rope(k), cache + v)), with
 * [q, k, v] = qkv(rms_norm(hidden) * norm_weight). The row's key and value go into
 * the cache (R, KV, T, D) at position `at`; the row attends to the positions up to
 * `at` where valid (R, T) is nonzero; cos, sin (R, D) are the rotary tables of the
 * row's position. Grouped heads: query head i reads key/value head i / (heads / KV).
 * What decoder.py computes with torch's operations, for a layer without LoRA. */
int int4_attention_step(const float *hidden, int64_t rows, int64_t h, const float *norm_weight, float eps,
                         const uint8_t *qkv_nibbles, const float *qkv_scales, const uint8_t *o_nibbles,
                         const float *o_scales, int64_t heads, int64_t kv_heads, int64_t d, float *keys,
                         float *values, int64_t total, int64_t at, const uint8_t *valid, const float *cos,
                         const float *sin, float *out, int threads) {
    int64_t width = (heads + 2 * kv_heads) * d, group = heads / kv_heads;
    float *normed = malloc(rows * h * sizeof(float)), *qkv = malloc(rows * width * sizeof(float));
    float *attended = malloc(rows * heads * d * sizeof(float)), *scores = malloc((at + 1) * sizeof(float));
    if (!normed || !qkv || !attended || !scores) {
        free(normed);
        free(qkv);
        free(attended);
        free(scores);
        return -1;
    }
    rms_norm_rows(hidden, rows, h, norm_weight, eps, normed);
    int4_matmul(normed, rows, h, qkv_nibbles, qkv_scales, width, qkv, threads);
    const float scale = 1.0f / sqrtf((float)d);
    for (int64_t r = 0; r < rows; r++) {
        float *q = qkv + r * width, *k = q + heads * d, *v = k + kv_heads * d;
        for (int64_t i = 0; i < heads + kv_heads; i++) rotate_head(q + i * d, cos + r * d, sin + r * d, d);
        for (int64_t g = 0; g < kv_heads; g++) {
            memcpy(keys + ((r * kv_heads + g) * total + at) * d, k + g * d, d * sizeof(float));
            memcpy(values + ((r * kv_heads + g) * total + at) * d, v + g * d, d * sizeof(float));
        }
        for (int64_t i = 0; i < heads; i++) {
            const float *key = keys + (r * kv_heads + i / group) * total * d;
            const float *value = values + (r * kv_heads + i / group) * total * d;
            float largest = -INFINITY, sum = 0.0f;
            for (int64_t t = 0; t <= at; t++) {
                scores[t] = valid[r * total + t] ? dot(q + i * d, key + t * d, d) * scale : -INFINITY;
                if (scores[t] > largest) largest = scores[t];
            }
            for (int64_t t = 0; t <= at; t++) {
                scores[t] = valid[r * total + t] ? expf(scores[t] - largest) : 0.0f;
                sum += scores[t];
            }
            float *o = attended + (r * heads + i) * d;
            for (int64_t j = 0; j < d; j++) o[j] = 0.0f;
            for (int64_t t = 0; t <= at; t++) {
                if (scores[t] == 0.0f) continue;
                float weight = scores[t] / sum;
                __m256 p = _mm256_set1_ps(weight);
                int64_t j = 0;
                for (; j + 8 <= d; j += 8)
                    _mm256_storeu_ps(o + j, _mm256_fmadd_ps(p, _mm256_loadu_ps(value + t * d + j), _mm256_loadu_ps(o + j)));
                for (; j < d; j++) o[j] += weight * value[t * d + j];
            }
        }
    }
    int4_matmul(attended, rows, heads * d, o_nibbles, o_scales, h, out, threads);
    for (int64_t i = 0; i < rows * h; i++) out[i] += hidden[i];
    free(normed);
    free(qkv);
    free(attended);
    free(scores);
    return 0;
}

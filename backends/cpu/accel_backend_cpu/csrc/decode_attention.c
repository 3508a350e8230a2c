/* Paged decode attention for the accel-models CPU backend: one query row per sequence, keys and values
 * read in place from the cache blocks (no gather copy), online softmax, float32 accumulation.
 *
 * Cache layout (the backend's): [2, num_blocks, num_kv_heads, block_size, head_size]; keys are cache[0],
 * values cache[1]. Query [batch, num_heads, head_size] contiguous; output the same. Query head h uses KV
 * head h / (num_heads / num_kv_heads). Sequence b attends to positions [max(0, L - window), L) with
 * L = seq_lens[b] (window <= 0: no window); soft_cap > 0 applies c * tanh(s / c) to the scaled scores.
 *
 * The kernel is compute-bound, not DRAM-bound, at decode sizes (measured: 16 sequences x 2 KV heads x 80 keys,
 * head 64, hot or streamed cache within ~30%): the score dot products use two 8-wide accumulators and one
 * horizontal sum (head sizes that are multiples of 8; the OpenMP-simd reduction it replaces was latency-bound
 * on one accumulator) and the softmax's exponentials a vectorizable polynomial (softmax_expf) instead of a
 * libm call per score: 183 -> ~110 us single-threaded on that case (bench in the issue-4 notes).
 *
 * Built by accel_backend_cpu/native.py with the machine's C compiler (-O3 -march=native -fopenmp) and
 * called through ctypes; plain C, no Python or torch headers.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_GROUP 16
#define MAX_HEAD 256
#define MAX_BLOCK 256

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));
static inline v8 ldv8(const float *p) { return *(const v8u *)p; }

/* exp(x) for the softmax (x <= 0 there), vectorizable (no libm call): x = n ln2 + r with n = rint(x log2 e)
 * (ln2 in two parts, Cody-Waite), exp(r) by Cephes' expf polynomial, 2^n in the exponent bits; relative
 * error ~1e-7. Inputs below -87 give 2^-125.5-ish (the softmax denominator is >= 1, so that is 0 to float
 * precision); NaN stays NaN (the comparison keeps it, the polynomial propagates it). */
static inline float softmax_expf(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = __builtin_rintf(x * 1.44269504088896341f);
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t e = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &e, sizeof scale);
    return p * scale;
}

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = ((uint32_t)v) << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);  /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* dtype: 0 = float32, 1 = bfloat16 (query, cache and output share it). Returns 0, or -1 for sizes this
 * kernel does not take (the caller checks them first), -2 when a block-table entry a sequence uses lies outside
 * the cache (nothing of that sequence is read). */
int accel_decode_attention(const void *query, const void *cache, const int32_t *block_table,
                           int64_t block_table_stride, const int32_t *seq_lens, void *out, int64_t batch,
                           int64_t num_heads, int64_t num_kv_heads, int64_t head_size, int64_t block_size,
                           int64_t num_blocks, float scale, int64_t window, float soft_cap, int dtype,
                           int num_threads) {
    const int64_t group = num_heads / num_kv_heads;
    if (group > MAX_GROUP || head_size > MAX_HEAD || block_size > MAX_BLOCK || group * num_kv_heads != num_heads)
        return -1;
    const int vec8 = head_size % 8 == 0;
    const int64_t head_stride = block_size * head_size;               /* one KV head of one block */
    const int64_t block_stride = num_kv_heads * head_stride;
    const int64_t half = num_blocks * block_stride;                    /* keys -> values */
    int bad_block = 0; /* a block-table entry outside the cache: reported, never read */
#pragma omp parallel for collapse(2) schedule(dynamic, 1) num_threads(num_threads) reduction(| : bad_block)
    for (int64_t b = 0; b < batch; ++b) {
        for (int64_t kh = 0; kh < num_kv_heads; ++kh) {
            {
                const int64_t len0 = seq_lens[b];
                int ok = 1;
                for (int64_t j = 0; j * block_size < len0; ++j) {
                    const int64_t blk = block_table[b * block_table_stride + j];
                    ok &= blk >= 0 && blk < num_blocks;
                }
                if (!ok) {
                    bad_block = 1;
                    continue;
                }
            }
            float q[MAX_GROUP][MAX_HEAD];
            float acc[MAX_GROUP][MAX_HEAD];
            float m[MAX_GROUP], l[MAX_GROUP];
            float krow[MAX_HEAD], vrow[MAX_HEAD];
            const int64_t len = seq_lens[b];
            const int64_t start = (window > 0 && len > window) ? len - window : 0;
            for (int64_t g = 0; g < group; ++g) {
                const int64_t qoff = (b * num_heads + kh * group + g) * head_size;
                for (int64_t d = 0; d < head_size; ++d)
                    q[g][d] = dtype ? bf16_to_f32(((const uint16_t *)query)[qoff + d]) : ((const float *)query)[qoff + d];
                m[g] = -INFINITY;
                l[g] = 0.0f;
                memset(acc[g], 0, sizeof(float) * head_size);
            }
            /* block by block: the block's scores for every query head of the group, one rescale per block,
             * then the weighted values; the next block's rows are prefetched while this one is used */
            for (int64_t p0 = start - start % block_size; p0 < len; p0 += block_size) {
                const int64_t j = p0 / block_size;
                const int64_t lo = p0 < start ? start - p0 : 0;
                const int64_t hi = (len - p0) < block_size ? (len - p0) : block_size;
                const int64_t kbase = (int64_t)block_table[b * block_table_stride + j] * block_stride + kh * head_stride;
                if (p0 + block_size < len) {
                    const int64_t nb = (int64_t)block_table[b * block_table_stride + j + 1] * block_stride + kh * head_stride;
                    const char *nk = (const char *)cache + nb * (dtype ? 2 : 4);
                    const char *nv = (const char *)cache + (half + nb) * (dtype ? 2 : 4);
                    for (int64_t off = 0; off < head_stride * (dtype ? 2 : 4); off += 64) {
                        __builtin_prefetch(nk + off, 0, 1);
                        __builtin_prefetch(nv + off, 0, 1);
                    }
                }
                float sc[MAX_GROUP][MAX_BLOCK];
                for (int64_t t = lo; t < hi; ++t) {
                    const float *k32;
                    if (dtype) {
                        const uint16_t *k16 = (const uint16_t *)cache + kbase + t * head_size;
                        for (int64_t d = 0; d < head_size; ++d) krow[d] = bf16_to_f32(k16[d]);
                        k32 = krow;
                    } else {
                        k32 = (const float *)cache + kbase + t * head_size;
                    }
                    for (int64_t g = 0; g < group; ++g) {
                        float s;
                        if (vec8) {  /* two independent 8-wide accumulators, one horizontal sum */
                            v8 a0 = {0}, a1 = {0};
                            const int64_t nv = head_size / 8;
                            int64_t c = 0;
                            for (; c + 1 < nv; c += 2) {
                                a0 += ldv8(q[g] + 8 * c) * ldv8(k32 + 8 * c);
                                a1 += ldv8(q[g] + 8 * c + 8) * ldv8(k32 + 8 * c + 8);
                            }
                            if (c < nv) a0 += ldv8(q[g] + 8 * c) * ldv8(k32 + 8 * c);
                            a0 += a1;
                            s = ((a0[0] + a0[4]) + (a0[1] + a0[5])) + ((a0[2] + a0[6]) + (a0[3] + a0[7]));
                        } else {
                            s = 0.0f;
#pragma omp simd reduction(+ : s)
                            for (int64_t d = 0; d < head_size; ++d) s += q[g][d] * k32[d];
                        }
                        s *= scale;
                        if (soft_cap > 0.0f) s = soft_cap * tanhf(s / soft_cap);
                        sc[g][t] = s;
                    }
                }
                for (int64_t g = 0; g < group; ++g) {
                    float bm = -INFINITY;
                    for (int64_t t = lo; t < hi; ++t) bm = sc[g][t] > bm ? sc[g][t] : bm;
                    if (bm > m[g]) {  /* rescale what was accumulated under the old maximum */
                        const float alpha = expf(m[g] - bm);
                        l[g] *= alpha;
#pragma omp simd
                        for (int64_t d = 0; d < head_size; ++d) acc[g][d] *= alpha;
                        m[g] = bm;
                    }
                    const float mg = m[g];
                    float *row = sc[g];
#pragma omp simd
                    for (int64_t t = lo; t < hi; ++t) row[t] = softmax_expf(row[t] - mg);
                    float lsum = 0.0f;
                    for (int64_t t = lo; t < hi; ++t) lsum += row[t];
                    l[g] += lsum;
                }
                for (int64_t t = lo; t < hi; ++t) {
                    const float *v32;
                    if (dtype) {
                        const uint16_t *v16 = (const uint16_t *)cache + half + kbase + t * head_size;
                        for (int64_t d = 0; d < head_size; ++d) vrow[d] = bf16_to_f32(v16[d]);
                        v32 = vrow;
                    } else {
                        v32 = (const float *)cache + half + kbase + t * head_size;
                    }
                    for (int64_t g = 0; g < group; ++g) {
                        const float e = sc[g][t];
#pragma omp simd
                        for (int64_t d = 0; d < head_size; ++d) acc[g][d] += e * v32[d];
                    }
                }
            }
            for (int64_t g = 0; g < group; ++g) {
                const int64_t ooff = (b * num_heads + kh * group + g) * head_size;
                const float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f;
                for (int64_t d = 0; d < head_size; ++d) {
                    const float v = acc[g][d] * inv;
                    if (dtype) ((uint16_t *)out)[ooff + d] = f32_to_bf16(v);
                    else ((float *)out)[ooff + d] = v;
                }
            }
        }
    }
    return bad_block ? -2 : 0;
}

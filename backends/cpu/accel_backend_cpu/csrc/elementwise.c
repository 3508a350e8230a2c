/* Row-wise float32 kernels of the accel-models CPU backend (normalization, rotary, KV write):
 * each replaces several eager torch ops of a decode step with one pass. Built and loaded like
 * decode_attention.c (see accel_backend_cpu/native.py). Row strides are in elements; rows are contiguous.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* out[r] = x[r] * rsqrt(mean(x[r]^2) + eps) * w  (sum of squares in double) */
void accel_rms_norm_f32(const float *x, int64_t x_stride, const float *w, float *out, int64_t out_stride,
                        int64_t rows, int64_t n, float eps, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows > 16)
    for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * x_stride;
        float *o = out + r * out_stride;
        double ss = 0.0;
        for (int64_t i = 0; i < n; ++i) ss += (double)xr[i] * xr[i];
        const float inv = (float)(1.0 / sqrt(ss / (double)n + (double)eps));
        for (int64_t i = 0; i < n; ++i) o[i] = (xr[i] * inv) * w[i];
    }
}

/* in place: res[r] = x[r] + res[r]; x[r] = rms_norm(res[r]) * w */
void accel_fused_add_rms_norm_f32(float *x, int64_t x_stride, float *res, int64_t res_stride, const float *w,
                                  int64_t rows, int64_t n, float eps, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows > 16)
    for (int64_t r = 0; r < rows; ++r) {
        float *xr = x + r * x_stride;
        float *rr = res + r * res_stride;
        double ss = 0.0;
        for (int64_t i = 0; i < n; ++i) {
            const float s = xr[i] + rr[i];
            rr[i] = s;
            ss += (double)s * s;
        }
        const float inv = (float)(1.0 / sqrt(ss / (double)n + (double)eps));
        for (int64_t i = 0; i < n; ++i) xr[i] = (rr[i] * inv) * w[i];
    }
}

/* In place on x[t, h, :rot] (row stride x_stride, head stride head_size): neox rotates (i, i + rot/2),
 * gpt-j (2i, 2i + 1); cache[pos] = [cos(rot/2) | sin(rot/2)]. Returns -1 on a position outside the cache. */
static int rotate(const int64_t *pos, float *x, int64_t x_stride, int64_t heads, const float *cache,
                  int64_t cache_stride, int64_t max_pos, int64_t tokens, int64_t head_size, int64_t rot, int neox) {
    const int64_t half = rot / 2;
    for (int64_t t = 0; t < tokens; ++t) {
        const int64_t p = pos[t];
        if (p < 0 || p >= max_pos) return -1;
        const float *cs = cache + p * cache_stride, *sn = cs + half;
        for (int64_t h = 0; h < heads; ++h) {
            float *v = x + t * x_stride + h * head_size;
            for (int64_t i = 0; i < half; ++i) {
                const int64_t a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
                const float x1 = v[a], x2 = v[b];
                v[a] = x1 * cs[i] - x2 * sn[i];
                v[b] = x2 * cs[i] + x1 * sn[i];
            }
        }
    }
    return 0;
}

int accel_rotary_f32(const int64_t *pos, float *q, int64_t q_stride, int64_t q_heads, float *k, int64_t k_stride,
                     int64_t k_heads, const float *cache, int64_t cache_stride, int64_t max_pos, int64_t tokens,
                     int64_t head_size, int64_t rot, int neox) {
    if (rotate(pos, q, q_stride, q_heads, cache, cache_stride, max_pos, tokens, head_size, rot, neox)) return -1;
    if (k && rotate(pos, k, k_stride, k_heads, cache, cache_stride, max_pos, tokens, head_size, rot, neox)) return -1;
    return 0;
}

/* Copy key/value rows [t, kv_heads, head_size] (row strides k_stride, v_stride; heads contiguous) into the
 * cache [2, num_blocks, kv_heads, block_size, head_size] at slot_mapping[t] (negative: skipped). elem: bytes
 * per element (2 or 4). Returns -1 on a slot past the cache. */
int accel_write_kv(const void *key, int64_t k_stride, const void *value, int64_t v_stride, void *cache,
                   const int64_t *slots, int64_t tokens, int64_t kv_heads, int64_t head_size, int64_t block_size,
                   int64_t num_blocks, int64_t elem) {
    const int64_t head_stride = block_size * head_size, block_stride = kv_heads * head_stride;
    const int64_t half = num_blocks * block_stride;
    for (int64_t t = 0; t < tokens; ++t) {
        const int64_t s = slots[t];
        if (s < 0) continue;
        if (s >= num_blocks * block_size) return -1;
    }
    for (int64_t t = 0; t < tokens; ++t) {
        const int64_t s = slots[t];
        if (s < 0) continue;
        const int64_t base = (s / block_size) * block_stride + (s % block_size) * head_size;
        for (int64_t h = 0; h < kv_heads; ++h) {
            const int64_t dst = base + h * head_stride;
            memcpy((char *)cache + dst * elem, (const char *)key + (t * k_stride + h * head_size) * elem,
                   (size_t)(head_size * elem));
            memcpy((char *)cache + (half + dst) * elem, (const char *)value + (t * v_stride + h * head_size) * elem,
                   (size_t)(head_size * elem));
        }
    }
    return 0;
}

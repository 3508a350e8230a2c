/* Decode-sized linear layers for the accel-models CPU backend: out[m, n] = sum_k x[m, k] w[n, k] (+ bias[n])
 * for m < M <= 4 rows, float32, the weight row-major ([N, K], unit stride along K) as the model holds it.
 *
 * At one or two rows a decode step's linear layers only stream their weights (2 FLOP per 4-byte weight), and
 * oneDNN's packed inner product streamed them at ~20 GB/s on the 2-core CI machine (Zen 4) with the weights
 * out of cache, as they are in a decode step (154 MB of weights per step): this kernel streams each thread's
 * contiguous range of weight rows at 34-43 GB/s (bench in docs/BENCHMARKS.md, CPU session 4). Each weight
 * row is read once for all M rows of x; one horizontal sum per output. The vector width is chosen at
 * compile time: with __AVX512F__ two 16-wide accumulators per x row; without it (AVX2: 16 ymm registers)
 * four 8-wide ones for 1-2 rows, two for 3-4 (below).
 *
 * Built by accel_backend_cpu/native.py with the machine's C compiler (-O3 -march=native -fopenmp) and
 * called through ctypes; plain C, no Python or torch headers.
 */
#include <stdint.h>
#include <omp.h>

#if defined(__AVX512F__)
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
static inline v16 ld16(const float *p) { return *(const v16u *)p; }

static inline float hsum16(v16 v) {
    float s = 0.0f;
    for (int i = 0; i < 16; i++) s += v[i];
    return s;
}

/* one weight row against the M_ (a constant after inlining) rows of x */
static inline void row_dot(const float *x, int64_t x_stride, const float *wr, int64_t K, const float *bias,
                           float *o, int64_t o_stride, const int M_) {
    v16 a0[4] = {0}, a1[4] = {0};
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        const v16 w0 = ld16(wr + k), w1 = ld16(wr + k + 16);
        for (int m = 0; m < M_; m++) {
            a0[m] += ld16(x + m * x_stride + k) * w0;
            a1[m] += ld16(x + m * x_stride + k + 16) * w1;
        }
    }
    for (int m = 0; m < M_; m++) {
        float s = hsum16(a0[m] + a1[m]);
        for (int64_t j = k; j < K; j++) s += x[m * x_stride + j] * wr[j];
        o[m * o_stride] = bias ? s + *bias : s;
    }
}

#else

/* Without AVX-512 (AVX2 + FMA: 16 ymm registers of 8 floats): a 64-byte vector is two registers there, and
 * the 16-wide code above ran at 11-15 ms per step of the benchmark's linears against 9-11 for oneDNN on a
 * Zen 3. Here 4 independent 8-wide accumulators per row (k step 32, as above) for 1-2 rows (8
 * accumulators + 4 weight vectors at 2 rows), 2 per row (k step 16) for 3-4 rows: 6-7.5 ms. (A software
 * prefetch 2-4 KB ahead measured no better: the hardware prefetcher follows each thread's stream.) */
typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));
static inline v8 ld8(const float *p) { return *(const v8u *)p; }

static inline float hsum8(v8 v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

static inline __attribute__((always_inline)) void row_dot(const float *x, int64_t x_stride, const float *wr,
                                                          int64_t K, const float *bias, float *o, int64_t o_stride,
                                                          const int M_) {
    int64_t k = 0;
    float s[4];
    if (M_ <= 2) {
        v8 a0[4] = {0}, a1[4] = {0}, a2[4] = {0}, a3[4] = {0};
        for (; k + 32 <= K; k += 32) {
            const v8 w0 = ld8(wr + k), w1 = ld8(wr + k + 8), w2 = ld8(wr + k + 16), w3 = ld8(wr + k + 24);
            for (int m = 0; m < M_; m++) {
                const float *xm = x + m * x_stride + k;
                a0[m] += ld8(xm) * w0;
                a1[m] += ld8(xm + 8) * w1;
                a2[m] += ld8(xm + 16) * w2;
                a3[m] += ld8(xm + 24) * w3;
            }
        }
        for (int m = 0; m < M_; m++) s[m] = hsum8((a0[m] + a1[m]) + (a2[m] + a3[m]));
    } else {
        v8 a0[4] = {0}, a1[4] = {0};
        for (; k + 16 <= K; k += 16) {
            const v8 w0 = ld8(wr + k), w1 = ld8(wr + k + 8);
            for (int m = 0; m < M_; m++) {
                a0[m] += ld8(x + m * x_stride + k) * w0;
                a1[m] += ld8(x + m * x_stride + k + 8) * w1;
            }
        }
        for (int m = 0; m < M_; m++) s[m] = hsum8(a0[m] + a1[m]);
    }
    for (int m = 0; m < M_; m++) {
        float t = s[m];
        for (int64_t j = k; j < K; j++) t += x[m * x_stride + j] * wr[j];
        o[m * o_stride] = bias ? t + *bias : t;
    }
}
#endif

/* Returns 0, or -1 for sizes it does not take (M outside 1..4). bias may be NULL. */
int accel_gemv_f32(const float *x, int64_t x_stride, const float *w, int64_t w_stride, const float *bias,
                   float *out, int64_t out_stride, int64_t M, int64_t N, int64_t K, int num_threads) {
    if (M < 1 || M > 4) return -1;
    if (N <= 0) return 0;
#pragma omp parallel num_threads(num_threads)
    {
        const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t n0 = N * t / nt, n1 = N * (t + 1) / nt;  /* a contiguous stream of rows per thread */
        for (int64_t n = n0; n < n1; n++) {
            const float *wr = w + n * w_stride;
            const float *b = bias ? bias + n : 0;
            switch (M) {
            case 1: row_dot(x, x_stride, wr, K, b, out + n, out_stride, 1); break;
            case 2: row_dot(x, x_stride, wr, K, b, out + n, out_stride, 2); break;
            case 3: row_dot(x, x_stride, wr, K, b, out + n, out_stride, 3); break;
            default: row_dot(x, x_stride, wr, K, b, out + n, out_stride, 4); break;
            }
        }
    }
    return 0;
}

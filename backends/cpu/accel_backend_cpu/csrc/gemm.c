/* Float32 linear layers for the accel-models CPU backend from 3 rows up: out[m, n] = sum_k x[m, k] w[n, k]
 * (+ bias[n]) on a weight packed once into panels of NR = 48 output columns, k-major:
 * panels[p][k][j] = w[p * NR + j][k] (zero past N).
 *
 * A register tile of up to MR = 8 rows of x by one panel keeps 24 16-wide accumulators; per k it loads the
 * panel's 48 weights once (3 vectors) and broadcasts 8 values of x: 24 FMAs per 11 loads, so it runs at the
 * FMA rate, and each panel (K x 48 floats) stays in L2 while every row tile passes over it. Threads take
 * contiguous ranges of panels: each streams its part of the weight once per call.
 *
 * Measured on the 2-core CI machine (Zen 4) with the weights out of cache, as in a decode step, against
 * oneDNN's packed inner product (torch.ops.mkldnn._linear_pointwise) on the Llama layer shapes of the CPU
 * benchmark: 16 rows 9.19 -> 7.51 ms per step of linears, 8 rows 7.01 -> 4.46, 4 rows 5.15 -> 3.66; level
 * at 64 and 512 rows (docs/BENCHMARKS.md, CPU session 4).
 *
 * Built by accel_backend_cpu/native.py with the machine's C compiler (-O3 -march=native -fopenmp) and
 * called through ctypes; plain C, no Python or torch headers.
 */
#include <stdint.h>
#include <omp.h>

#define NR 48
#define MR 8

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
static inline v16 ld16(const float *p) { return *(const v16u *)p; }
static inline void st16(float *p, v16 v) { *(v16u *)p = v; }

int64_t accel_panels_numel(int64_t N, int64_t K) { return (N + NR - 1) / NR * K * NR; }

/* w: [N, K] with row stride w_stride (unit stride along K) -> out: accel_panels_numel(N, K) floats */
void accel_pack_panels_f32(const float *w, int64_t w_stride, int64_t N, int64_t K, float *out, int num_threads) {
    const int64_t P = (N + NR - 1) / NR;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t p = 0; p < P; p++)
        for (int64_t k = 0; k < K; k++)
            for (int j = 0; j < NR; j++) {
                const int64_t n = p * NR + j;
                out[(p * K + k) * NR + j] = n < N ? w[n * w_stride + k] : 0.0f;
            }
}

/* rows_ (a constant after inlining) rows of x against one panel; the first nv columns are stored */
static inline void tile(const float *x, int64_t x_stride, const float *panel, int64_t K, const float *bias,
                        float *o, int64_t o_stride, int64_t nv, const int rows_) {
    v16 a0[MR] = {0}, a1[MR] = {0}, a2[MR] = {0};
    for (int64_t k = 0; k < K; k++) {
        const float *pk = panel + k * NR;
        const v16 w0 = ld16(pk), w1 = ld16(pk + 16), w2 = ld16(pk + 32);
        for (int m = 0; m < rows_; m++) {
            const float xv = x[m * x_stride + k];
            a0[m] += w0 * xv;
            a1[m] += w1 * xv;
            a2[m] += w2 * xv;
        }
    }
    for (int m = 0; m < rows_; m++) {
        float buf[NR];
        st16(buf, a0[m]);
        st16(buf + 16, a1[m]);
        st16(buf + 32, a2[m]);
        float *om = o + m * o_stride;
        if (bias)
            for (int64_t j = 0; j < nv; j++) om[j] = buf[j] + bias[j];
        else
            for (int64_t j = 0; j < nv; j++) om[j] = buf[j];
    }
}

/* Returns 0. bias may be NULL. out rows have stride out_stride (unit stride along N). */
int accel_gemm_panels_f32(const float *x, int64_t x_stride, const float *panels, const float *bias, float *out,
                          int64_t out_stride, int64_t M, int64_t N, int64_t K, int num_threads) {
    if (M <= 0 || N <= 0) return 0;
    const int64_t P = (N + NR - 1) / NR;
#pragma omp parallel num_threads(num_threads)
    {
        const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t p0 = P * t / nt, p1 = P * (t + 1) / nt;
        for (int64_t p = p0; p < p1; p++) {
            const float *panel = panels + p * K * NR;
            const int64_t nv = (p + 1) * NR <= N ? NR : N - p * NR;
            const float *b = bias ? bias + p * NR : 0;
            for (int64_t m0 = 0; m0 < M; m0 += MR) {
                const int64_t mr = M - m0 < MR ? M - m0 : MR;
                const float *xm = x + m0 * x_stride;
                float *om = out + m0 * out_stride + p * NR;
                switch (mr) {
                case 8: tile(xm, x_stride, panel, K, b, om, out_stride, nv, 8); break;
                case 7: tile(xm, x_stride, panel, K, b, om, out_stride, nv, 7); break;
                case 6: tile(xm, x_stride, panel, K, b, om, out_stride, nv, 6); break;
                case 5: tile(xm, x_stride, panel, K, b, om, out_stride, nv, 5); break;
                case 4: tile(xm, x_stride, panel, K, b, om, out_stride, nv, 4); break;
                case 3: tile(xm, x_stride, panel, K, b, om, out_stride, nv, 3); break;
                case 2: tile(xm, x_stride, panel, K, b, om, out_stride, nv, 2); break;
                default: tile(xm, x_stride, panel, K, b, om, out_stride, nv, 1); break;
                }
            }
        }
    }
    return 0;
}

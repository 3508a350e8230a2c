/* Float32 linear layers for the accel-models CPU backend from 3 rows up: out[m, n] = sum_k x[m, k] w[n, k]
 * (+ bias[n]) on a weight packed once into panels of NR = 16 output columns, k-major:
 * panels[p][k][j] = w[p * NR + j][k] (zero past N). A panel row is one 16-wide vector.
 *
 * Two register tiles, both FMA-bound when their data is in cache (~110 GFLOP/s per core on the Zen 4 CI
 * machine, its measured FMA peak ~117):
 *  - up to 8 rows (a decode step of a few sequences): 8 rows x 3 adjacent panels, 24 accumulators; per k it
 *    loads 3 weight vectors and broadcasts 8 values of x straight from x's rows.
 *  - 9 to 16 rows: 16 rows x 1 panel, 16 accumulators; x is first copied k-major in tiles of 16 rows
 *    (xp[k][16]) so that the 16 broadcasts of a k are one cache line. 16 rows need one pass over the
 *    weight: a decode step's weights come from DRAM, and two passes of 8 rows left the memory idle while
 *    the second pass computed (measured on the LM head's 32000 x 512 weight at 16 rows, cold: 3.2-3.5 ms
 *    with 8 x 48 tiles, 2.6 ms with this tile and its prefetch). More rows: 16-row tiles one after the
 *    other on a panel, which then sits in L1/L2.
 * In the first row tile of a panel the 16-row kernel prefetches the weight 16 KB ahead into L2: computing
 * at the FMA rate the core otherwise keeps too few misses in flight (11 GB/s per core against 28 measured
 * for a plain read).
 *
 * Threads take contiguous ranges of panels (of groups of 3 panels below 9 rows): each streams its part of
 * the weight once per call.
 *
 * Built by accel_backend_cpu/native.py with the machine's C compiler (-O3 -march=native -ffp-contract=fast
 * -fopenmp) and called through ctypes; plain C, no Python or torch headers. Each product is summed over k
 * in order, one fused multiply-add per k.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#define NR 16
#define MR_SMALL 8
#define MR_BIG 16
#define GROUP 3        /* panels per small-row tile */
#define PREFETCH 4096  /* floats ahead of the weight read, in the first row tile of a panel */

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

/* the first nv columns of one accumulator row (+ bias) to o */
static inline void store_row(float *o, v16 acc, const float *bias, int64_t nv) {
    if (nv == NR && !bias) {
        st16(o, acc);
        return;
    }
    float buf[NR];
    st16(buf, acc);
    if (bias)
        for (int64_t j = 0; j < nv; j++) o[j] = buf[j] + bias[j];
    else
        for (int64_t j = 0; j < nv; j++) o[j] = buf[j];
}

/* rows_ (<= 8) rows of x against panels_ (<= 3) adjacent panels; both constants after inlining.
 * nv: valid columns of the last panel of the group (the others are full). */
static inline __attribute__((always_inline)) void tile_small(const float *x, int64_t x_stride, const float *panel, int64_t K, const float *bias,
                              float *o, int64_t o_stride, int64_t nv, const int rows_, const int panels_) {
    v16 acc[MR_SMALL][GROUP] = {{0}};
    const float *p0 = panel, *p1 = panel + K * NR, *p2 = panel + 2 * K * NR;
    for (int64_t k = 0; k < K; k++) {
        const v16 w0 = ld16(p0 + k * NR);
        const v16 w1 = panels_ > 1 ? ld16(p1 + k * NR) : w0;
        const v16 w2 = panels_ > 2 ? ld16(p2 + k * NR) : w0;
        for (int m = 0; m < rows_; m++) {
            const float xv = x[m * x_stride + k];
            acc[m][0] += w0 * xv;
            if (panels_ > 1) acc[m][1] += w1 * xv;
            if (panels_ > 2) acc[m][2] += w2 * xv;
        }
    }
    for (int m = 0; m < rows_; m++)
        for (int v = 0; v < panels_; v++)
            store_row(o + m * o_stride + v * NR, acc[m][v], bias ? bias + v * NR : 0, v == panels_ - 1 ? nv : NR);
}

/* rows_ (1..16, a constant after inlining) rows of the k-major x tile xp[k][16] against one panel */
static inline __attribute__((always_inline)) void tile_big(const float *xp, const float *panel, int64_t K, const float *bias, float *o,
                            int64_t o_stride, int64_t nv, int prefetch, const int rows_) {
    v16 acc[MR_BIG] = {0};
    if (prefetch)
        for (int64_t k = 0; k < K; k++) {
            __builtin_prefetch(panel + k * NR + PREFETCH, 0, 2);
            const v16 w = ld16(panel + k * NR);
            for (int m = 0; m < rows_; m++) acc[m] += w * xp[k * MR_BIG + m];
        }
    else
        for (int64_t k = 0; k < K; k++) {
            const v16 w = ld16(panel + k * NR);
            for (int m = 0; m < rows_; m++) acc[m] += w * xp[k * MR_BIG + m];
        }
    for (int m = 0; m < rows_; m++) store_row(o + m * o_stride, acc[m], bias, nv);
}

#define SMALL_ROWS(R)                                                                                   \
    case R:                                                                                             \
        if (np == 3) tile_small(x, x_stride, panel, K, b, om, out_stride, nv, R, 3);                    \
        else if (np == 2) tile_small(x, x_stride, panel, K, b, om, out_stride, nv, R, 2);               \
        else tile_small(x, x_stride, panel, K, b, om, out_stride, nv, R, 1);                            \
        break;

static void gemm_small(const float *x, int64_t x_stride, const float *panels, const float *bias, float *out,
                       int64_t out_stride, int64_t M, int64_t N, int64_t K, int num_threads) {
    const int64_t P = (N + NR - 1) / NR, G = (P + GROUP - 1) / GROUP;
#pragma omp parallel num_threads(num_threads)
    {
        const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
        for (int64_t g = G * t / nt; g < G * (t + 1) / nt; g++) {
            const int64_t p = g * GROUP, np = P - p < GROUP ? P - p : GROUP, n_end = (p + np) * NR;
            const int64_t nv = n_end <= N ? NR : N - (n_end - NR);
            const float *panel = panels + p * K * NR;
            const float *b = bias ? bias + p * NR : 0;
            float *om = out + p * NR;
            switch (M) {
                SMALL_ROWS(8) SMALL_ROWS(7) SMALL_ROWS(6) SMALL_ROWS(5)
                SMALL_ROWS(4) SMALL_ROWS(3) SMALL_ROWS(2) default: SMALL_ROWS(1)
            }
        }
    }
}
#undef SMALL_ROWS

#define BIG_ROWS(R)                                                                                     \
    case R:                                                                                             \
        tile_big(xt, panel, K, b, om, out_stride, nv, m0 == 0, R);                                      \
        break;

static int gemm_big(const float *x, int64_t x_stride, const float *panels, const float *bias, float *out,
                    int64_t out_stride, int64_t M, int64_t N, int64_t K, int num_threads) {
    const int64_t P = (N + NR - 1) / NR, T = (M + MR_BIG - 1) / MR_BIG;
    float *xp = aligned_alloc(64, (size_t)(T * K * MR_BIG * sizeof(float) + 63) / 64 * 64);
    if (!xp) return -1;
#pragma omp parallel num_threads(num_threads)
    {
        const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
        /* x -> k-major tiles of 16 rows, zeros past M (rows never stored) */
#pragma omp for schedule(static)
        for (int64_t i = 0; i < T; i++) {
            float *dst = xp + i * K * MR_BIG;
            for (int m = 0; m < MR_BIG; m++) {
                const int64_t row = i * MR_BIG + m;
                if (row < M) {
                    const float *src = x + row * x_stride;
                    for (int64_t k = 0; k < K; k++) dst[k * MR_BIG + m] = src[k];
                } else {
                    for (int64_t k = 0; k < K; k++) dst[k * MR_BIG + m] = 0.0f;
                }
            }
        } /* implicit barrier */
        for (int64_t p = P * t / nt; p < P * (t + 1) / nt; p++) {
            const float *panel = panels + p * K * NR;
            const int64_t nv = (p + 1) * NR <= N ? NR : N - p * NR;
            const float *b = bias ? bias + p * NR : 0;
            for (int64_t m0 = 0; m0 < M; m0 += MR_BIG) {
                const float *xt = xp + m0 / MR_BIG * K * MR_BIG;
                float *om = out + m0 * out_stride + p * NR;
                const int64_t rows = M - m0 < MR_BIG ? M - m0 : MR_BIG;
                switch (rows) {
                    BIG_ROWS(16) BIG_ROWS(15) BIG_ROWS(14) BIG_ROWS(13) BIG_ROWS(12) BIG_ROWS(11)
                    BIG_ROWS(10) BIG_ROWS(9) BIG_ROWS(8) BIG_ROWS(7) BIG_ROWS(6) BIG_ROWS(5)
                    BIG_ROWS(4) BIG_ROWS(3) BIG_ROWS(2) default: BIG_ROWS(1)
                }
            }
        }
    }
    free(xp);
    return 0;
}
#undef BIG_ROWS

/* Returns 0, or -1 when the x workspace could not be allocated. bias may be NULL. out rows have stride
 * out_stride (unit stride along N). */
int accel_gemm_panels_f32(const float *x, int64_t x_stride, const float *panels, const float *bias, float *out,
                          int64_t out_stride, int64_t M, int64_t N, int64_t K, int num_threads) {
    if (M <= 0 || N <= 0) return 0;
    if (M <= MR_SMALL) {
        gemm_small(x, x_stride, panels, bias, out, out_stride, M, N, K, num_threads);
        return 0;
    }
    return gemm_big(x, x_stride, panels, bias, out, out_stride, M, N, K, num_threads);
}

/* Float32 linear layers for the accel-models CPU backend from 3 rows up: out[m, n] = sum_k x[m, k] w[n, k]
 * (+ bias[n]) on a weight packed once into panels of NR output columns, k-major:
 * panels[p][k][j] = w[p * NR + j][k] (zero past N). The vector width and so NR and the tiles are chosen at
 * compile time from the target's macros (-march=native): with __AVX512F__ (32 zmm registers of 16 floats)
 * NR = 16 and the tiles described here; without it (AVX2 + FMA: 16 ymm registers of 8 floats, or any
 * other target) NR = 6 and the tiles of the second half of this file, described there. Python never
 * assumes NR: it sizes and packs panels through accel_panels_numel / accel_pack_panels_f32 of the same
 * build (accel_panel_width and accel_gemm_isa report the choice).
 *
 * AVX-512: a panel row is one 16-wide vector. Two register tiles, both FMA-bound when their data is in
 * cache (~110 GFLOP/s per core on the Zen 4 CI machine, its measured FMA peak ~117):
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
 * Threads take contiguous ranges of panels (of groups of 3 panels below 9 rows; of 2 in the AVX2 build):
 * each streams its part of the weight once per call.
 *
 * Built by accel_backend_cpu/native.py with the machine's C compiler (-O3 -march=native -ffp-contract=fast
 * -fopenmp) and called through ctypes; plain C, no Python or torch headers. Each product is summed over k
 * in order, one fused multiply-add per k.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#if defined(__AVX512F__)
#define NR 16
#define MR_SMALL 8
#define MR_BIG 16
#define GROUP 3        /* panels per small-row tile */
#define PREFETCH 4096  /* floats ahead of the weight read, in the first row tile of a panel */

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
static inline v16 ld16(const float *p) { return *(const v16u *)p; }
static inline void st16(float *p, v16 v) { *(v16u *)p = v; }
#else
#define NR 6
#endif

/* the panel width this build packs (16 with AVX-512, 6 otherwise) */
int64_t accel_panel_width(void) { return NR; }

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

#if defined(__AVX512F__)
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

const char *accel_gemm_isa(void) {
    return "avx512: 16-column panels; 8x48 and 16x16 tiles (rows x columns); GEMV 16-wide";
}

#else

/* ---- AVX2 + FMA (no AVX-512): 16 ymm registers of 8 floats --------------------------------------------
 * The tiles above need 32-48 ymm registers here (a 16-wide vector is two) and spilled: 5-7x slower than
 * oneDNN on a Zen 3. Here the rows of x lie along the vector lanes instead: x is copied k-major in tiles of
 * 16 rows (xp[k][16], two ymm per k; 8 rows below 9 rows: one ymm), the weight is packed in panels of
 * NR = 6 columns (panels[p][k][j], one 24-byte row per k) whose values are broadcast:
 *  - 9+ rows: 16 rows x 6 columns, 12 accumulators, per k 2 loads of x, 6 broadcasts, 12 FMAs, so 16
 *    rows take one pass over the weight (a decode step streams it from DRAM), as the AVX-512 tile does;
 *  - 1-8 rows and the 1-8 row remainder of 9+ rows: 8 rows x 2 adjacent panels (12 columns), 12
 *    accumulators, per k 1 load of x, 12 broadcasts, 12 FMAs.
 * Padded rows are computed (zeros) and never stored. The accumulators hold columns, so the final store
 * writes single floats (96 per tile, against 12 FMAs per k of the loop). In the first row tile of a pass
 * the weight is prefetched PREFETCH floats ahead into L2. For many rows (prefill) the x tiles are taken
 * in blocks of about XBLOCK_BYTES, and each thread's panels are run against one block before the next. */
#define MR 16          /* rows per x tile from 9 rows */
#define MR_SMALL 8     /* rows per x tile up to 8 rows, and for a remainder of 1-8 rows */
#define XBLOCK_BYTES (160 * 1024)

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));
static inline v8 ld8(const float *p) { return *(const v8u *)p; }

static inline void store_cols(float *o, int64_t o_stride, const v8 *acc, const float *bias, int64_t rows,
                              int64_t nv) {
    for (int64_t c = 0; c < nv; c++) {
        float buf[8];
        __builtin_memcpy(buf, &acc[c], sizeof buf);
        const float b = bias ? bias[c] : 0.0f;
        for (int64_t m = 0; m < rows; m++) o[m * o_stride + c] = bias ? buf[m] + b : buf[m];
    }
}

/* 16 rows of the k-major tile xp[k][16] against one panel; rows (1..16) are stored, nv (1..6) columns */
static inline __attribute__((always_inline)) void tile16(const float *xp, const float *panel, int64_t K,
                                                         const float *bias, float *o, int64_t o_stride,
                                                         int64_t rows, int64_t nv, const char *pf, int64_t pf_step) {
    v8 lo[NR] = {0}, hi[NR] = {0};
    for (int64_t k = 0; k < K; k++) {
        if (pf) __builtin_prefetch(pf + k * pf_step, 0, 2);
        const v8 x0 = ld8(xp + k * MR), x1 = ld8(xp + k * MR + 8);
        const float *w = panel + k * NR;
        for (int c = 0; c < NR; c++) {
            lo[c] += x0 * w[c];
            hi[c] += x1 * w[c];
        }
    }
    store_cols(o, o_stride, lo, bias, rows < 8 ? rows : 8, nv);
    if (rows > 8) store_cols(o + 8 * o_stride, o_stride, hi, bias, rows - 8, nv);
}

/* 8 rows of the k-major tile xp[k][8] against panels_ (1 or 2, a constant) adjacent panels; nv: valid
 * columns of the last panel */
static inline __attribute__((always_inline)) void tile8(const float *xp, const float *panel, int64_t K,
                                                        const float *bias, float *o, int64_t o_stride,
                                                        int64_t rows, int64_t nv, const float *pf0,
                                                        const float *pf1, const int panels_) {
    v8 a0[NR] = {0}, a1[NR] = {0};
    const float *p1 = panel + K * NR;
    for (int64_t k = 0; k < K; k++) {
        if (pf0) __builtin_prefetch(pf0 + k * NR, 0, 2);
        if (pf1) __builtin_prefetch(pf1 + k * NR, 0, 2);
        const v8 x = ld8(xp + k * MR_SMALL);
        const float *w0 = panel + k * NR, *w1 = p1 + k * NR;
        for (int c = 0; c < NR; c++) {
            a0[c] += x * w0[c];
            if (panels_ > 1) a1[c] += x * w1[c];
        }
    }
    if (panels_ > 1) {
        store_cols(o, o_stride, a0, bias, rows, NR);
        store_cols(o + NR, o_stride, a1, bias ? bias + NR : 0, rows, nv);
    } else {
        store_cols(o, o_stride, a0, bias, rows, nv);
    }
}

/* rows [row0, row0 + rows) of x -> k-major tile dst[k][h] (h = MR or MR_SMALL), zeros past rows */
static void copy_tile(const float *x, int64_t x_stride, int64_t row0, int64_t rows, int64_t K, int h, float *dst) {
    for (int m = 0; m < h; m++) {
        if (m < rows) {
            const float *src = x + (row0 + m) * x_stride;
            for (int64_t k = 0; k < K; k++) dst[k * h + m] = src[k];
        } else {
            for (int64_t k = 0; k < K; k++) dst[k * h + m] = 0.0f;
        }
    }
}

/* Returns 0, or -1 when the x workspace could not be allocated. bias may be NULL. out rows have stride
 * out_stride (unit stride along N). */
int accel_gemm_panels_f32(const float *x, int64_t x_stride, const float *panels, const float *bias, float *out,
                          int64_t out_stride, int64_t M, int64_t N, int64_t K, int num_threads) {
    if (M <= 0 || N <= 0) return 0;
    const int64_t P = (N + NR - 1) / NR;
    /* T full-height tiles of 16 rows (the last may be partial: 9-16 rows), then at most one tile of 8 rows
     * holding the last 1-8 rows (all rows when M <= 8) */
    const int64_t rem = M % MR;
    const int64_t T = M / MR + (rem > MR_SMALL);
    const int64_t small_rows = M - (M / MR) * MR <= MR_SMALL ? M - (M / MR) * MR : 0;
    const size_t bytes = (size_t)(T * MR + (small_rows ? MR_SMALL : 0)) * (size_t)K * sizeof(float);
    float *xp = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!xp) return -1;
    float *xs = xp + T * MR * K; /* the 8-row tile */
    const int64_t fit = K > 0 ? (int64_t)(XBLOCK_BYTES / ((size_t)K * MR * sizeof(float))) : 1;
    const int64_t per_block = fit > 1 ? fit : 1; /* 16-row x tiles per block */
#pragma omp parallel num_threads(num_threads)
    {
        const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
#pragma omp for schedule(static)
        for (int64_t i = 0; i <= T; i++) {
            if (i < T) {
                const int64_t row0 = i * MR, rows = M - row0 < MR ? M - row0 : MR;
                copy_tile(x, x_stride, row0, rows, K, MR, xp + i * MR * K);
            } else if (small_rows) {
                copy_tile(x, x_stride, M - small_rows, small_rows, K, MR_SMALL, xs);
            }
        } /* implicit barrier */
        const int64_t p0 = P * t / nt, p1 = P * (t + 1) / nt;
        for (int64_t i0 = 0; i0 < T || (i0 == 0 && small_rows); i0 += per_block) {
            const int64_t i1 = i0 + per_block < T ? i0 + per_block : T;
            const int last = i1 == T;
            /* pairs of panels: the 16-row tiles of this block on each, then (last block) the 1-8 remaining
             * rows on both at once, while the pair is still in L1/L2 */
            for (int64_t p = p0; p < p1; p += 2) {
                const int64_t np = p1 - p < 2 ? p1 - p : 2;
                for (int64_t q = p; q < p + np; q++) {
                    const float *panel = panels + q * K * NR;
                    const int64_t nv = (q + 1) * NR <= N ? NR : N - q * NR;
                    const float *b = bias ? bias + q * NR : 0;
                    /* the n tiles on this panel prefetch the next panel of this thread, evenly: tile j the
                     * j-th n-th of it, so the DRAM stream never waits for the compute of later tiles */
                    const int64_t n = i1 > i0 ? i1 - i0 : 1, step = NR * (int64_t)sizeof(float) / n;
                    const char *next = q + 1 < p1 ? (const char *)(panel + K * NR) : 0;
                    for (int64_t i = i0; i < i1; i++) {
                        const int64_t row0 = i * MR, rows = M - row0 < MR ? M - row0 : MR;
                        float *om = out + row0 * out_stride + q * NR;
                        tile16(xp + i * MR * K, panel, K, b, om, out_stride, rows, nv,
                               next && step ? next + (i - i0) * K * step : 0, step);
                    }
                }
                if (last && small_rows) {
                    const int64_t n_end = (p + np) * NR, nv = n_end <= N ? NR : N - (n_end - NR);
                    const float *panel = panels + p * K * NR, *b = bias ? bias + p * NR : 0;
                    float *om = out + (M - small_rows) * out_stride + p * NR;
                    /* up to 8 rows: this tile alone streams the weight, and prefetches the next pair; after
                     * 16-row tiles the pair is in cache and those tiles prefetch */
                    const float *pf0 = T == 0 && p + 2 < p1 ? panel + 2 * K * NR : 0;
                    const float *pf1 = T == 0 && p + 3 < p1 ? panel + 3 * K * NR : 0;
                    if (np == 2) tile8(xs, panel, K, b, om, out_stride, small_rows, nv, pf0, pf1, 2);
                    else tile8(xs, panel, K, b, om, out_stride, small_rows, nv, pf0, pf1, 1);
                }
            }
        }
    }
    free(xp);
    return 0;
}

const char *accel_gemm_isa(void) {
    return "avx2: 6-column panels; 16x6 and 8x12 tiles (rows x columns), x k-major; GEMV 8-wide";
}
#endif

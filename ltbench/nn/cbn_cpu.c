/* Fused per-pixel kernels of CompoundBatchNorm2d on CPU (ltbench/nn/cbn_cpu.py builds and loads this).
 *
 * Every tensor is float32 and contiguous: activations x, g, out are (N, C, L), responsibilities and
 * their gradients r, da, out are (N, M, L), per-(component, channel) weights (M, K, C). xc = x - s[c]
 * is recomputed where it is needed instead of being stored. Work is split over (sample, block of
 * BLOCK points) with a static OpenMP schedule: for a given thread count every sum is taken in the
 * same order on every call (results are reproducible run to run). Inner loops run over the points
 * of one channel row (unit stride) and are vectorized by the compiler; no fast-math: IEEE float32
 * arithmetic, only the order of the sums differs from torch's matmuls.
 */
#include <stdint.h>
#include <string.h>
#include <omp.h>

#define BLOCK 256

static inline int64_t blocks(int64_t L) { return (L + BLOCK - 1) / BLOCK; }

/* out[n,k,l] = cst[k] + sum_c xc (w[k,0,c] + w[k,1,c] xc) [+ g (w[k,2,c] xc + w[k,3,c]) if g]
 * E-step log-densities (g = NULL, w = [w1 | w2]) and the backward's dL/dr (g given). */
void cbn_quad(const float *x, const float *g, const float *s, const float *w, const float *cst,
              float *out, int64_t N, int64_t C, int64_t L, int64_t M, int nt)
{
    const int64_t nb = blocks(L), K = g ? 4 : 2;
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < N * nb; t++) {
        const int64_t n = t / nb, l0 = (t % nb) * BLOCK, len = L - l0 < BLOCK ? L - l0 : BLOCK;
        float xc[BLOCK], gv[BLOCK];
        for (int64_t k = 0; k < M; k++) {
            float *o = out + (n * M + k) * L + l0;
            for (int64_t l = 0; l < len; l++) o[l] = cst[k];
        }
        for (int64_t c = 0; c < C; c++) {
            const float *xr = x + (n * C + c) * L + l0;
            for (int64_t l = 0; l < len; l++) xc[l] = xr[l] - s[c];
            if (g) memcpy(gv, g + (n * C + c) * L + l0, len * sizeof(float));
            for (int64_t k = 0; k < M; k++) {
                const float *wk = w + k * K * C;
                const float a = wk[c], b = wk[C + c];
                float *o = out + (n * M + k) * L + l0;
                if (g) {
                    const float e = wk[2 * C + c], f = wk[3 * C + c];
                    #pragma omp simd
                    for (int64_t l = 0; l < len; l++) o[l] += xc[l] * (a + b * xc[l]) + gv[l] * (e * xc[l] + f);
                } else {
                    #pragma omp simd
                    for (int64_t l = 0; l < len; l++) o[l] += xc[l] * (a + b * xc[l]);
                }
            }
        }
    }
}

/* part[thread, k, 0:C] += sum_l r[n,k,l] u, part[thread, k, C:2C] += sum_l r[n,k,l] v with
 * (u, v) = (xc, xc^2) (the M-step moments, g = NULL) or (g xc, g) (the backward's dL/dscale, dL/doffset).
 * part: (nt, M, 2C) doubles, zeroed by the caller; the caller adds the nt slices. */
void cbn_moments(const float *x, const float *g, const float *s, const float *r, double *part,
                 int64_t N, int64_t C, int64_t L, int64_t M, int nt)
{
    const int64_t nb = blocks(L);
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < N * nb; t++) {
        const int64_t n = t / nb, l0 = (t % nb) * BLOCK, len = L - l0 < BLOCK ? L - l0 : BLOCK;
        double *p = part + (int64_t)omp_get_thread_num() * M * 2 * C;
        float u[BLOCK], v[BLOCK];
        for (int64_t c = 0; c < C; c++) {
            const float *xr = x + (n * C + c) * L + l0;
            if (g) {
                const float *gr = g + (n * C + c) * L + l0;
                for (int64_t l = 0; l < len; l++) { u[l] = gr[l] * (xr[l] - s[c]); v[l] = gr[l]; }
            } else {
                for (int64_t l = 0; l < len; l++) { u[l] = xr[l] - s[c]; v[l] = u[l] * u[l]; }
            }
            for (int64_t k = 0; k < M; k++) {
                const float *rk = r + (n * M + k) * L + l0;
                float su = 0.0f, sv = 0.0f;
                #pragma omp simd reduction(+:su, sv)
                for (int64_t l = 0; l < len; l++) { su += rk[l] * u[l]; sv += rk[l] * v[l]; }
                p[k * 2 * C + c] += su;
                p[k * 2 * C + C + c] += sv;
            }
        }
    }
}

/* out[n,c,l] = B + A xc [+ G g], per point A = sum_k r_k wr[k,0,c] (+ da_k wd[k,0,c]),
 * B = sum_k r_k wr[k,1,c] (+ da_k wd[k,1,c]), G = sum_k r_k wr[k,2,c] (only if g).
 * The mixed affine of the output (Eq. 16: wr = [scale | offset]) and the backward's dx. */
void cbn_mix(const float *x, const float *g, const float *s, const float *r, const float *da,
             const float *wr, const float *wd, float *out, int64_t N, int64_t C, int64_t L, int64_t M, int nt)
{
    const int64_t nb = blocks(L), K = g ? 3 : 2;
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < N * nb; t++) {
        const int64_t n = t / nb, l0 = (t % nb) * BLOCK, len = L - l0 < BLOCK ? L - l0 : BLOCK;
        float A[BLOCK], B[BLOCK], G[BLOCK];
        for (int64_t c = 0; c < C; c++) {
            for (int64_t l = 0; l < len; l++) { A[l] = 0.0f; B[l] = 0.0f; G[l] = 0.0f; }
            for (int64_t k = 0; k < M; k++) {
                const float *rk = r + (n * M + k) * L + l0, *wk = wr + k * K * C;
                const float a = wk[c], b = wk[C + c], e = g ? wk[2 * C + c] : 0.0f;
                #pragma omp simd
                for (int64_t l = 0; l < len; l++) { A[l] += rk[l] * a; B[l] += rk[l] * b; G[l] += rk[l] * e; }
                if (da) {
                    const float *dk = da + (n * M + k) * L + l0;
                    const float p = wd[k * 2 * C + c], q = wd[k * 2 * C + C + c];
                    #pragma omp simd
                    for (int64_t l = 0; l < len; l++) { A[l] += dk[l] * p; B[l] += dk[l] * q; }
                }
            }
            const float *xr = x + (n * C + c) * L + l0;
            float *o = out + (n * C + c) * L + l0;
            if (g) {
                const float *gr = g + (n * C + c) * L + l0;
                #pragma omp simd
                for (int64_t l = 0; l < len; l++) o[l] = B[l] + A[l] * (xr[l] - s[c]) + G[l] * gr[l];
            } else {
                #pragma omp simd
                for (int64_t l = 0; l < len; l++) o[l] = B[l] + A[l] * (xr[l] - s[c]);
            }
        }
    }
}

/* A measurement for benchmarks/filter_cost.py --fused-c, not part of the package: what one compiled pass over a
   block of logits costs when it does what the CPU draw's torch ops do in several (sampling.py: `weights`, the
   chunk sums of the proposal, and `counts_masses` at the two thresholds of each of its two counting passes).

   For each row r of x [n, V] (row-major float32), with its largest logit m[r] and q <= 4 thresholds t[r, :q]:
   w[r, i] = exp(x[r, i] - m[r]); cs[r, b] = the sum of w over chunk b of `chunk` ids; c[r, k] and z[r, k] = how
   many logits of the row lie above t[r, k], and their summed w. One thread; V a multiple of `chunk`. */
#include <math.h>
#include <stddef.h>

#define MAXQ 4

int fused_count(const float *x, const float *m, const float *t, int n, int V, int q, int chunk, float *w,
                float *cs, float *c, float *z) {
    if (q < 1 || q > MAXQ || chunk < 1 || V % chunk) return 1;
    for (int r = 0; r < n; r++) {
        const float *xr = x + (size_t)r * V;
        float *wr = w + (size_t)r * V;
        float th[MAXQ], cnt[MAXQ] = {0}, mass[MAXQ] = {0};
        for (int k = 0; k < MAXQ; k++) th[k] = k < q ? t[(size_t)r * q + k] : INFINITY;
        for (int b = 0; b < V / chunk; b++) {
            float s = 0.f, cc[MAXQ] = {0}, zz[MAXQ] = {0};  /* per chunk: short float sums */
            for (int i = b * chunk; i < (b + 1) * chunk; i++) {
                float wi = expf(xr[i] - m[r]);
                wr[i] = wi;
                s += wi;
                for (int k = 0; k < MAXQ; k++) {
                    float above = xr[i] > th[k] ? 1.f : 0.f;
                    cc[k] += above;
                    zz[k] += above * wi;
                }
            }
            cs[(size_t)r * (V / chunk) + b] = s;
            for (int k = 0; k < MAXQ; k++) {
                cnt[k] += cc[k];
                mass[k] += zz[k];
            }
        }
        for (int k = 0; k < q; k++) {
            c[(size_t)r * q + k] = cnt[k];
            z[(size_t)r * q + k] = mass[k];
        }
    }
    return 0;
}

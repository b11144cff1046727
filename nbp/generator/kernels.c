/* The passes of the CPU draw (nbp/generator/sampling.py) over a block of logits, compiled: the weights
   exp(x - max) with their chunk sums, and the counts and masses above a few thresholds per row. Built at install
   as the extension nbp.generator._kernels (setup.py, optional: without a C compiler the torch ops run instead) and
   called through ctypes by nbp/generator/kernels.py.

   One thread: on two cores, a second thread of ours only contends with torch's OpenMP workers, which spin on the
   other core after each of its parallel ops. Every result is the same bits on every CPU:
   - only IEEE-rounded +, -, *, comparisons and exact conversions (the build turns off fused multiply-add
     contraction; no fast-math), and an exp of our own instead of libm's;
   - fixed summation orders: LANES float lanes, added in one order at the end of each chunk (chunk sums) or of
     each run of RUN ids (masses), the runs' totals added in double.
   The compiler still vectorises the lanes (target clones for AVX-512 and AVX2 on x86-64 Linux, picked at load). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#define LANES 16
#define MAXQ 8
#define RUN 2048 /* ids of a run: masses are summed in float lanes over a run, the runs in double */

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && !defined(NBP_NO_CLONES)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

/* LANES floats (ints) as one value: GCC/clang vector extensions, lowered to whatever the target clone has
   (one AVX-512 register, two AVX2 ones, four SSE ones); every operation is elementwise and IEEE-rounded. */
typedef float vf __attribute__((vector_size(4 * LANES)));
typedef int32_t vi __attribute__((vector_size(4 * LANES)));
typedef float vf_u __attribute__((vector_size(4 * LANES), aligned(4))); /* an unaligned load or store */

static inline __attribute__((always_inline)) vf splat(float a) { return (vf){0} + a; }
static inline __attribute__((always_inline)) vf blend(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); } /* mask ? a : b */

/* exp(d) for d <= 0 (or -inf): 0 below EXP_MIN, where exp falls below the smallest normal float. Range reduction
   d = k ln2 + r, |r| <= ln2 / 2, then the Taylor polynomial of degree 7 (truncation below 6e-9 relative), scaled
   by 2^k through the exponent bits. */
#define EXP_MIN (-87.3f)

static inline __attribute__((always_inline)) vf exp_nonpos(vf d) {
    vi low = d < EXP_MIN;
    vf dc = blend(low, splat(EXP_MIN), d);
    vf k = dc * 1.44269504088896341f;
    k = (k + 12582912.0f) - 12582912.0f; /* round to nearest: |k| <= 126 */
    vf r = dc - k * 0.693145751953125f;  /* ln2, high part: k times it is exact */
    r = r - k * 1.42860682030941723e-06f; /* ln2, low part */
    vf p = splat(1.0f / 5040.0f);
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    vf scale = (vf)((__builtin_convertvector(k, vi) + 127) << 23); /* 2^k, k >= -126 */
    return blend(low, splat(0.0f), p * scale);
}

static inline __attribute__((always_inline)) float lane_sum(vf a) { /* the lanes in one fixed order */
    float s = 0.0f;
    for (int l = 0; l < LANES; l++) s += a[l];
    return s;
}

static float exp_one(float d) { /* the tail of a row: the same arithmetic as a lane */
    vf v = splat(d);
    return exp_nonpos(v)[0];
}

/* One row of V logits x (largest m): where w_out, w[i] = exp(x[i] - m) is computed and written, else w is read;
   with chunk > 0 (a multiple of LANES dividing RUN), cs[b] = the sum of w over ids [b chunk, (b + 1) chunk), for
   the whole chunks of the row; for each of q thresholds t[j], c[j] = #(x > t[j]) and z[j] = the sum of w where
   x > t[j]. Each run of RUN ids is tested at every threshold while it is in cache. */
CLONES static void row(const float *restrict x, float m, float *restrict w, int w_out, float *restrict cs, long chunk,
                       const float *restrict t, int q, float *restrict c, float *restrict z, long V) {
    long whole = V / LANES * LANES;
    vi cnt[MAXQ] = {{0}};
    double total[MAXQ] = {0};
    for (long a = 0; a < whole; a += RUN) {
        long end = a + RUN < whole ? a + RUN : whole;
        if (w_out) {
            vf acc = {0};
            for (long i = a; i < end; i += LANES) {
                vf e = exp_nonpos(*(const vf_u *)(x + i) - m);
                *(vf_u *)(w + i) = e;
                acc += e;
                if (chunk > 0 && (i + LANES) % chunk == 0) {
                    if (i + LANES <= V / chunk * chunk) cs[i / chunk] = lane_sum(acc);
                    acc = (vf){0};
                }
            }
        }
        for (int j = 0; j < q; j++) {
            vf acc = {0};
            vi n = {0};
            for (long i = a; i < end; i += LANES) {
                vi above = *(const vf_u *)(x + i) > t[j];
                n -= above; /* a true comparison is -1 */
                acc += (vf)((vi)*(const vf_u *)(w + i) & above);
            }
            cnt[j] += n;
            total[j] += lane_sum(acc);
        }
    }
    if (w_out)
        for (long i = whole; i < V; i++) w[i] = exp_one(x[i] - m);
    for (int j = 0; j < q; j++) {
        long n = 0;
        float tail = 0.0f;
        for (long i = whole; i < V; i++)
            if (x[i] > t[j]) {
                n++;
                tail += w[i];
            }
        for (int l = 0; l < LANES; l++) n += cnt[j][l];
        c[j] = (float)n;
        z[j] = (float)(total[j] + tail);
    }
}

/* For n rows of V logits x (row stride xs), largest m [n]: w (row stride ws) = exp(x - m); cs [n, V / chunk] the
   chunk sums of w (NULL: none; chunk a multiple of LANES dividing RUN); and, for q <= MAXQ thresholds per row
   t [n, q] (q = 0: none), c and z [n, q] the counts of x above them and the sums of w there. Returns 0, or 1 for
   arguments it refuses. */
int nbp_weights(const float *x, long xs, const float *m, float *w, long ws, float *cs, long chunk, const float *t,
                int q, float *c, float *z, long n, long V) {
    if (n < 0 || V < 1 || xs < V || ws < V || q < 0 || q > MAXQ) return 1;
    if (cs && (chunk < LANES || chunk % LANES || RUN % chunk)) return 1;
    for (long r = 0; r < n; r++)
        row(x + r * xs, m[r], w + r * ws, 1, cs ? cs + r * (V / chunk) : NULL, cs ? chunk : 0, t + r * q, q,
            c + r * q, z + r * q, V);
    return 0;
}

/* c, z [n, q] = the counts of the logits x (row stride xs) above thresholds t [n, q], 1 <= q <= MAXQ, and the
   sums of the weights w (row stride ws) there. Returns 0, or 1 for arguments it refuses. */
int nbp_count_mass(const float *x, long xs, const float *w, long ws, const float *t, int q, float *c, float *z,
                   long n, long V) {
    if (n < 0 || V < 1 || xs < V || ws < V || q < 1 || q > MAXQ) return 1;
    for (long r = 0; r < n; r++)
        row(x + r * xs, 0.0f, (float *)(w + r * ws), 0, NULL, 0, t + r * q, q, c + r * q, z + r * q, V);
    return 0;
}

/* The module itself has no functions: nbp/generator/kernels.py loads this file with ctypes. */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }

/* The passes of the CPU draw (nbp/generator/sampling.py) over a block of logits, compiled: the weights
   exp(x - max) with their chunk sums, and the counts and masses above a few thresholds per row; and the integer
   screen of the greedy head (nbp_screen, at the end of the file proper). Built at install as the extension
   nbp.generator._kernels (setup.py, optional: without a C compiler the torch ops run instead) and called through
   ctypes by nbp/generator/kernels.py.

   The draw's passes run on one thread: on two cores, a second thread of ours only contends with torch's OpenMP workers, which spin on the
   other core after each of its parallel ops. Every result is the same bits on every CPU:
   - only IEEE-rounded +, -, *, comparisons and exact conversions (the build turns off fused multiply-add
     contraction; no fast-math), and an exp of our own instead of libm's;
   - fixed summation orders: LANES float lanes, added in one order at the end of each chunk (chunk sums) or of
     each run of RUN ids (masses), the runs' totals added in double.

   The row function is compiled once per vector width W (this file includes itself, as "kernels.c", with NBP_W
   set): 16 floats (AVX-512), 8 (AVX2) and 4 (SSE2, NEON, anything else), the widest the CPU runs picked at the
   first call (nbp_width). Each width keeps LANES / W vectors of accumulators, lane l of vector g holding the
   logical lane g W + l, so every width adds in the same order. W must be a width the target has registers for:
   GCC lowers a comparison of wider vectors one element at a time, with scalar compares. */
#ifndef NBP_W /* ------------------------------------------------------------------------- the file proper */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>

#define LANES 16
#define MAXQ 8
#define RUN 2048 /* ids of a run: masses are summed in float lanes over a run, the runs in double */
#define EXP_MIN (-87.3f) /* exp(d) below this is under the smallest normal float: 0 */

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && !defined(NBP_NO_DISPATCH)
#define NBP_X86 1
#else
#define NBP_X86 0
#endif

#define NBP_CAT2(a, b) a##b
#define NBP_CAT(a, b) NBP_CAT2(a, b)

typedef void (*row_fn)(const float *restrict x, float m, float *restrict w, int w_out, float *restrict cs, long chunk,
                       const float *restrict t, int q, float *restrict c, float *restrict z, long V);

#define NBP_W 4
#define NBP_TARGET
#include "kernels.c" /* this file */
#undef NBP_W
#undef NBP_TARGET
#if NBP_X86
#define NBP_W 8
#define NBP_TARGET __attribute__((target("avx2")))
#include "kernels.c" /* this file */
#undef NBP_W
#undef NBP_TARGET
#define NBP_W 16
#define NBP_TARGET __attribute__((target("avx512f")))
#include "kernels.c" /* this file */
#undef NBP_W
#undef NBP_TARGET
#endif

typedef void (*gemv_fn)(const float *restrict x, long M, const float *restrict w, const float *restrict b,
                        float *restrict y, long N, long K, long lo, long hi);

static row_fn row = NULL; /* the width in use: set by nbp_width, at the latest by the first call */
static gemv_fn gemv = NULL;
static int width = 0;

static int widest(void) {
#if NBP_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return 16;
    if (__builtin_cpu_supports("avx2")) return 8;
#endif
    return 4;
}

/* The vector width the passes run at: the widest this CPU runs (want = 0), or the widest of at most want floats
   (4, 8 or 16; the tests compare widths). The screen runs its AVX2 version at width 8 or more. Returns the width
   now in use. */
int nbp_width(int want) {
    int w = widest();
    if (want > 0 && want < w) w = want >= 8 ? 8 : 4;
#if NBP_X86
    row = w == 16 ? row16 : w == 8 ? row8 : row4;
    gemv = w == 16 ? gemv16 : w == 8 ? gemv8 : gemv4;
#else
    row = row4;
    gemv = gemv4;
#endif
    width = w;
    return w;
}

/* For n rows of V logits x (row stride xs), m [n] at least each row's largest logit: w (row stride ws) =
   exp(x - m); cs [n, V / chunk] the chunk sums of w (NULL: none; chunk a multiple of LANES dividing RUN); and,
   for q <= MAXQ thresholds per row t [n, q] (q = 0: none), c and z [n, q] the counts of x above them and the sums
   of w there. Returns 0, or 1 for arguments it refuses. */
int nbp_weights(const float *x, long xs, const float *m, float *w, long ws, float *cs, long chunk, const float *t,
                int q, float *c, float *z, long n, long V) {
    if (n < 0 || V < 1 || xs < V || ws < V || q < 0 || q > MAXQ) return 1;
    if (cs && (chunk < LANES || chunk % LANES || RUN % chunk)) return 1;
    if (!row) nbp_width(0);
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
    if (!row) nbp_width(0);
    for (long r = 0; r < n; r++)
        row(x + r * xs, 0.0f, (float *)(w + r * ws), 0, NULL, 0, t + r * q, q, c + r * q, z + r * q, V);
    return 0;
}

#ifdef _OPENMP
#include <omp.h>
#endif

#define GEMV_BLOCK 64 /* weight rows a thread takes at a time */

/* y [M, N] = x [M, K] . w [N, K]^T (+ b [N]; NULL: none), every row x and w contiguous, in float: each output the
   LANES logical lanes of its products summed in one fixed order (the same bits at every width and thread count),
   the weight's rows split over `threads` threads (1 without OpenMP). For a few rows M: each weight row is read
   once from memory and used for all of them. Returns 0, or 1 for arguments it refuses. */
int nbp_gemv(const float *x, long M, const float *w, const float *b, float *y, long N, long K, int threads) {
    if (M < 0 || N < 0 || K < 1 || threads < 1) return 1;
    if (!row) nbp_width(0);
    long blocks = (N + GEMV_BLOCK - 1) / GEMV_BLOCK;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && blocks > 1)
#endif
    for (long g = 0; g < blocks; g++)
        gemv(x, M, w, b, y, N, K, g * GEMV_BLOCK, g * GEMV_BLOCK + GEMV_BLOCK < N ? g * GEMV_BLOCK + GEMV_BLOCK : N);
    return 0;
}

/* ------------------------------------------------------------------------------- the head screen
   Integer dot products of int8 weight rows with int16 input rows, for the greedy head (nbp/generator/model.py,
   HeadScreen): every product and sum is exact in int32 as long as K * 127 * max|x| < 2^31 (the caller scales x
   so). The loop is plain C; GCC vectorizes it (pmaddwd), once for the baseline target and once for AVX2. Built
   with OpenMP (setup.py), the rows are split over threads of the OpenMP runtime torch has loaded (the same
   libgomp.so.1, so the same workers as torch's parallel ops, and no second pool contending with them): one core
   does not read memory at the rate two do. */

static inline __attribute__((always_inline)) void screen_rows(const int8_t *restrict q, const int16_t *restrict x,
                                                             int32_t *restrict out, long N, long K, long M, long lo,
                                                             long hi) {
    for (long r = lo; r < hi; r++) {
        const int8_t *restrict qr = q + r * K;
        for (long m = 0; m < M; m++) {
            const int16_t *restrict xm = x + m * K;
            int32_t acc = 0;
            for (long k = 0; k < K; k++) acc += (int32_t)qr[k] * (int32_t)xm[k];
            out[m * N + r] = acc;
        }
    }
}

static void screen_base(const int8_t *q, const int16_t *x, int32_t *out, long N, long K, long M, long lo, long hi) {
    screen_rows(q, x, out, N, K, M, lo, hi);
}
#if NBP_X86
__attribute__((target("avx2"))) static void screen_avx2(const int8_t *q, const int16_t *x, int32_t *out, long N,
                                                        long K, long M, long lo, long hi) {
    screen_rows(q, x, out, N, K, M, lo, hi);
}
#endif

#define SCREEN_BLOCK 256 /* rows a thread takes at a time */

/* out [M, N] = x [M, K] . q [N, K]^T in int32, the rows of q split over `threads` threads (1 without OpenMP).
   Returns 0, or 1 for arguments it refuses. */
int nbp_screen(const int8_t *q, const int16_t *x, int32_t *out, long N, long K, long M, int threads) {
    if (N < 0 || K < 1 || M < 0 || threads < 1) return 1;
    if (!row) nbp_width(0);
    int avx2 = width >= 8;
    long blocks = (N + SCREEN_BLOCK - 1) / SCREEN_BLOCK;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && blocks > 1)
#endif
    for (long b = 0; b < blocks; b++) {
        long lo = b * SCREEN_BLOCK, hi = lo + SCREEN_BLOCK < N ? lo + SCREEN_BLOCK : N;
#if NBP_X86
        if (avx2) {
            screen_avx2(q, x, out, N, K, M, lo, hi);
            continue;
        }
#endif
        screen_base(q, x, out, N, K, M, lo, hi);
    }
    (void)avx2;
    return 0;
}

/* Whether this build splits work over threads (OpenMP). */
int nbp_threaded(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* The module itself has no functions: nbp/generator/kernels.py loads this file with ctypes. */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }

#else /* ----------------------------------------------- the row function at width NBP_W (included above) */
#define G (LANES / NBP_W) /* vectors per LANES ids */
#define VF NBP_CAT(vf, NBP_W)
#define VI NBP_CAT(vi, NBP_W)
#define VFU NBP_CAT(vfu, NBP_W)
#define FN(name) NBP_CAT(name, NBP_W)
#define INL static inline __attribute__((always_inline)) NBP_TARGET

/* W floats (ints) as one value: GCC/clang vector extensions, one register of the target; every operation is
   elementwise and IEEE-rounded. */
typedef float VF __attribute__((vector_size(4 * NBP_W)));
typedef int32_t VI __attribute__((vector_size(4 * NBP_W)));
typedef float VFU __attribute__((vector_size(4 * NBP_W), aligned(4))); /* an unaligned load or store */

INL VF FN(splat)(float a) { return (VF){0} + a; }
INL VF FN(blend)(VI mask, VF a, VF b) { return (VF)(((VI)a & mask) | ((VI)b & ~mask)); } /* mask ? a : b */

/* exp(d) for d <= 0 (or -inf): 0 below EXP_MIN. Range reduction d = k ln2 + r, |r| <= ln2 / 2, then the Taylor
   polynomial of degree 7 (truncation below 6e-9 relative), scaled by 2^k through the exponent bits. */
INL VF FN(exp_nonpos)(VF d) {
    VI low = d < FN(splat)(EXP_MIN);
    VF dc = FN(blend)(low, FN(splat)(EXP_MIN), d);
    VF k = dc * 1.44269504088896341f;
    k = (k + 12582912.0f) - 12582912.0f; /* round to nearest: |k| <= 126 */
    VF r = dc - k * 0.693145751953125f;   /* ln2, high part: k times it is exact */
    r = r - k * 1.42860682030941723e-06f; /* ln2, low part */
    VF p = FN(splat)(1.0f / 5040.0f);
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    VF scale = (VF)((__builtin_convertvector(k, VI) + 127) << 23); /* 2^k, k >= -126 */
    return FN(blend)(low, FN(splat)(0.0f), p * scale);
}

INL float FN(lane_sum)(const VF *a) { /* the LANES logical lanes of G vectors, in one fixed order */
    float s = 0.0f;
    for (int g = 0; g < G; g++)
        for (int l = 0; l < NBP_W; l++) s += a[g][l];
    return s;
}

/* One row of V logits x (m at least its largest): where w_out, w[i] = exp(x[i] - m) is computed and written, else
   w is read; with chunk > 0 (a multiple of LANES dividing RUN), cs[b] = the sum of w over ids [b chunk, (b + 1)
   chunk), for the whole chunks of the row; for each of q thresholds t[j], c[j] = #(x > t[j]) and z[j] = the sum of
   w where x > t[j]. Each run of RUN ids is tested at every threshold while it is in cache. */
NBP_TARGET static void FN(row)(const float *restrict x, float m, float *restrict w, int w_out, float *restrict cs,
                               long chunk, const float *restrict t, int q, float *restrict c, float *restrict z,
                               long V) {
    long whole = V / LANES * LANES, chunks_end = chunk > 0 ? V / chunk * chunk : 0;
    VI cnt[MAXQ][G];
    double total[MAXQ] = {0};
    for (int j = 0; j < q; j++)
        for (int g = 0; g < G; g++) cnt[j][g] = (VI){0};
    for (long a = 0; a < whole; a += RUN) {
        long end = a + RUN < whole ? a + RUN : whole;
        if (w_out) {
            VF acc[G];
            for (int g = 0; g < G; g++) acc[g] = (VF){0};
            long next = a + chunk; /* the end of the current chunk (runs start on chunk boundaries) */
            for (long i = a; i < end; i += LANES) {
                for (int g = 0; g < G; g++) {
                    VF e = FN(exp_nonpos)(*(const VFU *)(x + i + g * NBP_W) - m);
                    *(VFU *)(w + i + g * NBP_W) = e;
                    acc[g] += e;
                }
                if (chunk > 0 && i + LANES == next) {
                    if (next <= chunks_end) cs[next / chunk - 1] = FN(lane_sum)(acc);
                    for (int g = 0; g < G; g++) acc[g] = (VF){0};
                    next += chunk;
                }
            }
        }
        for (int j = 0; j < q; j++) {
            VF acc[G], tj = FN(splat)(t[j]);
            for (int g = 0; g < G; g++) acc[g] = (VF){0};
            for (long i = a; i < end; i += LANES)
                for (int g = 0; g < G; g++) {
                    VI above = *(const VFU *)(x + i + g * NBP_W) > tj;
                    cnt[j][g] -= above; /* a true comparison is -1 */
                    acc[g] += (VF)((VI) * (const VFU *)(w + i + g * NBP_W) & above);
                }
            total[j] += FN(lane_sum)(acc);
        }
    }
    if (w_out)
        for (long i = whole; i < V; i++) w[i] = FN(exp_nonpos)(FN(splat)(x[i] - m))[0];
    for (int j = 0; j < q; j++) {
        long n = 0;
        float tail = 0.0f;
        for (long i = whole; i < V; i++)
            if (x[i] > t[j]) {
                n++;
                tail += w[i];
            }
        for (int g = 0; g < G; g++)
            for (int l = 0; l < NBP_W; l++) n += cnt[j][g][l];
        c[j] = (float)n;
        z[j] = (float)(total[j] + tail);
    }
}

/* Rows lo..hi-1 of y [M, N] = x [M, K] . w [N, K]^T (+ b): logical lane l of an output sums the products at
   k = l, l + LANES, ..., the lanes are added in one order, then the K % LANES last products, then the bias. */
NBP_TARGET static void FN(gemv)(const float *restrict x, long M, const float *restrict w, const float *restrict b,
                                float *restrict y, long N, long K, long lo, long hi) {
    long whole = K / LANES * LANES;
    for (long n = lo; n < hi; n++) {
        const float *restrict wr = w + n * K;
        for (long m = 0; m < M; m++) {
            const float *restrict xm = x + m * K;
            VF acc[G];
            for (int g = 0; g < G; g++) acc[g] = (VF){0};
            for (long k = 0; k < whole; k += LANES)
                for (int g = 0; g < G; g++) acc[g] += *(const VFU *)(wr + k + g * NBP_W) * *(const VFU *)(xm + k + g * NBP_W);
            float s = FN(lane_sum)(acc);
            for (long k = whole; k < K; k++) s += wr[k] * xm[k];
            y[m * N + n] = b ? s + b[n] : s;
        }
    }
}

#undef G
#undef VF
#undef VI
#undef VFU
#undef FN
#undef INL
#endif

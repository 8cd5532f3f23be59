/*
 * adderquant._adder_cpu — fast CPU kernels for the adder layer.
 *
 * Plain C (no torch headers): every entry point takes raw pointers to contiguous NCHW tensors plus a
 * geometry array and is called from Python through ctypes (adderquant/kernels/cpu.py). The Python
 * module object itself is empty; it exists so that setuptools builds this file as an Extension.
 *
 *   aq_forward_f32     Y[n,o,p]  = -sum_k |X_unf[n,k,p] - W[o,k]|                       (float32)
 *   aq_grad_input_f32  dX        = fold( sum_o G[n,o,p] * clamp(W[o,k] - X_unf[n,k,p], -1, 1) )
 *   aq_fake_quant_f32  y = s * clamp(rint(x / s), qn, qp), inside = [qn <= rint(x / s) <= qp]   (QAT)
 *   aq_mask_f32        y = inside ? g : 0                  (its straight-through backward)
 *
 * (The integer kernels — aq_int_forward, the network runner — are in int_net.c.)
 *
 * geometry (int64[15]): N, C, H, W, O, KH, KW, SH, SW, PH, PW, DH, DW, HO, WO.
 * The float kernels also come grouped (aq_forward_f32_g, aq_grad_input_f32_g: groups G as nn.Conv2d,
 * C and O the whole layer's, weights (O, C/G, KH, KW)); the ungrouped names are G = 1.
 *
 * Float kernels vectorise over output positions. The input is first copied once, zero-padded and
 * split by column phase (so that the positions of an output row are contiguous for any stride;
 * skipped when there is no padding and the input can be read as it is), then unfolded per (image,
 * block of positions) into panels of NR positions ([panel][k][NR]) by contiguous row copies.
 * Weights are packed in panels of MR output channels ([panel][k][MR]). The forward micro-kernel
 * keeps an MR x NR tile of accumulators in registers and walks k, broadcasting one weight and
 * loading NR inputs per step: acc += |x - w| (sub, and-abs, add — on AVX-512 the add is an FMA by
 * 1.0, exact, so that it runs on the FMA pipes beside the sub/and). The input-gradient kernel is
 * the same shape with the roles turned: an MR (k) x NR (positions) tile of unfolded inputs stays in
 * registers while it walks the output channels (fmsub, min, max, fma), then the unfolded gradient
 * is folded back (col2im). The weight gradient is not here: it is two matrix products.
 *
 * ISA: no -march flags at build time; AVX2+FMA and AVX-512 (F/BW/VL/DQ) variants are compiled with
 * target attributes and picked at run time with __builtin_cpu_supports; a portable scalar path
 * serves everything else. Threads: OpenMP, with the count passed in by the caller.
 */
#ifndef AQ_NO_PYTHON /* -DAQ_NO_PYTHON: plain C library, for C-level tests (sanitizers) */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#endif

#include <stdlib.h>
#include <string.h>

#include "aq_common.h"

typedef struct {
    int64_t N, C, H, W, O, KH, KW, SH, SW, PH, PW, DH, DW, HO, WO;
} geom_t;

static geom_t read_geom(const int64_t *g) {
    geom_t r;
    r.N = g[0]; r.C = g[1]; r.H = g[2]; r.W = g[3]; r.O = g[4]; r.KH = g[5]; r.KW = g[6];
    r.SH = g[7]; r.SW = g[8]; r.PH = g[9]; r.PW = g[10]; r.DH = g[11]; r.DW = g[12];
    r.HO = g[13]; r.WO = g[14];
    return r;
}

static int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
static int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
static int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }
static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

static void *aalloc(size_t bytes) {
    void *p = NULL;
    bytes = (size_t)round_up((int64_t)bytes + 64, 64);
    if (posix_memalign(&p, 64, bytes) != 0) return NULL;
    return p;
}

/* ------------------------------------------------------------------------------------------------ */
/* ISA selection                                                                                    */
/* ------------------------------------------------------------------------------------------------ */
enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

static int isa_detect(void) {
#if AQ_X86 && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return ISA_AVX2;
#endif
    return ISA_SCALAR;
}

static int g_isa_max = -1, g_isa = -1;

static int isa_now(void) {
    if (g_isa_max < 0) g_isa_max = isa_detect();
    if (g_isa < 0) g_isa = g_isa_max;
    return g_isa;
}

/* Highest instruction set this CPU supports: 0 scalar, 1 AVX2+FMA, 2 AVX-512. */
AQ_EXPORT int aq_isa_max(void) {
    isa_now();
    return g_isa_max;
}

/* Instruction set in use. */
AQ_EXPORT int aq_isa(void) { return isa_now(); }

/* Use at most ``level`` (tests exercise every path); returns the level now in use. */
AQ_EXPORT int aq_set_isa(int level) {
    isa_now();
    if (level < 0 || level > g_isa_max) level = g_isa_max;
    g_isa = level;
    return g_isa;
}

AQ_EXPORT int aq_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* ------------------------------------------------------------------------------------------------ */
/* float32: packing                                                                                 */
/* ------------------------------------------------------------------------------------------------ */

/* The input, zero-padded and split by column phase so that any stride reads contiguously:
 * xs[n][c][hp][ph][q] = xpad[n][c][hp][q*SW + ph]  (hp < Hp = H + 2PH, q < Wq = ceil(Wp / SW)).
 * Output position (ho, wo) and tap (c, i, j) read xs at koff(c,i,j) + poff(ho,wo) with
 *   koff = ((c*Hp + i*DH)*SW + (j*DW) % SW)*Wq + (j*DW) / SW,   poff = ho*SH*SW*Wq + wo,
 * so the positions of one output row are contiguous. */
typedef struct {
    int64_t Hp, Wq, img; /* img: floats per image */
    int64_t rowstep;     /* xs offset from one output row to the next */
    int64_t cstep;       /* 0: xs is the padded phase-split copy (rows contiguous, slack for over-copy);
                            >= 1: no copy, read the input itself with this column step */
} xs_t;

/* Without padding, a kernel of width 1 or a stride of 1 reads the input directly (strided 1x1
 * shortcuts then touch only the pixels they use); otherwise the padded phase-split copy is made. */
static xs_t xs_dims(const geom_t *g) {
    xs_t d;
    if (g->PH == 0 && g->PW == 0 && (g->SW == 1 || g->KW == 1)) {
        d.Hp = g->H;
        d.Wq = g->W;
        d.img = g->C * g->H * g->W;
        d.rowstep = g->SH * g->W;
        d.cstep = g->SW;
    } else {
        d.Hp = g->H + 2 * g->PH;
        d.Wq = ceil_div(g->W + 2 * g->PW, g->SW);
        d.img = g->C * d.Hp * g->SW * d.Wq;
        d.rowstep = g->SH * g->SW * d.Wq;
        d.cstep = 0;
    }
    return d;
}

/* Padded rows and column phases that some output position reads (a strided 1x1 kernel reads a
 * quarter of the input: the rest of xs is left unwritten and never used). need: Hp + SW bytes. */
static void xs_needed(const geom_t *g, const xs_t *d, uint8_t *need) {
    memset(need, 0, (size_t)(d->Hp + g->SW));
    for (int64_t i = 0; i < g->KH; i++)
        for (int64_t ho = 0; ho < g->HO; ho++) need[ho * g->SH + i * g->DH] = 1;
    for (int64_t j = 0; j < g->KW; j++) need[d->Hp + (j * g->DW) % g->SW] = 1;
}

/* One padded row (all SW column phases) of xs from the input row src (NULL: a padding row). */
static inline __attribute__((always_inline)) void xs_row_body(const float *src, float *dst, const geom_t *g,
                                                              const xs_t *d, const uint8_t *need_phase,
                                                              const int64_t *qrange) {
    const int64_t SW = g->SW, Wq = d->Wq;
    if (src == NULL) {
        memset(dst, 0, (size_t)(SW * Wq) * sizeof(float));
        return;
    }
    for (int64_t ph = 0; ph < SW; ph++) {
        if (!need_phase[ph]) continue;
        float *dd = dst + ph * Wq;
        const int64_t off = ph - g->PW, qlo = qrange[2 * ph], qhi = qrange[2 * ph + 1];
        memset(dd, 0, (size_t)qlo * sizeof(float));
        const float *ss = src + off;
        if (SW == 1) {
            memcpy(dd + qlo, ss + qlo, (size_t)(qhi - qlo) * sizeof(float));
        } else if (SW == 2) {
            for (int64_t q = qlo; q < qhi; q++) dd[q] = ss[2 * q];
        } else {
            for (int64_t q = qlo; q < qhi; q++) dd[q] = ss[q * SW];
        }
        memset(dd + qhi, 0, (size_t)(Wq - qhi) * sizeof(float));
    }
}

#define AQ_XSROW_ARGS                                                                                   \
    const float *src, float *dst, const geom_t *g, const xs_t *d, const uint8_t *need_phase, const int64_t *qrange
typedef void (*xs_row_fn)(AQ_XSROW_ARGS);
static void xs_row_scalar(AQ_XSROW_ARGS) { xs_row_body(src, dst, g, d, need_phase, qrange); }
#if AQ_X86
AQ_AVX2 static void xs_row_avx2(AQ_XSROW_ARGS) { xs_row_body(src, dst, g, d, need_phase, qrange); }
AQ_AVX512 static void xs_row_avx512(AQ_XSROW_ARGS) { xs_row_body(src, dst, g, d, need_phase, qrange); }
#endif

static int make_xs(const float *x, const geom_t *g, const xs_t *d, float *xs, int nt) {
    const int64_t rows = g->N * g->C * d->Hp, SW = g->SW, Wq = d->Wq;
    xs_row_fn row_fn = xs_row_scalar;
#if AQ_X86
    if (isa_now() >= ISA_AVX512) row_fn = xs_row_avx512;
    else if (isa_now() >= ISA_AVX2) row_fn = xs_row_avx2;
#endif
    uint8_t *need = (uint8_t *)malloc((size_t)(d->Hp + SW));
    int64_t *qrange = (int64_t *)malloc((size_t)(2 * SW) * sizeof(int64_t));
    if (!need || !qrange) {
        free(need); free(qrange);
        return 1;
    }
    xs_needed(g, d, need);
    for (int64_t ph = 0; ph < SW; ph++) { /* column w = q*SW + ph - PW lies in the image for q in [qlo, qhi) */
        const int64_t off = ph - g->PW;
        const int64_t qlo = imin(Wq, off >= 0 ? 0 : ceil_div(-off, SW));
        qrange[2 * ph] = qlo;
        qrange[2 * ph + 1] = imax(qlo, imin(Wq, g->W - 1 - off >= 0 ? (g->W - 1 - off) / SW + 1 : 0));
    }
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t nc = r / d->Hp, hp = r % d->Hp, h = hp - g->PH;
        if (!need[hp]) continue;
        const float *src = (h < 0 || h >= g->H) ? NULL : x + (nc * g->H + h) * g->W;
        row_fn(src, xs + r * SW * Wq, g, d, need + d->Hp, qrange);
    }
    free(need);
    free(qrange);
    return 0;
}

static void make_koff(const geom_t *g, const xs_t *d, int64_t *koff) {
    int64_t k = 0;
    for (int64_t c = 0; c < g->C; c++)
        for (int64_t i = 0; i < g->KH; i++)
            for (int64_t j = 0; j < g->KW; j++, k++) {
                const int64_t woff = j * g->DW;
                koff[k] = d->cstep ? (c * g->H + i * g->DH) * g->W + woff
                                   : ((c * d->Hp + i * g->DH) * g->SW + woff % g->SW) * d->Wq + woff / g->SW;
            }
}

/* A run: lanes [lane, lane+len) of panel `panel` take positions whose xs offsets are src..src+len. */
typedef struct {
    int64_t panel, lane, len, src;
} run_t;

/* Runs of positions [p0, p0+np), split at output-row ends and panel boundaries (at most
 * np + np/nr + 2 of them). */
static int64_t make_runs(const geom_t *g, const xs_t *d, int64_t p0, int64_t np, int64_t nr, run_t *runs) {
    int64_t nrun = 0, q = 0, ho = p0 / g->WO, wo = p0 % g->WO;
    while (q < np) {
        const int64_t len = imin(imin(g->WO - wo, np - q), nr - q % nr);
        runs[nrun].panel = q / nr;
        runs[nrun].lane = q % nr;
        runs[nrun].len = len;
        runs[nrun].src = ho * d->rowstep + wo * (d->cstep ? d->cstep : 1);
        nrun++;
        q += len;
        wo += len;
        if (wo == g->WO) {
            wo = 0;
            ho++;
        }
    }
    return nrun;
}

/* Copy n floats in 16-float pieces: may write up to 15 floats past d+n and read past s+n. */
static inline void copy_over_f32(float *d, const float *s, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) memcpy(d + i, s + i, 64);
}

/* Unfold the positions described by `runs` (np of them, npad = np rounded up to nr) of one image
 * into panels of nr positions: buf[panel][k][nr] with panel stride kstride*nr; rows K..kstride-1 and
 * lanes np..npad-1 are zero. buf needs 16 floats of slack. Panels are filled in order, rows in
 * order, so each piece's over-copy lands on data written later. */
static inline __attribute__((always_inline)) void im2col_body(const float *xsn, const int64_t *koff, int64_t K,
                                                              const run_t *runs, int64_t nrun, int64_t np,
                                                              int64_t npad, int64_t nr, int64_t kstride,
                                                              int64_t cstep, float *buf) {
    const int64_t pstride = kstride * nr, npan = npad / nr;
    int64_t r0 = 0;
    for (int64_t pan = 0; pan < npan; pan++) {
        int64_t r1 = r0;
        while (r1 < nrun && runs[r1].panel == pan) r1++;
        float *pb = buf + pan * pstride;
        const int64_t tail = (pan == npan - 1) ? np - pan * nr : nr; /* valid lanes in this panel */
        for (int64_t k = 0; k < K; k++) {
            const float *src = xsn + koff[k];
            float *dst = pb + k * nr;
            if (cstep == 0) {
                for (int64_t r = r0; r < r1; r++) copy_over_f32(dst + runs[r].lane, src + runs[r].src, runs[r].len);
            } else if (cstep == 1) {
                for (int64_t r = r0; r < r1; r++)
                    memcpy(dst + runs[r].lane, src + runs[r].src, (size_t)runs[r].len * sizeof(float));
            } else {
                for (int64_t r = r0; r < r1; r++) {
                    float *dd = dst + runs[r].lane;
                    const float *ss = src + runs[r].src;
                    for (int64_t q = 0; q < runs[r].len; q++) dd[q] = ss[q * cstep];
                }
            }
            if (tail < nr) memset(dst + tail, 0, (size_t)(nr - tail) * sizeof(float));
        }
        if (kstride > K) memset(pb + K * nr, 0, (size_t)((kstride - K) * nr) * sizeof(float));
        r0 = r1;
    }
}

/* Add the unfolded gradient cols (K, P) of one image back into gx (C, H, W) (col2im). */
static inline __attribute__((always_inline)) void fold_body(const float *cols, const geom_t *g, float *gxn,
                                                            int64_t c_begin, int64_t c_end) {
    const int64_t P = g->HO * g->WO;
    for (int64_t c = c_begin; c < c_end; c++)
        for (int64_t i = 0; i < g->KH; i++)
            for (int64_t j = 0; j < g->KW; j++) {
                const int64_t k = (c * g->KH + i) * g->KW + j;
                const int64_t joff = j * g->DW - g->PW;
                int64_t wlo = joff >= 0 ? 0 : ceil_div(-joff, g->SW);
                int64_t whi = (g->W - 1 - joff) >= 0 ? (g->W - 1 - joff) / g->SW + 1 : 0;
                whi = imin(whi, g->WO);
                if (whi <= wlo) continue;
                for (int64_t ho = 0; ho < g->HO; ho++) {
                    const int64_t hi = ho * g->SH - g->PH + i * g->DH;
                    if (hi < 0 || hi >= g->H) continue;
                    const float *src = cols + k * P + ho * g->WO;
                    float *dst = gxn + (c * g->H + hi) * g->W + joff;
                    if (g->SW == 1) {
                        for (int64_t wo = wlo; wo < whi; wo++) dst[wo] += src[wo];
                    } else {
                        const int64_t sw = g->SW;
                        for (int64_t wo = wlo; wo < whi; wo++) dst[wo * sw] += src[wo];
                    }
                }
            }
}

/* The two loops above, compiled for each instruction set (the generic body vectorises wider there). */
#define AQ_IM2COL_ARGS                                                                                  \
    const float *xsn, const int64_t *koff, int64_t K, const run_t *runs, int64_t nrun, int64_t np,       \
        int64_t npad, int64_t nr, int64_t kstride, int64_t cstep, float *buf
#define AQ_FOLD_ARGS const float *cols, const geom_t *g, float *gxn, int64_t c_begin, int64_t c_end
typedef void (*im2col_fn)(AQ_IM2COL_ARGS);
typedef void (*fold_fn)(AQ_FOLD_ARGS);
static void im2col_scalar(AQ_IM2COL_ARGS) { im2col_body(xsn, koff, K, runs, nrun, np, npad, nr, kstride, cstep, buf); }
static void fold_scalar(AQ_FOLD_ARGS) { fold_body(cols, g, gxn, c_begin, c_end); }
#if AQ_X86
AQ_AVX2 static void im2col_avx2(AQ_IM2COL_ARGS) { im2col_body(xsn, koff, K, runs, nrun, np, npad, nr, kstride, cstep, buf); }
AQ_AVX2 static void fold_avx2(AQ_FOLD_ARGS) { fold_body(cols, g, gxn, c_begin, c_end); }
AQ_AVX512 static void im2col_avx512(AQ_IM2COL_ARGS) {
    im2col_body(xsn, koff, K, runs, nrun, np, npad, nr, kstride, cstep, buf);
}
AQ_AVX512 static void fold_avx512(AQ_FOLD_ARGS) { fold_body(cols, g, gxn, c_begin, c_end); }
#endif

static im2col_fn pick_im2col(int isa) {
#if AQ_X86
    if (isa >= ISA_AVX512) return im2col_avx512;
    if (isa >= ISA_AVX2) return im2col_avx2;
#endif
    (void)isa;
    return im2col_scalar;
}

static fold_fn pick_fold(int isa) {
#if AQ_X86
    if (isa >= ISA_AVX512) return fold_avx512;
    if (isa >= ISA_AVX2) return fold_avx2;
#endif
    (void)isa;
    return fold_scalar;
}

/* ------------------------------------------------------------------------------------------------ */
/* float32 micro-kernels                                                                            */
/*   fwd:  C[r*ldc + j] = -sum_k |B[k*NR + j] - A[k*MR + r]|      (A: weights, B: unfolded inputs)   */
/*   gin:  C[r*ldc + j] = sum_o G[o*NR + j] * clamp(Wt[o*MR + r] - X[r*NR + j], -1, 1)               */
/* ------------------------------------------------------------------------------------------------ */
typedef void (*fwd_kern_t)(const float *A, const float *B, int64_t K, float *C, int64_t ldc);
typedef void (*gin_kern_t)(const float *X, const float *G, const float *Wt, int64_t O, float *C, int64_t ldc);

#define SC_MR 4
#define SC_NR 8
static void fwd_scalar(const float *A, const float *B, int64_t K, float *C, int64_t ldc) {
    float acc[SC_MR][SC_NR];
    memset(acc, 0, sizeof(acc));
    for (int64_t k = 0; k < K; k++) {
        const float *b = B + k * SC_NR, *a = A + k * SC_MR;
        for (int r = 0; r < SC_MR; r++) {
            const float ar = a[r];
            for (int j = 0; j < SC_NR; j++) {
                const float d = b[j] - ar;
                acc[r][j] += d < 0.f ? -d : d;
            }
        }
    }
    for (int r = 0; r < SC_MR; r++)
        for (int j = 0; j < SC_NR; j++) C[r * ldc + j] = -acc[r][j];
}

static void gin_scalar(const float *X, const float *G, const float *Wt, int64_t O, float *C, int64_t ldc) {
    float acc[SC_MR][SC_NR];
    memset(acc, 0, sizeof(acc));
    for (int64_t o = 0; o < O; o++) {
        const float *g = G + o * SC_NR, *w = Wt + o * SC_MR;
        for (int r = 0; r < SC_MR; r++)
            for (int j = 0; j < SC_NR; j++) {
                float t = w[r] - X[r * SC_NR + j];
                t = t > 1.f ? 1.f : (t < -1.f ? -1.f : t);
                acc[r][j] += t * g[j];
            }
    }
    for (int r = 0; r < SC_MR; r++)
        for (int j = 0; j < SC_NR; j++) C[r * ldc + j] = acc[r][j];
}

#if AQ_X86
/* AVX2: MR output channels x 16 positions (MR = 6: 12 accumulators; 2 and 4 serve the last
 * channel panel so that no padded channels are computed). */
#define A2_MR 6
#define A2_NR 16
#define FWD_AVX2(NAME, MR)                                                                               \
    AQ_AVX2 static void NAME(const float *A, const float *B, int64_t K, float *C, int64_t ldc) {          \
        __m256 acc[MR][2];                                                                               \
        for (int r = 0; r < MR; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();                        \
        const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));                          \
        for (int64_t k = 0; k < K; k++) {                                                                \
            const __m256 b0 = _mm256_loadu_ps(B + k * A2_NR), b1 = _mm256_loadu_ps(B + k * A2_NR + 8);   \
            for (int r = 0; r < MR; r++) {                                                               \
                const __m256 a = _mm256_broadcast_ss(A + k * MR + r);                                    \
                acc[r][0] = _mm256_add_ps(acc[r][0], _mm256_and_ps(_mm256_sub_ps(b0, a), absm));         \
                acc[r][1] = _mm256_add_ps(acc[r][1], _mm256_and_ps(_mm256_sub_ps(b1, a), absm));         \
            }                                                                                            \
        }                                                                                                \
        const __m256 z = _mm256_setzero_ps();                                                            \
        for (int r = 0; r < MR; r++) {                                                                   \
            _mm256_storeu_ps(C + r * ldc, _mm256_sub_ps(z, acc[r][0]));                                  \
            _mm256_storeu_ps(C + r * ldc + 8, _mm256_sub_ps(z, acc[r][1]));                              \
        }                                                                                                \
    }
FWD_AVX2(fwd_avx2, 6)
FWD_AVX2(fwd_avx2_m4, 4)
FWD_AVX2(fwd_avx2_m2, 2)

/* AVX2 input gradient: 4 k-rows x 16 positions; the difference is an FMA (w*1 - x) so that it runs
 * on the FMA pipes beside the min/max clamp. */
#define G2_MR 4
#define G2_NR 16
AQ_AVX2 static void gin_avx2(const float *X, const float *G, const float *Wt, int64_t O, float *C, int64_t ldc) {
    __m256 acc[G2_MR][2];
    for (int r = 0; r < G2_MR; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    const __m256 one = _mm256_set1_ps(1.f), mone = _mm256_set1_ps(-1.f);
    for (int64_t o = 0; o < O; o++) {
        const __m256 g0 = _mm256_loadu_ps(G + o * G2_NR), g1 = _mm256_loadu_ps(G + o * G2_NR + 8);
        for (int r = 0; r < G2_MR; r++) {
            const __m256 w = _mm256_broadcast_ss(Wt + o * G2_MR + r);
            __m256 t0 = _mm256_fmsub_ps(w, one, _mm256_loadu_ps(X + r * G2_NR));
            __m256 t1 = _mm256_fmsub_ps(w, one, _mm256_loadu_ps(X + r * G2_NR + 8));
            t0 = _mm256_max_ps(_mm256_min_ps(t0, one), mone);
            t1 = _mm256_max_ps(_mm256_min_ps(t1, one), mone);
            acc[r][0] = _mm256_fmadd_ps(t0, g0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(t1, g1, acc[r][1]);
        }
    }
    for (int r = 0; r < G2_MR; r++) {
        _mm256_storeu_ps(C + r * ldc, acc[r][0]);
        _mm256_storeu_ps(C + r * ldc + 8, acc[r][1]);
    }
}

/* AVX-512: MR output channels x 64 positions (MR = 6: 24 zmm accumulators; 2 and 4 for the last
 * channel panel). */
#define A5_MR 6
#define A5_NR 64
#define FWD_AVX512(NAME, MR)                                                                             \
    AQ_AVX512 static void NAME(const float *A, const float *B, int64_t K, float *C, int64_t ldc) {        \
        __m512 acc[MR][4];                                                                               \
        for (int r = 0; r < MR; r++)                                                                     \
            for (int v = 0; v < 4; v++) acc[r][v] = _mm512_setzero_ps();                                 \
        const __m512 absm = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));                          \
        const __m512 one = _mm512_set1_ps(1.f);                                                          \
        for (int64_t k = 0; k < K; k++) {                                                                \
            __m512 b[4];                                                                                 \
            for (int v = 0; v < 4; v++) b[v] = _mm512_loadu_ps(B + k * A5_NR + 16 * v);                  \
            for (int r = 0; r < MR; r++) {                                                               \
                const __m512 a = _mm512_set1_ps(A[k * MR + r]);                                          \
                for (int v = 0; v < 4; v++)                                                              \
                    acc[r][v] = _mm512_fmadd_ps(_mm512_and_ps(_mm512_sub_ps(b[v], a), absm), one, acc[r][v]); \
            }                                                                                            \
        }                                                                                                \
        const __m512 z = _mm512_setzero_ps();                                                            \
        for (int r = 0; r < MR; r++)                                                                     \
            for (int v = 0; v < 4; v++) _mm512_storeu_ps(C + r * ldc + 16 * v, _mm512_sub_ps(z, acc[r][v])); \
    }
FWD_AVX512(fwd_avx512, 6)
FWD_AVX512(fwd_avx512_m4, 4)
FWD_AVX512(fwd_avx512_m2, 2)

/* AVX-512 input gradient: 6 k-rows x 32 positions; the 12 input vectors of the tile stay in
 * registers beside the 12 accumulators. */
#define G5_MR 6
#define G5_NV 2
#define G5_NR (16 * G5_NV)
AQ_AVX512 static void gin_avx512(const float *X, const float *G, const float *Wt, int64_t O, float *C,
                                 int64_t ldc) {
    __m512 acc[G5_MR][G5_NV], xv[G5_MR][G5_NV];
    for (int r = 0; r < G5_MR; r++)
        for (int v = 0; v < G5_NV; v++) {
            acc[r][v] = _mm512_setzero_ps();
            xv[r][v] = _mm512_loadu_ps(X + r * G5_NR + 16 * v);
        }
    const __m512 one = _mm512_set1_ps(1.f), mone = _mm512_set1_ps(-1.f);
    for (int64_t o = 0; o < O; o++) {
        __m512 g[G5_NV];
        for (int v = 0; v < G5_NV; v++) g[v] = _mm512_loadu_ps(G + o * G5_NR + 16 * v);
        for (int r = 0; r < G5_MR; r++) {
            const __m512 w = _mm512_set1_ps(Wt[o * G5_MR + r]);
            for (int v = 0; v < G5_NV; v++) {
                __m512 t = _mm512_fmsub_ps(w, one, xv[r][v]);
                t = _mm512_max_ps(_mm512_min_ps(t, one), mone);
                acc[r][v] = _mm512_fmadd_ps(t, g[v], acc[r][v]);
            }
        }
    }
    for (int r = 0; r < G5_MR; r++)
        for (int v = 0; v < G5_NV; v++) _mm512_storeu_ps(C + r * ldc + 16 * v, acc[r][v]);
}
#endif /* AQ_X86 */

typedef struct {
    int64_t mr, nr;
    fwd_kern_t fwd;
    fwd_kern_t fwd_m2, fwd_m4; /* narrower forward kernels for the last channel panel (NULL: none) */
    gin_kern_t gin;
    im2col_fn im2col;
    fold_fn fold;
} fcfg_t;

static fcfg_t float_cfg(int isa) {
    fcfg_t c = {SC_MR, SC_NR, fwd_scalar, NULL, NULL, gin_scalar, pick_im2col(isa), pick_fold(isa)};
#if AQ_X86
    if (isa >= ISA_AVX512) {
        c.mr = A5_MR; c.nr = A5_NR; c.fwd = fwd_avx512; c.gin = gin_avx512;
        c.fwd_m2 = fwd_avx512_m2; c.fwd_m4 = fwd_avx512_m4;
    } else if (isa >= ISA_AVX2) {
        c.mr = A2_MR; c.nr = A2_NR; c.fwd = fwd_avx2; c.gin = gin_avx2;
        c.fwd_m2 = fwd_avx2_m2; c.fwd_m4 = fwd_avx2_m4;
    }
#else
    (void)isa;
#endif
    return c;
}

static fcfg_t float_cfg_gin(int isa) {
    fcfg_t c = {SC_MR, SC_NR, fwd_scalar, NULL, NULL, gin_scalar, pick_im2col(isa), pick_fold(isa)};
#if AQ_X86
    if (isa >= ISA_AVX512) {
        c.mr = G5_MR; c.nr = G5_NR; c.gin = gin_avx512;
    } else if (isa >= ISA_AVX2) {
        c.mr = G2_MR; c.nr = G2_NR; c.gin = gin_avx2;
    }
#else
    (void)isa;
#endif
    return c;
}

/* Positions per work item: the unfolded block stays near `bytes`, and there are enough items for
 * the threads. Returns a multiple of nr. */
static int64_t block_positions(int64_t P, int64_t N, int64_t per_pos_bytes, int64_t nr, int nt, int64_t bytes) {
    int64_t pb = imax(nr, bytes / imax(per_pos_bytes, 1) / nr * nr);
    int64_t nblk = ceil_div(P, pb);
    const int64_t want = 4 * (int64_t)nt; /* items wanted for load balance */
    if (N * nblk < want) nblk = imax(nblk, ceil_div(want, N));
    nblk = imin(nblk, ceil_div(P, nr));
    return round_up(ceil_div(P, nblk), nr);
}

/* ------------------------------------------------------------------------------------------------ */
/* float32 forward                                                                                  */
/* ------------------------------------------------------------------------------------------------ */
/* Grouped layers (groups G > 1, as nn.Conv2d): geometry C and O are the whole layer's channels; output
 * channels [grp*O/G, (grp+1)*O/G) read input channels [grp*C/G, (grp+1)*C/G) only, with weights
 * (O, C/G, KH, KW). A work item is (image, group, block of positions); `gg` is one group's geometry
 * (C/G input and O/G output channels), the padded copy xs is made once for all channels. */
/* One group's geometry: C/G input and O/G output channels; non-zero when G does not divide both. */
static int group_geom(const geom_t *g, int64_t G, geom_t *gg) {
    if (G < 1 || g->C % G || g->O % G) return 2;
    *gg = *g;
    gg->C = g->C / G;
    gg->O = g->O / G;
    return 0;
}

AQ_EXPORT int aq_forward_f32_g(const float *x, const float *w, float *y, const int64_t *geom, int64_t groups,
                               int nthreads) {
    const geom_t g = read_geom(geom);
    const int nt = clamp_threads(nthreads);
    const fcfg_t cfg = float_cfg(isa_now());
    const int64_t G = groups;
    geom_t gg;
    if (group_geom(&g, G, &gg)) return 2;
    const int64_t K = gg.C * g.KH * g.KW, P = g.HO * g.WO, O = g.O, Og = gg.O, mr = cfg.mr, nr = cfg.nr;
    if (g.N <= 0 || O <= 0 || P <= 0) return 0;
    const int64_t nop = ceil_div(Og, mr);
    /* the last panel (of each group) may use a narrower kernel: its rows (and packing width) */
    const int64_t last = Og - (nop - 1) * mr;
    int64_t mr_last = mr;
    fwd_kern_t fwd_last = cfg.fwd;
    if (last <= 2 && cfg.fwd_m2) {
        mr_last = 2; fwd_last = cfg.fwd_m2;
    } else if (last <= 4 && cfg.fwd_m4) {
        mr_last = 4; fwd_last = cfg.fwd_m4;
    }
    const int64_t wpg = nop * K * mr; /* packed weight floats per group */
    float *wp = (float *)aalloc((size_t)(G * wpg) * sizeof(float));
    if (!wp) return 1;
    for (int64_t grp = 0; grp < G; grp++)
        for (int64_t op = 0; op < nop; op++) {
            const int64_t width = op == nop - 1 ? mr_last : mr;
            for (int64_t k = 0; k < K; k++)
                for (int64_t r = 0; r < width; r++) {
                    const int64_t o = op * mr + r;
                    wp[grp * wpg + op * K * mr + k * width + r] = o < Og ? w[(grp * Og + o) * K + k] : 0.f;
                }
        }
    const int64_t pb = block_positions(P, g.N * G, K * 4, nr, nt, 192 * 1024);
    const int64_t nblk = ceil_div(P, pb), items = g.N * G * nblk;
    const xs_t d = xs_dims(&g);
    const int64_t cs = d.cstep ? g.H * g.W : d.Hp * g.SW * d.Wq; /* xs floats per channel */
    float *xs_buf = d.cstep ? NULL : (float *)aalloc((size_t)(g.N * d.img + 16) * sizeof(float));
    const float *xs = d.cstep ? x : xs_buf;
    int64_t *koff = (int64_t *)malloc((size_t)K * sizeof(int64_t));
    if ((!d.cstep && (!xs_buf || make_xs(x, &g, &d, xs_buf, nt))) || !koff) {
        free(wp); free(xs_buf); free(koff);
        return 1;
    }
    make_koff(&gg, &d, koff);
    int err = 0;
#pragma omp parallel num_threads(nt)
    {
        float *buf = (float *)aalloc((size_t)(pb * K + 16) * sizeof(float));
        float *tmp = (float *)aalloc((size_t)(mr * nr) * sizeof(float));
        run_t *runs = (run_t *)malloc((size_t)(pb + pb / nr + 2) * sizeof(run_t));
        if (!buf || !tmp || !runs) {
#pragma omp atomic write
            err = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            if (!buf || !tmp || !runs) continue;
            const int64_t n = it / (G * nblk), grp = (it / nblk) % G, p0 = (it % nblk) * pb, np = imin(pb, P - p0);
            const int64_t npad = round_up(np, nr);
            const int64_t nrun = make_runs(&g, &d, p0, np, nr, runs);
            cfg.im2col(xs + n * d.img + grp * gg.C * cs, koff, K, runs, nrun, np, npad, nr, K, d.cstep, buf);
            float *yn = y + (n * O + grp * Og) * P;
            const float *wpn = wp + grp * wpg;
            for (int64_t pp = 0; pp < npad / nr; pp++) {
                const int64_t pos = p0 + pp * nr, nvalid = imin(nr, P - pos);
                const float *B = buf + pp * K * nr;
                for (int64_t op = 0; op < nop; op++) {
                    const int64_t o0 = op * mr, ovalid = imin(mr, Og - o0);
                    const int64_t width = op == nop - 1 ? mr_last : mr;
                    const fwd_kern_t fwd = op == nop - 1 ? fwd_last : cfg.fwd;
                    if (nvalid == nr && ovalid == width) {
                        fwd(wpn + op * K * mr, B, K, yn + o0 * P + pos, P);
                    } else {
                        fwd(wpn + op * K * mr, B, K, tmp, nr);
                        for (int64_t r = 0; r < ovalid; r++)
                            memcpy(yn + (o0 + r) * P + pos, tmp + r * nr, (size_t)nvalid * sizeof(float));
                    }
                }
            }
        }
        free(buf);
        free(tmp);
        free(runs);
    }
    free(wp);
    free(xs_buf);
    free(koff);
    return err;
}

AQ_EXPORT int aq_forward_f32(const float *x, const float *w, float *y, const int64_t *geom, int nthreads) {
    return aq_forward_f32_g(x, w, y, geom, 1, nthreads);
}

/* ------------------------------------------------------------------------------------------------ */
/* float32 input gradient                                                                           */
/* ------------------------------------------------------------------------------------------------ */

/* Unfolded gradient of positions [p0, p0+np) of image n into cols (K, P). */
typedef struct {
    float *xbuf, *gbuf, *tmp;
    run_t *runs;
} gin_scratch_t;

static int gin_scratch_alloc(gin_scratch_t *s, int64_t pb, int64_t kpad, int64_t O, int64_t mr, int64_t nr) {
    s->xbuf = (float *)aalloc((size_t)(pb * kpad + 16) * sizeof(float));
    s->gbuf = (float *)aalloc((size_t)(pb * O) * sizeof(float));
    s->tmp = (float *)aalloc((size_t)(mr * nr) * sizeof(float));
    s->runs = (run_t *)malloc((size_t)(pb + pb / nr + 2) * sizeof(run_t));
    return s->xbuf && s->gbuf && s->tmp && s->runs;
}

static void gin_scratch_free(gin_scratch_t *s) {
    free(s->xbuf); free(s->gbuf); free(s->tmp); free(s->runs);
}

static void gin_block(const fcfg_t *cfg, const geom_t *g, const xs_t *d, const float *xsn, const int64_t *koff,
                      const float *gon, const float *wt, int64_t p0, int64_t np, gin_scratch_t *s, float *cols) {
    const int64_t K = g->C * g->KH * g->KW, P = g->HO * g->WO, O = g->O, mr = cfg->mr, nr = cfg->nr;
    const int64_t kpad = round_up(K, mr), nkp = kpad / mr, npad = round_up(np, nr);
    float *xbuf = s->xbuf, *gbuf = s->gbuf, *tmp = s->tmp;
    const int64_t nrun = make_runs(g, d, p0, np, nr, s->runs);
    cfg->im2col(xsn, koff, K, s->runs, nrun, np, npad, nr, kpad, d->cstep, xbuf);
    /* grad_out block: gbuf[panel][o][nr] */
    for (int64_t pp = 0; pp < npad / nr; pp++) {
        const int64_t pos = p0 + pp * nr, nvalid = imin(nr, p0 + np - pos);
        for (int64_t o = 0; o < O; o++) {
            float *d = gbuf + (pp * O + o) * nr;
            memcpy(d, gon + o * P + pos, (size_t)nvalid * sizeof(float));
            for (int64_t j = nvalid; j < nr; j++) d[j] = 0.f;
        }
    }
    for (int64_t pp = 0; pp < npad / nr; pp++) {
        const int64_t pos = p0 + pp * nr, nvalid = imin(nr, p0 + np - pos);
        for (int64_t kp = 0; kp < nkp; kp++) {
            const int64_t k0 = kp * mr, kvalid = imin(mr, K - k0);
            const float *X = xbuf + (pp * kpad + k0) * nr;
            if (nvalid == nr && kvalid == mr) {
                cfg->gin(X, gbuf + pp * O * nr, wt + kp * O * mr, O, cols + k0 * P + pos, P);
            } else {
                cfg->gin(X, gbuf + pp * O * nr, wt + kp * O * mr, O, tmp, nr);
                for (int64_t r = 0; r < kvalid; r++)
                    memcpy(cols + (k0 + r) * P + pos, tmp + r * nr, (size_t)nvalid * sizeof(float));
            }
        }
    }
}

/* Grouped as aq_forward_f32_g: each group's unfolded gradient (C/G·KH·KW rows) is computed from its own
 * O/G output channels and folded into its own input channels. */
AQ_EXPORT int aq_grad_input_f32_g(const float *go, const float *x, const float *w, float *gx, const int64_t *geom,
                                  int64_t groups, int nthreads) {
    const geom_t g = read_geom(geom);
    const int nt = clamp_threads(nthreads);
    const fcfg_t cfg = float_cfg_gin(isa_now());
    const int64_t G = groups;
    geom_t gg;
    if (group_geom(&g, G, &gg)) return 2;
    const int64_t K = gg.C * g.KH * g.KW, P = g.HO * g.WO, O = g.O, Og = gg.O, mr = cfg.mr, nr = cfg.nr;
    const int64_t CHW = g.C * g.H * g.W, gCHW = gg.C * g.H * g.W;
    memset(gx, 0, (size_t)(g.N * CHW) * sizeof(float));
    if (g.N <= 0 || O <= 0 || P <= 0 || K <= 0) return 0;
    const int64_t kpad = round_up(K, mr), nkp = kpad / mr, wtg = kpad * Og;
    /* wt[group][kpanel][o][mr] = W[group*Og + o][kpanel*mr + r] */
    float *wt = (float *)aalloc((size_t)(G * wtg) * sizeof(float));
    if (!wt) return 1;
    for (int64_t grp = 0; grp < G; grp++)
        for (int64_t kp = 0; kp < nkp; kp++)
            for (int64_t o = 0; o < Og; o++)
                for (int64_t r = 0; r < mr; r++) {
                    const int64_t k = kp * mr + r;
                    wt[grp * wtg + (kp * Og + o) * mr + r] = k < K ? w[(grp * Og + o) * K + k] : 0.f;
                }
    const int64_t per_pos = (kpad + Og) * 4;
    const xs_t d = xs_dims(&g);
    const int64_t cs = d.cstep ? g.H * g.W : d.Hp * g.SW * d.Wq; /* xs floats per channel */
    float *xs_buf = d.cstep ? NULL : (float *)aalloc((size_t)(g.N * d.img + 16) * sizeof(float));
    const float *xs = d.cstep ? x : xs_buf;
    int64_t *koff = (int64_t *)malloc((size_t)K * sizeof(int64_t));
    float *shared_cols = g.N >= nt ? NULL : (float *)aalloc((size_t)(K * P) * sizeof(float));
    if ((!d.cstep && (!xs_buf || make_xs(x, &g, &d, xs_buf, nt))) || !koff || (g.N < nt && !shared_cols)) {
        free(wt); free(xs_buf); free(koff); free(shared_cols);
        return 1;
    }
    make_koff(&gg, &d, koff);
    int err = 0;
    if (g.N >= nt) {
        /* one image per item: a thread unfolds, computes and folds its image alone */
        const int64_t pb = imin(round_up(P, nr), imax(nr, (192 * 1024 / per_pos) / nr * nr));
#pragma omp parallel num_threads(nt)
        {
            gin_scratch_t sc;
            float *cols = (float *)aalloc((size_t)(K * P) * sizeof(float));
            const int ok = gin_scratch_alloc(&sc, pb, kpad, Og, mr, nr) && cols;
            if (!ok) {
#pragma omp atomic write
                err = 1;
            }
#pragma omp for schedule(dynamic, 1)
            for (int64_t n = 0; n < g.N; n++) {
                if (!ok) continue;
                for (int64_t grp = 0; grp < G; grp++) {
                    for (int64_t p0 = 0; p0 < P; p0 += pb)
                        gin_block(&cfg, &gg, &d, xs + n * d.img + grp * gg.C * cs, koff, go + (n * O + grp * Og) * P,
                                  wt + grp * wtg, p0, imin(pb, P - p0), &sc, cols);
                    cfg.fold(cols, &gg, gx + n * CHW + grp * gCHW, 0, gg.C);
                }
            }
            gin_scratch_free(&sc);
            free(cols);
        }
    } else {
        /* few images: split each image's positions over the threads, then its channels for the fold */
        const int64_t pb = block_positions(P, 1, per_pos, nr, nt, 192 * 1024);
        const int64_t nblk = ceil_div(P, pb);
        for (int64_t ng = 0; ng < g.N * G && !err; ng++) {
            const int64_t n = ng / G, grp = ng % G;
#pragma omp parallel num_threads(nt)
            {
                gin_scratch_t sc;
                const int ok = gin_scratch_alloc(&sc, pb, kpad, Og, mr, nr);
                if (!ok) {
#pragma omp atomic write
                    err = 1;
                }
#pragma omp for schedule(dynamic, 1)
                for (int64_t b = 0; b < nblk; b++) {
                    if (!ok) continue;
                    const int64_t p0 = b * pb;
                    gin_block(&cfg, &gg, &d, xs + n * d.img + grp * gg.C * cs, koff, go + (n * O + grp * Og) * P,
                              wt + grp * wtg, p0, imin(pb, P - p0), &sc, shared_cols);
                }
                gin_scratch_free(&sc);
#pragma omp barrier
#pragma omp for schedule(static)
                for (int64_t c = 0; c < gg.C; c++)
                    if (!err) cfg.fold(shared_cols, &gg, gx + n * CHW + grp * gCHW, c, c + 1);
            }
        }
    }
    free(xs_buf);
    free(koff);
    free(shared_cols);
    free(wt);
    return err;
}

AQ_EXPORT int aq_grad_input_f32(const float *go, const float *x, const float *w, float *gx, const int64_t *geom,
                                int nthreads) {
    return aq_grad_input_f32_g(go, x, w, gx, geom, 1, nthreads);
}

/* ------------------------------------------------------------------------------------------------ */
/* Python module (empty: the functions above are reached through ctypes)                            */
/* ------------------------------------------------------------------------------------------------ */
#ifndef AQ_NO_PYTHON
static struct PyModuleDef aq_module = {
    PyModuleDef_HEAD_INIT, "_adder_cpu",
    "Adder-layer CPU kernels; the C functions are called through ctypes by adderquant.kernels.cpu.", -1, NULL,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__adder_cpu(void) { return PyModule_Create(&aq_module); }
#endif

/* ------------------------------------------------------------------------------------------------ */
/* Fake quantisation, QAT's activation quantiser, in one pass: y = s * clamp(rint(x / s), qn, qp) and */
/* the straight-through mask inside = [qn <= rint(x / s) <= qp]. Bit for bit the PyTorch expression   */
/* torch.round(x / s).clamp(qn, qp) * s: an IEEE division (not a product with 1/s), round half to    */
/* even, a NaN stays NaN (and outside the mask).                                                      */
/* ------------------------------------------------------------------------------------------------ */
static inline __attribute__((always_inline)) void fq_body(const float *x, int64_t b, int64_t e, float s, float qn,
                                                          float qp, float *y, uint8_t *inside) {
    for (int64_t i = b; i < e; i++) {
        const float c = __builtin_rintf(x[i] / s);
        inside[i] = (uint8_t)((c >= qn) & (c <= qp));
        y[i] = (c < qn ? qn : (c > qp ? qp : c)) * s;
    }
}

static inline __attribute__((always_inline)) void mask_body(const float *g, const uint8_t *inside, int64_t b,
                                                            int64_t e, float *y) {
    for (int64_t i = b; i < e; i++) y[i] = inside[i] ? g[i] : 0.0f;
}

#define AQ_FQ_ARGS const float *x, int64_t b, int64_t e, float s, float qn, float qp, float *y, uint8_t *inside
#define AQ_MASK_ARGS const float *g, const uint8_t *inside, int64_t b, int64_t e, float *y
typedef void (*fq_fn)(AQ_FQ_ARGS);
typedef void (*mask_fn)(AQ_MASK_ARGS);
static void fq_scalar(AQ_FQ_ARGS) { fq_body(x, b, e, s, qn, qp, y, inside); }
static void mask_scalar(AQ_MASK_ARGS) { mask_body(g, inside, b, e, y); }
#if AQ_X86
AQ_AVX2 static void fq_avx2(AQ_FQ_ARGS) { fq_body(x, b, e, s, qn, qp, y, inside); }
AQ_AVX512 static void fq_avx512(AQ_FQ_ARGS) { fq_body(x, b, e, s, qn, qp, y, inside); }
AQ_AVX2 static void mask_avx2(AQ_MASK_ARGS) { mask_body(g, inside, b, e, y); }
AQ_AVX512 static void mask_avx512(AQ_MASK_ARGS) { mask_body(g, inside, b, e, y); }
#endif

AQ_EXPORT int aq_fake_quant_f32(const float *x, int64_t n, float s, float qn, float qp, float *y, uint8_t *inside,
                                int nthreads) {
    fq_fn fn = fq_scalar;
#if AQ_X86
    if (isa_now() >= ISA_AVX512) fn = fq_avx512;
    else if (isa_now() >= ISA_AVX2) fn = fq_avx2;
#endif
    const int nt = clamp_threads(nthreads);
    const int64_t block = 1 << 14;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t b = 0; b < n; b += block) fn(x, b, b + block < n ? b + block : n, s, qn, qp, y, inside);
    return 0;
}

AQ_EXPORT int aq_mask_f32(const float *g, const uint8_t *inside, int64_t n, float *y, int nthreads) {
    mask_fn fn = mask_scalar;
#if AQ_X86
    if (isa_now() >= ISA_AVX512) fn = mask_avx512;
    else if (isa_now() >= ISA_AVX2) fn = mask_avx2;
#endif
    const int nt = clamp_threads(nthreads);
    const int64_t block = 1 << 14;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t b = 0; b < n; b += block) fn(g, inside, b, b + block < n ? b + block : n, y);
    return 0;
}

/*
 * The integer engine's network runner and its sum-of-absolute-differences (SAD) kernels.
 *
 * Layouts (all per image):
 *   codes  uint8 "NCHWc8": ceil(C/8) planes of Hp x Wp pixels x 8 channel bytes, with a halo of the
 *          consumer's padding (hh rows, hw columns) holding the code of a real zero activation. Codes
 *          are stored in the offset domain x' = x - qmin in [0, 255]; channels beyond C are 0.
 *          A plane is followed by 8 pixels of slack (the kernels read whole 8-pixel groups).
 *   Z      int64 fixed point, blocked by groups of 8 positions: [G][Cp][8] with G = HO * ceil(WO/8)
 *          (a group is 8 consecutive positions of one output row; lanes beyond the row are junk).
 *
 * SAD kernel (positions in lanes): a 64-byte register holds 8 positions x 8 input channels of one tap,
 * read directly from the codes (stride 1 along the row) or from a packed copy (other column strides);
 * each of 8 output channels broadcasts its 8 weight bytes, vpsadbw sums |x' - w'| over the 8 channels
 * into one 64-bit lane per position and vpaddq accumulates. The register tile is 8 channels x NR
 * groups of 8 positions (NR <= 3 on AVX-512; AVX2: 4 channels x 1 group, twice). Reduction dimension
 * steps of 8 bytes: (tap i, tap j, channel chunk), so 16-channel layers waste nothing.
 * Offsets: with x' = x - qmin, w' = w - qmin clamped to [0, 255], |x - w| = |x' - w'| + e(w') where
 * e(w') = max(-w', 0) + max(w' - 255, 0) exactly (x' lies in [0, 255]); sum_k e is a per-channel constant.
 *
 * Epilogue (fused into every layer, on the int32 accumulators v = -(SAD + cst)):
 *   exact mode (a residual is added or Z is kept): Z = floor((v*M + 2^(sh-1)) / 2^sh) + B [+ R] [ReLU],
 *     in int64 exactly, stored when a later op reads it;
 *   codes for every adder that reads this value: code = clamp(round_half_even(Z * 2^k / D)), taken
 *     from a float64 estimate z of Z*2^k/D (exact mode: from Z; v mode: fma(v, a_c, b_c) with
 *     a_c = M_c 2^k / (2^sh_c D), b_c = B_c 2^k / D) whose error is below a per-channel margin that
 *     the plan computes; where z lies within the margin of a rounding boundary (x.5), the lane is
 *     recomputed exactly (Z in int64, then the quantisation thresholds), so every code equals the
 *     NumPy runtime's. ReLU in v mode: Q(max(Z, 0)) = max(Q(Z), Q(0)) (Q is monotone).
 * The scalar path computes everything exactly with the thresholds (no float).
 *
 * The runner takes images one at a time per thread (OpenMP across the batch), each thread with its
 * own arena of buffers (offsets planned in Python with liveness), so a whole image's activations stay
 * in the core's L2. aq_int_forward (the generic int_adder_conv2d) uses the same kernels.
 */
#include "aq_common.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
#define NRMAX 3                /* groups of 8 positions per kernel call */
#define SUPER 12               /* groups per epilogue call (4 kernel calls): whole vectors for the searches */
#define TLD (8 * SUPER)        /* tile row stride (int32): 8 channels x TLD positions */
#define MAX_COUT 16 /* code outputs of one layer: every (reading layer, input scale) */
#define MAX_KEYS 16
#define NET_MAX_BUF 1024

static int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
static int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
static int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

static void *aalloc(size_t bytes) {
    void *p = NULL;
    bytes = (bytes + 64 + 63) / 64 * 64;
    if (posix_memalign(&p, 64, bytes) != 0) return NULL;
    return p;
}

static inline int64_t ld64(const void *p) {
    int64_t v;
    memcpy(&v, p, 8);
    return v;
}

/* floor((v*M + 2^(sh-1)) / 2^sh) + B; |v*M| < 2^62 is checked when the plan is made. */
static inline int64_t requant1(int64_t v, int64_t M, int64_t sh, int64_t B) {
    const int64_t half = ((int64_t)1 << sh) >> 1;
    return (int64_t)((uint64_t)((v * M + half) >> sh) + (uint64_t)B);
}

static inline int64_t wrap_add(int64_t a, int64_t b) { return (int64_t)((uint64_t)a + (uint64_t)b); }

/* ------------------------------------------------------------------------------------------------ */
/* geometry                                                                                         */
/* ------------------------------------------------------------------------------------------------ */
typedef struct {
    int64_t N, C, H, W, O, KH, KW, SH, SW, PH, PW, DH, DW, HO, WO;
} ngeom_t;

static ngeom_t geom15(const int64_t *g) {
    ngeom_t r = {g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9], g[10], g[11], g[12], g[13], g[14]};
    return r;
}

typedef struct {
    int is_code;
    int64_t C, H, W;
    int64_t hh, hw, Hp, Wp, c8, plane; /* codes */
    int64_t G, gpr, Cp;                /* Z */
    uint8_t pad;
    int64_t bytes, off;
} nbuf_t;

static void code_geom(nbuf_t *b, int64_t C, int64_t H, int64_t W, int64_t hh, int64_t hw, int64_t pad) {
    memset(b, 0, sizeof(*b));
    b->is_code = 1;
    b->C = C; b->H = H; b->W = W; b->hh = hh; b->hw = hw;
    b->Hp = H + 2 * hh; b->Wp = W + 2 * hw; b->c8 = cdiv(C, 8);
    b->plane = (b->Hp * b->Wp + 8) * 8;
    b->pad = (uint8_t)pad;
    b->bytes = b->c8 * b->plane;
    b->off = -1;
}

static void z_geom(nbuf_t *b, int64_t C, int64_t H, int64_t W) {
    memset(b, 0, sizeof(*b));
    b->C = C; b->H = H; b->W = W;
    b->gpr = cdiv(W, 8); b->G = H * b->gpr; b->Cp = 8 * cdiv(C, 8);
    b->bytes = b->G * b->Cp * 8 * 8;
    b->off = -1;
}

/* The halo of a code buffer (and the padded channels of its halo pixels): zero activation codes. */
static void code_halo(const nbuf_t *b, uint8_t *base) {
    if (b->hh == 0 && b->hw == 0) return;
    for (int64_t c8 = 0; c8 < b->c8; c8++) {
        uint8_t px[8];
        for (int k = 0; k < 8; k++) px[k] = (c8 * 8 + k < b->C) ? b->pad : 0;
        uint8_t *pl = base + c8 * b->plane;
        for (int64_t hp = 0; hp < b->Hp; hp++) {
            uint8_t *row = pl + hp * b->Wp * 8;
            if (hp < b->hh || hp >= b->hh + b->H) {
                for (int64_t wp = 0; wp < b->Wp; wp++) memcpy(row + wp * 8, px, 8);
            } else {
                for (int64_t wp = 0; wp < b->hw; wp++) memcpy(row + wp * 8, px, 8);
                for (int64_t wp = b->hw + b->W; wp < b->Wp; wp++) memcpy(row + wp * 8, px, 8);
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* SAD kernels: tile[m][n*8 + q] = sum_s sum_b |A_n[koff[s] + q*8 + b] - W[s*64 + m*8 + b]|          */
/* ------------------------------------------------------------------------------------------------ */
typedef void (*sadk_t)(const uint8_t *const *A, int nr, const int64_t *koff, int64_t ns, const uint8_t *W,
                       uint32_t *tile);

static void sad_scalar(const uint8_t *const *A, int nr, const int64_t *koff, int64_t ns, const uint8_t *W,
                       uint32_t *tile) {
    for (int m = 0; m < 8; m++)
        for (int n = 0; n < nr * 8; n++) tile[m * TLD + n] = 0;
    for (int64_t s = 0; s < ns; s++) {
        const uint8_t *w = W + s * 64;
        for (int n = 0; n < nr; n++) {
            const uint8_t *a = A[n] + koff[s];
            for (int m = 0; m < 8; m++)
                for (int q = 0; q < 8; q++) {
                    uint32_t t = 0;
                    for (int b = 0; b < 8; b++) {
                        const int d = (int)a[q * 8 + b] - (int)w[m * 8 + b];
                        t += (uint32_t)(d < 0 ? -d : d);
                    }
                    tile[m * TLD + n * 8 + q] += t;
                }
        }
    }
}

#if AQ_X86
/* 8 channels x NR groups, the 24 accumulators as named registers (an array makes GCC keep them on the stack
 * at the loop's entry and exit). */
#define S5_ACC(m) __m512i a##m##0 = _mm512_setzero_si512(), a##m##1 = a##m##0, a##m##2 = a##m##0
#define S5_STEP(m)                                                                                         \
    do {                                                                                                   \
        const __m512i b_ = _mm512_set1_epi64(ld64(w + (m) * 8));                                          \
        a##m##0 = _mm512_add_epi64(a##m##0, _mm512_sad_epu8(x0, b_));                                     \
        if (NR > 1) a##m##1 = _mm512_add_epi64(a##m##1, _mm512_sad_epu8(x1, b_));                         \
        if (NR > 2) a##m##2 = _mm512_add_epi64(a##m##2, _mm512_sad_epu8(x2, b_));                         \
    } while (0)
#define S5_STORE(m)                                                                                        \
    do {                                                                                                   \
        _mm256_storeu_si256((__m256i *)(tile + (m) * TLD), _mm512_cvtepi64_epi32(a##m##0));               \
        if (NR > 1) _mm256_storeu_si256((__m256i *)(tile + (m) * TLD + 8), _mm512_cvtepi64_epi32(a##m##1)); \
        if (NR > 2) _mm256_storeu_si256((__m256i *)(tile + (m) * TLD + 16), _mm512_cvtepi64_epi32(a##m##2)); \
    } while (0)

AQ_AVX512 static inline __attribute__((always_inline)) void sad512_body(const uint8_t *const *A, const int64_t *koff,
                                                                        int64_t ns, const uint8_t *W,
                                                                        uint32_t *tile, const int NR) {
    S5_ACC(0); S5_ACC(1); S5_ACC(2); S5_ACC(3); S5_ACC(4); S5_ACC(5); S5_ACC(6); S5_ACC(7);
    const uint8_t *p0 = A[0], *p1 = NR > 1 ? A[1] : A[0], *p2 = NR > 2 ? A[2] : A[0];
    for (int64_t s = 0; s < ns; s++) {
        const int64_t o = koff[s];
        const __m512i x0 = _mm512_loadu_si512((const void *)(p0 + o));
        const __m512i x1 = NR > 1 ? _mm512_loadu_si512((const void *)(p1 + o)) : x0;
        const __m512i x2 = NR > 2 ? _mm512_loadu_si512((const void *)(p2 + o)) : x0;
        const uint8_t *w = W + s * 64;
        S5_STEP(0); S5_STEP(1); S5_STEP(2); S5_STEP(3); S5_STEP(4); S5_STEP(5); S5_STEP(6); S5_STEP(7);
    }
    S5_STORE(0); S5_STORE(1); S5_STORE(2); S5_STORE(3); S5_STORE(4); S5_STORE(5); S5_STORE(6); S5_STORE(7);
}

AQ_AVX512 static void sad_avx512(const uint8_t *const *A, int nr, const int64_t *koff, int64_t ns,
                                 const uint8_t *W, uint32_t *tile) {
    if (nr >= 3) sad512_body(A, koff, ns, W, tile, 3);
    else if (nr == 2) sad512_body(A, koff, ns, W, tile, 2);
    else sad512_body(A, koff, ns, W, tile, 1);
}

/* One group of 8 positions (two 4-position halves) x 4 channels m0..m0+3. */
AQ_AVX2 static void sad256_group(const uint8_t *a, const int64_t *koff, int64_t ns, const uint8_t *W, int m0,
                                 uint32_t *tile) {
    __m256i acc[4][2];
    for (int m = 0; m < 4; m++) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
    for (int64_t s = 0; s < ns; s++) {
        const uint8_t *p = a + koff[s];
        const __m256i x0 = _mm256_loadu_si256((const __m256i *)p), x1 = _mm256_loadu_si256((const __m256i *)(p + 32));
        const uint8_t *w = W + s * 64 + m0 * 8;
        for (int m = 0; m < 4; m++) {
            const __m256i b = _mm256_set1_epi64x(ld64(w + m * 8));
            acc[m][0] = _mm256_add_epi64(acc[m][0], _mm256_sad_epu8(x0, b));
            acc[m][1] = _mm256_add_epi64(acc[m][1], _mm256_sad_epu8(x1, b));
        }
    }
    const __m256i idx = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    for (int m = 0; m < 4; m++) {
        const __m256i t = _mm256_or_si256(acc[m][0], _mm256_slli_epi64(acc[m][1], 32));
        _mm256_storeu_si256((__m256i *)(tile + (m0 + m) * TLD), _mm256_permutevar8x32_epi32(t, idx));
    }
}

AQ_AVX2 static void sad_avx2(const uint8_t *const *A, int nr, const int64_t *koff, int64_t ns, const uint8_t *W,
                             uint32_t *tile) {
    for (int n = 0; n < nr; n++) {
        sad256_group(A[n], koff, ns, W, 0, tile + n * 8);
        sad256_group(A[n], koff, ns, W, 4, tile + n * 8);
    }
}
#endif

static sadk_t sad_kernel(int isa) {
#if AQ_X86
    if (isa >= ISA_AVX512) return sad_avx512;
    if (isa >= ISA_AVX2) return sad_avx2;
#endif
    (void)isa;
    return sad_scalar;
}

/* ------------------------------------------------------------------------------------------------ */
/* adder operands: packed weights, tap offsets, input addressing                                    */
/* ------------------------------------------------------------------------------------------------ */
typedef struct {
    int64_t ns, nchunk;  /* reduction steps of 8 bytes; output chunks of 8 channels */
    int64_t *koff;       /* direct: byte offsets of each step in the input code buffer */
    uint8_t *wpk;        /* [chunk][s][8 channels][8 bytes] */
    int32_t *cst;        /* [8 * nchunk] */
    int direct;          /* SW == 1: groups read the buffer itself */
    int64_t in_Wp, in_plane, in_r0, in_c0; /* input buffer geometry; (r0, c0): its pixel of (ho, wo) = (0, 0) */
} sadop_t;

/* w: int16 (O, C, KH, KW) as integers on the activation grid; xmin: the grid's qmin (x' = x - xmin). */
static int sadop_make(sadop_t *s, const ngeom_t *g, const int16_t *w, int64_t xmin, int64_t in_Wp, int64_t in_plane,
                      int64_t r0, int64_t c0) {
    memset(s, 0, sizeof(*s));
    const int64_t c8 = cdiv(g->C, 8);
    s->ns = g->KH * g->KW * c8;
    s->nchunk = cdiv(g->O, 8);
    s->direct = g->SW == 1;
    s->in_Wp = in_Wp; s->in_plane = in_plane; s->in_r0 = r0; s->in_c0 = c0;
    s->koff = (int64_t *)aalloc((size_t)s->ns * sizeof(int64_t));
    s->wpk = (uint8_t *)aalloc((size_t)(s->nchunk * s->ns * 64));
    s->cst = (int32_t *)aalloc((size_t)(s->nchunk * 8) * sizeof(int32_t));
    if (!s->koff || !s->wpk || !s->cst) return 1;
    memset(s->wpk, 0, (size_t)(s->nchunk * s->ns * 64));
    int64_t st = 0;
    for (int64_t i = 0; i < g->KH; i++)
        for (int64_t j = 0; j < g->KW; j++)
            for (int64_t c = 0; c < c8; c++, st++)
                s->koff[st] = s->direct ? c * in_plane + ((r0 + i * g->DH) * in_Wp + c0 + j * g->DW) * 8 : st * 64;
    for (int64_t o = 0; o < s->nchunk * 8; o++) {
        int64_t e = 0;
        if (o < g->O) {
            st = 0;
            for (int64_t i = 0; i < g->KH; i++)
                for (int64_t j = 0; j < g->KW; j++)
                    for (int64_t c = 0; c < c8; c++, st++)
                        for (int64_t b = 0; b < 8; b++) {
                            if (c * 8 + b >= g->C) continue;
                            const int64_t v = (int64_t)w[((o * g->C + c * 8 + b) * g->KH + i) * g->KW + j] - xmin;
                            const int64_t q = v < 0 ? 0 : v > 255 ? 255 : v;
                            e += (q - v < 0 ? v - q : q - v);
                            s->wpk[((o / 8) * s->ns + st) * 64 + (o % 8) * 8 + b] = (uint8_t)q;
                        }
        }
        if (e > INT32_MAX) return 3;
        s->cst[o] = (int32_t)e;
    }
    return 0;
}

static void sadop_free(sadop_t *s) {
    free(s->koff); free(s->wpk); free(s->cst);
    memset(s, 0, sizeof(*s));
}

#if AQ_X86
/* The 8 even pixels of 16 (column stride 2): two loads and one permute. */
AQ_AVX512 static void pack_s2_avx512(const uint8_t *src, uint8_t *dst) {
    const __m512i idx = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14);
    _mm512_storeu_si512((void *)dst, _mm512_permutex2var_epi64(_mm512_loadu_si512((const void *)src), idx,
                                                                _mm512_loadu_si512((const void *)(src + 64))));
}
#endif

/* Pack the groups of a tile for a strided layer: pk[n][s][q][8] (junk lanes copy position 0). */
static void pack_groups(const sadop_t *s, const ngeom_t *g, const uint8_t *in, const int64_t *grp, int nr,
                        const int32_t *gho, const int32_t *gwo, uint8_t *pk) {
    const int64_t c8 = cdiv(g->C, 8);
#if AQ_X86
    const int fast2 = g->SW == 2 && aq_isa() >= ISA_AVX512;
#endif
    for (int n = 0; n < nr; n++) {
        const int64_t ho = gho[grp[n]], wo0 = gwo[grp[n]], nv = imin(8, g->WO - wo0);
        uint8_t *dst = pk + (int64_t)n * s->ns * 64;
        int64_t st = 0;
        for (int64_t i = 0; i < g->KH; i++) {
            const int64_t row = (s->in_r0 + ho * g->SH + i * g->DH) * s->in_Wp;
            for (int64_t j = 0; j < g->KW; j++)
                for (int64_t c = 0; c < c8; c++, st++) {
                    const uint8_t *src = in + c * s->in_plane + (row + s->in_c0 + j * g->DW) * 8;
#if AQ_X86
                    if (fast2 && nv == 8) { /* reads 16 pixels: the last one at most 8 pixels past the plane */
                        pack_s2_avx512(src + wo0 * 16, dst + st * 64);
                        continue;
                    }
#endif
                    for (int64_t q = 0; q < 8; q++)
                        memcpy(dst + st * 64 + q * 8, src + (q < nv ? q : 0) * g->SW * 8 + wo0 * g->SW * 8, 8);
                }
        }
    }
}

/* Pointers to the groups' data for the kernel (direct: the group's pixel of tap (0, 0) in plane 0). */
static void group_ptrs(const sadop_t *s, const ngeom_t *g, const uint8_t *in, const int64_t *grp, int nr,
                       const int32_t *gho, const int32_t *gwo, uint8_t *pk, const uint8_t **A) {
    if (s->direct) {
        for (int n = 0; n < nr; n++) {
            const int64_t ho = gho[grp[n]], wo0 = gwo[grp[n]];
            A[n] = in + (ho * g->SH * s->in_Wp + wo0) * 8;
        }
    } else {
        pack_groups(s, g, in, grp, nr, gho, gwo, pk);
        for (int n = 0; n < nr; n++) A[n] = pk + (int64_t)n * s->ns * 64;
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* network plan                                                                                     */
/* ------------------------------------------------------------------------------------------------ */
typedef struct {
    int buf;
    int64_t qmin, qmax, nthr, q0; /* q0: Q(0) - qmin */
    int64_t *thr;
    double c, margin_exact, margin_avx2; /* margin_avx2: of the AVX2 estimate from Z >> 16 */
    double *a, *b, *margin; /* v mode, per channel (the float estimate) */
    int vwidth;             /* v mode, integer tables: 16 or 32 entries per channel (0: float estimate) */
    int32_t *vtab;          /* [Op][vwidth]: code = #{t : key >= vtab[o][t]}, key = tile value (negated if vneg) */
    uint8_t *vneg;
    int ztab_ok;            /* exact mode, nthr <= 15: the thresholds padded to 16 with INT64_MAX */
    int64_t ztab[16];
    int64_t ztab1[16];      /* [INT64_MIN, thr..., INT64_MAX...]: the estimate-and-correct lookups */
    int16_t *vtab16;        /* v mode, keys within int16: [Op][32] (entries past nthr: INT16_MAX) */
    int16_t *vtab16n;       /* the same negated (compare the tile value S itself when the key is -S) */
    int16_t *vtab16b;       /* AVX2, nthr <= 15: [Op][nthr][16] each threshold (of vtab16n if vneg) broadcast */
} cout_t;

typedef struct {
    int64_t O, Op;
    int64_t *M, *sh, *B;
    int64_t *xc; /* [Op][8] per channel {Mh, Ml, H, B, sh}: the tile value t's multiplier split (t*Ms =
                    (t*Mh << 31) + t*Ml, Ms = -M for adders where v = -(S + cst), M for the first layer) and
                    H = 2^(sh-1) - cst*M, so that v*M + 2^(sh-1) = t*Ms + H; one record per channel */
    int relu, exact, res, zout;
    int ncout;
    cout_t cout[MAX_COUT];
} epi_t;

enum { OP_STEM = 1, OP_ADDER = 2 };

typedef struct {
    int kind;
    ngeom_t g;
    int64_t gpr, G;
    int32_t *gho, *gwo; /* [G]: output row and first column of each group (no divisions in the loops) */
    int in;       /* adder: input code buffer (of scale key 0) */
    int nkeys;    /* adder: distinct input scales (groups of the quantized layer) */
    int keyin[MAX_KEYS];   /* their code buffers */
    uint8_t *key_of;       /* [Op]: the scale of each output channel */
    uint32_t *chunk_keys;  /* [nchunk]: bit k set when the chunk has a channel of scale k */
    sadop_t sad;  /* adder */
    int8_t *lut;  /* stem: (C, 256) */
    int32_t *w32; /* stem: [K][Op] */
    int32_t *wp;  /* stem: tap pairs [ceil(K/2)][Op], (w[2k] & 0xffff) | w[2k+1] << 16 (vpmaddwd) */
    int64_t *kx;  /* stem: [K] offsets of the taps in the padded planar input */
    int64_t K;
    epi_t epi;
} nop_t;

typedef struct {
    int z;
    int64_t C, O, nthr, qmin;
    int64_t *thr, *w, *M, *sh, *B;
    int relu;
} tail_t;

typedef struct {
    int64_t C, H, W; /* image */
    int nop, capop, pending; /* pending: ops[nop] was started (and may hold allocations) but not added */
    nop_t *ops;
    int nbuf;
    nbuf_t buf[NET_MAX_BUF];
    int has_tail;
    tail_t tail;
    int64_t arena, scratch;
    int narena;
    uint8_t **arenas;
} plan_t;

AQ_EXPORT void *aq_plan_new(int64_t C, int64_t H, int64_t W) {
    plan_t *p = (plan_t *)calloc(1, sizeof(plan_t));
    if (!p) return NULL;
    p->C = C; p->H = H; p->W = W;
    return p;
}

static void epi_free(epi_t *e) {
    free(e->M); free(e->sh); free(e->B); free(e->xc);
    for (int j = 0; j < e->ncout; j++) {
        free(e->cout[j].thr); free(e->cout[j].a); free(e->cout[j].b); free(e->cout[j].margin);
        free(e->cout[j].vtab); free(e->cout[j].vneg); free(e->cout[j].vtab16); free(e->cout[j].vtab16n);
        free(e->cout[j].vtab16b);
    }
}

AQ_EXPORT void aq_plan_free(void *vp) {
    plan_t *p = (plan_t *)vp;
    if (!p) return;
    for (int i = 0; i < p->nop + (p->pending && p->nop < p->capop); i++) {
        sadop_free(&p->ops[i].sad);
        free(p->ops[i].lut); free(p->ops[i].w32); free(p->ops[i].key_of); free(p->ops[i].chunk_keys);
        free(p->ops[i].wp); free(p->ops[i].kx); free(p->ops[i].gho); free(p->ops[i].gwo);
        epi_free(&p->ops[i].epi);
    }
    free(p->ops);
    free(p->tail.thr); free(p->tail.w); free(p->tail.M); free(p->tail.sh); free(p->tail.B);
    for (int t = 0; t < p->narena; t++) free(p->arenas[t]);
    free(p->arenas);
    free(p);
}

AQ_EXPORT int aq_plan_codebuf(void *vp, int64_t C, int64_t H, int64_t W, int64_t hh, int64_t hw, int64_t pad) {
    plan_t *p = (plan_t *)vp;
    if (p->nbuf >= NET_MAX_BUF || pad < 0 || pad > 255) return -1;
    code_geom(&p->buf[p->nbuf], C, H, W, hh, hw, pad);
    return p->nbuf++;
}

AQ_EXPORT int aq_plan_zbuf(void *vp, int64_t C, int64_t H, int64_t W) {
    plan_t *p = (plan_t *)vp;
    if (p->nbuf >= NET_MAX_BUF) return -1;
    z_geom(&p->buf[p->nbuf], C, H, W);
    return p->nbuf++;
}

AQ_EXPORT int64_t aq_plan_buf_bytes(void *vp, int id) { return ((plan_t *)vp)->buf[id].bytes; }

AQ_EXPORT int aq_plan_place(void *vp, int id, int64_t off) {
    plan_t *p = (plan_t *)vp;
    if (id < 0 || id >= p->nbuf || off < 0 || off % 64) return 1;
    p->buf[id].off = off;
    return 0;
}

static nop_t *new_op(plan_t *p) {
    if (p->nop == p->capop) {
        const int cap = p->capop ? 2 * p->capop : 16;
        nop_t *ops = (nop_t *)realloc(p->ops, (size_t)cap * sizeof(nop_t));
        if (!ops) return NULL;
        p->ops = ops;
        p->capop = cap;
    }
    nop_t *op = &p->ops[p->nop];
    memset(op, 0, sizeof(*op));
    op->in = -1;
    p->pending = 1;
    return op;
}

static void op_common(nop_t *op, const int64_t *geom) {
    op->g = geom15(geom);
    op->g.N = 1;
    op->gpr = cdiv(op->g.WO, 8);
    op->G = op->g.HO * op->gpr;
    op->gho = (int32_t *)aalloc((size_t)op->G * sizeof(int32_t));
    op->gwo = (int32_t *)aalloc((size_t)op->G * sizeof(int32_t));
    if (op->gho && op->gwo)
        for (int64_t gi = 0; gi < op->G; gi++) {
            op->gho[gi] = (int32_t)(gi / op->gpr);
            op->gwo[gi] = (int32_t)((gi % op->gpr) * 8);
        }
    op->epi.O = op->g.O;
    op->epi.Op = 8 * cdiv(op->g.O, 8);
    op->epi.res = op->epi.zout = -1;
}

/* The first layer: per-channel table of the image (C, 256) int8, convolution weights w (O, C, KH, KW) int8. */
AQ_EXPORT int aq_plan_stem(void *vp, const int64_t *geom, const int8_t *lut, const int8_t *w) {
    plan_t *p = (plan_t *)vp;
    nop_t *op = new_op(p);
    if (!op) return -1;
    op_common(op, geom);
    if (!op->gho || !op->gwo) return -1;
    op->kind = OP_STEM;
    const ngeom_t *g = &op->g;
    op->K = g->C * g->KH * g->KW;
    op->lut = (int8_t *)aalloc((size_t)(g->C * 256));
    op->w32 = (int32_t *)aalloc((size_t)(op->K * op->epi.Op) * sizeof(int32_t));
    if (!op->lut || !op->w32) return -1;
    memcpy(op->lut, lut, (size_t)(g->C * 256));
    memset(op->w32, 0, (size_t)(op->K * op->epi.Op) * sizeof(int32_t));
    for (int64_t o = 0; o < g->O; o++)
        for (int64_t k = 0; k < op->K; k++) op->w32[k * op->epi.Op + o] = w[o * op->K + k];
    const int64_t K2 = cdiv(op->K, 2), Op = op->epi.Op, Hp = g->H + 2 * g->PH, Wp = g->W + 2 * g->PW;
    op->wp = (int32_t *)aalloc((size_t)(K2 * Op) * sizeof(int32_t));
    op->kx = (int64_t *)aalloc((size_t)(2 * K2) * sizeof(int64_t));
    if (!op->wp || !op->kx) return -1;
    for (int64_t k2 = 0; k2 < K2; k2++)
        for (int64_t o = 0; o < Op; o++) {
            const int32_t a = op->w32[2 * k2 * Op + o], b = 2 * k2 + 1 < op->K ? op->w32[(2 * k2 + 1) * Op + o] : 0;
            op->wp[k2 * Op + o] = (int32_t)(((uint32_t)a & 0xffffu) | ((uint32_t)b << 16));
        }
    int64_t k = 0;
    for (int64_t c = 0; c < g->C; c++)
        for (int64_t i = 0; i < g->KH; i++)
            for (int64_t j = 0; j < g->KW; j++) op->kx[k++] = (c * Hp + i * g->DH) * Wp + j * g->DW;
    if (k < 2 * K2) op->kx[k] = op->kx[0]; /* the pad tap: any valid offset, its weight is 0 */
    p->pending = 0;
    return p->nop++;
}

/* An adder layer reading the code buffers ins[k] (one per input scale k; same geometry), output channel o
 * taking scale key_of[o]. */
AQ_EXPORT int aq_plan_adder(void *vp, const int64_t *geom, int nkeys, const int *ins, const uint8_t *key_of,
                            int64_t xmin, const int16_t *w) {
    plan_t *p = (plan_t *)vp;
    if (nkeys < 1 || nkeys > MAX_KEYS) return -1;
    for (int k = 0; k < nkeys; k++)
        if (ins[k] < 0 || ins[k] >= p->nbuf || !p->buf[ins[k]].is_code) return -1;
    nop_t *op = new_op(p);
    if (!op) return -1;
    op_common(op, geom);
    if (!op->gho || !op->gwo) return -1;
    op->kind = OP_ADDER;
    op->in = ins[0];
    op->nkeys = nkeys;
    const nbuf_t *b = &p->buf[ins[0]];
    for (int k = 0; k < nkeys; k++) {
        const nbuf_t *bk = &p->buf[ins[k]];
        if (bk->C != op->g.C || bk->H != op->g.H || bk->W != op->g.W || bk->hh != b->hh || bk->hw != b->hw) return -1;
        op->keyin[k] = ins[k];
    }
    if (b->hh < op->g.PH || b->hw < op->g.PW) return -1;
    if (sadop_make(&op->sad, &op->g, w, xmin, b->Wp, b->plane, b->hh - op->g.PH, b->hw - op->g.PW)) {
        sadop_free(&op->sad);
        return -1;
    }
    const int64_t Op = op->epi.Op, nch = op->sad.nchunk;
    op->key_of = (uint8_t *)aalloc((size_t)Op);
    op->chunk_keys = (uint32_t *)aalloc((size_t)nch * sizeof(uint32_t));
    if (!op->key_of || !op->chunk_keys) return -1;
    memset(op->chunk_keys, 0, (size_t)nch * sizeof(uint32_t));
    for (int64_t o = 0; o < Op; o++) {
        const int k = o < op->g.O ? key_of[o] : 0;
        if (k >= nkeys) return -1;
        op->key_of[o] = (uint8_t)k;
        if (o < op->g.O) op->chunk_keys[o / 8] |= 1u << k;
    }
    p->pending = 0;
    return p->nop++;
}

static int64_t *dup64(const int64_t *src, int64_t n, int64_t npad) {
    int64_t *d = (int64_t *)aalloc((size_t)imax(npad, 1) * sizeof(int64_t));
    if (!d) return NULL;
    memset(d, 0, (size_t)imax(npad, 1) * sizeof(int64_t));
    if (n) memcpy(d, src, (size_t)n * sizeof(int64_t));
    return d;
}

static double *dupd(const double *src, int64_t n, int64_t npad) {
    double *d = (double *)aalloc((size_t)imax(npad, 1) * sizeof(double));
    if (!d) return NULL;
    for (int64_t i = 0; i < npad; i++) d[i] = i < n ? src[i] : 0.0;
    return d;
}

AQ_EXPORT int aq_plan_epilogue(void *vp, int opi, const int64_t *M, const int64_t *sh, const int64_t *B, int relu,
                               int res, int zout, int exact) {
    plan_t *p = (plan_t *)vp;
    if (opi < 0 || opi >= p->nop) return 1;
    epi_t *e = &p->ops[opi].epi;
    e->M = dup64(M, e->O, e->Op); e->sh = dup64(sh, e->O, e->Op); e->B = dup64(B, e->O, e->Op);
    if (!e->M || !e->sh || !e->B) return 1;
    for (int64_t o = 0; o < e->O; o++)
        if (sh[o] < 0 || sh[o] > 62) return 1;
    e->relu = relu; e->res = res; e->zout = zout;
    e->exact = exact || res >= 0 || zout >= 0;
    const nop_t *op = &p->ops[opi];
    e->xc = dup64(NULL, 0, e->Op * 8);
    if (!e->xc) return 1;
    for (int64_t o = 0; o < e->O; o++) {
        const int32_t *cst = op->kind == OP_ADDER ? op->sad.cst : NULL;
        const int64_t Mv = e->M[o], Ms = cst ? -Mv : Mv, h = ((int64_t)1 << e->sh[o]) >> 1;
        int64_t *r = e->xc + o * 8;
        r[0] = Ms >> 31;
        r[1] = Ms & 0x7fffffff;
        r[2] = cst ? (int64_t)((uint64_t)h - (uint64_t)cst[o] * (uint64_t)Mv) : h;
        r[3] = e->B[o];
        r[4] = e->sh[o];
    }
    for (int id = res; id >= 0 && id == res; id = -1) {
        const nbuf_t *b = &p->buf[id];
        if (b->is_code || b->C != op->g.O || b->H != op->g.HO || b->W != op->g.WO) return 1;
    }
    for (int id = zout; id >= 0 && id == zout; id = -1) {
        const nbuf_t *b = &p->buf[id];
        if (b->is_code || b->C != op->g.O || b->H != op->g.HO || b->W != op->g.WO) return 1;
    }
    return 0;
}

/* One adder that reads this op's output: its code buffer, grid, thresholds (ascending, qmax - qmin of
 * them), c = 2^k / D, the margin of the estimate from Z, and (v mode) a, b, margins per channel. */
AQ_EXPORT int aq_plan_codeout(void *vp, int opi, int buf, int64_t qmin, int64_t qmax, const int64_t *thr,
                              int64_t nthr, double c, double margin_exact, const double *a, const double *b,
                              const double *margin) {
    plan_t *p = (plan_t *)vp;
    if (opi < 0 || opi >= p->nop || buf < 0 || buf >= p->nbuf) return 1;
    nop_t *op = &p->ops[opi];
    epi_t *e = &op->epi;
    const nbuf_t *bb = &p->buf[buf];
    if (e->ncout >= MAX_COUT || !bb->is_code || bb->C != op->g.O || bb->H != op->g.HO || bb->W != op->g.WO) return 1;
    if (nthr != qmax - qmin || qmax - qmin > 255 || qmin > 0 || qmax < 0) return 1;
    cout_t *co = &e->cout[e->ncout];
    memset(co, 0, sizeof(*co));
    co->buf = buf; co->qmin = qmin; co->qmax = qmax; co->nthr = nthr; co->c = c; co->margin_exact = margin_exact;
    co->margin_avx2 = margin_exact + 32768.0 * c * (1.0 + 0x1p-40) + 0x1p-40;
    co->thr = dup64(thr, nthr, nthr);
    if (!co->thr) return 1;
    co->q0 = count_le(thr, nthr, 0);
    co->ztab_ok = nthr <= 15;
    for (int t = 0; t < 16; t++) co->ztab[t] = t < nthr ? thr[t] : INT64_MAX;
    for (int t = 0; t < 16; t++) co->ztab1[t] = t == 0 ? INT64_MIN : t <= nthr ? thr[t - 1] : INT64_MAX;
    /* ztab (hi) for the estimate-and-correct step: hi[c] = T(c+1), +inf from c = nthr (for nthr = 15:
     * hi[15] = +inf, so a count of 15 never grows); ztab with the search's semantics is entries 0..nthr-1. */
    if (a) {
        co->a = dupd(a, e->O, e->Op); co->b = dupd(b, e->O, e->Op); co->margin = dupd(margin, e->O, e->Op);
        if (!co->a || !co->b || !co->margin) return 1;
    } else if (!e->exact) {
        return 1;
    }

    e->ncout++;
    return 0;
}

/* v mode: integer tables for the last code output added to op `opi`, in the domain of the tile values (the
 * SAD sums of an adder layer, the accumulators of the first layer): code - qmin = #{t : key >= tab[o][t]},
 * key = value or -value (neg[o]); the plan computes them exactly from the requantisation, ReLU and thresholds. */
AQ_EXPORT int aq_plan_codeout_tables(void *vp, int opi, const int32_t *tab, const uint8_t *neg, int width,
                                     int keys16) {
    plan_t *p = (plan_t *)vp;
    if (opi < 0 || opi >= p->nop || (width != 16 && width != 32)) return 1;
    epi_t *e = &p->ops[opi].epi;
    if (e->exact || e->ncout < 1) return 1;
    cout_t *co = &e->cout[e->ncout - 1];
    co->vtab = (int32_t *)aalloc((size_t)(e->Op * width) * sizeof(int32_t));
    co->vneg = (uint8_t *)aalloc((size_t)e->Op);
    if (!co->vtab || !co->vneg) return 1;
    for (int64_t i = 0; i < e->Op * width; i++) co->vtab[i] = i < e->O * width ? tab[i] : INT32_MAX;
    for (int64_t o = 0; o < e->Op; o++) co->vneg[o] = o < e->O ? neg[o] : 0;
    co->vwidth = width;
    if (keys16 && co->nthr <= 31) { /* every key in [-32767, 32766]: the table in int16, 32 entries */
        co->vtab16 = (int16_t *)aalloc((size_t)(e->Op * 32) * sizeof(int16_t));
        co->vtab16n = (int16_t *)aalloc((size_t)(e->Op * 32) * sizeof(int16_t));
        if (!co->vtab16 || !co->vtab16n) return 1;
        for (int64_t o = 0; o < e->Op; o++)
            for (int t = 0; t < 32; t++) {
                const int32_t u = t < width ? co->vtab[o * width + t] : INT32_MAX;
                const int16_t u16 = (int16_t)(u > 32767 ? 32767 : u < -32767 ? -32767 : u);
                co->vtab16[o * 32 + t] = u16;
                co->vtab16n[o * 32 + t] = (int16_t)-u16; /* key >= u  <=>  -key <= -u (|u| <= 32767) */
            }
        if (co->nthr <= 15) {
            co->vtab16b = (int16_t *)aalloc((size_t)(e->Op * imax(co->nthr, 1) * 16) * sizeof(int16_t));
            if (!co->vtab16b) return 1;
            for (int64_t o = 0; o < e->Op; o++)
                for (int64_t t = 0; t < co->nthr; t++)
                    for (int l = 0; l < 16; l++)
                        co->vtab16b[(o * co->nthr + t) * 16 + l] = (co->vneg[o] ? co->vtab16n : co->vtab16)[o * 32 + t];
        }
    }
    return 0;
}

/* After the last layer: global sum of Z, quantisation, 8-bit matrix product (O, C), requantisation. */
AQ_EXPORT int aq_plan_tail(void *vp, int z, const int64_t *thr, int64_t nthr, int64_t qmin, int64_t O,
                           const int8_t *w, const int64_t *M, const int64_t *sh, const int64_t *B, int relu) {
    plan_t *p = (plan_t *)vp;
    if (z < 0 || z >= p->nbuf || p->buf[z].is_code) return 1;
    tail_t *t = &p->tail;
    t->z = z; t->C = p->buf[z].C; t->O = O; t->nthr = nthr; t->qmin = qmin; t->relu = relu;
    t->thr = dup64(thr, nthr, nthr);
    t->w = (int64_t *)aalloc((size_t)imax(O * t->C, 1) * sizeof(int64_t));
    t->M = dup64(M, O, O); t->sh = dup64(sh, O, O); t->B = dup64(B, O, O);
    if (!t->thr || !t->w || !t->M || !t->sh || !t->B) return 1;
    for (int64_t i = 0; i < O * t->C; i++) t->w[i] = w[i];
    for (int64_t o = 0; o < O; o++)
        if (sh[o] < 0 || sh[o] > 62) return 1;
    p->has_tail = 1;
    return 0;
}

static int64_t op_scratch(const plan_t *p, const nop_t *op) {
    int64_t s = (int64_t)(8 * TLD) * 4 + 64;
    if (op->kind == OP_ADDER && !op->sad.direct) s += op->nkeys * SUPER * op->sad.ns * 64 + 64;
    if (op->kind == OP_ADDER && op->nkeys > 1) s += (int64_t)(8 * TLD) * 4 + 64; /* a second tile */
    if (op->kind == OP_STEM) {
        const ngeom_t *g = &op->g;
        s = op->epi.Op * TLD * 4 + 64 + (g->C * (g->H + 2 * g->PH) * (g->W + 2 * g->PW) + 64) * 2 + 64;
    }
    (void)p;
    return s;
}

AQ_EXPORT int aq_plan_finalize(void *vp, int64_t arena) {
    plan_t *p = (plan_t *)vp;
    for (int i = 0; i < p->nbuf; i++)
        if (p->buf[i].off < 0 || p->buf[i].off + p->buf[i].bytes > arena) return 1;
    int64_t s = 0;
    for (int i = 0; i < p->nop; i++) s = imax(s, op_scratch(p, &p->ops[i]));
    if (p->has_tail) s = imax(s, p->tail.C * 8 * 2 + 64);
    p->arena = (arena + 63) / 64 * 64;
    p->scratch = (s + 63) / 64 * 64;
    return 0;
}

static int ensure_arenas(plan_t *p, int nt) {
    if (p->narena >= nt) return 0;
    uint8_t **a = (uint8_t **)realloc(p->arenas, (size_t)nt * sizeof(uint8_t *));
    if (!a) return 1;
    p->arenas = a;
    for (int t = p->narena; t < nt; t++) {
        a[t] = (uint8_t *)aalloc((size_t)(p->arena + p->scratch));
        if (!a[t]) return 1;
        memset(a[t], 0, (size_t)(p->arena + p->scratch));
        p->narena = t + 1;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------------ */
/* epilogue                                                                                         */
/* ------------------------------------------------------------------------------------------------ */
/* Store 8 positions x 8 channels of codes (codes[m] = channel m's 8 bytes, position-minor) as nv pixels. */
static inline void store_codes(const uint64_t codes[8], uint8_t *dst, int64_t nv) {
#if AQ_X86
    __m128i r[8];
    for (int m = 0; m < 8; m++) r[m] = _mm_loadl_epi64((const __m128i *)&codes[m]);
    const __m128i a01 = _mm_unpacklo_epi8(r[0], r[1]), a23 = _mm_unpacklo_epi8(r[2], r[3]);
    const __m128i a45 = _mm_unpacklo_epi8(r[4], r[5]), a67 = _mm_unpacklo_epi8(r[6], r[7]);
    const __m128i b0 = _mm_unpacklo_epi16(a01, a23), b1 = _mm_unpackhi_epi16(a01, a23);
    const __m128i b2 = _mm_unpacklo_epi16(a45, a67), b3 = _mm_unpackhi_epi16(a45, a67);
    __m128i out[4] = {_mm_unpacklo_epi32(b0, b2), _mm_unpackhi_epi32(b0, b2), _mm_unpacklo_epi32(b1, b3),
                      _mm_unpackhi_epi32(b1, b3)};
    if (nv == 8) {
        for (int k = 0; k < 4; k++) _mm_storeu_si128((__m128i *)(dst + 16 * k), out[k]);
    } else {
        uint8_t tmp[64];
        for (int k = 0; k < 4; k++) _mm_storeu_si128((__m128i *)(tmp + 16 * k), out[k]);
        memcpy(dst, tmp, (size_t)(nv * 8));
    }
#else
    for (int64_t q = 0; q < nv; q++)
        for (int m = 0; m < 8; m++) dst[q * 8 + m] = (uint8_t)(codes[m] >> (8 * q));
#endif
}


#if AQ_X86
/* 8 channels' codes of 8 positions (r[m]: channel m in the low 8 bytes) stored as nv pixels of 8 bytes. */
static inline void store_codes_x(const __m128i r[8], uint8_t *dst, int64_t nv) {
    const __m128i a01 = _mm_unpacklo_epi8(r[0], r[1]), a23 = _mm_unpacklo_epi8(r[2], r[3]);
    const __m128i a45 = _mm_unpacklo_epi8(r[4], r[5]), a67 = _mm_unpacklo_epi8(r[6], r[7]);
    const __m128i b0 = _mm_unpacklo_epi16(a01, a23), b1 = _mm_unpackhi_epi16(a01, a23);
    const __m128i b2 = _mm_unpacklo_epi16(a45, a67), b3 = _mm_unpackhi_epi16(a45, a67);
    const __m128i out[4] = {_mm_unpacklo_epi32(b0, b2), _mm_unpackhi_epi32(b0, b2), _mm_unpacklo_epi32(b1, b3),
                            _mm_unpackhi_epi32(b1, b3)};
    if (nv == 8) {
        for (int k = 0; k < 4; k++) _mm_storeu_si128((__m128i *)(dst + 16 * k), out[k]);
    } else {
        uint8_t tmp[64];
        for (int k = 0; k < 4; k++) _mm_storeu_si128((__m128i *)(tmp + 16 * k), out[k]);
        memcpy(dst, tmp, (size_t)(nv * 8));
    }
}
#endif

typedef struct {
    const plan_t *p;
    const nop_t *op;
    uint8_t *const *base;
    const int32_t *cst; /* adder: v = -(S + cst); stem: v = S */
} epictx_t;

static inline uint8_t *code_dst(const epictx_t *x, const cout_t *co, int64_t o0, int64_t ho, int64_t wo0) {
    const nbuf_t *b = &x->p->buf[co->buf];
    return x->base[co->buf] + (o0 / 8) * b->plane + ((ho + b->hh) * b->Wp + wo0 + b->hw) * 8;
}

static inline int64_t lane_z(const epi_t *e, int64_t o, int64_t v, const int64_t *res) {
    int64_t Z = requant1(v, e->M[o], e->sh[o], e->B[o]);
    if (res) Z = wrap_add(Z, *res);
    if (e->relu && Z < 0) Z = 0;
    return Z;
}

static inline int64_t tile_v(const epictx_t *x, const uint32_t *tile, int64_t o, int64_t i) {
    return x->cst ? -((int64_t)tile[i] + x->cst[o]) : (int64_t)(int32_t)tile[i];
}

/* Exact everywhere: Z in int64, codes from the thresholds. */
static void epi_scalar(const epictx_t *x, int64_t o0, const uint32_t *tile, const int64_t *grp, int nr) {
    const nop_t *op = x->op;
    const epi_t *e = &op->epi;
    const int64_t *zres = e->res >= 0 ? (const int64_t *)x->base[e->res] : NULL;
    int64_t *zout = e->zout >= 0 ? (int64_t *)x->base[e->zout] : NULL;
    for (int n = 0; n < nr; n++) {
        const int64_t g = grp[n], ho = op->gho[g], wo0 = op->gwo[g], nv = imin(8, op->g.WO - wo0);
        uint64_t codes[MAX_COUT][8];
        memset(codes, 0, sizeof(codes));
        for (int m = 0; m < 8; m++) {
            const int64_t o = o0 + m;
            if (o >= e->O) continue;
            for (int64_t q = 0; q < 8; q++) {
                const int64_t zi = (g * e->Op + o) * 8 + q;
                const int64_t Z = lane_z(e, o, tile_v(x, tile, o, m * TLD + n * 8 + q), zres ? zres + zi : NULL);
                if (zout) zout[zi] = Z;
                for (int j = 0; j < e->ncout; j++)
                    codes[j][m] |= (uint64_t)count_le(e->cout[j].thr, e->cout[j].nthr, Z) << (8 * q);
            }
        }
        for (int j = 0; j < e->ncout; j++) store_codes(codes[j], code_dst(x, &e->cout[j], o0, ho, wo0), nv);
    }
}

#if AQ_X86
/* z -> (round-half-up(z) as int32, lanes within `margin` of a rounding boundary); |z| is first clamped
 * to 4096 (far beyond any grid: saturated lanes round exactly). */
AQ_AVX512 static inline __m256i round512(__m512d z, double margin, __mmask8 *near) {
    z = _mm512_min_pd(_mm512_max_pd(z, _mm512_set1_pd(-4096.0)), _mm512_set1_pd(4096.0));
    const __m512d t = _mm512_add_pd(z, _mm512_set1_pd(0.5));
    const __m512d r = _mm512_roundscale_pd(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512d f = _mm512_sub_pd(t, r);
    *near = _mm512_cmp_pd_mask(f, _mm512_set1_pd(margin), _CMP_LT_OQ) |
            _mm512_cmp_pd_mask(f, _mm512_set1_pd(1.0 - margin), _CMP_GT_OQ);
    return _mm512_cvtpd_epi32(r);
}

/* code = #{t : key >= tab[t]} for 16 lanes: branch-free binary search, tables in registers (t1: entries 16..31). */
AQ_AVX512 static inline __m512i bsearch32_512(__m512i key, __m512i t0, __m512i t1, int width) {
    __m512i c = _mm512_setzero_si512();
    if (width == 32) {
        const __m512i u = _mm512_permutex2var_epi32(t0, _mm512_set1_epi32(15), t1);
        c = _mm512_mask_mov_epi32(c, _mm512_cmpge_epi32_mask(key, u), _mm512_set1_epi32(16));
    }
    for (int b = 8; b >= 1; b >>= 1) {
        const __m512i idx = _mm512_add_epi32(c, _mm512_set1_epi32(b - 1));
        const __m512i u = width == 32 ? _mm512_permutex2var_epi32(t0, idx, t1) : _mm512_permutexvar_epi32(idx, t0);
        c = _mm512_mask_add_epi32(c, _mm512_cmpge_epi32_mask(key, u), c, _mm512_set1_epi32(b));
    }
    return c;
}

/* The same on 8 int64 lanes with 16 sorted thresholds (t0: 0..7, t1: 8..15), capped at n. */
AQ_AVX512 static inline __m512i bsearch64_512(__m512i z, __m512i t0, __m512i t1, int64_t n) {
    __m512i c = _mm512_setzero_si512();
    for (int b = 8; b >= 1; b >>= 1) {
        const __m512i u = _mm512_permutex2var_epi64(t0, _mm512_add_epi64(c, _mm512_set1_epi64(b - 1)), t1);
        c = _mm512_mask_add_epi64(c, _mm512_cmpge_epi64_mask(z, u), c, _mm512_set1_epi64(b));
    }
    return n ? _mm512_min_epi64(c, _mm512_set1_epi64(n)) : c;
}

/* Float estimate of one consumer's codes (8 lanes), exact fixes of the lanes near a rounding boundary. */
AQ_AVX512 static inline uint64_t codes_float512(const epi_t *e, const cout_t *co, int64_t o, __m512d z, double margin,
                                               __mmask8 valid, int exact, const int64_t *zz, const int32_t *vv) {
    __mmask8 near;
    __m256i c = round512(z, margin, &near);
    c = _mm256_min_epi32(_mm256_max_epi32(c, _mm256_set1_epi32((int)co->qmin)), _mm256_set1_epi32((int)co->qmax));
    c = _mm256_sub_epi32(c, _mm256_set1_epi32((int)co->qmin));
    if (!exact && e->relu) c = _mm256_max_epi32(c, _mm256_set1_epi32((int)co->q0));
    uint64_t r = (uint64_t)_mm_cvtsi128_si64(_mm256_cvtepi32_epi8(c));
    near &= valid;
    for (int q = 0; near && q < 8; q++)
        if (near >> q & 1) {
            const int64_t Z = exact ? zz[q] : lane_z(e, o, vv[q], NULL);
            r = (r & ~((uint64_t)0xff << (8 * q))) | (uint64_t)count_le(co->thr, co->nthr, Z) << (8 * q);
        }
    return r;
}

typedef uint64_t codes_t[MAX_COUT][SUPER][8]; /* [consumer][group][channel]: 8 positions' bytes */

AQ_AVX512 static void epi512_v(const epictx_t *x, int64_t o0, int nm, const uint32_t *tile, int nr,
                               const int64_t *nv, codes_t codes) {
    const epi_t *e = &x->op->epi;
    for (int j = 0; j < e->ncout; j++) {
        const cout_t *co = &e->cout[j];
        const int w = co->vwidth;
        for (int m = 0; m < nm; m++) {
            const int64_t o = o0 + m;
            const uint32_t *row = tile + m * TLD;
            if (w) {
                const int32_t *tab = co->vtab + o * w;
                const __m512i t0 = _mm512_loadu_si512((const void *)tab);
                const __m512i t1 = w == 32 ? _mm512_loadu_si512((const void *)(tab + 16)) : t0;
                const int neg = co->vneg[o];
                for (int n = 0; n < nr; n += 2) {
                    __m512i key = n + 1 < nr ? _mm512_loadu_si512((const void *)(row + n * 8))
                                             : _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)(row + n * 8)));
                    if (neg) key = _mm512_sub_epi32(_mm512_setzero_si512(), key);
                    const __m128i b = _mm512_cvtepi32_epi8(bsearch32_512(key, t0, t1, w));
                    codes[j][n][m] = (uint64_t)_mm_cvtsi128_si64(b);
                    if (n + 1 < nr) codes[j][n + 1][m] = (uint64_t)_mm_extract_epi64(b, 1);
                }
            } else {
                const __m512d a = _mm512_set1_pd(co->a[o]), b = _mm512_set1_pd(co->b[o]);
                for (int n = 0; n < nr; n++) {
                    __m256i v = _mm256_loadu_si256((const __m256i *)(row + n * 8));
                    if (x->cst) v = _mm256_sub_epi32(_mm256_set1_epi32(-x->cst[o]), v);
                    int32_t vv[8];
                    _mm256_storeu_si256((__m256i *)vv, v);
                    const __m512d z = _mm512_fmadd_pd(_mm512_cvtepi32_pd(v), a, b);
                    codes[j][n][m] = codes_float512(e, co, o, z, co->margin[o], (__mmask8)((1u << nv[n]) - 1), 0, NULL, vv);
                }
            }
        }
    }
}

AQ_AVX512 static void epi512_exact(const epictx_t *x, int64_t o0, int nm, const uint32_t *tile, const int64_t *grp,
                                   int nr, const int64_t *nv, codes_t codes) {
    const epi_t *e = &x->op->epi;
    const int64_t *zres = e->res >= 0 ? (const int64_t *)x->base[e->res] : NULL;
    int64_t *zout = e->zout >= 0 ? (int64_t *)x->base[e->zout] : NULL;
    __m512i zt[MAX_COUT][2];
    for (int j = 0; j < e->ncout; j++) {
        zt[j][0] = _mm512_loadu_si512((const void *)e->cout[j].ztab);
        zt[j][1] = _mm512_loadu_si512((const void *)(e->cout[j].ztab + 8));
    }
    for (int m = 0; m < nm; m++) {
        const int64_t o = o0 + m;
        const __m512i M = _mm512_set1_epi64(e->M[o]), half = _mm512_set1_epi64(((int64_t)1 << e->sh[o]) >> 1);
        const __m512i B = _mm512_set1_epi64(e->B[o]);
        const __m128i sh = _mm_cvtsi64_si128(e->sh[o]);
        const __m256i ncst = _mm256_set1_epi32(x->cst ? -x->cst[o] : 0);
        for (int n = 0; n < nr; n++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(tile + m * TLD + n * 8));
            if (x->cst) v = _mm256_sub_epi32(ncst, v);
            const int64_t zi = (grp[n] * e->Op + o) * 8;
            __m512i Z = _mm512_mullo_epi64(_mm512_cvtepi32_epi64(v), M);
            Z = _mm512_add_epi64(_mm512_sra_epi64(_mm512_add_epi64(Z, half), sh), B);
            if (zres) Z = _mm512_add_epi64(Z, _mm512_loadu_si512((const void *)(zres + zi)));
            if (e->relu) Z = _mm512_max_epi64(Z, _mm512_setzero_si512());
            if (zout) _mm512_storeu_si512((void *)(zout + zi), Z);
            for (int j = 0; j < e->ncout; j++) {
                const cout_t *co = &e->cout[j];
                if (co->ztab_ok) {
                    codes[j][n][m] = (uint64_t)_mm_cvtsi128_si64(
                        _mm512_cvtepi64_epi8(bsearch64_512(Z, zt[j][0], zt[j][1], co->nthr)));
                } else {
                    int64_t zz[8];
                    _mm512_storeu_si512((void *)zz, Z);
                    const __m512d z = _mm512_mul_pd(_mm512_cvtepi64_pd(Z), _mm512_set1_pd(co->c));
                    codes[j][n][m] = codes_float512(e, co, o, z, co->margin_exact, (__mmask8)((1u << nv[n]) - 1), 1,
                                                    zz, NULL);
                }
            }
        }
    }
}

/* 8 channels' codes c[m] (qword lanes = 8 positions, values < 256) as one NCHWc8 vector: byte m of qword q. */
AQ_AVX512 static inline __m512i pack_codes64(const __m512i c[8]) {
    const __m512i t0 = _mm512_or_si512(c[0], _mm512_slli_epi64(c[1], 8)), t1 = _mm512_or_si512(c[2], _mm512_slli_epi64(c[3], 8));
    const __m512i t2 = _mm512_or_si512(c[4], _mm512_slli_epi64(c[5], 8)), t3 = _mm512_or_si512(c[6], _mm512_slli_epi64(c[7], 8));
    return _mm512_or_si512(_mm512_or_si512(t0, _mm512_slli_epi64(t1, 16)),
                           _mm512_slli_epi64(_mm512_or_si512(t2, _mm512_slli_epi64(t3, 16)), 32));
}

static inline void store_group(uint8_t *dst, __m512i v, int64_t nv) AQ_AVX512;
AQ_AVX512 static inline void store_group(uint8_t *dst, __m512i v, int64_t nv) {
    if (nv == 8) _mm512_storeu_si512((void *)dst, v);
    else _mm512_mask_storeu_epi64((void *)dst, (__mmask8)((1u << nv) - 1), v);
}

/* Exact mode, every consumer with an int64 threshold table: groups outer, the 8 channels of the chunk
 * side by side (independent chains), codes assembled in registers. v*M with two vpmuldq (M = Mh*2^31 + Ml,
 * |M| < 2^62): vpmullq is slow. Codes: c0 = clamp(floor(Z*2^k/D - qmin + 1/2), 0, n) in float64 — off by
 * at most one (the float error is far below 1/2) — then one exact step each way against the thresholds:
 * code = c0 + [Z >= hi[c0]] - [Z < lo[c0]], lo = [-inf, T1..], hi = [T1.., +inf]. Padded channels (>= O)
 * compute junk on zero parameters; their codes are forced to 0. */
AQ_AVX512 static void epi512_exact_tab(const epictx_t *x, int64_t o0, const uint32_t *tile, const int64_t *grp,
                                       int nr) {
    const nop_t *op = x->op;
    const epi_t *e = &op->epi;
    const int64_t *const zres = e->res >= 0 ? (const int64_t *)x->base[e->res] : NULL;
    int64_t *const zout = e->zout >= 0 ? (int64_t *)x->base[e->zout] : NULL;
    const int relu = e->relu, nc = e->ncout, nm = (int)imin(8, e->O - o0);
    const int64_t Op = e->Op, WO = op->g.WO;
    const int32_t *const cst = x->cst;
    /* v*M + half = t*Ms + xH (plan-time constants, broadcast from memory at their use: arrays of vector
     * constants make GCC shuffle spilled vectors between stack slots at every group) */
    const int64_t *const xc = e->xc + o0 * 8;
    (void)cst;
    const __mmask8 live = (__mmask8)((1u << nm) - 1);
    for (int n = 0; n < nr; n++) {
        const int64_t g = grp[n], ho = op->gho[g], wo0 = op->gwo[g], nv = imin(8, WO - wo0), zi = (g * Op + o0) * 8;
        __m512i Z[8];
#pragma GCC unroll 8
        for (int m = 0; m < 8; m++) {
            const __m512i v64 = _mm512_cvtepi32_epi64(_mm256_loadu_si256((const __m256i *)(tile + m * TLD + n * 8)));
            const int64_t *r = xc + m * 8;
            __m512i z = _mm512_add_epi64(_mm512_slli_epi64(_mm512_mul_epi32(v64, _mm512_set1_epi64(r[0])), 31),
                                         _mm512_mul_epi32(v64, _mm512_set1_epi64(r[1])));
            z = _mm512_add_epi64(_mm512_sra_epi64(_mm512_add_epi64(z, _mm512_set1_epi64(r[2])),
                                                  _mm_loadl_epi64((const __m128i *)(r + 4))),
                                 _mm512_set1_epi64(r[3]));
            if (zres) z = _mm512_add_epi64(z, _mm512_loadu_si512((const void *)(zres + zi + m * 8)));
            if (relu) z = _mm512_max_epi64(z, _mm512_setzero_si512());
            if (zout) _mm512_storeu_si512((void *)(zout + zi + m * 8), z);
            Z[m] = z;
        }
        for (int j = 0; j < nc; j++) {
            const cout_t *co = &e->cout[j];
            const nbuf_t *bf = &x->p->buf[co->buf];
            /* t = clamp(Z*2^k/D - qmin + 1/2, -1/2, n + 1/2) in float64; code = floor(t) unless t lies within
             * the margin of an integer (Z near a rounding boundary of the grid): those lanes are recounted
             * exactly against the thresholds. (An estimate from S and R in parallel with the int64 chain
             * measured slower: the epilogue is bound by throughput, not latency.) */
            const __m512d cd = _mm512_set1_pd(co->c), off = _mm512_set1_pd(0.5 - (double)co->qmin);
            const __m512d mg = _mm512_set1_pd(co->margin_exact), mg1 = _mm512_set1_pd(1.0 - co->margin_exact);
            const __m512i top = _mm512_set1_epi64(co->nthr);
            __m512i c[8];
            __mmask8 near[8];
            int any = 0;
            /* no float clamps (the FP pipes are the bottleneck): |t| <= 2^63 c + 2^9 < 2^52 (the plan checks
             * c <= 2^-12), so floor and fraction are exact; the code is clamped as an integer. Lanes far
             * outside [0, n] may be flagged near and recounted: harmless. */
#pragma GCC unroll 8
            for (int m = 0; m < 8; m++) {
                const __m512d t = _mm512_fmadd_pd(_mm512_cvtepi64_pd(Z[m]), cd, off);
                const __m512d f = _mm512_roundscale_pd(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
                const __m512d fr = _mm512_sub_pd(t, f);
                near[m] = _mm512_cmp_pd_mask(fr, mg, _CMP_LT_OQ) | _mm512_cmp_pd_mask(fr, mg1, _CMP_GT_OQ);
                any |= near[m];
                c[m] = _mm512_maskz_mov_epi64(live >> m & 1 ? 0xff : 0,
                                              _mm512_min_epi64(_mm512_max_epi64(_mm512_cvttpd_epi64(f), _mm512_setzero_si512()),
                                                               top));
            }
            if (any) { /* rare: recount the lanes near a boundary */
                for (int m = 0; m < nm; m++) {
                    if (!near[m]) continue;
                    int64_t zz[8], cc[8];
                    _mm512_storeu_si512((void *)zz, Z[m]);
                    _mm512_storeu_si512((void *)cc, c[m]);
                    for (int q = 0; q < 8; q++)
                        if (near[m] >> q & 1) cc[q] = count_le(co->thr, co->nthr, zz[q]);
                    c[m] = _mm512_loadu_si512((const void *)cc);
                }
            }
            store_group(x->base[co->buf] + (o0 / 8) * bf->plane + ((ho + bf->hh) * bf->Wp + bf->hw + wo0) * 8,
                        pack_codes64(c), nv);
        }
    }
}

/* v mode with int16 tables: 32 lanes (four groups) per search, 8 channels in lockstep. When every channel
 * of the chunk has neg set (the usual case: M > 0, and v = -(S + cst)), the key -S is never formed: the
 * search compares S <= -U instead (tables negated once, vtab16n). */
AQ_AVX512 static void epi512_v_tab16(const epictx_t *x, int64_t o0, const uint32_t *tile, const int64_t *grp, int nr) {
    const nop_t *op = x->op;
    const epi_t *e = &op->epi;
    const int64_t WO = op->g.WO;
    const __m512i ia = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), ib = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
    for (int j = 0; j < e->ncout; j++) {
        const cout_t *co = &e->cout[j];
        const nbuf_t *bf = &x->p->buf[co->buf];
        const uint8_t *const neg = co->vneg + o0;
        int negm = 0;
        for (int m = 0; m < 8; m++) negm |= neg[m] ? 1 << m : 0;
        const int allneg = negm == 0xff;
        const int16_t *const tab = (allneg ? co->vtab16n : co->vtab16) + o0 * 32;
        const int steps32 = co->nthr > 15;
        uint8_t *const dst0 = x->base[co->buf] + (o0 / 8) * bf->plane + (bf->hh * bf->Wp + bf->hw) * 8;
        const int64_t Wp = bf->Wp;
        __m512i t[8];
#pragma GCC unroll 8
        for (int m = 0; m < 8; m++) t[m] = _mm512_loadu_si512((const void *)(tab + m * 32));
        for (int n = 0; n < nr; n += 4) {
            const int ng = (int)imin(4, nr - n);
            __m512i key[8], c[8];
#pragma GCC unroll 8
            for (int m = 0; m < 8; m++) {
                const uint32_t *row = tile + m * TLD + n * 8;
                const __m512i a = ng >= 2 ? _mm512_loadu_si512((const void *)row)
                                          : _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)row));
                const __m512i b = ng == 4   ? _mm512_loadu_si512((const void *)(row + 16))
                                  : ng == 3 ? _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)(row + 16)))
                                            : _mm512_setzero_si512();
                __m512i k = _mm512_packs_epi32(a, b);
                if (!allneg && (negm >> m & 1)) k = _mm512_sub_epi16(_mm512_setzero_si512(), k);
                key[m] = k;
                c[m] = _mm512_setzero_si512();
            }
            if (allneg) {
                if (steps32) {
#pragma GCC unroll 8
                    for (int m = 0; m < 8; m++)
                        c[m] = _mm512_mask_mov_epi16(c[m], _mm512_cmple_epi16_mask(key[m], _mm512_set1_epi16(tab[m * 32 + 15])),
                                                     _mm512_set1_epi16(16));
                }
#pragma GCC unroll 4
                for (int b = 8; b >= 1; b >>= 1) {
                    const __m512i bm1 = _mm512_set1_epi16((short)(b - 1)), bb = _mm512_set1_epi16((short)b);
#pragma GCC unroll 8
                    for (int m = 0; m < 8; m++) {
                        const __m512i u = _mm512_permutexvar_epi16(_mm512_add_epi16(c[m], bm1), t[m]);
                        c[m] = _mm512_mask_add_epi16(c[m], _mm512_cmple_epi16_mask(key[m], u), c[m], bb);
                    }
                }
            } else {
                if (steps32) {
#pragma GCC unroll 8
                    for (int m = 0; m < 8; m++)
                        c[m] = _mm512_mask_mov_epi16(c[m], _mm512_cmpge_epi16_mask(key[m], _mm512_set1_epi16(tab[m * 32 + 15])),
                                                     _mm512_set1_epi16(16));
                }
#pragma GCC unroll 4
                for (int b = 8; b >= 1; b >>= 1) {
                    const __m512i bm1 = _mm512_set1_epi16((short)(b - 1)), bb = _mm512_set1_epi16((short)b);
#pragma GCC unroll 8
                    for (int m = 0; m < 8; m++) {
                        const __m512i u = _mm512_permutexvar_epi16(_mm512_add_epi16(c[m], bm1), t[m]);
                        c[m] = _mm512_mask_add_epi16(c[m], _mm512_cmpge_epi16_mask(key[m], u), c[m], bb);
                    }
                }
            }
            /* codes to NCHWc8: word lane (L, w) of the packs holds position 4L+w (w < 4) or 16+4L+w-4 */
            const __m512i w01 = _mm512_or_si512(c[0], _mm512_slli_epi16(c[1], 8));
            const __m512i w23 = _mm512_or_si512(c[2], _mm512_slli_epi16(c[3], 8));
            const __m512i w45 = _mm512_or_si512(c[4], _mm512_slli_epi16(c[5], 8));
            const __m512i w67 = _mm512_or_si512(c[6], _mm512_slli_epi16(c[7], 8));
            const __m512i elo = _mm512_unpacklo_epi16(w01, w23), ehi = _mm512_unpackhi_epi16(w01, w23);
            const __m512i flo = _mm512_unpacklo_epi16(w45, w67), fhi = _mm512_unpackhi_epi16(w45, w67);
            const __m512i o0v = _mm512_unpacklo_epi32(elo, flo), o1v = _mm512_unpackhi_epi32(elo, flo);
            const __m512i o2v = _mm512_unpacklo_epi32(ehi, fhi), o3v = _mm512_unpackhi_epi32(ehi, fhi);
            const __m512i gv[4] = {_mm512_permutex2var_epi64(o0v, ia, o1v), _mm512_permutex2var_epi64(o0v, ib, o1v),
                                   _mm512_permutex2var_epi64(o2v, ia, o3v), _mm512_permutex2var_epi64(o2v, ib, o3v)};
            for (int k = 0; k < ng; k++) {
                const int64_t g = grp[n + k], ho = op->gho[g], wo0 = op->gwo[g];
                store_group(dst0 + (ho * Wp + wo0) * 8, gv[k], imin(8, WO - wo0));
            }
        }
    }
}

AQ_AVX512 static void epi512_v_tab(const epictx_t *x, int64_t o0, const uint32_t *tile, const int64_t *grp, int nr) {
    const nop_t *op = x->op;
    const epi_t *e = &op->epi;
    const int nc = e->ncout;
    const int64_t WO = op->g.WO;
    for (int j = 0; j < nc; j++) {
        const cout_t *co = &e->cout[j];
        const nbuf_t *bf = &x->p->buf[co->buf];
        const int w = co->vwidth;
        const int32_t *const tab = co->vtab + o0 * w;
        const uint8_t *const neg = co->vneg + o0;
        uint8_t *const dst0 = x->base[co->buf] + (o0 / 8) * bf->plane + (bf->hh * bf->Wp + bf->hw) * 8;
        const int64_t Wp = bf->Wp;
        __mmask16 negm = 0;
        for (int m = 0; m < 8; m++) negm |= (__mmask16)(neg[m] ? 1u << m : 0);
        for (int n = 0; n < nr; n += 2) {
            const int two = n + 1 < nr;
            __m512i key[8], c[8];
#pragma GCC unroll 8
            for (int m = 0; m < 8; m++) {
                const uint32_t *row = tile + m * TLD + n * 8;
                __m512i k = two ? _mm512_loadu_si512((const void *)row)
                                : _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)row));
                if (negm >> m & 1) k = _mm512_sub_epi32(_mm512_setzero_si512(), k);
                key[m] = k;
                c[m] = _mm512_setzero_si512();
            }
            if (w == 32) {
#pragma GCC unroll 8
                for (int m = 0; m < 8; m++) {
                    const __m512i u = _mm512_set1_epi32(tab[m * w + 15]);
                    c[m] = _mm512_mask_mov_epi32(c[m], _mm512_cmpge_epi32_mask(key[m], u), _mm512_set1_epi32(16));
                }
            }
#pragma GCC unroll 4
            for (int b = 8; b >= 1; b >>= 1) {
                const __m512i bm1 = _mm512_set1_epi32(b - 1), bb = _mm512_set1_epi32(b);
#pragma GCC unroll 8
                for (int m = 0; m < 8; m++) {
                    const __m512i idx = _mm512_add_epi32(c[m], bm1);
                    const __m512i t0 = _mm512_loadu_si512((const void *)(tab + m * w));
                    const __m512i u = w == 32 ? _mm512_permutex2var_epi32(t0, idx, _mm512_loadu_si512((const void *)(tab + m * w + 16)))
                                              : _mm512_permutexvar_epi32(idx, t0);
                    c[m] = _mm512_mask_add_epi32(c[m], _mm512_cmpge_epi32_mask(key[m], u), c[m], bb);
                }
            }
            __m128i r0[8], r1[8];
#pragma GCC unroll 8
            for (int m = 0; m < 8; m++) {
                r0[m] = _mm512_cvtepi32_epi8(c[m]);
                r1[m] = _mm_unpackhi_epi64(r0[m], r0[m]);
            }
            for (int k = 0; k < 1 + two; k++) {
                const int64_t g = grp[n + k], ho = op->gho[g], wo0 = op->gwo[g];
                store_codes_x(k ? r1 : r0, dst0 + (ho * Wp + wo0) * 8, imin(8, WO - wo0));
            }
        }
    }
}

AQ_AVX512 static void epi_avx512(const epictx_t *x, int64_t o0, const uint32_t *tile, const int64_t *grp, int nr) {
    const nop_t *op = x->op;
    const epi_t *e = &op->epi;
    int tab_ok = 1, tab16 = 1;
    for (int j = 0; j < e->ncout; j++) {
        tab_ok &= e->exact ? e->cout[j].ztab_ok : e->cout[j].vwidth != 0;
        tab16 &= e->cout[j].vtab16 != NULL;
    }
    if (tab_ok && e->exact) {
        epi512_exact_tab(x, o0, tile, grp, nr);
        return;
    }
    if (tab_ok && tab16) {
        epi512_v_tab16(x, o0, tile, grp, nr);
        return;
    }
    if (tab_ok) {
        epi512_v_tab(x, o0, tile, grp, nr);
        return;
    }
    codes_t codes;
    int64_t ho[SUPER], wo0[SUPER], nv[SUPER];
    for (int n = 0; n < nr; n++) {
        ho[n] = op->gho[grp[n]];
        wo0[n] = op->gwo[grp[n]];
        nv[n] = imin(8, op->g.WO - wo0[n]);
    }
    const int nm = (int)imin(8, e->O - o0);
    if (nm < 8) memset(codes, 0, sizeof(codes)); /* padded channels: code 0 */
    if (e->exact) epi512_exact(x, o0, nm, tile, grp, nr, nv, codes);
    else epi512_v(x, o0, nm, tile, nr, nv, codes);
    for (int j = 0; j < e->ncout; j++)
        for (int n = 0; n < nr; n++) store_codes(codes[j][n], code_dst(x, &e->cout[j], o0, ho[n], wo0[n]), nv[n]);
}

/* int64 x int64 -> low 64 bits (wrapping), 4 lanes. */
AQ_AVX2 static inline __m256i mul64_avx2(__m256i a, __m256i b) {
    const __m256i lo = _mm256_mul_epu32(a, b);
    const __m256i cross = _mm256_add_epi64(_mm256_mul_epu32(_mm256_srli_epi64(a, 32), b),
                                           _mm256_mul_epu32(a, _mm256_srli_epi64(b, 32)));
    return _mm256_add_epi64(lo, _mm256_slli_epi64(cross, 32));
}

AQ_AVX2 static inline __m256i sra64_avx2(__m256i x, int64_t s) {
    if (s == 0) return x;
    const __m256i sign = _mm256_cmpgt_epi64(_mm256_setzero_si256(), x);
    return _mm256_or_si256(_mm256_srl_epi64(x, _mm_cvtsi64_si128(s)), _mm256_sll_epi64(sign, _mm_cvtsi64_si128(64 - s)));
}

/* x * c for int64 lanes: x = hi * 2^32 + lo, both halves converted exactly, one fused rounding. */
AQ_AVX2 static inline __m256d i64_times_avx2(__m256i x, double c) {
    const __m256i p = _mm256_permutevar8x32_epi32(x, _mm256_setr_epi32(1, 3, 5, 7, 0, 2, 4, 6));
    const __m256d hd = _mm256_cvtepi32_pd(_mm256_castsi256_si128(p));
    const __m256d ld = _mm256_add_pd(_mm256_cvtepi32_pd(_mm_xor_si128(_mm256_extracti128_si256(p, 1),
                                                                      _mm_set1_epi32(INT32_MIN))),
                                     _mm256_set1_pd(2147483648.0));
    return _mm256_fmadd_pd(hd, _mm256_set1_pd(c * 4294967296.0), _mm256_mul_pd(ld, _mm256_set1_pd(c)));
}

AQ_AVX2 static inline __m128i round256(__m256d z, double margin, int *near) {
    z = _mm256_min_pd(_mm256_max_pd(z, _mm256_set1_pd(-4096.0)), _mm256_set1_pd(4096.0));
    const __m256d t = _mm256_add_pd(z, _mm256_set1_pd(0.5));
    const __m256d r = _mm256_floor_pd(t);
    const __m256d f = _mm256_sub_pd(t, r);
    const __m256d nm = _mm256_or_pd(_mm256_cmp_pd(f, _mm256_set1_pd(margin), _CMP_LT_OQ),
                                    _mm256_cmp_pd(f, _mm256_set1_pd(1.0 - margin), _CMP_GT_OQ));
    *near = _mm256_movemask_pd(nm);
    return _mm256_cvtpd_epi32(r);
}

AQ_AVX2 static inline uint64_t codes8_avx2(__m128i lo, __m128i hi, const cout_t *co, int relu_q0) {
    __m256i c = _mm256_set_m128i(hi, lo);
    c = _mm256_min_epi32(_mm256_max_epi32(c, _mm256_set1_epi32((int)co->qmin)), _mm256_set1_epi32((int)co->qmax));
    c = _mm256_sub_epi32(c, _mm256_set1_epi32((int)co->qmin));
    if (relu_q0) c = _mm256_max_epi32(c, _mm256_set1_epi32((int)co->q0));
    const __m128i b = _mm_packus_epi16(_mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1)),
                                       _mm_setzero_si128());
    return (uint64_t)_mm_cvtsi128_si64(b);
}

/* code = #{t : key >= tab[t]}, 16 entries in two registers (lo: 0..7, hi: 8..15), 8 lanes. */
AQ_AVX2 static inline __m256i bsearch32_256(__m256i key, __m256i lo, __m256i hi) {
    __m256i c = _mm256_setzero_si256();
    for (int b = 8; b >= 1; b >>= 1) {
        const __m256i idx = _mm256_add_epi32(c, _mm256_set1_epi32(b - 1));
        const __m256i u = _mm256_blendv_epi8(_mm256_permutevar8x32_epi32(lo, idx), _mm256_permutevar8x32_epi32(hi, idx),
                                             _mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7)));
        c = _mm256_add_epi32(c, _mm256_andnot_si256(_mm256_cmpgt_epi32(u, key), _mm256_set1_epi32(b)));
    }
    return c;
}

/* v mode, every consumer with int16 tables and at most 15 thresholds: a linear count on 16 int16 lanes
 * (two groups): code = n + sum_t [key > V_t] (neg: key = S, V = -U) or n + sum_t [U_t > key]. */
AQ_AVX2 static void epi_avx2_v16(const epictx_t *x, int64_t o0, const uint32_t *tile, const int64_t *grp, int nr) {
    const nop_t *op = x->op;
    const epi_t *e = &op->epi;
    const int nm = (int)imin(8, e->O - o0);
    const __m256i fix = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int j = 0; j < e->ncout; j++) {
        const cout_t *co = &e->cout[j];
        const nbuf_t *bf = &x->p->buf[co->buf];
        const int64_t nt = co->nthr;
        uint8_t *const dst0 = x->base[co->buf] + (o0 / 8) * bf->plane + (bf->hh * bf->Wp + bf->hw) * 8;
        for (int n = 0; n < nr; n += 2) {
            const int two = n + 1 < nr;
            uint64_t c0[8], c1[8];
            for (int m = 0; m < 8; m++) {
                c0[m] = c1[m] = 0;
                if (m >= nm) continue;
                const int64_t o = o0 + m;
                const uint32_t *row = tile + m * TLD + n * 8;
                const __m256i a = _mm256_loadu_si256((const __m256i *)row);
                const __m256i b = two ? _mm256_loadu_si256((const __m256i *)(row + 8)) : _mm256_setzero_si256();
                const __m256i key = _mm256_packs_epi32(a, b); /* lanes: a0-3 b0-3 | a4-7 b4-7 */
                const int16_t *tb = co->vtab16b + o * nt * 16;
                __m256i c = _mm256_set1_epi16((short)nt);
                if (co->vneg[o]) {
                    for (int64_t t = 0; t < nt; t++)
                        c = _mm256_add_epi16(c, _mm256_cmpgt_epi16(key, _mm256_loadu_si256((const __m256i *)(tb + 16 * t))));
                } else {
                    for (int64_t t = 0; t < nt; t++)
                        c = _mm256_add_epi16(c, _mm256_cmpgt_epi16(_mm256_loadu_si256((const __m256i *)(tb + 16 * t)), key));
                }
                /* bytes [a0-3 b0-3 ... | a4-7 b4-7 ...] -> dwords (a0-3, a4-7, b0-3, b4-7) */
                const __m256i by = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(c, c), fix);
                c0[m] = (uint64_t)_mm256_extract_epi64(by, 0);
                c1[m] = (uint64_t)_mm256_extract_epi64(by, 1);
            }
            for (int k = 0; k < 1 + two; k++) {
                const int64_t g = grp[n + k], ho = op->gho[g], wo0 = op->gwo[g];
                store_codes(k ? c1 : c0, dst0 + (ho * bf->Wp + wo0) * 8, imin(8, op->g.WO - wo0));
            }
        }
    }
}

AQ_AVX2 static void epi_avx2(const epictx_t *x, int64_t o0, const uint32_t *tile, const int64_t *grp, int nr) {
    const nop_t *op = x->op;
    const epi_t *e = &op->epi;
    const int64_t *zres = e->res >= 0 ? (const int64_t *)x->base[e->res] : NULL;
    int64_t *zout = e->zout >= 0 ? (int64_t *)x->base[e->zout] : NULL;
    for (int n = 0; n < nr; n++) {
        const int64_t g = grp[n], ho = op->gho[g], wo0 = op->gwo[g], nv = imin(8, op->g.WO - wo0);
        const int valid = (1 << nv) - 1;
        uint64_t codes[MAX_COUT][8];
        memset(codes, 0, sizeof(codes));
        for (int m = 0; m < 8; m++) {
            const int64_t o = o0 + m;
            if (o >= e->O) continue;
            __m256i v = _mm256_loadu_si256((const __m256i *)(tile + m * TLD + n * 8));
            if (x->cst) v = _mm256_sub_epi32(_mm256_set1_epi32(-x->cst[o]), v);
            const __m128i vh[2] = {_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)};
            if (e->exact) {
                const int64_t half = ((int64_t)1 << e->sh[o]) >> 1, zi = (g * e->Op + o) * 8;
                __m256i Z[2];
                for (int h = 0; h < 2; h++) {
                    __m256i t = mul64_avx2(_mm256_cvtepi32_epi64(vh[h]), _mm256_set1_epi64x(e->M[o]));
                    t = sra64_avx2(_mm256_add_epi64(t, _mm256_set1_epi64x(half)), e->sh[o]);
                    t = _mm256_add_epi64(t, _mm256_set1_epi64x(e->B[o]));
                    if (zres) t = _mm256_add_epi64(t, _mm256_loadu_si256((const __m256i *)(zres + zi + 4 * h)));
                    if (e->relu) t = _mm256_andnot_si256(_mm256_cmpgt_epi64(_mm256_setzero_si256(), t), t);
                    if (zout) _mm256_storeu_si256((__m256i *)(zout + zi + 4 * h), t);
                    Z[h] = t;
                }
                for (int j = 0; j < e->ncout; j++) {
                    const cout_t *co = &e->cout[j];
                    int n0, n1;
                    const __m128i c0 = round256(i64_times_avx2(Z[0], co->c), co->margin_exact, &n0);
                    const __m128i c1 = round256(i64_times_avx2(Z[1], co->c), co->margin_exact, &n1);
                    codes[j][m] = codes8_avx2(c0, c1, co, 0);
                    const int near = (n0 | n1 << 4) & valid;
                    if (near) {
                        int64_t zz[8];
                        _mm256_storeu_si256((__m256i *)zz, Z[0]);
                        _mm256_storeu_si256((__m256i *)(zz + 4), Z[1]);
                        uint8_t *cb = (uint8_t *)&codes[j][m];
                        for (int q = 0; q < 8; q++)
                            if (near >> q & 1) cb[q] = (uint8_t)count_le(co->thr, co->nthr, zz[q]);
                    }
                }
            } else {
                const __m256d vd0 = _mm256_cvtepi32_pd(vh[0]), vd1 = _mm256_cvtepi32_pd(vh[1]);
                for (int j = 0; j < e->ncout; j++) {
                    const cout_t *co = &e->cout[j];
                    if (co->vwidth == 16) {
                        const int32_t *tab = co->vtab + o * 16;
                        __m256i key = _mm256_loadu_si256((const __m256i *)(tile + m * TLD + n * 8));
                        if (co->vneg[o]) key = _mm256_sub_epi32(_mm256_setzero_si256(), key);
                        const __m256i c = bsearch32_256(key, _mm256_loadu_si256((const __m256i *)tab),
                                                        _mm256_loadu_si256((const __m256i *)(tab + 8)));
                        const __m128i b8 = _mm_packus_epi16(_mm_packs_epi32(_mm256_castsi256_si128(c),
                                                                            _mm256_extracti128_si256(c, 1)),
                                                            _mm_setzero_si128());
                        codes[j][m] = (uint64_t)_mm_cvtsi128_si64(b8);
                        continue;
                    }
                    const __m256d a = _mm256_set1_pd(co->a[o]), b = _mm256_set1_pd(co->b[o]);
                    int n0, n1;
                    const __m128i c0 = round256(_mm256_fmadd_pd(vd0, a, b), co->margin[o], &n0);
                    const __m128i c1 = round256(_mm256_fmadd_pd(vd1, a, b), co->margin[o], &n1);
                    codes[j][m] = codes8_avx2(c0, c1, co, e->relu);
                    const int near = (n0 | n1 << 4) & valid;
                    if (near) {
                        int32_t vv[8];
                        _mm256_storeu_si256((__m256i *)vv, v);
                        uint8_t *cb = (uint8_t *)&codes[j][m];
                        for (int q = 0; q < 8; q++)
                            if (near >> q & 1) cb[q] = (uint8_t)count_le(co->thr, co->nthr, lane_z(e, o, vv[q], NULL));
                    }
                }
            }
        }
        for (int j = 0; j < e->ncout; j++) store_codes(codes[j], code_dst(x, &e->cout[j], o0, ho, wo0), nv);
    }
}
#endif

typedef void (*epik_t)(const epictx_t *x, int64_t o0, const uint32_t *tile, const int64_t *grp, int nr);

#if AQ_X86
/* Exact mode on AVX2 (4 int64 lanes): Z = srl(S*(-M) + h - cst*M + 2^62, sh) + B - 2^(62-sh) [+ R] [ReLU]
 * (the offset makes the floor division a logical shift: |v*M| <= 2^62 is checked by the plan), v*M by two
 * vpmuldq (M = Mh*2^31 + Ml). Codes from a float64 estimate of Z*2^k/D built from Zs = Z >> 16 (offset
 * and logical shift again; converted exactly by the 2^52 + 2^51 trick): t = Zs*c*2^16 + 2^15*c - qmin + 1/2,
 * error <= 2^15*c + roundings, inside margin_avx2; lanes near a boundary or with Z < -2^62 are recounted. */
AQ_AVX2 static void epi_avx2_exact(const epictx_t *x, int64_t o0, const uint32_t *tile, const int64_t *grp, int nr) {
    const nop_t *op = x->op;
    const epi_t *e = &op->epi;
    const int64_t *const zres = e->res >= 0 ? (const int64_t *)x->base[e->res] : NULL;
    int64_t *const zout = e->zout >= 0 ? (int64_t *)x->base[e->zout] : NULL;
    const int relu = e->relu, nc = e->ncout, nm = (int)imin(8, e->O - o0);
    const int64_t Op = e->Op;
    const int32_t *const cst = x->cst;
    const __m256i off62 = _mm256_set1_epi64x((int64_t)1 << 62), lim = _mm256_set1_epi64x(-((int64_t)1 << 62));
    const __m256i magic = _mm256_set1_epi64x(0x4338000000000000LL - ((int64_t)1 << 46));
    const __m256d magicd = _mm256_set1_pd(6755399441055744.0); /* 2^52 + 2^51 */
    for (int n = 0; n < nr; n++) {
        const int64_t g = grp[n], ho = op->gho[g], wo0 = op->gwo[g], nv = imin(8, op->g.WO - wo0), zi = (g * Op + o0) * 8;
        const int valid = (1 << nv) - 1;
        __m256i Z[8][2];
        int lowz[8];
        for (int m = 0; m < 8; m++) {
            const int64_t M = e->M[o0 + m], sh = e->sh[o0 + m], h = ((int64_t)1 << sh) >> 1;
            const int64_t Ms = cst ? -M : M;
            const __m256i Mh = _mm256_set1_epi64x(Ms >> 31), Ml = _mm256_set1_epi64x(Ms & 0x7fffffff);
            const __m256i H = _mm256_set1_epi64x((int64_t)((uint64_t)h - (cst ? (uint64_t)cst[o0 + m] * (uint64_t)M : 0) +
                                                           ((uint64_t)1 << 62)));
            const __m256i Bv = _mm256_set1_epi64x((int64_t)((uint64_t)e->B[o0 + m] - ((uint64_t)1 << 62 >> sh)));
            const __m128i shv = _mm_cvtsi64_si128(sh);
            const __m256i v = _mm256_loadu_si256((const __m256i *)(tile + m * TLD + n * 8));
            lowz[m] = 0;
            for (int hf = 0; hf < 2; hf++) {
                const __m256i v64 = _mm256_cvtepi32_epi64(hf ? _mm256_extracti128_si256(v, 1) : _mm256_castsi256_si128(v));
                __m256i z = _mm256_add_epi64(_mm256_slli_epi64(_mm256_mul_epi32(v64, Mh), 31), _mm256_mul_epi32(v64, Ml));
                z = _mm256_add_epi64(_mm256_srl_epi64(_mm256_add_epi64(z, H), shv), Bv);
                if (zres) z = _mm256_add_epi64(z, _mm256_loadu_si256((const __m256i *)(zres + zi + m * 8 + 4 * hf)));
                if (relu) z = _mm256_andnot_si256(_mm256_cmpgt_epi64(_mm256_setzero_si256(), z), z);
                if (zout) _mm256_storeu_si256((__m256i *)(zout + zi + m * 8 + 4 * hf), z);
                Z[m][hf] = z;
                if (!relu)
                    lowz[m] |= _mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpgt_epi64(lim, z))) << (4 * hf);
            }
        }
        for (int j = 0; j < nc; j++) {
            const cout_t *co = &e->cout[j];
            const __m256d c16 = _mm256_set1_pd(co->c * 65536.0), offd = _mm256_set1_pd(co->c * 32768.0 + 0.5 - (double)co->qmin);
            const __m256d lo = _mm256_set1_pd(-0.5), top = _mm256_set1_pd((double)co->nthr + 0.5);
            const __m256d mg = _mm256_set1_pd(co->margin_avx2), mg1 = _mm256_set1_pd(1.0 - co->margin_avx2);
            uint64_t codes[8];
            for (int m = 0; m < 8; m++) {
                if (m >= nm) {
                    codes[m] = 0;
                    continue;
                }
                __m128i ci[2];
                int near = lowz[m];
                for (int hf = 0; hf < 2; hf++) {
                    const __m256i zs = _mm256_add_epi64(_mm256_srli_epi64(_mm256_add_epi64(Z[m][hf], off62), 16), magic);
                    const __m256d zd = _mm256_sub_pd(_mm256_castsi256_pd(zs), magicd);
                    const __m256d t = _mm256_min_pd(_mm256_max_pd(_mm256_fmadd_pd(zd, c16, offd), lo), top);
                    const __m256d f = _mm256_floor_pd(t), fr = _mm256_sub_pd(t, f);
                    near |= _mm256_movemask_pd(_mm256_or_pd(_mm256_cmp_pd(fr, mg, _CMP_LT_OQ),
                                                            _mm256_cmp_pd(fr, mg1, _CMP_GT_OQ))) << (4 * hf);
                    ci[hf] = _mm_max_epi32(_mm256_cvttpd_epi32(f), _mm_setzero_si128());
                }
                uint64_t r = (uint64_t)_mm_cvtsi128_si64(_mm_packus_epi16(_mm_packs_epi32(ci[0], ci[1]), _mm_setzero_si128()));
                near &= valid;
                if (near) {
                    int64_t zz[8];
                    _mm256_storeu_si256((__m256i *)zz, Z[m][0]);
                    _mm256_storeu_si256((__m256i *)(zz + 4), Z[m][1]);
                    for (int q = 0; q < 8; q++)
                        if (near >> q & 1)
                            r = (r & ~((uint64_t)0xff << (8 * q))) | (uint64_t)count_le(co->thr, co->nthr, zz[q]) << (8 * q);
                }
                codes[m] = r;
            }
            const nbuf_t *bf = &x->p->buf[co->buf];
            store_codes(codes, x->base[co->buf] + (o0 / 8) * bf->plane + ((ho + bf->hh) * bf->Wp + bf->hw + wo0) * 8, nv);
        }
    }
}

static void epi_avx2_any(const epictx_t *x, int64_t o0, const uint32_t *tile, const int64_t *grp, int nr) {
    const epi_t *e = &x->op->epi;
    if (e->exact) {
        epi_avx2_exact(x, o0, tile, grp, nr);
        return;
    }
    int v16 = 1;
    for (int j = 0; j < e->ncout; j++) v16 &= e->cout[j].vtab16b != NULL;
    if (v16) epi_avx2_v16(x, o0, tile, grp, nr);
    else epi_avx2(x, o0, tile, grp, nr);
}
#endif

static epik_t epi_kernel(int isa) {
#if AQ_X86
    if (isa >= ISA_AVX512) return epi_avx512;
    if (isa >= ISA_AVX2) return epi_avx2_any;
#endif
    (void)isa;
    return epi_scalar;
}

/* ------------------------------------------------------------------------------------------------ */
/* the first layer: table lookup, 8-bit convolution (int32, positions in lanes)                     */
/* ------------------------------------------------------------------------------------------------ */
/* tile[o][n*8 + q] = sum_k x[k at group n, position q] * w[o][k] for every output channel (tile rows: Op). */
static void stem_scalar(const nop_t *op, const int16_t *xs, int64_t Wp, const int64_t *grp, int nr, uint32_t *tile) {
    const ngeom_t *g = &op->g;
    const int64_t Op = op->epi.Op;
    for (int n = 0; n < nr; n++) {
        const int64_t ho = op->gho[grp[n]], wo0 = op->gwo[grp[n]];
        for (int64_t o = 0; o < Op; o++)
            for (int q = 0; q < 8; q++) {
                int32_t acc = 0;
                if (wo0 + q < g->WO)
                    for (int64_t k = 0; k < op->K; k++)
                        acc += xs[op->kx[k] + ho * g->SH * Wp + (wo0 + q) * g->SW] * op->w32[k * Op + o];
                tile[o * TLD + n * 8 + q] = (uint32_t)acc;
            }
    }
}

#if AQ_X86
/* 8 positions of taps (ka, kb) as int16 pairs in int32 lanes (vpmaddwd operand). */
AQ_AVX2 static inline __m256i stem_pairs8(const int16_t *xs, int64_t pb, int64_t sw, int64_t ka, int64_t kb) {
    __m128i a, b;
    if (sw == 1) {
        a = _mm_loadu_si128((const __m128i *)(xs + ka + pb));
        b = _mm_loadu_si128((const __m128i *)(xs + kb + pb));
    } else {
        int16_t ta[8], tb[8];
        for (int q = 0; q < 8; q++) {
            ta[q] = xs[ka + pb + q * sw];
            tb[q] = xs[kb + pb + q * sw];
        }
        a = _mm_loadu_si128((const __m128i *)ta);
        b = _mm_loadu_si128((const __m128i *)tb);
    }
    return _mm256_or_si256(_mm256_cvtepu16_epi32(a), _mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
}

AQ_AVX2 static void stem_avx2(const nop_t *op, const int16_t *xs, int64_t Wp, const int64_t *grp, int nr, uint32_t *tile) {
    const ngeom_t *g = &op->g;
    const int64_t Op = op->epi.Op, K2 = cdiv(op->K, 2);
    for (int n = 0; n < nr; n++) {
        const int64_t pb = op->gho[grp[n]] * g->SH * Wp + op->gwo[grp[n]] * g->SW;
        for (int64_t o0 = 0; o0 < Op; o0 += 8) {
            __m256i acc[8];
            for (int m = 0; m < 8; m++) acc[m] = _mm256_setzero_si256();
            for (int64_t k2 = 0; k2 < K2; k2++) {
                const __m256i x2 = stem_pairs8(xs, pb, g->SW, op->kx[2 * k2], op->kx[2 * k2 + 1]);
                const int32_t *w = op->wp + k2 * Op + o0;
                for (int m = 0; m < 8; m++) acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(x2, _mm256_set1_epi32(w[m])));
            }
            for (int m = 0; m < 8; m++) _mm256_storeu_si256((__m256i *)(tile + (o0 + m) * TLD + n * 8), acc[m]);
        }
    }
}

/* Two groups (16 positions) x 16 channels per pass. */
AQ_AVX512 static void stem_avx512(const nop_t *op, const int16_t *xs, int64_t Wp, const int64_t *grp, int nr,
                                  uint32_t *tile) {
    const ngeom_t *g = &op->g;
    const int64_t Op = op->epi.Op, K2 = cdiv(op->K, 2);
    for (int n = 0; n < nr; n += 2) {
        const int two = n + 1 < nr;
        const int64_t pb0 = op->gho[grp[n]] * g->SH * Wp + op->gwo[grp[n]] * g->SW;
        const int64_t pb1 = two ? op->gho[grp[n + 1]] * g->SH * Wp + op->gwo[grp[n + 1]] * g->SW : pb0;
        for (int64_t o0 = 0; o0 < Op; o0 += 16) {
            const int nc = (int)imin(16, Op - o0);
            __m512i acc[16];
            for (int m = 0; m < 16; m++) acc[m] = _mm512_setzero_si512();
            for (int64_t k2 = 0; k2 < K2; k2++) {
                const int64_t ka = op->kx[2 * k2], kb = op->kx[2 * k2 + 1];
                const __m512i x2 = _mm512_inserti64x4(_mm512_castsi256_si512(stem_pairs8(xs, pb0, g->SW, ka, kb)),
                                                      stem_pairs8(xs, pb1, g->SW, ka, kb), 1);
                const int32_t *w = op->wp + k2 * Op + o0;
                if (nc == 16) {
#pragma GCC unroll 16
                    for (int m = 0; m < 16; m++) acc[m] = _mm512_add_epi32(acc[m], _mm512_madd_epi16(x2, _mm512_set1_epi32(w[m])));
                } else {
                    for (int m = 0; m < nc; m++) acc[m] = _mm512_add_epi32(acc[m], _mm512_madd_epi16(x2, _mm512_set1_epi32(w[m])));
                }
            }
            for (int m = 0; m < nc; m++) {
                uint32_t *t = tile + (o0 + m) * TLD + n * 8;
                if (two) _mm512_storeu_si512((void *)t, acc[m]);
                else _mm256_storeu_si256((__m256i *)t, _mm512_castsi512_si256(acc[m]));
            }
        }
    }
}
#endif

static void run_stem(const plan_t *p, const nop_t *op, uint8_t *const *base, const uint8_t *img, uint8_t *scr, int isa) {
    const ngeom_t *g = &op->g;
    const epi_t *e = &op->epi;
    uint32_t *tile = (uint32_t *)scr;
    int16_t *xs = (int16_t *)(scr + e->Op * TLD * 4 + 64);
    const int64_t Hp = g->H + 2 * g->PH, Wp = g->W + 2 * g->PW;
    memset(xs, 0, (size_t)(g->C * Hp * Wp + 64) * 2);
    for (int64_t c = 0; c < g->C; c++) {
        const int8_t *lut = op->lut + c * 256;
        for (int64_t h = 0; h < g->H; h++) {
            const uint8_t *src = img + (c * g->H + h) * g->W;
            int16_t *dst = xs + (c * Hp + h + g->PH) * Wp + g->PW;
            for (int64_t w = 0; w < g->W; w++) dst[w] = lut[src[w]];
        }
    }
    for (int j = 0; j < e->ncout; j++) code_halo(&p->buf[e->cout[j].buf], base[e->cout[j].buf]);
    const epictx_t ctx = {p, op, base, NULL};
    const epik_t epi = epi_kernel(isa);
    int64_t grp[SUPER];
    for (int64_t t0 = 0; t0 < op->G; t0 += SUPER) {
        const int nr = (int)imin(SUPER, op->G - t0);
        for (int n = 0; n < nr; n++) grp[n] = t0 + n;
#if AQ_X86
        if (isa >= ISA_AVX512) stem_avx512(op, xs, Wp, grp, nr, tile);
        else if (isa >= ISA_AVX2) stem_avx2(op, xs, Wp, grp, nr, tile);
        else
#endif
            stem_scalar(op, xs, Wp, grp, nr, tile);
        for (int64_t o0 = 0; o0 < e->O; o0 += 8) epi(&ctx, o0, tile + o0 * TLD, grp, nr);
    }
}

static void run_adder(const plan_t *p, const nop_t *op, uint8_t *const *base, uint8_t *scr, int isa) {
    uint32_t *tile = (uint32_t *)scr;
    uint8_t *pk = scr + 8 * TLD * 4 + 64;
    const sadop_t *s = &op->sad;
    const epi_t *e = &op->epi;
    const int nk = op->nkeys;
    uint32_t *tile2 = (uint32_t *)(pk + (s->direct ? 0 : nk * SUPER * s->ns * 64 + 64));
    for (int j = 0; j < e->ncout; j++) code_halo(&p->buf[e->cout[j].buf], base[e->cout[j].buf]);
    const epictx_t ctx = {p, op, base, s->cst};
    const sadk_t kern = sad_kernel(isa);
    const epik_t epi = epi_kernel(isa);
    int64_t grp[SUPER];
    const uint8_t *A[MAX_KEYS][SUPER];
    for (int64_t t0 = 0; t0 < op->G; t0 += SUPER) {
        const int nr = (int)imin(SUPER, op->G - t0);
        for (int n = 0; n < nr; n++) grp[n] = t0 + n;
        for (int k = 0; k < nk; k++)
            group_ptrs(s, &op->g, base[op->keyin[k]], grp, nr, op->gho, op->gwo, pk + (int64_t)k * SUPER * s->ns * 64,
                       A[k]);
        for (int64_t oc = 0; oc < s->nchunk; oc++) {
            const uint32_t keys = op->chunk_keys[oc];
            const uint8_t *kof = op->key_of + oc * 8;
            for (int k = 0; k < nk; k++) {
                if (!(keys >> k & 1)) continue;
                const int only = keys == (1u << k); /* every channel of the chunk reads scale k */
                uint32_t *t = only ? tile : tile2;
                for (int n = 0; n < nr; n += NRMAX)
                    kern(A[k] + n, (int)imin(NRMAX, nr - n), s->koff, s->ns, s->wpk + oc * s->ns * 64, t + n * 8);
                if (!only)
                    for (int m = 0; m < 8; m++)
                        if (kof[m] == k) memcpy(tile + m * TLD, tile2 + m * TLD, (size_t)nr * 8 * sizeof(uint32_t));
            }
            epi(&ctx, oc * 8, tile, grp, nr);
        }
    }
}

static int run_tail(const plan_t *p, uint8_t *const *base, int64_t *logits, uint8_t *scr) {
    const tail_t *t = &p->tail;
    const nbuf_t *zb = &p->buf[t->z];
    const int64_t *Z = (const int64_t *)base[t->z];
    int64_t *xq = (int64_t *)scr;
    int64_t *sum = xq + t->C;
    for (int64_t c = 0; c < t->C; c++) sum[c] = 0;
    for (int64_t g = 0, wo0 = 0; g < zb->G; g++, wo0 = wo0 + 8 >= zb->W ? 0 : wo0 + 8) {
        const int64_t nv = imin(8, zb->W - wo0);
        for (int64_t c = 0; c < t->C; c++) {
            const int64_t *z = Z + (g * zb->Cp + c) * 8;
            int64_t s = sum[c];
            for (int64_t q = 0; q < nv; q++) s = wrap_add(s, z[q]);
            sum[c] = s;
        }
    }
    for (int64_t c = 0; c < t->C; c++) xq[c] = t->qmin + count_le(t->thr, t->nthr, sum[c]);
    int64_t mmax = 0;
    for (int64_t o = 0; o < t->O; o++) mmax = imax(mmax, t->M[o] < 0 ? -t->M[o] : t->M[o]);
    const int64_t limit = mmax ? ((int64_t)1 << 62) / mmax : INT64_MAX;
    int bad = 0;
    for (int64_t o = 0; o < t->O; o++) {
        int64_t y = 0;
        for (int64_t c = 0; c < t->C; c++) y += xq[c] * t->w[o * t->C + c];
        bad |= (y > limit) | (y < -limit);
        int64_t r = bad ? 0 : requant1(y, t->M[o], t->sh[o], t->B[o]);
        if (t->relu && r < 0) r = 0;
        logits[o] = r;
    }
    return bad ? 2 : 0;
}

static int run_image(const plan_t *p, uint8_t *arena, const uint8_t *img, int64_t *logits, int isa,
                     uint8_t *const *ext, const int64_t *ext_stride, int64_t n, int only) {
    uint8_t *scr = arena + p->arena;
    uint8_t *bases[NET_MAX_BUF];
    for (int i = 0; i < p->nbuf; i++)
        bases[i] = (ext && ext[i]) ? ext[i] + n * ext_stride[i] : arena + p->buf[i].off;
    for (int i = 0; i < p->nop; i++) {
        if (only >= 0 && i != only) continue;
        const nop_t *op = &p->ops[i];
        if (op->kind == OP_STEM) run_stem(p, op, bases, img, scr, isa);
        else run_adder(p, op, bases, scr, isa);
    }
    if (only < 0 && p->has_tail) return run_tail(p, bases, logits, scr);
    return 0;
}

static int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* Logits (N, O) int64 of uint8 images (N, C, H, W). Returns 0, 1 (out of memory) or 2 (requant overflow). */
AQ_EXPORT int aq_plan_run(void *vp, const uint8_t *images, int64_t N, int64_t *logits, int nthreads) {
    plan_t *p = (plan_t *)vp;
    if (!p->has_tail) return 4;
    if (N <= 0) return 0;
    const int nt = (int)imin(clamp_threads(nthreads), N);
    if (ensure_arenas(p, nt)) return 1;
    const int isa = aq_isa();
    const int64_t img = p->C * p->H * p->W;
    int err = 0;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) reduction(| : err)
    for (int64_t n = 0; n < N; n++)
        err |= run_image(p, p->arenas[thread_id()], images + n * img, logits + n * p->tail.O, isa, NULL, NULL, n, -1);
    return err;
}

/* One op of the plan on N images (benchmarks): buffers with ext[i] != NULL are read/written at
 * ext[i] + n * stride[i] instead of the thread's arena. */
AQ_EXPORT int aq_plan_run_op(void *vp, int opi, int64_t N, uint8_t *const *ext, const int64_t *stride, int nthreads) {
    plan_t *p = (plan_t *)vp;
    if (opi < 0 || opi >= p->nop || p->ops[opi].kind != OP_ADDER) return 4;
    if (N <= 0) return 0;
    const int nt = (int)imin(clamp_threads(nthreads), N);
    if (ensure_arenas(p, nt)) return 1;
    const int isa = aq_isa();
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t n = 0; n < N; n++) run_image(p, p->arenas[thread_id()], NULL, NULL, isa, ext, stride, n, opi);
    return 0;
}

AQ_EXPORT int aq_plan_num_ops(void *vp) { return ((plan_t *)vp)->nop; }

/* ------------------------------------------------------------------------------------------------ */
/* int_adder_conv2d on NCHW tensors: y = -sum |x - w| (int32), through the same kernels             */
/* ------------------------------------------------------------------------------------------------ */
AQ_EXPORT int aq_int_forward(const void *xv, int x_is_uint8, const void *wv, int w_is_int16, int32_t *y,
                             const int64_t *geom, int nthreads) {
    const ngeom_t g = geom15(geom);
    const int nt = clamp_threads(nthreads);
    if (g.N <= 0 || g.O <= 0 || g.HO <= 0 || g.WO <= 0) return 0;
    const int64_t xmin = x_is_uint8 ? 0 : -128, K = g.C * g.KH * g.KW;
    nbuf_t b;
    code_geom(&b, g.C, g.H, g.W, g.PH, g.PW, -xmin);
    int16_t *w16 = (int16_t *)aalloc((size_t)imax(g.O * K, 1) * sizeof(int16_t));
    uint8_t *xb = (uint8_t *)aalloc((size_t)(g.N * b.bytes));
    sadop_t s;
    memset(&s, 0, sizeof(s));
    int rc = (!w16 || !xb) ? 1 : 0;
    if (!rc) {
        for (int64_t i = 0; i < g.O * K; i++)
            w16[i] = w_is_int16 ? ((const int16_t *)wv)[i] : ((const int8_t *)wv)[i];
        int64_t emax = 0; /* |v| bound: K * 255 plus the clamp corrections */
        for (int64_t i = 0; i < g.O * K; i++) {
            const int64_t v = w16[i] - xmin;
            emax = imax(emax, v < 0 ? -v : v > 255 ? v - 255 : 0);
        }
        if (K * (255 + emax) > INT32_MAX) rc = 3;
    }
    if (!rc) rc = sadop_make(&s, &g, w16, xmin, b.Wp, b.plane, 0, 0);
    if (rc) {
        free(w16); free(xb); sadop_free(&s);
        return rc;
    }
    const uint8_t flip = x_is_uint8 ? 0 : 0x80;
    const uint8_t *x = (const uint8_t *)xv;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t n = 0; n < g.N; n++) {
        uint8_t *dst = xb + n * b.bytes;
        memset(dst, 0, (size_t)b.bytes);
        code_halo(&b, dst);
        const uint64_t flip8 = 0x0101010101010101ULL * flip;
        for (int64_t c8 = 0; c8 < b.c8; c8++)
            for (int64_t h = 0; h < g.H; h++) {
                uint8_t *row = dst + c8 * b.plane + ((h + b.hh) * b.Wp + b.hw) * 8;
                const uint8_t *src[8];
                for (int k = 0; k < 8; k++)
                    src[k] = c8 * 8 + k < g.C ? x + ((n * g.C + c8 * 8 + k) * g.H + h) * g.W : NULL;
                for (int64_t w0 = 0; w0 < g.W; w0 += 8) { /* 8 channels x 8 pixels, transposed */
                    const int64_t nv = imin(8, g.W - w0);
                    uint64_t rows[8];
                    for (int k = 0; k < 8; k++) {
                        uint64_t v = 0;
                        if (src[k]) {
                            if (nv == 8) memcpy(&v, src[k] + w0, 8);
                            else memcpy(&v, src[k] + w0, (size_t)nv);
                            v ^= flip8;
                        }
                        rows[k] = v;
                    }
                    store_codes(rows, row + w0 * 8, nv);
                }
            }
    }
    const int64_t gpr = cdiv(g.WO, 8), G = g.HO * gpr, ntile = cdiv(G, NRMAX), P = g.HO * g.WO;
    int32_t *gho = (int32_t *)aalloc((size_t)G * sizeof(int32_t)), *gwo = (int32_t *)aalloc((size_t)G * sizeof(int32_t));
    if (!gho || !gwo) {
        free(gho); free(gwo); free(w16); free(xb); sadop_free(&s);
        return 1;
    }
    for (int64_t gi = 0; gi < G; gi++) {
        gho[gi] = (int32_t)(gi / gpr);
        gwo[gi] = (int32_t)((gi % gpr) * 8);
    }
    const sadk_t kern = sad_kernel(aq_isa());
    int err = 0;
#pragma omp parallel num_threads(nt)
    {
        uint8_t *pk = (uint8_t *)aalloc((size_t)(NRMAX * s.ns * 64));
        uint32_t tile[8 * TLD];
        if (!pk) {
#pragma omp atomic write
            err = 1;
        }
#pragma omp for schedule(dynamic, 4)
        for (int64_t it = 0; it < g.N * ntile; it++) {
            if (!pk) continue;
            const int64_t n = it / ntile, t0 = (it % ntile) * NRMAX;
            const int nr = (int)imin(NRMAX, G - t0);
            int64_t grp[NRMAX];
            const uint8_t *A[NRMAX];
            for (int q = 0; q < nr; q++) grp[q] = t0 + q;
            group_ptrs(&s, &g, xb + n * b.bytes, grp, nr, gho, gwo, pk, A);
            for (int64_t oc = 0; oc < s.nchunk; oc++) {
                kern(A, nr, s.koff, s.ns, s.wpk + oc * s.ns * 64, tile);
                for (int m = 0; m < 8 && oc * 8 + m < g.O; m++) {
                    const int64_t o = oc * 8 + m;
                    int32_t *yo = y + (n * g.O + o) * P;
                    for (int q = 0; q < nr; q++) {
                        const int64_t ho = gho[grp[q]], wo0 = gwo[grp[q]], nv = imin(8, g.WO - wo0);
                        for (int64_t l = 0; l < nv; l++)
                            yo[ho * g.WO + wo0 + l] = -(int32_t)(tile[m * TLD + q * 8 + l] + (uint32_t)s.cst[o]);
                    }
                }
            }
        }
        free(pk);
    }
    free(w16); free(xb); free(gho); free(gwo); sadop_free(&s);
    return err;
}

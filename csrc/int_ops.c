/*
 * Element-wise integer ops of the integer engine (adderquant/integer/engine.py), one pass each.
 *
 * In PyTorch each of these is a chain of int64 tensor ops (multiply, add, shift, add, relu; or a
 * bucketize), every one a full pass over memory; fused here they cost one read and one write. The
 * results are the same integers as the PyTorch formulas they replace (tests hold them together).
 *
 *   aq_requant   y = floor((v*M_c + (2^sh_c >> 1)) / 2^sh_c) + B_c  [+ residual]  [max(., 0)]
 *                v int32 or int64 (N, C, HW); M, sh, B int64 per channel; y int64.
 *                Returns 2 when some |v| * max|M| would leave int64 (|v| > 2^62 / max|M|: the same
 *                bound the PyTorch path checks), 0 otherwise.
 *   aq_quantize  q = qmin + #{t in T : t <= z}   (T sorted ascending; int64 z) as 8- or 16-bit integers.
 */
#include "aq_common.h"

AQ_EXPORT int aq_requant(const void *v, int v_is_int64, const int64_t *mult, const int64_t *shift,
                         const int64_t *bias, const int64_t *residual, int relu, int64_t N, int64_t C, int64_t HW,
                         int64_t *y, int nthreads) {
    const int nt = clamp_threads(nthreads);
    int64_t mmax = 0;
    for (int64_t c = 0; c < C; ++c) {
        const int64_t m = mult[c] < 0 ? -mult[c] : mult[c];
        if (m > mmax) mmax = m;
    }
    const int64_t limit = mmax ? ((int64_t)1 << 62) / mmax : INT64_MAX;
    int overflow = 0;
#pragma omp parallel for num_threads(nt) schedule(static) reduction(| : overflow)
    for (int64_t nc = 0; nc < N * C; ++nc) {
        const int64_t c = nc % C, m = mult[c], sh = shift[c], b = bias[c], half = ((int64_t)1 << sh) >> 1;
        const int64_t base = nc * HW;
        int bad = 0;
        for (int64_t i = 0; i < HW; ++i) {
            const int64_t x = v_is_int64 ? ((const int64_t *)v)[base + i] : ((const int32_t *)v)[base + i];
            bad |= (x > limit) | (x < -limit);
            int64_t r = ((int64_t)((uint64_t)x * (uint64_t)m + (uint64_t)half) >> sh) + b; /* wraps, never UB */
            if (residual) r += residual[base + i];
            if (relu) r = r < 0 ? 0 : r;
            y[base + i] = r;
        }
        overflow |= bad;
    }
    return overflow ? 2 : 0;
}

static inline void store_q(void *q, int out_bytes, int64_t i, int64_t r) {
    if (out_bytes == 1) ((uint8_t *)q)[i] = (uint8_t)r; /* two's complement bits: int8 or uint8 */
    else ((uint16_t *)q)[i] = (uint16_t)r;
}

static void quantize_range(const int64_t *z, int64_t b, int64_t e, const int64_t *t, int64_t nthr, int64_t qmin,
                           int out_bytes, void *q) {
    for (int64_t i = b; i < e; ++i) store_q(q, out_bytes, i, qmin + count_le(t, nthr, z[i]));
}

#if AQ_X86
#define AQ_LINEAR_MAX 64 /* up to 6-bit grids a linear count of 4 lanes beats the binary search */
/* 4 values at a time: count = -sum_j (x > t_j - 1), thresholds broadcast (|t_j| < 2^62: no wrap). */
AQ_AVX2 static void quantize_range_avx2(const int64_t *z, int64_t b, int64_t e, const int64_t *t, int64_t nthr,
                                        int64_t qmin, int out_bytes, void *q) {
    int64_t i = b;
    for (; i + 4 <= e; i += 4) {
        const __m256i x = _mm256_loadu_si256((const __m256i *)(z + i));
        __m256i cnt = _mm256_set1_epi64x(qmin);
        for (int64_t j = 0; j < nthr; ++j)
            cnt = _mm256_sub_epi64(cnt, _mm256_cmpgt_epi64(x, _mm256_set1_epi64x(t[j] - 1)));
        int64_t r[4];
        _mm256_storeu_si256((__m256i *)r, cnt);
        for (int k = 0; k < 4; ++k) store_q(q, out_bytes, i + k, r[k]);
    }
    quantize_range(z, i, e, t, nthr, qmin, out_bytes, q);
}
#endif

AQ_EXPORT int aq_quantize(const int64_t *z, int64_t n, const int64_t *thresholds, int64_t nthr, int64_t qmin,
                          int out_bytes, void *q, int nthreads) {
    const int nt = clamp_threads(nthreads);
    const int64_t block = 4096;
#if AQ_X86
    const int linear = nthr <= AQ_LINEAR_MAX && aq_isa() >= 1;
#endif
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t b = 0; b < n; b += block) {
        const int64_t e = b + block < n ? b + block : n;
#if AQ_X86
        if (linear) {
            quantize_range_avx2(z, b, e, thresholds, nthr, qmin, out_bytes, q);
            continue;
        }
#endif
        quantize_range(z, b, e, thresholds, nthr, qmin, out_bytes, q);
    }
    return 0;
}

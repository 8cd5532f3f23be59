/* What the C sources of adderquant._adder_cpu share: platform macros, the ISA query, thread count. */
#ifndef AQ_COMMON_H
#define AQ_COMMON_H

#include <stdint.h>

#if defined(__x86_64__) || defined(__i386__)
#define AQ_X86 1
#include <immintrin.h>
#else
#define AQ_X86 0
#endif

#if defined(__GNUC__)
#define AQ_EXPORT __attribute__((visibility("default")))
#else
#define AQ_EXPORT
#endif

#define AQ_AVX2 __attribute__((target("avx2,fma")))
#define AQ_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))

/* Instruction set in use (adder_cpu.c): 0 scalar, 1 AVX2, 2 AVX-512; cpu.force_isa lowers it for tests. */
int aq_isa(void);

static inline int clamp_threads(int nt) { return nt < 1 ? 1 : nt; }

/* The number of thresholds t[0..n) (sorted ascending) that are <= x: a branch-free binary search, the
   quantisation of a fixed-point value to its integer code (int_ops.c, int_net.c). */
static inline int64_t count_le(const int64_t *t, int64_t n, int64_t x) {
    int64_t lo = 0, len = n;
    while (len > 0) {
        const int64_t half = len >> 1;
        const int take = t[lo + half] <= x;
        lo = take ? lo + half + 1 : lo;
        len = take ? len - half - 1 : half;
    }
    return lo;
}

#endif

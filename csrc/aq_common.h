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

#endif

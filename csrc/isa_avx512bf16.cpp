// The kernels built for one ISA; ops.cpp picks the build at run time. AVX-512 with BF16 dot
// products (Cooper Lake, Sapphire Rapids, Zen 4): the MoE experts multiply bf16 pairs.
#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
#include <immintrin.h>
#define ASYNCPP_BF16_DOT 1
#endif
#define ASYNCPP_TABLE kAvx512Bf16
#define ASYNCPP_MOE_TILE 4
#include "isa_build.h"

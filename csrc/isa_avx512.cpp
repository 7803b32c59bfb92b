// The kernels built for one ISA; ops.cpp picks the build at run time.
#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#endif
#define ASYNCPP_TABLE kAvx512
#define ASYNCPP_MOE_TILE 4
#include "isa_build.h"

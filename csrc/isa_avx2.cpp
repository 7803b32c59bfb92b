// The kernels built for one ISA; ops.cpp picks the build at run time.
#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c")
#endif
#define ASYNCPP_TABLE kAvx2
#define ASYNCPP_MOE_TILE 2
#include "isa_build.h"

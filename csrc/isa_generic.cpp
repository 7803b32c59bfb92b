// The kernels built for one ISA; ops.cpp picks the build at run time.
// Baseline x86-64 (or any other CPU): whatever the compiler targets by default.
#define ASYNCPP_TABLE kGeneric
#define ASYNCPP_MOE_TILE 1
#include "isa_build.h"

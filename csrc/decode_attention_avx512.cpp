// The decode kernel built for one ISA; ops.cpp picks the build at run time.
#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#endif
#include "decode_attention.h"

namespace asyncpp {
namespace {
#include "decode_attention_impl.h"
}  // namespace

void decode_items_avx512(const DecodeParams& p, int64_t begin, int64_t end, int worker) {
  decode_items(p, begin, end, worker);
}

}  // namespace asyncpp

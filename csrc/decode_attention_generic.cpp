// The decode kernel built for one ISA; ops.cpp picks the build at run time.
// Baseline x86-64 (or any other CPU): whatever the compiler targets by default.
#include "decode_attention.h"

namespace asyncpp {
namespace {
#include "decode_attention_impl.h"
}  // namespace

void decode_items_generic(const DecodeParams& p, int64_t begin, int64_t end, int worker) {
  decode_items(p, begin, end, worker);
}

}  // namespace asyncpp

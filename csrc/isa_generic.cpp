// The kernels built for one ISA; ops.cpp picks the build at run time.
// Baseline x86-64 (or any other CPU): whatever the compiler targets by default.
#include "kernels.h"

namespace asyncpp {
namespace {
#include "vec_impl.h"
#include "decode_attention_impl.h"
#include "small_ops_impl.h"
constexpr int kMoeTile = 1;  // tokens a tile holds: the accumulators fill the vector registers
#include "moe_impl.h"
}  // namespace

const KernelTable kGeneric = {decode_items, rms_norm_rows, silu_and_mul_rows, rotary_rows,
                                moe_up_items, moe_down_blocks, pairs_bf16};

}  // namespace asyncpp

// One ISA build of every kernel: an isa_*.cpp sets its target, then names its table
// (ASYNCPP_TABLE) and the tokens an MoE tile holds (ASYNCPP_MOE_TILE: the accumulators fill the
// vector registers) before including this.
#include "kernels.h"

namespace asyncpp {
namespace {
#include "vec_impl.h"
#include "decode_attention_impl.h"
#include "small_ops_impl.h"
constexpr int kMoeTile = ASYNCPP_MOE_TILE;
#include "moe_impl.h"
}  // namespace

const KernelTable ASYNCPP_TABLE = {decode_items, rms_norm_rows, silu_and_mul_rows, rotary_rows,
                                   moe_up_items, moe_down_blocks, pairs_bf16};

}  // namespace asyncpp

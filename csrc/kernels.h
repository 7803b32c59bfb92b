// The compiled kernels: the parameters every ISA build shares, and each build's entry points.
// Plain data only: the ISA translation units include no torch or std header (an inline
// function compiled for AVX-512 there must never be linked into a caller on an AVX2 host).
#pragma once

#include <cstdint>

namespace asyncpp {

enum class KVKind : int32_t { F32 = 0, BF16 = 1, F8_E4M3 = 2, F8_E5M2 = 3 };

struct DecodeParams {
  // q [seqs, heads, head_dim] and out [seqs, heads, head_dim]: float32 (bf16 inputs are widened
  // and outputs narrowed by the caller, which is cheap: one token a sequence).
  const float* q;
  float* out;
  // K [blocks, kv_heads, head_dim, block_size]; V [blocks, block_size, kv_heads, head_dim].
  const void* key_cache;
  const void* value_cache;
  KVKind kind;
  const int32_t* block_tables;  // [seqs, max_blocks]
  const int32_t* context_lens;  // [seqs]: tokens each sequence attends to, itself included
  const int32_t* first_pos;     // [seqs] or null: the first position attended (sliding windows)
  const float* sinks;           // [heads] or null: a logit per head that takes softmax mass, no value
  const float* fp8_table;       // [256] byte -> float, for the 8-bit kinds
  float scale;                  // applied to q.k (with the fp8 K unit folded in)
  float v_unit;                 // applied to the output (fp8 V unit; 1 otherwise)
  float softcap;                // > 0: scores = softcap * tanh(scores / softcap)
  int32_t num_seqs, num_heads, num_kv_heads, head_dim, block_size, max_blocks;
  int32_t kv_per_item;  // KV heads one work item covers (divides num_kv_heads)
};

// Rows of a [tokens, width] activation, float32 or bfloat16 (`bf16`), contiguous rows.
struct RowsParams {
  const void* x;         // the input rows
  const void* residual;  // rms_norm: added to x first (null: none); its sum is written to `sum`
  const void* weight;    // rms_norm: [width], the rows' dtype
  void* out;
  void* sum;             // rms_norm with a residual: x + residual
  int64_t width;         // rms_norm: the normalized width; silu_and_mul: the output width (input 2x)
  int64_t x_stride, out_stride;  // elements between rows
  float eps;
  float weight_offset;   // 0: x * w (Llama); 1: x * (1 + w) (Gemma)
  bool round_normalized; // the normalized row rounded to the dtype before the weight (Llama), or not (Gemma, gpt-oss)
  bool bf16;
};

// Rotary embedding (rotate-half layout) in place on `heads` heads of each token's row.
struct RotaryParams {
  void* x;               // [tokens, ...] rows; head h of token t at x + t * row_stride + h * head_dim
  const float* cos_sin;  // [tokens, rot_dim]: cos for the first rot_dim / 2, then sin
  int64_t row_stride, heads, head_dim, rot_dim;
  bool bf16;
};

// The routed experts of a SwiGLU MoE block (moe_impl.h). Slots are (token, choice) pairs grouped
// by expert; activations are float32 (the caller widens and narrows bf16 rows), or bf16 where the
// build multiplies bf16 pairs (pairs_bf16) and the weights are packed so.
struct MoeParams {
  const void* x;                // [tokens, hidden]
  const void* w13;              // [experts, inner / 32, hidden, 64]: 32 gate then the same 32 up columns
  const void* w2;               // [experts, hidden / 64, inner, 64]
  const int32_t* slot_token;    // [slots]: the token each slot computes for
  const float* slot_weight;     // [slots]: its routing weight
  const int64_t* expert_start;  // [experts + 1]: expert e's slots are [start[e], start[e + 1])
  const int64_t* up_items;      // the gate/up pass's items: expert * (inner / 32) + block
  void* act;                    // [slots, inner]: silu(gate) * up, x's type
  float* out;                   // [tokens, hidden]: zeroed by the caller, summed into
  int64_t hidden, inner, experts;
  bool bf16_weights;
  bool bf16_acts;               // x and act bf16, weights bf16 in pairs along K ([K / 2][64][2])
  bool round_bf16;              // a bf16 model: round where its own code rounds
};

// Each ISA build's entry points: `begin`/`end` are work items (decode: a sequence and a run of
// KV heads; rows: tokens). `scratch`: the calling thread's own, an item's query heads x
// (max_blocks * block_size) floats.
struct KernelTable {
  void (*decode_items)(const DecodeParams& p, int64_t begin, int64_t end, float* scratch);
  void (*rms_norm_rows)(const RowsParams& p, int64_t begin, int64_t end);
  void (*silu_and_mul_rows)(const RowsParams& p, int64_t begin, int64_t end);
  void (*rotary_rows)(const RotaryParams& p, int64_t begin, int64_t end);
  void (*moe_up_items)(const MoeParams& p, int64_t begin, int64_t end);
  void (*moe_down_blocks)(const MoeParams& p, int64_t begin, int64_t end);
  bool (*pairs_bf16)();  // whether this build multiplies bf16 pairs (AVX512-BF16)
};

extern const KernelTable kAvx512Bf16, kAvx512, kAvx2, kGeneric;

}  // namespace asyncpp

// Decode paged attention: the parameters every ISA build of the kernel shares.
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
  // Scratch for each worker: an item's query heads x (max_blocks * block_size + head_dim) floats.
  float* scratch;
  int64_t scratch_stride;
};

// Items are (sequence, run of kv_per_item KV heads); `worker` picks its scratch.
void decode_items_avx512(const DecodeParams& p, int64_t begin, int64_t end, int worker);
void decode_items_avx2(const DecodeParams& p, int64_t begin, int64_t end, int worker);
void decode_items_generic(const DecodeParams& p, int64_t begin, int64_t end, int worker);

}  // namespace asyncpp

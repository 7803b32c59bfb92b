// torch.ops.asyncpp.*: argument checks, the ISA picked at run time, and torch's thread pool.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>

#include "decode_attention.h"

namespace asyncpp {
namespace {

using DecodeFn = void (*)(const DecodeParams&, int64_t, int64_t, int);

DecodeFn pick_decode() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return decode_items_avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return decode_items_avx2;
#endif
  return decode_items_generic;
}

const DecodeFn kDecode = pick_decode();

std::string isa() {
  if (kDecode == decode_items_avx512) return "avx512";
  if (kDecode == decode_items_avx2) return "avx2";
  return "generic";
}

KVKind kind_of(const at::Tensor& cache, int64_t fp8_kind) {
  if (cache.scalar_type() == at::kFloat) return KVKind::F32;
  if (cache.scalar_type() == at::kBFloat16) return KVKind::BF16;
  TORCH_CHECK(cache.scalar_type() == at::kByte && (fp8_kind == 2 || fp8_kind == 3),
              "paged_decode_attention: the KV cache must be float32, bfloat16 or fp8 bytes");
  return static_cast<KVKind>(fp8_kind);
}

// q [seqs, heads, head_dim] -> [seqs, heads * head_dim] in q's dtype.
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens,
                                  const std::optional<at::Tensor>& first_pos, const std::optional<at::Tensor>& sinks,
                                  const std::optional<at::Tensor>& fp8_table, double scale, double v_unit,
                                  double softcap, int64_t fp8_kind) {
  TORCH_CHECK(q.dim() == 3 && key_cache.dim() == 4 && value_cache.dim() == 4, "paged_decode_attention: bad ranks");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), "paged_decode_attention: caches must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt,
              "paged_decode_attention: block tables and lengths are int32");
  const int64_t S = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t KVH = key_cache.size(1), BS = key_cache.size(3);
  TORCH_CHECK(key_cache.size(2) == D && value_cache.size(1) == BS && value_cache.size(2) == KVH &&
                  value_cache.size(3) == D && H % KVH == 0,
              "paged_decode_attention: cache shapes do not fit q");
  const KVKind kind = kind_of(key_cache, fp8_kind);
  auto qf = q.to(at::kFloat).contiguous();
  auto tables = block_tables.contiguous();
  auto lens = context_lens.contiguous();
  auto out = at::empty({S, H, D}, qf.options());
  std::optional<at::Tensor> first, sink, table;
  if (first_pos) first = first_pos->to(at::kInt).contiguous();
  if (sinks) sink = sinks->to(at::kFloat).contiguous();
  if (kind == KVKind::F8_E4M3 || kind == KVKind::F8_E5M2) {
    TORCH_CHECK(fp8_table.has_value() && fp8_table->numel() == 256, "paged_decode_attention: fp8 needs its table");
    table = fp8_table->to(at::kFloat).contiguous();
  }
  const int64_t g = H / KVH, max_blocks = tables.size(1);
  TORCH_CHECK(BS % 8 == 0 && D % 8 == 0,
              "paged_decode_attention: block_size and head_dim must be multiples of 8");
  // Whole blocks of all KV heads are the longest contiguous reads; split the heads only when
  // there are too few sequences to keep every thread busy.
  int64_t kv_per_item = KVH;
  while (S * (KVH / kv_per_item) < 4 * at::get_num_threads() && kv_per_item % 2 == 0) kv_per_item /= 2;
  const int64_t stride = kv_per_item * g * (max_blocks * BS + D);
  auto scratch = at::empty({at::get_num_threads(), stride}, qf.options());

  DecodeParams p{};
  p.q = qf.data_ptr<float>();
  p.out = out.data_ptr<float>();
  p.key_cache = key_cache.data_ptr();
  p.value_cache = value_cache.data_ptr();
  p.kind = kind;
  p.block_tables = tables.data_ptr<int32_t>();
  p.context_lens = lens.data_ptr<int32_t>();
  p.first_pos = first ? first->data_ptr<int32_t>() : nullptr;
  p.sinks = sink ? sink->data_ptr<float>() : nullptr;
  p.fp8_table = table ? table->data_ptr<float>() : nullptr;
  p.scale = float(scale);
  p.v_unit = float(v_unit);
  p.softcap = float(softcap);
  p.num_seqs = int32_t(S);
  p.num_heads = int32_t(H);
  p.num_kv_heads = int32_t(KVH);
  p.head_dim = int32_t(D);
  p.block_size = int32_t(BS);
  p.max_blocks = int32_t(max_blocks);
  p.kv_per_item = int32_t(kv_per_item);
  p.scratch = scratch.data_ptr<float>();
  p.scratch_stride = stride;
  at::parallel_for(0, S * (KVH / kv_per_item), 1, [&](int64_t begin, int64_t end) {
    kDecode(p, begin, end, at::get_thread_num());
  });
  return out.view({S, H * D}).to(q.scalar_type());
}

}  // namespace
}  // namespace asyncpp

TORCH_LIBRARY(asyncpp, m) {
  m.def("paged_decode_attention", &asyncpp::paged_decode_attention);
  m.def("kernel_isa", &asyncpp::isa);
}

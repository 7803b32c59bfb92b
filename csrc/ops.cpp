// torch.ops.asyncpp.*: argument checks, the ISA picked at run time, and torch's thread pool.
// Importing asyncpp._kernels (an empty Python module) registers the ops.
#include <Python.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <optional>
#include <tuple>
#include <vector>

#include "kernels.h"

namespace asyncpp {
namespace {

const KernelTable& best() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return __builtin_cpu_supports("avx512bf16") ? kAvx512Bf16 : kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kGeneric;
}

// ASYNCPP_KERNEL_ISA names a lesser build to run instead (tests run every build on one host).
const KernelTable& pick() {
  const KernelTable* order[] = {&kAvx512Bf16, &kAvx512, &kAvx2, &kGeneric};
  const char* names[] = {"avx512_bf16", "avx512", "avx2", "generic"};
  const KernelTable& found = best();
  const char* wanted = std::getenv("ASYNCPP_KERNEL_ISA");
  bool reached = false;
  for (int i = 0; i < 4; ++i) {
    reached = reached || order[i] == &found;
    if (reached && wanted && std::string(wanted) == names[i]) return *order[i];
  }
  return found;
}

const KernelTable& kKernels = pick();

std::string isa() {
  if (&kKernels == &kAvx512Bf16) return "avx512_bf16";
  if (&kKernels == &kAvx512) return "avx512";
  if (&kKernels == &kAvx2) return "avx2";
  return "generic";
}

constexpr int64_t kMoeCols = 64;  // a packed expert block's columns (moe_impl.h)

// Row ops split rows across torch's threads only when a step has enough of them to pay for it.
int64_t row_grain(int64_t width) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1)); }

bool is_bf16(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op, ": float32 or bfloat16 rows");
  return t.scalar_type() == at::kBFloat16;
}

KVKind kind_of(const at::Tensor& cache, int64_t fp8_kind) {
  if (cache.scalar_type() == at::kFloat) return KVKind::F32;
  if (cache.scalar_type() == at::kBFloat16) return KVKind::BF16;
  TORCH_CHECK(cache.scalar_type() == at::kByte && (fp8_kind == 2 || fp8_kind == 3),
              "paged_decode_attention: the KV cache must be float32, bfloat16 or fp8 bytes");
  return static_cast<KVKind>(fp8_kind);
}

// Every position a sequence attends to lies in a block its table names, and every block named
// lies in the cache: the kernel trusts both (a length past the table would run off its scratch).
void check_extents(const at::Tensor& tables, const at::Tensor& lens, const std::optional<at::Tensor>& first,
                   int64_t num_blocks, int64_t block_size) {
  const int64_t S = tables.size(0), width = tables.size(1);
  const int32_t* t = tables.data_ptr<int32_t>();
  const int32_t* n = lens.data_ptr<int32_t>();
  const int32_t* f = first ? first->data_ptr<int32_t>() : nullptr;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t ctx = n[s], lo = f ? f[s] : 0;
    TORCH_CHECK(ctx >= 1 && ctx <= width * block_size && lo >= 0 && lo < ctx, "paged_decode_attention: sequence ", s,
                " attends to positions [", lo, ", ", ctx, ") but its table holds ", width, " blocks of ", block_size);
    for (int64_t b = lo / block_size; b <= (ctx - 1) / block_size; ++b)
      TORCH_CHECK(t[s * width + b] >= 0 && t[s * width + b] < num_blocks, "paged_decode_attention: block ",
                  t[s * width + b], " is not in the cache (", num_blocks, " blocks)");
  }
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
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == S && lens.numel() == S,
              "paged_decode_attention: a block table row and a length per sequence");
  check_extents(tables, lens, first, key_cache.size(0), key_cache.size(3));
  TORCH_CHECK(BS % 8 == 0 && D % 8 == 0,
              "paged_decode_attention: block_size and head_dim must be multiples of 8");
  // Whole blocks of all KV heads are the longest contiguous reads; split the heads only when
  // there are too few sequences to keep every thread busy.
  int64_t kv_per_item = KVH;
  while (S * (KVH / kv_per_item) < 4 * at::get_num_threads() && kv_per_item % 2 == 0) kv_per_item /= 2;
  const int64_t scratch_floats = kv_per_item * g * max_blocks * BS;

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
  at::parallel_for(0, S * (KVH / kv_per_item), 1, [&](int64_t begin, int64_t end) {
    // Each thread's own scratch, kept for its next call: a buffer indexed by at::get_thread_num()
    // and sized by at::get_num_threads() overflowed when a team had more threads than that said.
    thread_local std::vector<float> scratch;
    if (scratch.size() < size_t(scratch_floats)) scratch.resize(scratch_floats);
    kKernels.decode_items(p, begin, end, scratch.data());
  });
  return out.view({S, H * D}).to(q.scalar_type());
}

// (norm(x + residual) * (w + weight_offset), x + residual); without a residual the second is empty.
std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                            const at::Tensor& weight, double eps, double weight_offset,
                                            bool round_normalized) {
  const bool bf16 = is_bf16(x, "rms_norm");
  auto xs = x.contiguous();
  const int64_t width = xs.size(-1), rows = xs.numel() / width;
  auto out = at::empty_like(xs);
  at::Tensor res, sum;
  if (residual) {
    res = residual->contiguous();
    TORCH_CHECK(res.sizes() == xs.sizes() && res.scalar_type() == xs.scalar_type(), "rms_norm: residual must match x");
    sum = at::empty_like(xs);
  }
  auto w = weight.to(xs.scalar_type()).contiguous();
  TORCH_CHECK(w.numel() == width, "rms_norm: weight must have the row's width");
  RowsParams p{};
  p.x = xs.data_ptr();
  p.residual = residual ? res.data_ptr() : nullptr;
  p.weight = w.data_ptr();
  p.out = out.data_ptr();
  p.sum = residual ? sum.data_ptr() : nullptr;
  p.width = width;
  p.x_stride = p.out_stride = width;
  p.eps = float(eps);
  p.weight_offset = float(weight_offset);
  p.round_normalized = round_normalized;
  p.bf16 = bf16;
  at::parallel_for(0, rows, row_grain(width), [&](int64_t b, int64_t e) { kKernels.rms_norm_rows(p, b, e); });
  return {out, sum};
}

// x [..., 2 * n] = [gate | up] -> silu(gate) * up [..., n].
at::Tensor silu_and_mul(const at::Tensor& x) {
  const bool bf16 = is_bf16(x, "silu_and_mul");
  TORCH_CHECK(x.size(-1) % 2 == 0 && x.stride(-1) == 1, "silu_and_mul: [..., 2n] rows, contiguous in the last dim");
  auto xs = x.reshape({-1, x.size(-1)});
  auto sizes = x.sizes().vec();
  sizes.back() /= 2;
  auto out = at::empty(sizes, x.options());
  RowsParams p{};
  p.x = xs.data_ptr();
  p.out = out.data_ptr();
  p.width = sizes.back();
  p.x_stride = xs.stride(0);
  p.out_stride = p.width;
  p.bf16 = bf16;
  at::parallel_for(0, xs.size(0), row_grain(p.width), [&](int64_t b, int64_t e) { kKernels.silu_and_mul_rows(p, b, e); });
  return out;
}

// Rotates the first `heads` heads of x [tokens, any heads, head_dim] in place (the first rot_dim
// dims of each); cos_sin [tokens, rot_dim] float32.
void rotary_(const at::Tensor& x, const at::Tensor& cos_sin, int64_t heads) {
  const bool bf16 = is_bf16(x, "rotary");
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2) && heads <= x.size(1),
              "rotary: x is [tokens, heads, head_dim] with contiguous heads");
  TORCH_CHECK(cos_sin.scalar_type() == at::kFloat && cos_sin.is_contiguous() && cos_sin.size(0) == x.size(0) &&
                  cos_sin.size(1) % 2 == 0 && cos_sin.size(1) <= x.size(2),
              "rotary: cos_sin is [tokens, rot_dim] float32");
  RotaryParams p{};
  p.x = x.data_ptr();
  p.cos_sin = cos_sin.data_ptr<float>();
  p.row_stride = x.stride(0);
  p.heads = heads;
  p.head_dim = x.size(2);
  p.rot_dim = cos_sin.size(1);
  p.bf16 = bf16;
  at::parallel_for(0, x.size(0), row_grain(heads * p.head_dim), [&](int64_t b, int64_t e) { kKernels.rotary_rows(p, b, e); });
}

// Cuts items [0, costs.size()) into at most `parts` runs of about equal total cost.
std::vector<int64_t> balanced_cuts(const std::vector<double>& costs, int64_t parts) {
  double total = 0;
  for (double c : costs) total += c;
  std::vector<int64_t> cuts{0};
  double run = 0;
  for (size_t i = 0; i < costs.size(); ++i) {
    run += costs[i];
    if (run >= total * double(cuts.size()) / double(parts) && int64_t(cuts.size()) < parts) cuts.push_back(int64_t(i) + 1);
  }
  if (cuts.back() != int64_t(costs.size())) cuts.push_back(int64_t(costs.size()));
  return cuts;
}

// x [tokens, hidden] through the routed SwiGLU experts chosen by topk_ids [tokens, k] with weights
// topk_weights: sum_k weight * down(silu(gate(x)) * up(x)), in x's dtype. w13 and w2 are packed
// by asyncpp/model/packed_experts.py: [E, I/32, H, 64] and [E, H/64, I, 64] float32 or bf16, or
// bf16 in pairs along K ([E, I/32, H/2, 64, 2], [E, H/64, I/2, 64, 2]) where the build multiplies
// bf16 pairs; then x must be bf16 too.
at::Tensor moe_swiglu(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2, const at::Tensor& topk_ids,
                      const at::Tensor& topk_weights, bool round_bf16) {
  const bool bf16_x = is_bf16(x, "moe_swiglu");
  const bool bf16_weights = is_bf16(w13, "moe_swiglu");
  const bool pairs = w13.dim() == 5;
  TORCH_CHECK(!pairs || (kKernels.pairs_bf16() && bf16_weights && bf16_x),
              "moe_swiglu: weights in bf16 pairs need bf16 x and a CPU with AVX512-BF16");
  TORCH_CHECK(x.dim() == 2 && w13.dim() == w2.dim() && (w13.dim() == 4 || pairs) && w13.is_contiguous() &&
                  w2.is_contiguous() && w2.scalar_type() == w13.scalar_type(),
              "moe_swiglu: packed weights [E, I/32, H, 64], [E, H/64, I, 64] (or their bf16 pairs)");
  const int64_t T = x.size(0), H = x.size(1), E = w13.size(0), I = w13.size(1) * 32, f = pairs ? 2 : 1;
  TORCH_CHECK(w13.size(2) * f == H && w13.size(3) == kMoeCols && w2.size(0) == E && w2.size(1) * kMoeCols == H &&
                  w2.size(2) * f == I && w2.size(3) == kMoeCols && (!pairs || (w13.size(4) == 2 && w2.size(4) == 2)),
              "moe_swiglu: packed weights do not fit x");
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.size(0) == T && topk_weights.sizes() == topk_ids.sizes(),
              "moe_swiglu: topk ids and weights are [tokens, k]");
  auto ids = topk_ids.to(at::kLong).contiguous();
  auto weights = topk_weights.to(at::kFloat).contiguous();
  const int64_t S = ids.numel();
  const int64_t* id = ids.data_ptr<int64_t>();
  // Slots grouped by expert, tokens in order within an expert (a counting sort).
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(id[s] >= 0 && id[s] < E, "moe_swiglu: expert id ", id[s], " out of range (", E, " experts)");
    ++start[id[s] + 1];
  }
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  std::vector<int32_t> slot_token(S);
  std::vector<float> slot_weight(S);
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  const float* w = weights.data_ptr<float>();
  const int64_t k = ids.size(1);
  for (int64_t s = 0; s < S; ++s) {
    const int64_t at = fill[id[s]]++;
    slot_token[at] = int32_t(s / k);
    slot_weight[at] = w[s];
  }
  // Streaming a block costs about what four tokens' arithmetic over it does.
  std::vector<int64_t> up_items;
  std::vector<double> costs;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t b = 0; start[e + 1] > start[e] && b < I / 32; ++b) {
      up_items.push_back(e * (I / 32) + b);
      costs.push_back(1.0 + double(start[e + 1] - start[e]) / 4.0);
    }
  auto xs = pairs ? x.contiguous() : x.to(at::kFloat).contiguous();
  auto act = at::empty({S, I}, xs.options());
  auto out = at::zeros({T, H}, x.options().dtype(at::kFloat));
  MoeParams p{};
  p.x = xs.data_ptr();
  p.w13 = w13.data_ptr();
  p.w2 = w2.data_ptr();
  p.slot_token = slot_token.data();
  p.slot_weight = slot_weight.data();
  p.expert_start = start.data();
  p.up_items = up_items.data();
  p.act = act.data_ptr();
  p.out = out.data_ptr<float>();
  p.hidden = H;
  p.inner = I;
  p.experts = E;
  p.bf16_weights = bf16_weights;
  p.bf16_acts = pairs;
  p.round_bf16 = round_bf16;
  const auto cuts = balanced_cuts(costs, at::get_num_threads());
  at::parallel_for(0, int64_t(cuts.size()) - 1, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) kKernels.moe_up_items(p, cuts[c], cuts[c + 1]);
  });
  at::parallel_for(0, H / kMoeCols, 1, [&](int64_t b, int64_t e) { kKernels.moe_down_blocks(p, b, e); });
  return out.to(x.scalar_type());
}

}  // namespace
}  // namespace asyncpp

TORCH_LIBRARY(asyncpp, m) {
  m.def("paged_decode_attention", &asyncpp::paged_decode_attention);
  m.def("rms_norm", &asyncpp::rms_norm);
  m.def("silu_and_mul", &asyncpp::silu_and_mul);
  m.def("rotary_(Tensor(a!) x, Tensor cos_sin, int heads) -> ()", &asyncpp::rotary_);
  m.def("moe_swiglu", &asyncpp::moe_swiglu);
  m.def("kernel_isa", &asyncpp::isa);
}

static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_kernels", "asyncpp's compiled kernels: torch.ops.asyncpp.*", -1,
                              nullptr};

PyMODINIT_FUNC PyInit__kernels() { return PyModule_Create(&kModule); }

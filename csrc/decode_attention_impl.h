// The decode kernel's body, compiled once per ISA (isa_*.cpp; see vec_impl.h).
//
// One item is one (sequence, KV head): its K and V are read once for all the query heads that
// share the KV head (GQA), block by block straight from the paged cache. K is stored
// transposed inside a block ([head_dim, block_size]), so W consecutive positions of one head_dim
// index are one vector load, and a block's scores are W-wide FMAs.

template <int W>
inline typename Vec<W>::F vsoftcap(typename Vec<W>::F x, float cap) {
  using F = typename Vec<W>::F;
  F a = x < 0 ? -x : x;
  F e = vexp<W>(a * (-2.0f / cap));  // tanh(|x|/cap) = (1 - e) / (1 + e)
  F t = (1.0f - e) / (1.0f + e) * cap;
  return x < 0 ? -t : t;
}

// Blocks sit at scattered addresses, and a block's K (or V) for the item's heads is one
// contiguous run the hardware prefetcher finds too late: DRAM latency, not bandwidth, would
// bound the step. So the K pass asks for the K and V of the block kPrefetchBlocks ahead (V is
// read again by the V pass, from L2 by then).
constexpr int kPrefetchBlocks = 2;

inline void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, 0, 2);
}

template <typename KT>
inline void prefetch_block(const DecodeParams& p, const KT* kc, const KT* vc, int32_t block, int k0, int nk) {
  const int64_t head_elems = int64_t(p.head_dim) * p.block_size;
  prefetch(kc + (int64_t(block) * p.num_kv_heads + k0) * head_elems, nk * head_elems * sizeof(KT));
  const int64_t pos_elems = int64_t(p.num_kv_heads) * p.head_dim;
  for (int t = 0; t < p.block_size; ++t)
    prefetch(vc + (int64_t(block) * p.block_size + t) * pos_elems + int64_t(k0) * p.head_dim,
             int64_t(nk) * p.head_dim * sizeof(KT));
}

// One W-chunk of a block's scores for the G query heads of one KV head: G x U accumulators in
// registers, U partial sums over head_dim so that a small group still has independent FMA chains.
template <int W, int G, typename KT>
inline void chunk_scores(const KT* k, const float* q, int D, int BS, const float* table, float* out, int64_t len) {
  using F = typename Vec<W>::F;
  constexpr int U = G >= 4 ? 1 : (G >= 2 ? 2 : 4);
  F acc[G][U] = {};
  int d = 0;
  for (; d + U <= D; d += U)
    for (int u = 0; u < U; ++u) {
      const F kv = load<W>(k + int64_t(d + u) * BS, table);
      for (int gi = 0; gi < G; ++gi) acc[gi][u] += q[gi * D + d + u] * kv;
    }
  for (; d < D; ++d) {
    const F kv = load<W>(k + int64_t(d) * BS, table);
    for (int gi = 0; gi < G; ++gi) acc[gi][0] += q[gi * D + d] * kv;
  }
  for (int gi = 0; gi < G; ++gi) {
    F sum = acc[gi][0];
    for (int u = 1; u < U; ++u) sum += acc[gi][u];
    store<W>(out + gi * len, sum);
  }
}

// The same for any group size, G heads at a time with the fixed-size kernel above.
template <int W, typename KT>
inline void chunk_scores_any(const KT* k, const float* q, int g, int D, int BS, const float* table, float* out,
                             int64_t len) {
  int gi = 0;
  for (; gi + 4 <= g; gi += 4) chunk_scores<W, 4>(k, q + gi * D, D, BS, table, out + gi * len, len);
  switch (g - gi) {
    case 3: chunk_scores<W, 3>(k, q + gi * D, D, BS, table, out + gi * len, len); break;
    case 2: chunk_scores<W, 2>(k, q + gi * D, D, BS, table, out + gi * len, len); break;
    case 1: chunk_scores<W, 1>(k, q + gi * D, D, BS, table, out + gi * len, len); break;
    default: break;
  }
}

// q.k for the query heads of KV heads [k0, k0 + nk) over blocks b0..b1 -> sc [nk * g, len].
template <int W, typename KT>
void scores(const DecodeParams& p, const float* q, const KT* kc, const KT* vc, const int32_t* table, int k0, int nk,
            int b0, int b1, float* sc, int64_t len) {
  const int g = p.num_heads / p.num_kv_heads, D = p.head_dim, BS = p.block_size;
  const int64_t head_elems = int64_t(D) * BS;
  for (int b = b0; b <= b1; ++b) {
    if (b + kPrefetchBlocks <= b1) prefetch_block(p, kc, vc, table[b + kPrefetchBlocks], k0, nk);
    for (int kv = 0; kv < nk; ++kv) {
      const KT* kb = kc + (int64_t(table[b]) * p.num_kv_heads + k0 + kv) * head_elems;
      float* out = sc + int64_t(kv) * g * len + int64_t(b - b0) * BS;
      for (int c = 0; c < BS; c += W)
        chunk_scores_any<W>(kb + c, q + int64_t(kv) * g * D, g, D, BS, p.fp8_table, out + c, len);
    }
  }
}

// Scores of positions [lo, hi) (relative to the first block) -> probabilities, in place. The
// vector loop covers whole W-chunks; positions outside [lo, hi) in them are set to 0.
template <int W>
void softmax(const DecodeParams& p, float* row, int64_t lo, int64_t hi, int head) {
  using F = typename Vec<W>::F;
  const int64_t a = lo / W * W, z = (hi + W - 1) / W * W;
  float m = p.sinks ? p.sinks[head] : -3.0e38f;
  for (int64_t j = a; j < z; j += W) {
    F x = load<W>(row + j, nullptr) * p.scale;
    if (p.softcap > 0) x = vsoftcap<W>(x, p.softcap);
    if (j < lo || j + W > hi)  // a chunk that holds padding: keep it out of the max
      for (int64_t i = j; i < j + W; ++i)
        if (i < lo || i >= hi) x[i - j] = -3.0e38f;
    store<W>(row + j, x);
    for (int i = 0; i < W; ++i) m = x[i] > m ? x[i] : m;
  }
  F sum = F{};
  for (int64_t j = a; j < z; j += W) {
    F e = vexp<W>(load<W>(row + j, nullptr) - m);
    store<W>(row + j, e);
    sum += e;
  }
  float total = p.sinks ? vexp<W>(F{} + (p.sinks[head] - m))[0] : 0.0f;
  for (int i = 0; i < W; ++i) total += sum[i];
  const float inv = 1.0f / total;
  for (int64_t j = a; j < z; j += W) store<W>(row + j, load<W>(row + j, nullptr) * inv);
  for (int64_t j = a; j < lo; ++j) row[j] = 0.0f;  // exp clamps, so the padding is tiny, not 0
  for (int64_t j = hi; j < z; ++j) row[j] = 0.0f;
}

// probs . V for G query heads and NV W-vectors of head_dim, accumulated in registers over the
// positions [lo, hi) of blocks b0..b1 (`row` gives a position's V row of this KV head).
template <int W, int G, int NV, typename KT>
inline void chunk_values(const DecodeParams& p, const KT* vc, const int32_t* table, const float* probs, int b0,
                         int b1, int64_t lo, int64_t hi, int64_t head_offset, float* out, int64_t len) {
  using F = typename Vec<W>::F;
  const int BS = p.block_size, D = p.head_dim;
  const int64_t pos_elems = int64_t(p.num_kv_heads) * D;
  F acc[G][NV] = {};
  for (int b = b0; b <= b1; ++b) {
    const int64_t first = int64_t(b - b0) * BS;
    const int t0 = lo > first ? int(lo - first) : 0, t1 = hi < first + BS ? int(hi - first) : BS;
    const KT* block = vc + int64_t(table[b]) * BS * pos_elems + head_offset;
    for (int t = t0; t < t1; ++t) {
      const KT* row = block + t * pos_elems;
      for (int v = 0; v < NV; ++v) {
        const F x = load<W>(row + v * W, p.fp8_table);
        for (int gi = 0; gi < G; ++gi) acc[gi][v] += probs[gi * len + first + t] * x;
      }
    }
  }
  for (int gi = 0; gi < G; ++gi)
    for (int v = 0; v < NV; ++v) store<W>(out + gi * D + v * W, acc[gi][v] * p.v_unit);
}

template <int W, int G, typename KT>
inline void group_values(const DecodeParams& p, const KT* vc, const int32_t* table, const float* probs, int b0,
                         int b1, int64_t lo, int64_t hi, int64_t head_offset, float* out, int64_t len) {
  // Four vectors at a time: G x 4 accumulators stay in registers; a second pass over the
  // positions (wider heads) reads V from the cache the first pass warmed.
  int c = 0;
  for (; c + 4 * W <= p.head_dim; c += 4 * W)
    chunk_values<W, G, 4>(p, vc, table, probs, b0, b1, lo, hi, head_offset + c, out + c, len);
  switch ((p.head_dim - c) / W) {
    case 3: chunk_values<W, G, 3>(p, vc, table, probs, b0, b1, lo, hi, head_offset + c, out + c, len); break;
    case 2: chunk_values<W, G, 2>(p, vc, table, probs, b0, b1, lo, hi, head_offset + c, out + c, len); break;
    case 1: chunk_values<W, G, 1>(p, vc, table, probs, b0, b1, lo, hi, head_offset + c, out + c, len); break;
    default: break;
  }
}

// out [nk * g, D] = probs . V for KV heads [k0, k0 + nk).
template <int W, typename KT>
void values(const DecodeParams& p, const KT* vc, const int32_t* table, const float* probs, int k0, int nk, int b0,
            int b1, int64_t lo, int64_t hi, float* out, int64_t len) {
  const int g = p.num_heads / p.num_kv_heads, D = p.head_dim;
  for (int kv = 0; kv < nk; ++kv) {
    const int64_t offset = int64_t(k0 + kv) * D;
    const float* pr = probs + int64_t(kv) * g * len;
    float* o = out + int64_t(kv) * g * D;
    int gi = 0;
    for (; gi + 4 <= g; gi += 4)
      group_values<W, 4>(p, vc, table, pr + gi * len, b0, b1, lo, hi, offset, o + gi * D, len);
    switch (g - gi) {
      case 3: group_values<W, 3>(p, vc, table, pr + gi * len, b0, b1, lo, hi, offset, o + gi * D, len); break;
      case 2: group_values<W, 2>(p, vc, table, pr + gi * len, b0, b1, lo, hi, offset, o + gi * D, len); break;
      case 1: group_values<W, 1>(p, vc, table, pr + gi * len, b0, b1, lo, hi, offset, o + gi * D, len); break;
      default: break;
    }
  }
}

// One item: a sequence and a run of `kv_per_item` KV heads (whole blocks of the cache are then
// contiguous reads: [heads, head_dim, block] of K and [block, heads, head_dim] of V).
template <int W, typename KT>
void decode_item(const DecodeParams& p, int64_t item, float* scratch) {
  const int groups = p.num_kv_heads / p.kv_per_item;
  const int s = int(item / groups), k0 = int(item % groups) * p.kv_per_item, nk = p.kv_per_item;
  const int g = p.num_heads / p.num_kv_heads, D = p.head_dim, BS = p.block_size;
  const int64_t ctx = p.context_lens[s];
  const int64_t first = p.first_pos ? p.first_pos[s] : 0;
  const int b0 = int(first / BS), b1 = int((ctx - 1) / BS);
  const int64_t len = int64_t(b1 - b0 + 1) * BS;
  const int64_t lo = first - int64_t(b0) * BS, hi = ctx - int64_t(b0) * BS;
  const int64_t row0 = int64_t(s) * p.num_heads + int64_t(k0) * g;  // the item's first query head
  const int32_t* table = p.block_tables + int64_t(s) * p.max_blocks;
  const int nh = nk * g;
  float* sc = scratch;  // [nh, len]
  const KT* kc = static_cast<const KT*>(p.key_cache);
  const KT* vc = static_cast<const KT*>(p.value_cache);
  for (int b = b0; b < b0 + kPrefetchBlocks && b <= b1; ++b) prefetch_block(p, kc, vc, table[b], k0, nk);
  scores<W>(p, p.q + row0 * D, kc, vc, table, k0, nk, b0, b1, sc, len);
  for (int h = 0; h < nh; ++h) softmax<W>(p, sc + h * len, lo, hi, int(row0 % p.num_heads) + h);
  values<W>(p, vc, table, sc, k0, nk, b0, b1, lo, hi, p.out + row0 * D, len);
}
template <int W>
void decode_range(const DecodeParams& p, int64_t begin, int64_t end, float* scratch) {
  for (int64_t item = begin; item < end; ++item) {
    switch (p.kind) {
      case KVKind::F32: decode_item<W, float>(p, item, scratch); break;
      case KVKind::BF16: decode_item<W, uint16_t>(p, item, scratch); break;
      default: decode_item<W, uint8_t>(p, item, scratch); break;
    }
  }
}

// 16 lanes when block_size and head_dim allow, else 8 (ops.cpp refuses anything not a multiple of 8).
void decode_items(const DecodeParams& p, int64_t begin, int64_t end, float* scratch) {
  if (p.block_size % 16 == 0 && p.head_dim % 16 == 0)
    decode_range<16>(p, begin, end, scratch);
  else
    decode_range<8>(p, begin, end, scratch);
}

// The routed experts of a SwiGLU Mixture-of-Experts block, compiled once per ISA (see vec_impl.h).
// Weights are packed in column blocks, each block's rows K-major ([K][64] floats or bf16), so a
// work item streams one contiguous block and a tile of tokens broadcasts its inputs against it:
// at decode (a few tokens an expert) every weight byte is read once, at memory speed; at prefill
// the block stays in cache while the tiles of the expert's tokens pass over it.

constexpr int kMoeCols = 64;  // a packed block's columns: four 16-float vectors
using MF = Vec<16>::F;

template <typename Wt>
inline void load_block_row(const Wt* w, MF (&v)[4]) {
  for (int c = 0; c < 4; ++c) v[c] = load<16>(w + 16 * c, nullptr);
}

inline float as_float(float v) { return v; }
inline float as_float(uint16_t v) { return __builtin_bit_cast(float, uint32_t(v) << 16); }

// acc[t][c] = sum_k x[t][k] * w[k][16c..16c+16] for the MT rows x[t] (each `depth` long).
template <typename Wt, typename At, int MT>
inline void tile_dot(const Wt* w, const At* const* x, int64_t depth, MF (&acc)[MT][4]) {
  for (int t = 0; t < MT; ++t)
    for (int c = 0; c < 4; ++c) acc[t][c] = MF{};
  for (int64_t k = 0; k < depth; ++k) {
    MF wv[4];
    load_block_row(w + k * kMoeCols, wv);
    for (int t = 0; t < MT; ++t) {
      const MF xb = MF{} + as_float(x[t][k]);
      for (int c = 0; c < 4; ++c) acc[t][c] += xb * wv[c];
    }
  }
}

#if defined(ASYNCPP_BF16_DOT)
// bf16 weights and inputs with the weights' rows in pairs ([K / 2][64][2]): one vdpbf16ps adds
// x[k] w[k][n] + x[k + 1] w[k + 1][n] to lane n, twice the arithmetic of an fp32 FMA.
template <int MT>
inline void tile_dot_pairs(const uint16_t* w, const uint16_t* const* x, int64_t depth, MF (&acc)[MT][4]) {
  __m512 a[MT][4];
  for (int t = 0; t < MT; ++t)
    for (int c = 0; c < 4; ++c) a[t][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < depth; k += 2) {
    __m512bh wv[4];
    for (int c = 0; c < 4; ++c) wv[c] = (__m512bh)_mm512_loadu_si512(w + k * kMoeCols + 32 * c);
    for (int t = 0; t < MT; ++t) {
      int32_t pair;
      __builtin_memcpy(&pair, x[t] + k, sizeof pair);
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
      for (int c = 0; c < 4; ++c) a[t][c] = _mm512_dpbf16_ps(a[t][c], xb, wv[c]);
    }
  }
  for (int t = 0; t < MT; ++t)
    for (int c = 0; c < 4; ++c) acc[t][c] = (MF)a[t][c];
}
#endif

template <typename Wt, typename At, int MT>
inline void block_dot(const Wt* w, const At* const* x, int64_t depth, MF (&acc)[MT][4]) {
#if defined(ASYNCPP_BF16_DOT)
  if constexpr (sizeof(Wt) == 2 && sizeof(At) == 2) return tile_dot_pairs<MT>(w, x, depth, acc);
#endif
  tile_dot<Wt, At, MT>(w, x, depth, acc);
}

inline MF maybe_round(MF v, bool round) { return round ? round_bf16<16>(v) : v; }

// One tile of an expert's slots through a gate/up block: act = silu(gate) * up for 32 columns.
template <typename Wt, typename At, int MT>
void up_tile(const MoeParams& p, const Wt* w, int64_t s0, int64_t col) {
  const At* x[MT];
  for (int t = 0; t < MT; ++t) x[t] = static_cast<const At*>(p.x) + int64_t(p.slot_token[s0 + t]) * p.hidden;
  MF acc[MT][4];
  block_dot<Wt, At, MT>(w, x, p.hidden, acc);
  for (int t = 0; t < MT; ++t) {
    At* a = static_cast<At*>(p.act) + (s0 + t) * p.inner + col;
    for (int c = 0; c < 2; ++c) {  // vectors 0-1: gate columns, 2-3: the same up columns
      const MF g = maybe_round(acc[t][c], p.round_bf16), u = maybe_round(acc[t][c + 2], p.round_bf16);
      const MF s = maybe_round(g / (1.0f + vexp<16>(-g)), p.round_bf16);
      store<16>(a + 16 * c, maybe_round(s * u, p.round_bf16));
    }
  }
}

// One tile of an expert's slots through a down block: out[token] += weight * (act @ w2) there.
template <typename Wt, typename At, int MT>
void down_tile(const MoeParams& p, const Wt* w, int64_t s0, int64_t col) {
  const At* a[MT];
  for (int t = 0; t < MT; ++t) a[t] = static_cast<const At*>(p.act) + (s0 + t) * p.inner;
  MF acc[MT][4];
  block_dot<Wt, At, MT>(w, a, p.inner, acc);
  for (int t = 0; t < MT; ++t) {
    float* o = p.out + int64_t(p.slot_token[s0 + t]) * p.hidden + col;
    const float weight = p.slot_weight[s0 + t];
    for (int c = 0; c < 4; ++c) {
      const MF y = maybe_round(maybe_round(acc[t][c], p.round_bf16) * weight, p.round_bf16);
      store<16>(o + 16 * c, maybe_round(load<16>(o + 16 * c, nullptr) + y, p.round_bf16));
    }
  }
}

// An expert's slots [begin, end) in tiles of up to kMoeTile (a tail tile runs its own width).
template <template <typename, typename, int> class Tile, typename Wt, typename At>
struct Tiles {
  static void run(const MoeParams& p, const Wt* w, int64_t begin, int64_t end, int64_t col) {
    int64_t s = begin;
    for (; s + kMoeTile <= end; s += kMoeTile) Tile<Wt, At, kMoeTile>::run(p, w, s, col);
    switch (end - s) {
      case 3: if constexpr (kMoeTile > 3) Tile<Wt, At, 3>::run(p, w, s, col); break;
      case 2: if constexpr (kMoeTile > 2) Tile<Wt, At, 2>::run(p, w, s, col); break;
      case 1: if constexpr (kMoeTile > 1) Tile<Wt, At, 1>::run(p, w, s, col); break;
      default: break;
    }
  }
};

template <typename Wt, typename At, int MT>
struct UpTile {
  static void run(const MoeParams& p, const Wt* w, int64_t s, int64_t col) { up_tile<Wt, At, MT>(p, w, s, col); }
};

template <typename Wt, typename At, int MT>
struct DownTile {
  static void run(const MoeParams& p, const Wt* w, int64_t s, int64_t col) { down_tile<Wt, At, MT>(p, w, s, col); }
};

// Items [begin, end) of the gate/up pass: item i is (expert, 32-column block) p.up_items[i].
template <typename Wt, typename At>
void moe_up(const MoeParams& p, int64_t begin, int64_t end) {
  const int64_t blocks = p.inner / 32;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t e = p.up_items[i] / blocks, b = p.up_items[i] % blocks;
    const Wt* w = static_cast<const Wt*>(p.w13) + (e * blocks + b) * p.hidden * kMoeCols;
    Tiles<UpTile, Wt, At>::run(p, w, p.expert_start[e], p.expert_start[e + 1], b * 32);
  }
}

// Column blocks [begin, end) of the down pass, each over every expert in order (the order
// transformers adds the experts' outputs in), so no two threads write the same outputs.
template <typename Wt, typename At>
void moe_down(const MoeParams& p, int64_t begin, int64_t end) {
  const int64_t blocks = p.hidden / kMoeCols;
  for (int64_t b = begin; b < end; ++b)
    for (int64_t e = 0; e < p.experts; ++e) {
      if (p.expert_start[e] == p.expert_start[e + 1]) continue;
      const Wt* w = static_cast<const Wt*>(p.w2) + (e * blocks + b) * p.inner * kMoeCols;
      Tiles<DownTile, Wt, At>::run(p, w, p.expert_start[e], p.expert_start[e + 1], b * kMoeCols);
    }
}

// bf16 activations come with bf16 weights in pairs (the bf16 build's layout, see pairs_bf16).
void moe_up_items(const MoeParams& p, int64_t begin, int64_t end) {
  if (p.bf16_acts) return moe_up<uint16_t, uint16_t>(p, begin, end);
  p.bf16_weights ? moe_up<uint16_t, float>(p, begin, end) : moe_up<float, float>(p, begin, end);
}

void moe_down_blocks(const MoeParams& p, int64_t begin, int64_t end) {
  if (p.bf16_acts) return moe_down<uint16_t, uint16_t>(p, begin, end);
  p.bf16_weights ? moe_down<uint16_t, float>(p, begin, end) : moe_down<float, float>(p, begin, end);
}

#if defined(ASYNCPP_BF16_DOT)
constexpr bool kPairsBf16 = true;
#else
constexpr bool kPairsBf16 = false;
#endif
bool pairs_bf16() { return kPairsBf16; }

// The small per-layer ops of a step, fused, compiled once per ISA (see vec_impl.h). Each is a pass
// over a token's row where torch runs several ops (and allocations) per layer. bfloat16 rows
// are rounded where the model's own code rounds them, so results stay those of transformers.

constexpr int kRowW = 16;
using RF = Vec<kRowW>::F;

template <typename T>
inline RF row_load(const T* p, int64_t i, int64_t n) {  // n < kRowW: a zero-padded tail
  if (n >= kRowW) return load<kRowW>(p + i, nullptr);
  T tail[kRowW] = {};
  for (int64_t j = 0; j < n; ++j) tail[j] = p[i + j];
  return load<kRowW>(tail, nullptr);
}

inline void row_store(float* p, int64_t i, int64_t n, RF v) {
  if (n >= kRowW) return store<kRowW>(p + i, v);
  for (int64_t j = 0; j < n; ++j) p[i + j] = v[j];
}

inline void row_store(uint16_t* p, int64_t i, int64_t n, RF v) {
  if (n >= kRowW) return store<kRowW>(p + i, v);
  uint16_t tail[kRowW];
  store<kRowW>(tail, v);
  for (int64_t j = 0; j < n; ++j) p[i + j] = tail[j];
}

template <typename T>
inline RF rounded(RF v) {  // what storing the value in T and reading it back gives
  if constexpr (sizeof(T) == 2) return round_bf16<kRowW>(v);
  return v;
}

// out = norm(x + residual) * (w + weight_offset): Llama rounds the normalized row to the dtype,
// then multiplies; Gemma ((1 + w)) and gpt-oss multiply in float and round once (round_normalized
// false). sum = x + residual, rounded to the dtype.
template <typename T>
void rms_norm_row(const RowsParams& p, int64_t r) {
  const T* x = static_cast<const T*>(p.x) + r * p.x_stride;
  const T* res = p.residual ? static_cast<const T*>(p.residual) + r * p.x_stride : nullptr;
  T* sum = res ? static_cast<T*>(p.sum) + r * p.out_stride : nullptr;
  T* out = static_cast<T*>(p.out) + r * p.out_stride;
  const int64_t n = p.width;
  RF squares = RF{};
  for (int64_t i = 0; i < n; i += kRowW) {
    RF v = row_load(x, i, n - i);
    if (res) {
      v = rounded<T>(v + row_load(res, i, n - i));
      row_store(sum, i, n - i, v);
    }
    squares += v * v;
  }
  float total = 0;
  for (int j = 0; j < kRowW; ++j) total += squares[j];
  const float inv = 1.0f / __builtin_sqrtf(total / float(n) + p.eps);
  const T* src = res ? sum : x;
  for (int64_t i = 0; i < n; i += kRowW) {
    RF v = row_load(src, i, n - i) * inv;
    RF w = row_load(static_cast<const T*>(p.weight), i, n - i) + p.weight_offset;
    row_store(out, i, n - i, p.round_normalized ? rounded<T>(v) * w : v * w);
  }
}

void rms_norm_rows(const RowsParams& p, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) p.bf16 ? rms_norm_row<uint16_t>(p, r) : rms_norm_row<float>(p, r);
}

// out = silu(gate) * up for a row [gate | up]; bfloat16: silu rounded before the product, as torch's
// bf16 silu followed by a bf16 multiply.
template <typename T>
void silu_and_mul_row(const RowsParams& p, int64_t r) {
  const T* gate = static_cast<const T*>(p.x) + r * p.x_stride;
  const T* up = gate + p.width;
  T* out = static_cast<T*>(p.out) + r * p.out_stride;
  for (int64_t i = 0; i < p.width; i += kRowW) {
    const int64_t n = p.width - i;
    RF g = row_load(gate, i, n);
    RF s = rounded<T>(g / (1.0f + vexp<kRowW>(-g)));
    row_store(out, i, n, s * row_load(up, i, n));
  }
}

void silu_and_mul_rows(const RowsParams& p, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) p.bf16 ? silu_and_mul_row<uint16_t>(p, r) : silu_and_mul_row<float>(p, r);
}

// x1, x2 = the two halves of the rotated part: x1 cos - x2 sin, x2 cos + x1 sin; in bfloat16 each
// product is rounded before the sum, as transformers' bf16 ops (cos and sin are the dtype's values).
template <typename T>
void rotary_row(const RotaryParams& p, int64_t t) {
  const int64_t half = p.rot_dim / 2;
  const float* cos = p.cos_sin + t * p.rot_dim;
  const float* sin = cos + half;
  for (int64_t h = 0; h < p.heads; ++h) {
    T* x1 = static_cast<T*>(p.x) + t * p.row_stride + h * p.head_dim;
    T* x2 = x1 + half;
    for (int64_t i = 0; i < half; i += kRowW) {
      const int64_t n = half - i;
      RF a = row_load(x1, i, n), b = row_load(x2, i, n), c = row_load(cos, i, n), s = row_load(sin, i, n);
      row_store(x1, i, n, rounded<T>(a * c) - rounded<T>(b * s));
      row_store(x2, i, n, rounded<T>(b * c) + rounded<T>(a * s));
    }
  }
}

void rotary_rows(const RotaryParams& p, int64_t begin, int64_t end) {
  for (int64_t t = begin; t < end; ++t) p.bf16 ? rotary_row<uint16_t>(p, t) : rotary_row<float>(p, t);
}

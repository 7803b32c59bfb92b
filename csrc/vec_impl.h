// What every kernel body shares, compiled once per ISA: isa_{avx512,avx2,generic}.cpp set the
// target, then include the bodies inside an anonymous namespace. GCC vector extensions give
// W-lane vectors that each target lowers to its own registers (one zmm, two ymm, four xmm); no
// torch or std header here (see kernels.h).

template <int W>
struct Vec {
  typedef float F __attribute__((vector_size(4 * W)));
  typedef int32_t I __attribute__((vector_size(4 * W)));
  typedef uint32_t U __attribute__((vector_size(4 * W)));
  typedef uint16_t H __attribute__((vector_size(2 * W)));
};

template <int W>
inline typename Vec<W>::F load(const float* p, const float*) {
  typename Vec<W>::F v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

template <int W>
inline typename Vec<W>::F load(const uint16_t* p, const float*) {  // bf16: the high half of a float
  typename Vec<W>::H h;
  __builtin_memcpy(&h, p, sizeof h);
  typename Vec<W>::U u = __builtin_convertvector(h, typename Vec<W>::U) << 16;
  return (typename Vec<W>::F)u;
}

template <int W>
inline typename Vec<W>::F load(const uint8_t* p, const float* table) {  // fp8 bytes through a table
  typename Vec<W>::F v;
  for (int i = 0; i < W; ++i) v[i] = table[p[i]];
  return v;
}

template <int W>
inline void store(float* p, typename Vec<W>::F v) {
  __builtin_memcpy(p, &v, sizeof v);
}

// exp (clamped to float's range), Cephes' polynomial in plain vector arithmetic (a libm call
// would not vectorize).
template <int W>
inline typename Vec<W>::F vexp(typename Vec<W>::F x) {
  using F = typename Vec<W>::F;
  using I = typename Vec<W>::I;
  x = x < -87.0f ? F{} - 87.0f : x;
  x = x > 88.0f ? F{} + 88.0f : x;
  F t = x * 1.44269504088896341f + 0.5f;
  I n = __builtin_convertvector(t, I);                // truncates toward zero
  n += (I)(__builtin_convertvector(n, F) > t);      // floor: -1 where truncation rounded up
  F nf = __builtin_convertvector(n, F);
  F r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  F p = F{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * (F)((n + 127) << 23);
}


// float -> bfloat16 bits, rounded to nearest even (as torch's conversion).
template <int W>
inline typename Vec<W>::H to_bf16(typename Vec<W>::F x) {
  using U = typename Vec<W>::U;
  U bits = (U)x;
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return __builtin_convertvector(bits >> 16, typename Vec<W>::H);
}

template <int W>
inline typename Vec<W>::F round_bf16(typename Vec<W>::F x) {
  return (typename Vec<W>::F)(__builtin_convertvector(to_bf16<W>(x), typename Vec<W>::U) << 16);
}

template <int W>
inline void store(uint16_t* p, typename Vec<W>::F v) {
  typename Vec<W>::H h = to_bf16<W>(v);
  __builtin_memcpy(p, &h, sizeof h);
}

inline float hsum(const float* v, int n) {
  float s = 0;
  for (int i = 0; i < n; ++i) s += v[i];
  return s;
}

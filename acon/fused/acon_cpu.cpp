// ACON-C forward and backward CPU kernels for acon.fused.native (built on first use, loaded with ctypes).
//
// Math (in fp32 whatever the storage type): d = p1 - p2, u = d·x, z = β·u, s = σ(z),
//   y = u·s + p2·x
//   t = u·s·(1 - s), g = s + β·t = ∂(u·s)/∂u
//   dx = dy·(d·g + p2);  per (n, c) sums: Σ dy·x·g (→ dp1), Σ dy·x (dp2 = Σ dy·x - dp1), Σ dy·u·t (→ dβ)
//
// Layouts (x viewed as 3-D, dense):
//   "ncs": rows of S contiguous values, one row per (n, c). Work is cut into chunks of one vector (VB
//          values) laid end to end over the rows, so short rows cost no scalar tail: a chunk that crosses
//          a row boundary blends the two rows' parameters (S >= VB), or gathers them per lane.
//   "nsc": rows of C contiguous channels, one row per (n, s). Parameters are read from arrays of length
//          C + VB that repeat the channels, so a chunk crossing a row boundary needs one plain load.
// Reductions are per row (ncs) or per (n, block of s) (nsc) in a fixed order, so results do not depend
// on thread timing. Portable GCC/Clang vector extensions sized to the ISA (AVX-512, AVX2, SSE or NEON).
// No fast-math: NaN and Inf propagate as in the reference formula.

#include <cstdint>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>
#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

// Lanes per chunk: one native vector (AVX-512: 16 floats, AVX/AVX2: 8, otherwise 4). Wider generic
// vectors than the hardware has are lowered very poorly by compilers, so the width follows the ISA.
#if !defined(ACON_VB)
#if defined(__AVX512F__)
#define ACON_VB 16
#elif defined(__AVX__)
#define ACON_VB 8
#else
#define ACON_VB 4
#endif
#endif
constexpr int64_t VB = ACON_VB;
// index padding that keeps the hsum shuffles at the full width (upper lanes are don't-cares)
#if ACON_VB == 16
#define ACON_VB_PAD8 , 8, 9, 10, 11, 12, 13, 14, 15
#define ACON_VB_PAD4 , 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15
#define ACON_VB_PAD2 , 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15
#elif ACON_VB == 8
#define ACON_VB_PAD8
#define ACON_VB_PAD4 , 4, 5, 6, 7
#define ACON_VB_PAD2 , 2, 3, 4, 5, 6, 7
#else
#define ACON_VB_PAD4
#define ACON_VB_PAD2 , 2, 3
#endif
typedef float vf __attribute__((vector_size(VB * 4)));
typedef int32_t vi __attribute__((vector_size(VB * 4)));
typedef uint32_t vu __attribute__((vector_size(VB * 4)));
typedef uint16_t vh __attribute__((vector_size(VB * 2)));

template <size_t... I>
inline vf splat_(float a, std::index_sequence<I...>) {
  return vf{((void)I, a)...};
}
template <size_t... I>
inline vi iota_(std::index_sequence<I...>) {
  return vi{(int32_t)I...};
}
inline vf splat(float a) { return splat_(a, std::make_index_sequence<VB>{}); }
inline vi iota() { return iota_(std::make_index_sequence<VB>{}); }
const vi LANE = iota();

struct F32 {
  using T = float;
  static vf load(const T* p, int64_t n) {
    vf v = {};
    if (n == VB) std::memcpy(&v, p, sizeof v);
    else std::memcpy(&v, p, n * sizeof(T));
    return v;
  }
  static void store(T* p, vf v, int64_t n) {
    if (n == VB) std::memcpy(p, &v, sizeof v);
    else std::memcpy(p, &v, n * sizeof(T));
  }
};

struct BF16 {  // bfloat16 stored as uint16; round to nearest even on store, NaN kept NaN
  using T = uint16_t;
  static vf load(const T* p, int64_t n) {
    vh h = {};
    if (n == VB) std::memcpy(&h, p, sizeof h);
    else std::memcpy(&h, p, n * sizeof(T));
    vu w = __builtin_convertvector(h, vu) << 16;
    return (vf)w;
  }
  static void store(T* p, vf v, int64_t n) {
    vu b = (vu)v;
    vu r = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
    r = (v == v) ? r : (vu{} + 0x7FC0u);
    vh h = __builtin_convertvector(r, vh);
    if (n == VB) std::memcpy(p, &h, sizeof h);
    else std::memcpy(p, &h, n * sizeof(T));
  }
};

// e^x, Cephes-style range reduction and degree-6 polynomial (about 1 ulp), inputs clamped to [-87.3, 88].
// n = round(x·log2 e) comes from adding 1.5·2^23, which leaves n in the low mantissa bits (no float/int
// conversions); r = x - n·ln 2 then lies in [-ln2/2, ln2/2], the polynomial's range.
inline vf vexp(vf x) {
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23
  x = x < splat(88.0f) ? x : splat(88.0f);
  x = x > splat(-87.3365478515625f) ? x : splat(-87.3365478515625f);
  const vf k = x * splat(1.44269504088896341f) + magic;
  const vf nf = k - magic;
  const vf r = x - nf * splat(0.693359375f) - nf * splat(-2.12194440e-4f);
  vf p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  const vi e = ((vi)k - (vi)magic + 127) << 23;
  return p * (vf)e;
}

// 1/a: the hardware reciprocal estimate refined by one Newton step (relative error about 2^-23 or better),
// several times cheaper than a vector division; plain division where no estimate instruction is known.
inline vf vrecip(vf a) {
#if defined(__AVX512F__) || defined(__AVX__)
  vf r;
  if constexpr (VB == 16) {
    __m512 v;
    std::memcpy(&v, &a, sizeof v);
    v = _mm512_rcp14_ps(v);
    std::memcpy(&r, &v, sizeof v);
  } else if constexpr (VB == 8) {
    __m256 v;
    std::memcpy(&v, &a, sizeof v);
    v = _mm256_rcp_ps(v);
    std::memcpy(&r, &v, sizeof v);
  } else {
    return splat(1.0f) / a;
  }
  return r * (splat(2.0f) - a * r);
#else
  return splat(1.0f) / a;
#endif
}

inline vf vsigmoid(vf z) { return vrecip(splat(1.0f) + vexp(-z)); }

inline vf fwd_math(vf x, vf d, vf p, vf b) {
  vf u = d * x;
  return u * vsigmoid(b * u) + p * x;
}

struct Grads {
  vf dx, s1, s2, sb;  // terms of Σ dy·x·g, Σ dy·x and Σ dy·u·t
};

inline Grads bwd_math(vf dy, vf x, vf d, vf p, vf b) {
  vf u = d * x;
  vf s = vsigmoid(b * u);
  vf t = u * (s - s * s);
  vf g = s + b * t;
  vf gx = dy * x;
  vf s1 = gx * g;
  return {dy * (d * g + p), s1, gx, dy * u * t};
}

inline float hsum(vf v) {  // shuffle tree: log2(VB) shuffles and adds
#if ACON_VB == 16
  v = v + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
#endif
#if ACON_VB >= 8
  v = v + __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3 ACON_VB_PAD8);
#endif
  v = v + __builtin_shufflevector(v, v, 2, 3, 0, 1 ACON_VB_PAD4);
  v = v + __builtin_shufflevector(v, v, 1, 0 ACON_VB_PAD2);
  return v[0];
}

// ---- "ncs": rows r = n·C + c of S values; parameters per row -------------------------------------

struct RowParams {  // per-row parameters: row r = n·C + c; β index r (per sample) or c
  const float *d, *p, *b;
  int64_t C, R;
  bool per_sample;
  float beta(int64_t r, int64_t c) const { return b[per_sample ? r : c]; }
};

// Rows of S >= VB values, processed as chunks of VB laid end to end over rows r0..r1-1 in one flat loop:
// a chunk inside a row uses that row's parameters; the chunk crossing into the next row blends the two
// rows' parameters with the lane mask `m` (lanes < rem belong to the current row).
template <class IO, bool BWD>
void rows_long(const typename IO::T* __restrict__ dy, const typename IO::T* __restrict__ x,
               typename IO::T* __restrict__ out, float* __restrict__ s1, float* __restrict__ s2,
               float* __restrict__ sb, const RowParams& P, int64_t r0, int64_t r1, int64_t S) {
  const float *__restrict__ pd = P.d, *__restrict__ pp = P.p, *__restrict__ pb = P.b;
  const int64_t L = (r1 - r0) * S, C = P.C, R = P.R;
  const bool per_sample = P.per_sample;
  const vf zero = {};
  vf a1 = zero, a2 = zero, ab = zero;  // running sums of row r (carried over a crossing chunk)
  int64_t r = r0, c = r0 % C, o = 0;     // row, its channel, offset of the chunk in the row
  for (int64_t i = 0; i < L; i += VB) {
    const int64_t n = L - i < VB ? L - i : VB, rem = S - o;
    const int64_t cn = c + 1 == C ? 0 : c + 1, rn = r + 1 < R ? r + 1 : r;
    vf d = splat(pd[c]), p = splat(pp[c]), b = splat(pb[per_sample ? r : c]);
    const bool cross = rem < VB;
    vi m = {};
    if (cross) {
      m = LANE < (int32_t)rem;
      d = m ? d : splat(pd[cn]), p = m ? p : splat(pp[cn]), b = m ? b : splat(pb[per_sample ? rn : cn]);
    }
    const vf xv = n == VB ? IO::load(x + i, VB) : IO::load(x + i, n);
    if constexpr (BWD) {
      const Grads g = bwd_math(n == VB ? IO::load(dy + i, VB) : IO::load(dy + i, n), xv, d, p, b);
      if (n == VB) IO::store(out + i, g.dx, VB);
      else IO::store(out + i, g.dx, n);
      if (!cross) {
        a1 += g.s1, a2 += g.s2, ab += g.sb;
        if (rem == VB) {  // row r ends with this chunk
          s1[r] = hsum(a1), s2[r] = hsum(a2), sb[r] = hsum(ab);
          a1 = a2 = ab = zero;
        }
      } else {
        s1[r] = hsum(a1 + (m ? g.s1 : zero)), s2[r] = hsum(a2 + (m ? g.s2 : zero));
        sb[r] = hsum(ab + (m ? g.sb : zero));
        a1 = m ? zero : g.s1, a2 = m ? zero : g.s2, ab = m ? zero : g.sb;
      }
    } else {
      const vf yv = fwd_math(xv, d, p, b);
      if (n == VB) IO::store(out + i, yv, VB);
      else IO::store(out + i, yv, n);
    }
    o += VB;
    if (o >= S) o -= S, r = rn, c = cn;
  }
}

// Rows shorter than a vector (S < VB): parameters gathered lane by lane, sums scattered lane by lane.
template <class IO, bool BWD>
void rows_short(const typename IO::T* dy, const typename IO::T* x, typename IO::T* out, float* s1, float* s2,
                float* sb, const RowParams& P, int64_t r0, int64_t r1, int64_t S) {
  const int64_t L = (r1 - r0) * S;
  if constexpr (BWD) {
    for (int64_t r = r0; r < r1; ++r) s1[r] = s2[r] = sb[r] = 0.0f;
  }
  int64_t row[VB];
  for (int64_t i = 0; i < L; i += VB) {
    const int64_t n = L - i < VB ? L - i : VB;
    vf d = {}, p = {}, b = {};
    for (int64_t k = 0; k < VB; ++k) {
      const int64_t r = r0 + (i + k < L ? i + k : L - 1) / S, c = r % P.C;
      row[k] = r, d[k] = P.d[c], p[k] = P.p[c], b[k] = P.beta(r, c);
    }
    const vf xv = IO::load(x + i, n);
    if constexpr (BWD) {
      const Grads g = bwd_math(IO::load(dy + i, n), xv, d, p, b);
      IO::store(out + i, g.dx, n);
      for (int64_t k = 0; k < n; ++k) s1[row[k]] += g.s1[k], s2[row[k]] += g.s2[k], sb[row[k]] += g.sb[k];
    } else {
      IO::store(out + i, fwd_math(xv, d, p, b), n);
    }
  }
}

template <class IO, bool BWD>
void rows(const typename IO::T* dy, const typename IO::T* x, typename IO::T* out, float* s1, float* s2, float* sb,
          const RowParams& P, int64_t r0, int64_t r1, int64_t S) {
  dy += BWD ? r0 * S : 0;
  x += r0 * S;
  out += r0 * S;
  if (S >= VB) rows_long<IO, BWD>(dy, x, out, s1, s2, sb, P, r0, r1, S);
  else rows_short<IO, BWD>(dy, x, out, s1, s2, sb, P, r0, r1, S);
}

// ---- "nsc": rows of C channels; block (n, k) covers spatial positions [k·S/B, (k+1)·S/B) of sample n -----

struct Repeated {  // a per-channel array repeated to length C + VB, so lanes c0..c0+VB-1 are one load
  std::vector<float> v;
  Repeated(const float* src, int64_t C) : v(C + VB) {
    for (int64_t j = 0; j < C + VB; ++j) v[j] = src[j % C];
  }
  vf at(int64_t c0) const { return F32::load(v.data() + c0, VB); }
};

inline void block_range(int64_t S, int64_t B, int64_t k, int64_t* s0, int64_t* s1) {
  *s0 = S * k / B;
  *s1 = S * (k + 1) / B;
}

template <class IO>
void fwd_nsc_block(const typename IO::T* x, typename IO::T* y, const Repeated& d, const Repeated& p,
                   const Repeated& b, int64_t C, int64_t s0, int64_t s1) {
  const int64_t L = (s1 - s0) * C;
  x += s0 * C;
  y += s0 * C;
  int64_t c0 = 0;
  for (int64_t i = 0; i < L; i += VB) {
    const int64_t n = L - i < VB ? L - i : VB;
    IO::store(y + i, fwd_math(IO::load(x + i, n), d.at(c0), p.at(c0), b.at(c0)), n);
    c0 = (c0 + VB) % C;
  }
}

template <class IO>
void bwd_nsc_block(const typename IO::T* dy, const typename IO::T* x, typename IO::T* dx, float* s1, float* s2,
                   float* sb, const Repeated& d, const Repeated& p, const Repeated& b, int64_t C, int64_t s0,
                   int64_t s1_) {
  const int64_t L = (s1_ - s0) * C;
  x += s0 * C;
  dy += s0 * C;
  dx += s0 * C;
  std::vector<float> acc(3 * (C + VB), 0.0f);
  float *a1 = acc.data(), *a2 = a1 + C + VB, *ab = a2 + C + VB;
  int64_t c0 = 0;
  for (int64_t i = 0; i < L; i += VB) {
    const int64_t n = L - i < VB ? L - i : VB;
    Grads g = bwd_math(IO::load(dy + i, n), IO::load(x + i, n), d.at(c0), p.at(c0), b.at(c0));
    IO::store(dx + i, g.dx, n);
    F32::store(a1 + c0, F32::load(a1 + c0, VB) + g.s1, VB);
    F32::store(a2 + c0, F32::load(a2 + c0, VB) + g.s2, VB);
    F32::store(ab + c0, F32::load(ab + c0, VB) + g.sb, VB);
    c0 = (c0 + VB) % C;
  }
  for (int64_t c = 0; c < C; ++c) s1[c] = s2[c] = sb[c] = 0.0f;
  for (int64_t j = 0; j < C + VB; ++j) s1[j % C] += a1[j], s2[j % C] += a2[j], sb[j % C] += ab[j];
}

inline std::vector<float> difference(const float* p1, const float* p2, int64_t C) {  // d = p1 - p2
  std::vector<float> d(C);
  for (int64_t c = 0; c < C; ++c) d[c] = p1[c] - p2[c];
  return d;
}

// Final gradients from partial sums laid out (N, K, C) (K = 1 row per (n, c) for "ncs", K blocks per
// sample for "nsc"), summed in a fixed order: g1 = Σ s1, g2 = Σ sx - g1 over (n, k); gb over k, and over
// n too unless β is per sample.
inline void finish(const float* s1, const float* sx, const float* sb, float* g1, float* g2, float* gb, int64_t N,
                   int64_t K, int64_t C, bool per_sample) {
  for (int64_t c = 0; c < C; ++c) g1[c] = g2[c] = 0.0f;
  for (int64_t n = 0; n < (per_sample ? N : 1) * C; ++n) gb[n] = 0.0f;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t q = (n * K + k) * C;
      float* gbn = gb + (per_sample ? n * C : 0);
      for (int64_t c = 0; c < C; ++c) g1[c] += s1[q + c], g2[c] += sx[q + c], gbn[c] += sb[q + c];
    }
  }
  for (int64_t c = 0; c < C; ++c) g2[c] -= g1[c];
}

template <class IO>
void fwd_ncs(const void* x, void* y, const float* p1, const float* p, const float* b, int64_t N, int64_t C,
             int64_t S, int per_sample, int64_t blocks, int threads) {
  using T = typename IO::T;
  const std::vector<float> d = difference(p1, p, C);
  const RowParams P{d.data(), p, b, C, N * C, per_sample != 0};
  const int64_t R = N * C;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t k = 0; k < blocks; ++k)
    rows<IO, false>(nullptr, (const T*)x, (T*)y, nullptr, nullptr, nullptr, P, R * k / blocks,
                    R * (k + 1) / blocks, S);
}

template <class IO>
void bwd_ncs(const void* dy, const void* x, void* dx, float* g1, float* g2, float* gb, const float* p1,
             const float* p, const float* b, int64_t N, int64_t C, int64_t S, int per_sample, int64_t blocks,
             int threads) {
  using T = typename IO::T;
  const std::vector<float> d = difference(p1, p, C);
  const RowParams P{d.data(), p, b, C, N * C, per_sample != 0};
  const int64_t R = N * C;
  std::unique_ptr<float[]> part(new float[3 * R]);  // every row's sums are written before they are read
  float *s1 = part.get(), *sx = s1 + R, *sb = sx + R;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t k = 0; k < blocks; ++k)
    rows<IO, true>((const T*)dy, (const T*)x, (T*)dx, s1, sx, sb, P, R * k / blocks, R * (k + 1) / blocks, S);
  finish(s1, sx, sb, g1, g2, gb, N, 1, C, per_sample != 0);
}

template <class IO>
void fwd_nsc(const void* x, void* y, const float* p1, const float* p, const float* b, int64_t N, int64_t C,
             int64_t S, int per_sample, int64_t blocks, int threads) {
  using T = typename IO::T;
  const std::vector<float> d = difference(p1, p, C);
  const Repeated dr(d.data(), C), pr(p, C);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t q = 0; q < N * blocks; ++q) {
    const int64_t n = q / blocks;
    int64_t s0, s1;
    block_range(S, blocks, q % blocks, &s0, &s1);
    const Repeated br(b + (per_sample ? n * C : 0), C);
    fwd_nsc_block<IO>((const T*)x + n * S * C, (T*)y + n * S * C, dr, pr, br, C, s0, s1);
  }
}

template <class IO>
void bwd_nsc(const void* dy, const void* x, void* dx, float* g1, float* g2, float* gb, const float* p1,
             const float* p, const float* b, int64_t N, int64_t C, int64_t S, int per_sample, int64_t blocks,
             int threads) {
  using T = typename IO::T;
  const std::vector<float> d = difference(p1, p, C);
  const Repeated dr(d.data(), C), pr(p, C);
  const int64_t Q = N * blocks * C;
  std::unique_ptr<float[]> part(new float[3 * Q]);  // every block's sums are written before they are read
  float *s1 = part.get(), *sx = s1 + Q, *sb = sx + Q;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t q = 0; q < N * blocks; ++q) {
    const int64_t n = q / blocks, off = n * S * C;
    int64_t a, e;
    block_range(S, blocks, q % blocks, &a, &e);
    const Repeated br(b + (per_sample ? n * C : 0), C);
    bwd_nsc_block<IO>((const T*)dy + off, (const T*)x + off, (T*)dx + off, s1 + q * C, sx + q * C, sb + q * C,
                      dr, pr, br, C, a, e);
  }
  finish(s1, sx, sb, g1, g2, gb, N, blocks, C, per_sample != 0);
}

}  // namespace

// C ABI for ctypes. x, y, dy, dx: dense 3-D storage in the named layout and dtype; p1, p2: (C,) fp32; β: (C,)
// or (N, C) fp32 (per_sample). Backward writes the fp32 gradients of p1 and p2, (C,), and of β, β's shape.
#define ACON_EXPORT(NAME, LAYOUT, IO)                                                                                \
  extern "C" void acon_fwd_##NAME(const void* x, void* y, const float* p1, const float* p, const float* b,      \
                                  int64_t N, int64_t C, int64_t S, int ps, int64_t blocks, int threads) {      \
    fwd_##LAYOUT<IO>(x, y, p1, p, b, N, C, S, ps, blocks, threads);                                            \
  }                                                                                                            \
  extern "C" void acon_bwd_##NAME(const void* dy, const void* x, void* dx, float* g1, float* g2, float* gb,    \
                                  const float* p1, const float* p, const float* b, int64_t N, int64_t C,       \
                                  int64_t S, int ps, int64_t blocks, int threads) {                            \
    bwd_##LAYOUT<IO>(dy, x, dx, g1, g2, gb, p1, p, b, N, C, S, ps, blocks, threads);                           \
  }

ACON_EXPORT(ncs_f32, ncs, F32)
ACON_EXPORT(ncs_bf16, ncs, BF16)
ACON_EXPORT(nsc_f32, nsc, F32)
ACON_EXPORT(nsc_bf16, nsc, BF16)

extern "C" int acon_abi_version() { return 2; }

// ACON-C forward and backward CPU kernels for acon.fused.native (built on first use, loaded with ctypes).
//
// Math (in fp32 whatever the storage type): d = p1 - p2, u = d·x, z = β·u, s = σ(z),
//   y = u·s + p2·x
//   t = u·σ'(z) = u·s·(1 - s), g = s + β·t = ∂(u·s)/∂u
//   dx = dy·(d·g + p2);  with gx = dy·x: dp1 = Σ gx·g, dp2 = Σ gx - dp1, dβ = d·Σ gx·t,
//   since d is constant along each summed row; so only Σ gx·g, Σ gx·t and Σ gx are accumulated.
//   (Σ gx·g is not split into Σ gx·s + β·Σ gx·t: gx·t can overflow, or be 0 where β is ±inf, where gx·g
//   does not, as in the reference formula.)
//   The contiguous ("ncs") kernels run bwd_math_bd on β·d: z = (β·d)·x, t' = x·σ'(z) = t/d, and dβ =
//   d·(d·Σ gx·t'), one multiplication less per chunk. Where d·Σ gx·t' is not finite (x·x can overflow where
//   d·x·x does not, e.g. at d = 0), that row's sum is taken again in bwd_math's form, so NaN
//   and ±Inf come out as the reference formula gives them.
//
// Layouts (x viewed as 3-D, dense):
//   "ncs": rows of S contiguous values, one row per (n, c). Work is cut into chunks of one vector (VB
//          values) laid end to end over the rows, so short rows cost no scalar tail: a chunk that crosses
//          a row boundary blends the two rows' parameters. Most rows run row by row instead, their tails
//          gathered across VB rows (acon_rows_aligned.h says which: all with 8 lanes, whole vectors and 7×7
//          with 16). Rows shorter than a vector (S < VB) run as "nsc" with one position of C·S channels, on
//          parameters repeated S times.
//   "nsc": rows of C contiguous channels, one row per (n, s). Parameters are read from arrays of length
//          C + VB that repeat the channels, so a chunk crossing a row boundary needs one plain load.
// Reductions are per row (ncs; VB finished rows at a time) or per (n, block of s) (nsc) in a fixed order,
// so results do not depend on thread timing. The "ncs" row walkers are in acon_rows.h and acon_rows_aligned.h;
// BatchNorm followed by ACON-C (acon.fused.bn_act) in bn_acon_cpu.h, included at the end. Portable GCC/Clang
// vector extensions sized to the ISA (AVX-512, AVX2, SSE or NEON).
// No fast-math: NaN and ±Inf propagate as IEEE arithmetic of these formulas gives them (see vexp_neg and
// vsigmoid; acon.fused.native's docstring states the convention against the reference formula).

#include "acon_rows.h"
#include "acon_rows_aligned.h"

namespace {

// ---- "ncs" with rows of S >= VB values: row kernels for walk_rows (acon_rows.h) ----------------------
// Parameters per row: d = p1 - p2 and p2 per channel, β (forward) or β·d (backward) per channel or per sample.

template <class IO>
struct AconFwdRows {  // y = ACON-C(x)
  static constexpr int NP = 3, NQ = 0;
  const typename IO::T* __restrict__ x;
  typename IO::T* __restrict__ y;
  template <bool FULL>
  Vecs<NQ> chunk(int64_t i, int64_t n, const Vecs<NP>& q) const {
    store_chunk<IO, FULL>(y + i, fwd_math(load_chunk<IO, FULL>(x + i, n), q[0], q[1], q[2]), n);
    return {};
  }
  Vecs<NQ> lanes(int64_t o, vi idx, int64_t n, const Vecs<NP>& q) const {
    scatter_lanes<IO>(y + o, idx, n, fwd_math(gather_lanes<IO>(x + o, idx, n), q[0], q[1], q[2]));
    return {};
  }
};

template <class IO>
struct AconBwdRows {  // dx, and the row sums Σ gx·g, Σ gx·t', Σ gx (see bwd_math_bd: parameters d, p2, β·d)
  static constexpr int NP = 3, NQ = 3;
  const typename IO::T *__restrict__ dy, *__restrict__ x;
  typename IO::T* __restrict__ dx;
  template <bool FULL>
  Vecs<NQ> chunk(int64_t i, int64_t n, const Vecs<NP>& q) const {
    const Grads g = bwd_math_bd(load_chunk<IO, FULL>(dy + i, n), load_chunk<IO, FULL>(x + i, n), q[0], q[1], q[2]);
    store_chunk<IO, FULL>(dx + i, g.dx, n);
    return {g.gs, g.gt, g.gx};
  }
  Vecs<NQ> lanes(int64_t o, vi idx, int64_t n, const Vecs<NP>& q) const {
    const vf dyv = gather_lanes<IO>(dy + o, idx, n), xv = gather_lanes<IO>(x + o, idx, n);
    const Grads g = bwd_math_bd(dyv, xv, q[0], q[1], q[2]);
    scatter_lanes<IO>(dx + o, idx, n, g.dx);
    return {g.gs, g.gt, g.gx};
  }
};

template <class IO>
struct AconBetaRows {  // the row sums Σ gx·t in bwd_math's form (parameters d, p2, β), nothing stored
  static constexpr int NP = 3, NQ = 1;
  const typename IO::T *__restrict__ dy, *__restrict__ x;
  template <bool FULL>
  Vecs<NQ> chunk(int64_t i, int64_t n, const Vecs<NP>& q) const {
    return {bwd_math(load_chunk<IO, FULL>(dy + i, n), load_chunk<IO, FULL>(x + i, n), q[0], q[1], q[2]).gt};
  }
};

// ---- "nsc": rows of C channels; block (n, k) covers spatial positions [k·S/B, (k+1)·S/B) of sample n -----

struct Aligned {  // n zeroed floats starting on a vector boundary, so vector loads at multiples of VB never split
  std::unique_ptr<float[]> buf;
  float* v;
  explicit Aligned(int64_t n) : buf(new float[n + VB]()) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(buf.get()), w = sizeof(vf);
    v = reinterpret_cast<float*>((a + w - 1) / w * w);
  }
};

struct Repeated {  // a per-channel array repeated to length C + VB, so lanes c0..c0+VB-1 are one load
  Aligned a;
  Repeated(const float* src, int64_t C) : a(C + VB) {
    for (int64_t j = 0; j < C + VB;)  // no division per element: this runs once per sample and block
      for (int64_t c = 0; c < C && j < C + VB; ++c, ++j) a.v[j] = src[c];
  }
  vf at(int64_t c0) const { return F32::load(a.v + c0, VB); }
};

struct BetaRepeated {  // β as Repeated arrays: one shared copy when per channel, else one per sample
  const float* b;
  int64_t C;
  bool per_sample;
  Repeated shared;
  BetaRepeated(const float* b_, int64_t C_, bool per_sample_)
      : b(b_), C(C_), per_sample(per_sample_), shared(b_, C_) {}
  const Repeated& of(int64_t n, std::unique_ptr<Repeated>& own) const {  // `own` keeps sample n's copy alive
    if (!per_sample) return shared;
    own.reset(new Repeated(b + n * C, C));
    return *own;
  }
};

inline int64_t next_channel(int64_t c0, int64_t C) {  // (c0 + VB) % C without a division per chunk
  for (c0 += VB; c0 >= C;) c0 -= C;
  return c0;
}

inline void block_range(int64_t S, int64_t B, int64_t k, int64_t* s0, int64_t* s1) {
  *s0 = S * k / B;
  *s1 = S * (k + 1) / B;
}

// Chunks of VB values over a block's rows of C channels; the last chunk may be partial. Full chunks use
// fixed-size loads and stores (a runtime size would turn each into a library copy).
template <class IO>
void fwd_nsc_block(const typename IO::T* x, typename IO::T* y, const Repeated& d, const Repeated& p,
                   const Repeated& b, int64_t C, int64_t s0, int64_t s1) {
  const int64_t L = (s1 - s0) * C, full = L / VB * VB;
  x += s0 * C;
  y += s0 * C;
  int64_t c0 = 0;
  for (int64_t i = 0; i < full; i += VB) {
    IO::store(y + i, fwd_math(IO::load(x + i, VB), d.at(c0), p.at(c0), b.at(c0)), VB);
    c0 = next_channel(c0, C);
  }
  if (full < L) IO::store(y + full, fwd_math(IO::load(x + full, L - full), d.at(c0), p.at(c0), b.at(c0)), L - full);
}

template <class IO>
void bwd_nsc_block(const typename IO::T* dy, const typename IO::T* x, typename IO::T* dx, float* ss, float* st,
                   float* sx, const Repeated& d, const Repeated& p, const Repeated& b, int64_t C, int64_t s0,
                   int64_t s1) {
  const int64_t L = (s1 - s0) * C, full = L / VB * VB;
  x += s0 * C;
  dy += s0 * C;
  dx += s0 * C;
  const int64_t W = (C + 2 * VB - 1) / VB * VB;  // C + VB rounded up to whole vectors
  Aligned acc(3 * W);
  float *a1 = acc.v, *a2 = a1 + W, *ab = a2 + W;
  auto step = [&](int64_t i, int64_t n, int64_t c0) {
    Grads g = bwd_math(IO::load(dy + i, n), IO::load(x + i, n), d.at(c0), p.at(c0), b.at(c0));
    IO::store(dx + i, g.dx, n);
    if (n < VB) {  // lanes past the data hold x = dy = 0, whose terms are NaN for an infinite parameter
      const vi m = LANE < (int32_t)n;
      g.gs = m ? g.gs : vf{}, g.gt = m ? g.gt : vf{}, g.gx = m ? g.gx : vf{};
    }
    F32::store(a1 + c0, F32::load(a1 + c0, VB) + g.gs, VB);
    F32::store(a2 + c0, F32::load(a2 + c0, VB) + g.gt, VB);
    F32::store(ab + c0, F32::load(ab + c0, VB) + g.gx, VB);
  };
  int64_t c0 = 0;
  for (int64_t i = 0; i < full; i += VB) {
    step(i, VB, c0);
    c0 = next_channel(c0, C);
  }
  if (full < L) step(full, L - full, c0);
  for (int64_t c = 0; c < C; ++c) ss[c] = a1[c], st[c] = a2[c], sx[c] = ab[c];
  for (int64_t j = C, c = 0; j < C + VB; ++j, c = c + 1 == C ? 0 : c + 1)  // the repeated lanes past C
    ss[c] += a1[j], st[c] += a2[j], sx[c] += ab[j];
}

template <class IO>
void fwd_ncs_rows(const void* x, void* y, const float* p1, const float* p, const float* b, int64_t N, int64_t C,
                  int64_t S, int per_sample, int64_t blocks, int threads) {
  using T = typename IO::T;
  const std::vector<float> d = difference(p1, p, C);
  const RowParams<3> P{{d.data(), p, b}, {false, false, per_sample != 0}};
  const AconFwdRows<IO> k{(const T*)x, (T*)y};
  walk_blocks_by_rule<IO, false>(k, P, nullptr, N * C, C, S, blocks, threads);
}

template <class IO>
void bwd_ncs_rows(const void* dy, const void* x, void* dx, float* g1, float* g2, float* gb, const float* p1,
                  const float* p, const float* b, int64_t N, int64_t C, int64_t S, int per_sample, int64_t blocks,
                  int threads) {
  using T = typename IO::T;
  const std::vector<float> d = difference(p1, p, C);
  std::vector<float> bd((per_sample ? N : 1) * C);  // β·d per channel, or per sample and channel
  for (int64_t n = 0, j = 0; n < (per_sample ? N : 1); ++n)
    for (int64_t c = 0; c < C; ++c, ++j) bd[j] = b[j] * d[c];
  const RowParams<3> P{{d.data(), p, bd.data()}, {false, false, per_sample != 0}};
  const int64_t R = N * C;
  float* sums[3] = {scratch(3 * R), sums[0] + R, sums[1] + R};  // every row's sums are written before being read
  const AconBwdRows<IO> k{(const T*)dy, (const T*)x, (T*)dx};
  walk_blocks_by_rule<IO, true>(k, P, sums, R, C, S, blocks, threads);
  // Σ gx·t = d·Σ gx·t' per row; where that is not finite (x·x overflowed where d·x·x need not, or a NaN),
  // the row's sum in bwd_math's own form, so NaN and ±Inf come out as the reference formula gives them
  // (a vectorised pass without a division per row, then a search only when something is not finite)
  bool finite = true;
  for (int64_t n = 0; n < N; ++n) {
    float* t = sums[1] + n * C;
    for (int64_t c = 0; c < C; ++c) t[c] *= d[c], finite &= std::isfinite(t[c]);
  }
  const RowParams<3> Pb{{d.data(), p, b}, {false, false, per_sample != 0}};
  for (int64_t r = 0; !finite && r < R; ++r)
    if (!std::isfinite(sums[1][r]))
      walk_rows(AconBetaRows<IO>{(const T*)dy, (const T*)x}, Pb, sums + 1, C, S, r, r + 1);
  finish(sums[0], sums[1], sums[2], d.data(), g1, g2, gb, N, 1, C, per_sample != 0);
}

template <class IO>
void fwd_nsc(const void* x, void* y, const float* p1, const float* p, const float* b, int64_t N, int64_t C,
             int64_t S, int per_sample, int64_t blocks, int threads) {
  using T = typename IO::T;
  const std::vector<float> d = difference(p1, p, C);
  const Repeated dr(d.data(), C), pr(p, C);
  const BetaRepeated beta(b, C, per_sample != 0);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t q = 0; q < N * blocks; ++q) {
    const int64_t n = q / blocks;
    int64_t s0, s1;
    block_range(S, blocks, q % blocks, &s0, &s1);
    std::unique_ptr<Repeated> own;
    const Repeated& br = beta.of(n, own);
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
  const BetaRepeated beta(b, C, per_sample != 0);
  const int64_t Q = N * blocks * C;
  float *ss = scratch(3 * Q), *st = ss + Q, *sx = st + Q;  // every block's sums are written before being read
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t q = 0; q < N * blocks; ++q) {
    const int64_t n = q / blocks, off = n * S * C;
    int64_t a, e;
    block_range(S, blocks, q % blocks, &a, &e);
    std::unique_ptr<Repeated> own;
    const Repeated& br = beta.of(n, own);
    bwd_nsc_block<IO>((const T*)dy + off, (const T*)x + off, (T*)dx + off, ss + q * C, st + q * C, sx + q * C,
                      dr, pr, br, C, a, e);
  }
  finish(ss, st, sx, d.data(), g1, g2, gb, N, blocks, C, per_sample != 0);
}

// ---- "ncs" with rows shorter than a vector (S < VB) ------------------------------------------------
// Sample n is then one run of C·S values whose parameters repeat each channel's S times: the "nsc" layout
// with C·S channels, N positions of one sample (or, when β is per sample, one position of N samples).
// The parameters are expanded so, and each channel's S sums folded.

struct Expanded {  // p1, p2 and β with every channel's value repeated S times, and the "nsc" run over them
  std::vector<float> p1, p2, b;
  int64_t n, s, blocks;  // samples, positions per sample and blocks per sample of that run
  Expanded(const float* p1_, const float* p2_, const float* b_, int64_t N, int64_t C, int64_t S, bool per_sample,
           int threads)
      : p1(C * S), p2(C * S), b((per_sample ? N : 1) * C * S), n(per_sample ? N : 1), s(per_sample ? 1 : N),
        blocks(per_sample ? 1 : (N < threads ? N : threads)) {
    for (int64_t c = 0, j = 0; c < C; ++c)
      for (int64_t k = 0; k < S; ++k, ++j) p1[j] = p1_[c], p2[j] = p2_[c];
    for (int64_t c = 0, j = 0; c < (per_sample ? N : 1) * C; ++c)
      for (int64_t k = 0; k < S; ++k, ++j) b[j] = b_[c];
  }
};

inline void fold(const std::vector<float>& src, float* dst, int64_t rows, int64_t S) {  // dst[r] = Σ of S values
  for (int64_t r = 0; r < rows; ++r) {
    float acc = 0.0f;
    for (int64_t k = 0; k < S; ++k) acc += src[r * S + k];
    dst[r] = acc;
  }
}

template <class IO>
void fwd_ncs(const void* x, void* y, const float* p1, const float* p, const float* b, int64_t N, int64_t C,
             int64_t S, int per_sample, int64_t blocks, int threads) {
  if (S >= VB) return fwd_ncs_rows<IO>(x, y, p1, p, b, N, C, S, per_sample, blocks, threads);
  const Expanded e(p1, p, b, N, C, S, per_sample != 0, threads);
  fwd_nsc<IO>(x, y, e.p1.data(), e.p2.data(), e.b.data(), e.n, C * S, e.s, per_sample, e.blocks, threads);
}

template <class IO>
void bwd_ncs(const void* dy, const void* x, void* dx, float* g1, float* g2, float* gb, const float* p1,
             const float* p, const float* b, int64_t N, int64_t C, int64_t S, int per_sample, int64_t blocks,
             int threads) {
  if (S >= VB) return bwd_ncs_rows<IO>(dy, x, dx, g1, g2, gb, p1, p, b, N, C, S, per_sample, blocks, threads);
  const Expanded e(p1, p, b, N, C, S, per_sample != 0, threads);
  std::vector<float> e1(C * S), e2(C * S), eb(e.b.size());
  bwd_nsc<IO>(dy, x, dx, e1.data(), e2.data(), eb.data(), e.p1.data(), e.p2.data(), e.b.data(), e.n, C * S, e.s,
              per_sample, e.blocks, threads);
  fold(e1, g1, C, S);
  fold(e2, g2, C, S);
  fold(eb, gb, (per_sample ? N : 1) * C, S);
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

extern "C" int acon_abi_version() { return 5; }
// Whether rows of S values take the aligned walker (acon_rows_aligned.h) in the fp32 or bf16, forward or
// backward kernels of this build.
extern "C" int acon_aligned_rows(int64_t S, int bf16, int backward) {
  return bf16 ? aligned_rows_serve<BF16>(S, backward != 0) : aligned_rows_serve<F32>(S, backward != 0);
}
extern "C" int acon_vector_width() { return int(VB); }  // floats per vector chunk: 16, 8 or 4

#include "bn_acon_cpu.h"  // BatchNorm + ACON-C (acon.fused.bn_act): its kernels and exports
#include "meta_rows.h"  // Meta-ACON-C (acon.fused.meta_native): spatial mean, β network, row-gradient pass

// BatchNorm followed by ACON-C in as few passes as the math allows, for contiguous (N, C, S) x with rows of
// S >= VB values (acon.fused.bn_act). Included once, by acon_cpu.cpp; exports at the end.
//
// With per-channel mean m, 1/std v, BatchNorm weight w and bias β0, and a = v·w, b = β0 - m·a:
//   statistics: per row Σ(x - h) and Σ(x - h)² (h: the row's first value if finite, else 0) in fp32
//               lanes, rows combined by Chan's formula in float64 (acon.fused.bn_act.row_moments);
//               then (bn_finish_stats) m, v, a, b in fp32 and the running statistics moved;
//   forward:    z = a·x + b on load, y = ACON-C(z); z is never written;
//   backward 1: z again, dz = ∂y/∂z·dy written (times an optional per-channel scale: eval BatchNorm's
//               dx = w·v·dz in this pass), and per row the ACON sums (acon_cpu.cpp's header, with z for
//               x) and BatchNorm's Σdz and Σdz·(x - m);
//   backward 2: dx = (dz - G - (x - m)·k)·w·v in place over dz, with G = Σdz/count (minus Meta-ACON's
//               per-row spatial-mean gradient) and k = v²·Σdz·(x - m)/count: torch's BatchNorm backward
//               (eval BatchNorm: no x term).
// The passes walk rows as the ACON-C kernels do (walk_blocks_by_rule: the aligned walker where
// aligned_rows_serve allows, with the backward rule for backward 1 and the forward rule for the others, which
// store or sum but not both), else the row walker. Per-row sums land in fixed slots and are combined over
// rows in a fixed order (float64 for BatchNorm's), so results do not depend on thread timing; where the
// aligned walker runs they do not depend on the thread count either. NaN and ±Inf propagate as IEEE
// arithmetic of these formulas gives them; the shift h is 0 for a non-finite first value, so an infinite x
// gives the statistics torch's do (an infinite mean and a NaN variance) rather than NaN from ∞ - ∞.

#pragma once

#include <cmath>

#include "acon_rows_aligned.h"

namespace {

template <class IO>
struct MomentRows {  // Σ(x - h), Σ(x - h)²
  static constexpr int NP = 1, NQ = 2;
  const typename IO::T* __restrict__ x;
  template <bool FULL>
  Vecs<NQ> chunk(int64_t i, int64_t n, const Vecs<NP>& q) const {
    const vf v = load_chunk<IO, FULL>(x + i, n) - q[0];
    return {v, v * v};
  }
  Vecs<NQ> lanes(int64_t o, vi idx, int64_t n, const Vecs<NP>& q) const {  // walk_rows_aligned's tails
    const vf v = gather_lanes<IO>(x + o, idx, n) - q[0];
    return {v, v * v};
  }
};

template <class IO>
struct BnAconFwdRows {  // parameters a, b, d, p2, β: y = ACON-C(a·x + b)
  static constexpr int NP = 5, NQ = 0;
  const typename IO::T* __restrict__ x;
  typename IO::T* __restrict__ y;
  template <bool FULL>
  Vecs<NQ> chunk(int64_t i, int64_t n, const Vecs<NP>& q) const {
    const vf z = q[0] * load_chunk<IO, FULL>(x + i, n) + q[1];
    store_chunk<IO, FULL>(y + i, fwd_math(z, q[2], q[3], q[4]), n);
    return {};
  }
  Vecs<NQ> lanes(int64_t o, vi idx, int64_t n, const Vecs<NP>& q) const {
    const vf z = q[0] * gather_lanes<IO>(x + o, idx, n) + q[1];
    scatter_lanes<IO>(y + o, idx, n, fwd_math(z, q[2], q[3], q[4]));
    return {};
  }
};

template <class IO>
struct BnAconBwdRows {  // parameters a, b, m, scale, d, p2, β: dz·scale, and the five row sums
  static constexpr int NP = 7, NQ = 5;
  const typename IO::T *__restrict__ dy, *__restrict__ x;
  typename IO::T* __restrict__ dz;
  template <bool FULL>
  Vecs<NQ> chunk(int64_t i, int64_t n, const Vecs<NP>& q) const {
    const vf xv = load_chunk<IO, FULL>(x + i, n);
    const Grads g = bwd_math(load_chunk<IO, FULL>(dy + i, n), q[0] * xv + q[1], q[4], q[5], q[6]);
    store_chunk<IO, FULL>(dz + i, g.dx * q[3], n);
    return {g.gs, g.gt, g.gx, g.dx, g.dx * (xv - q[2])};
  }
  Vecs<NQ> lanes(int64_t o, vi idx, int64_t n, const Vecs<NP>& q) const {
    const vf xv = gather_lanes<IO>(x + o, idx, n);
    const Grads g = bwd_math(gather_lanes<IO>(dy + o, idx, n), q[0] * xv + q[1], q[4], q[5], q[6]);
    scatter_lanes<IO>(dz + o, idx, n, g.dx * q[3]);
    return {g.gs, g.gt, g.gx, g.dx, g.dx * (xv - q[2])};
  }
};

template <class IO, bool WITH_X>
struct BnInputGradRows {  // parameters G, m, k, w·v: dx = (dz - G - (x - m)·k)·w·v, in place over dz
  static constexpr int NP = 4, NQ = 0;
  typename IO::T* dz;
  const typename IO::T* __restrict__ x;
  template <bool FULL>
  Vecs<NQ> chunk(int64_t i, int64_t n, const Vecs<NP>& q) const {
    vf v = load_chunk<IO, FULL>(dz + i, n) - q[0];
    if constexpr (WITH_X) v = v - (load_chunk<IO, FULL>(x + i, n) - q[1]) * q[2];
    store_chunk<IO, FULL>(dz + i, v * q[3], n);
    return {};
  }
  Vecs<NQ> lanes(int64_t o, vi idx, int64_t n, const Vecs<NP>& q) const {
    vf v = gather_lanes<IO>(dz + o, idx, n) - q[0];
    if constexpr (WITH_X) v = v - (gather_lanes<IO>(x + o, idx, n) - q[1]) * q[2];
    scatter_lanes<IO>(dz + o, idx, n, v * q[3]);
    return {};
  }
};

// Per-row mean (R values), per-channel mean and biased variance (C values each), all float64.
template <class IO>
void bn_moments(const void* xp, double* row_mean, double* mean, double* var, int64_t N, int64_t C, int64_t S,
                int64_t blocks, int threads) {
  using T = typename IO::T;
  const T* x = (const T*)xp;
  const int64_t R = N * C;
  float* s1 = scratch(3 * R);
  float *s2 = s1 + R, *h = s2 + R;
  for (int64_t r = 0; r < R; ++r) {
    const float first = IO::load(x + r * S, 1)[0];
    h[r] = first - first == 0.0f ? first : 0.0f;  // finite
  }
  float* sums[2] = {s1, s2};
  const RowParams<1> P{{h}, {true}};
  walk_blocks_by_rule<IO, false>(MomentRows<IO>{x}, P, sums, R, C, S, blocks, threads);
  for (int64_t c = 0; c < C; ++c) mean[c] = var[c] = 0.0;
  for (int64_t n = 0, r = 0; n < N; ++n)  // rows r = n·C + c, walked without a division per row
    for (int64_t c = 0; c < C; ++c, ++r) {
      row_mean[r] = double(s1[r]) / S + h[r];
      mean[c] += row_mean[r];
    }
  for (int64_t c = 0; c < C; ++c) mean[c] /= N;
  for (int64_t n = 0, r = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c, ++r) {
      double m2 = double(s2[r]) - double(s1[r]) * s1[r] / S;
      m2 = m2 < 0.0 ? 0.0 : m2;  // keeps NaN
      const double dm = row_mean[r] - mean[c];
      var[c] += m2 + S * dm * dm;
    }
  for (int64_t c = 0; c < C; ++c) var[c] /= double(N * S);
}

template <class IO>
void bn_acon_fwd(const void* x, void* y, const float* a, const float* b, const float* p1, const float* p,
                 const float* beta, int64_t N, int64_t C, int64_t S, int per_sample, int64_t blocks, int threads) {
  using T = typename IO::T;
  const std::vector<float> d = difference(p1, p, C);
  const RowParams<5> P{{a, b, d.data(), p, beta}, {false, false, false, false, per_sample != 0}};
  const BnAconFwdRows<IO> k{(const T*)x, (T*)y};
  walk_blocks_by_rule<IO, false>(k, P, nullptr, N * C, C, S, blocks, threads);
}

// ACON gradients g1, g2, gb as acon_bwd; BatchNorm's Σdz and Σdz·(x - m) per channel (float64).
template <class IO>
void bn_acon_bwd(const void* dy, const void* x, void* dz, float* g1, float* g2, float* gb, double* sum_dz,
                 double* sum_dzx, const float* a, const float* b, const float* m, const float* scale,
                 const float* p1, const float* p, const float* beta, int64_t N, int64_t C, int64_t S,
                 int per_sample, int64_t blocks, int threads) {
  using T = typename IO::T;
  const std::vector<float> d = difference(p1, p, C), ones(scale ? 0 : C, 1.0f);
  const RowParams<7> P{{a, b, m, scale ? scale : ones.data(), d.data(), p, beta},
                       {false, false, false, false, false, false, per_sample != 0}};
  const int64_t R = N * C;
  float* sums[5] = {scratch(5 * R)};
  for (int q = 1; q < 5; ++q) sums[q] = sums[q - 1] + R;  // every row's sums are written before being read
  const BnAconBwdRows<IO> k{(const T*)dy, (const T*)x, (T*)dz};
  walk_blocks_by_rule<IO, true>(k, P, sums, R, C, S, blocks, threads);
  finish(sums[0], sums[1], sums[2], d.data(), g1, g2, gb, N, 1, C, per_sample != 0);
  for (int64_t c = 0; c < C; ++c) sum_dz[c] = sum_dzx[c] = 0.0;
  for (int64_t n = 0, r = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c, ++r) sum_dz[c] += sums[3][r], sum_dzx[c] += sums[4][r];
}

// means: float64 mean of dz and of dz·(x - m) per channel (2·C values; x null: eval BatchNorm, no x
// term, means unused); row_grad: float64 per row (N·C) added to every dz of its row first, or null.
template <class IO>
void bn_input_grad(void* dz, const void* x, const double* means, const double* row_grad, const float* m,
                   const float* invstd, const float* scale, int64_t N, int64_t C, int64_t S, int64_t blocks,
                   int threads) {
  using T = typename IO::T;
  const int64_t R = N * C;
  std::vector<float> G(row_grad ? R : C), k(C);
  for (int64_t c = 0; c < C; ++c) k[c] = x ? float(means[C + c] * (double(invstd[c]) * invstd[c])) : 0.0f;
  for (int64_t n = 0, r = 0; n < (row_grad ? N : 1); ++n)
    for (int64_t c = 0; c < C; ++c, ++r) {
      const double g = x ? means[c] : 0.0;
      G[r] = float(row_grad ? g - row_grad[r] : g);
    }
  const RowParams<4> P{{G.data(), m, k.data(), scale}, {row_grad != nullptr, false, false, false}};
  if (x) walk_blocks_by_rule<IO, false>(BnInputGradRows<IO, true>{(T*)dz, (const T*)x}, P, nullptr, R, C, S,
                                        blocks, threads);
  else walk_blocks_by_rule<IO, false>(BnInputGradRows<IO, false>{(T*)dz, nullptr}, P, nullptr, R, C, S, blocks,
                                      threads);
}

// Per-channel mean, 1/std, scale = w/std and shift = b - mean·scale (out: 4·C floats, w, b null: 1, 0)
// from the float64 mean and biased variance, as acon.fused.bn_act computes them in fp32, and the running
// statistics (null: left alone) moved by `momentum` towards the mean and the variance times `unbias`.
inline void finish_stats(const double* mean, const double* var, float* running_mean, float* running_var,
                         double momentum, double unbias, double eps, const float* w, const float* b,
                            float* out, int64_t C) {
  float *om = out, *oi = out + C, *os = out + 2 * C, *ob = out + 3 * C;
  const float keep = float(1.0 - momentum), step = float(momentum), e = float(eps);
  for (int64_t c = 0; c < C; ++c) {
    const float mu = float(mean[c]);
    om[c] = mu;
    oi[c] = 1.0f / std::sqrt(float(var[c]) + e);
    os[c] = w ? oi[c] * w[c] : oi[c];
    ob[c] = (b ? b[c] : 0.0f) - mu * os[c];
    if (running_mean) running_mean[c] = running_mean[c] * keep + step * mu;
    if (running_var) running_var[c] = running_var[c] * keep + step * float(var[c] * unbias);
  }
}

}  // namespace

// C ABI for ctypes: x, y, dy, dz contiguous (N, C, S) in the named dtype with S >= acon_vector_width();
// per-channel parameters (C,) fp32; β (C,) or (N, C) fp32 (ps); scale, x, row_grad: may be null.
#define BN_ACON_EXPORT(NAME, IO)                                                                               \
  extern "C" void bn_moments_##NAME(const void* x, double* row_mean, double* mean, double* var, int64_t N,     \
                                    int64_t C, int64_t S, int64_t blocks, int threads) {                       \
    bn_moments<IO>(x, row_mean, mean, var, N, C, S, blocks, threads);                                         \
  }                                                                                                            \
  extern "C" void bn_acon_fwd_##NAME(const void* x, void* y, const float* a, const float* b, const float* p1,  \
                                     const float* p2, const float* beta, int64_t N, int64_t C, int64_t S,      \
                                     int ps, int64_t blocks, int threads) {                                    \
    bn_acon_fwd<IO>(x, y, a, b, p1, p2, beta, N, C, S, ps, blocks, threads);                                  \
  }                                                                                                            \
  extern "C" void bn_acon_bwd_##NAME(const void* dy, const void* x, void* dz, float* g1, float* g2, float* gb, \
                                     double* sum_dz, double* sum_dzx, const float* a, const float* b,          \
                                     const float* m, const float* scale, const float* p1, const float* p2,     \
                                     const float* beta, int64_t N, int64_t C, int64_t S, int ps,               \
                                     int64_t blocks, int threads) {                                            \
    bn_acon_bwd<IO>(dy, x, dz, g1, g2, gb, sum_dz, sum_dzx, a, b, m, scale, p1, p2, beta, N, C, S, ps, blocks, \
                    threads);                                                                                  \
  }                                                                                                            \
  extern "C" void bn_input_grad_##NAME(void* dz, const void* x, const double* means, const double* row_grad,   \
                                       const float* m, const float* invstd, const float* scale, int64_t N,     \
                                       int64_t C, int64_t S, int64_t blocks, int threads) {                    \
    bn_input_grad<IO>(dz, x, means, row_grad, m, invstd, scale, N, C, S, blocks, threads);                    \
  }

BN_ACON_EXPORT(ncs_f32, F32)
BN_ACON_EXPORT(ncs_bf16, BF16)

extern "C" void bn_finish_stats(const double* mean, const double* var, float* running_mean, float* running_var,
                                double momentum, double unbias, double eps, const float* w, const float* b,
                                float* out, int64_t C) {
  finish_stats(mean, var, running_mean, running_var, momentum, unbias, eps, w, b, out, C);
}

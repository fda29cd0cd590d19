// Meta-ACON-C's own work around the ACON-C kernels, for acon.fused.meta_native: the spatial mean of x (one
// read), the β network σ(bn2(fc2(bn1(fc1(mean))))) and its backward on (N, C) rows, and the spatial-mean
// gradient added to dx in place (one read and one write). Included once, at the end of acon_cpu.cpp.
//
// β network (building blocks in meta_net.h). fc1 (H × C) and fc2 (C × H) run as vector dot products or row
// updates on copies of the weights whose rows are padded with zeros to whole vectors. The BatchNorms follow
// torch.batch_norm: batch statistics (biased variance, float64 sums) or the running ones, and, when asked,
// the running statistics moved by `momentum` towards the batch mean and unbiased variance (the bookkeeping —
// which of these applies, momentum or cumulative average, num_batches_tracked — is BatchNorm2dB1's, in Python).
// Backward is torch's: σ' = β(1 - β), BatchNorm's (dz - mean(dz) - x̂·mean(dz·x̂))·γ/σ with batch statistics
// (γ/σ·dz with running ones), and the products' transposes.
//
// Layouts and order. x is "ncs" (rows of S values) or "nsc" (rows of C channels), fp32 or bf16. Each row's
// (or each sample's, "nsc") sum runs in one fixed order whatever the blocks and the thread count, and so does
// every other sum. NaN and ±Inf propagate as IEEE arithmetic of these formulas gives them (σ as in
// acon_math.h; masked lanes are selected away, never multiplied by 0).

#pragma once

#include "acon_rows_aligned.h"
#include "meta_net.h"

namespace {

// ---- spatial sums and the row-gradient pass over x / dx -------------------------------------------------

template <class IO>
struct AddRows {  // dx += g of the row
  static constexpr int NP = 1, NQ = 0;
  typename IO::T* dx;
  template <bool FULL>
  Vecs<NQ> chunk(int64_t i, int64_t n, const Vecs<NP>& q) const {
    store_chunk<IO, FULL>(dx + i, load_chunk<IO, FULL>(dx + i, n) + q[0], n);
    return {};
  }
  Vecs<NQ> lanes(int64_t o, vi idx, int64_t n, const Vecs<NP>& q) const {  // walk_rows_aligned's tails
    scatter_lanes<IO>(dx + o, idx, n, gather_lanes<IO>(dx + o, idx, n) + q[0]);
    return {};
  }
};

// Sums of rows r0..r1-1 of S >= VB values: four accumulators over whole vectors, then the row's last VB values
// with the lanes already summed masked off; a row's sum is the same whatever rows share its block.
template <class IO>
META_COLD void row_sums(const typename IO::T* x, float* const* out, int64_t S, int64_t r0, int64_t r1) {
  RowSums<1> sums(out, r0);
  const vi tail = LANE >= (int32_t)(VB - S % VB);
  for (int64_t r = r0; r < r1; ++r) {
    const typename IO::T* p = x + r * S;
    vf a0{}, a1{}, a2{}, a3{};
    int64_t i = 0;
    for (; i + 4 * VB <= S; i += 4 * VB) {
      a0 += IO::load(p + i, VB), a1 += IO::load(p + i + VB, VB);
      a2 += IO::load(p + i + 2 * VB, VB), a3 += IO::load(p + i + 3 * VB, VB);
    }
    for (; i + VB <= S; i += VB) a0 += IO::load(p + i, VB);
    if (i < S) a1 += tail ? IO::load(p + S - VB, VB) : vf{};
    sums.park({(a0 + a1) + (a2 + a3)});
  }
  sums.flush();
}

// out[n·C + c] = Σ over the S values of (n, c).
template <class IO>
META_COLD void spatial_sums(const void* xp, bool nsc, float* out, int64_t N, int64_t C, int64_t S, int threads) {
  using T = typename IO::T;
  const T* x = (const T*)xp;
  const int64_t R = N * C;
  if (nsc) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t q = 0; q < N; ++q) {  // a sample as one run of S·C values; channel c0 + lane per chunk
      const int64_t n = q, L = S * C, full = L / VB * VB;
      std::vector<float> acc(C + VB, 0.0f);
      const T* xs = x + n * L;
      int64_t c0 = 0;
      for (int64_t i = 0; i < full; i += VB) {
        F32::store(acc.data() + c0, F32::load(acc.data() + c0, VB) + IO::load(xs + i, VB), VB);
        for (c0 += VB; c0 >= C;) c0 -= C;
      }
      if (full < L) F32::store(acc.data() + c0, F32::load(acc.data() + c0, VB) + IO::load(xs + full, L - full), VB);
      float* o = out + n * C;
      for (int64_t c = 0; c < C; ++c) o[c] = acc[c];
      for (int64_t j = C, c = 0; j < C + VB; ++j, c = c + 1 == C ? 0 : c + 1) o[c] += acc[j];
    }
  } else if (S < VB) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < R; ++r) {
      float acc = 0.0f;
      for (int64_t k = 0; k < S; ++k) acc += IO::load(x + r * S + k, 1)[0];  // constant sizes: no memcpy call
      out[r] = acc;
    }
  } else {
    float* sums[1] = {out};
    const int64_t blocks = std::min<int64_t>(R, 4 * threads);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; ++b) row_sums<IO>(x, sums, S, R * b / blocks, R * (b + 1) / blocks);
  }
}

// dx[n, c, ...] += g[n·C + c], in place.
template <class IO>
META_COLD void add_row_values(void* dxp, bool nsc, const float* g, int64_t N, int64_t C, int64_t S, int threads) {
  using T = typename IO::T;
  T* dx = (T*)dxp;
  const int64_t R = N * C;
  if (nsc) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t q = 0; q < N; ++q) {
      const int64_t n = q, L = S * C, full = L / VB * VB;
      std::vector<float> rep(C + VB);  // g of sample n repeated, so lanes c0..c0+VB-1 are one load
      for (int64_t j = 0, c = 0; j < C + VB; ++j, c = c + 1 == C ? 0 : c + 1) rep[j] = g[n * C + c];
      T* d = dx + n * L;
      int64_t c0 = 0;
      for (int64_t i = 0; i < full; i += VB) {
        IO::store(d + i, IO::load(d + i, VB) + F32::load(rep.data() + c0, VB), VB);
        for (c0 += VB; c0 >= C;) c0 -= C;
      }
      if (full < L) IO::store(d + full, IO::load(d + full, L - full) + F32::load(rep.data() + c0, VB), L - full);
    }
  } else if (S < VB) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t k = 0; k < S; ++k) IO::store(dx + r * S + k, IO::load(dx + r * S + k, 1) + splat(g[r]), 1);
  } else {
    const RowParams<1> P{{g}, {true}};
    const int64_t blocks = std::min<int64_t>(R, 4 * threads);
    walk_blocks_by_rule<IO, false>(AddRows<IO>{dx}, P, nullptr, R, C, S, blocks, threads);
  }
}

// ---- the β network --------------------------------------------------------------------------------------

// What forward saves for backward (fp32, one buffer of saved_floats(N, C, H)): the spatial mean (N × padded C),
// x̂ of bn1 (N × padded H) and of bn2 (N × padded C), and each BatchNorm's mean and 1/std.
struct Saved {
  Mat mean, xh1, xh2;
  float *mu1, *is1, *mu2, *is2;
  Saved(float* p, int64_t N, int64_t C, int64_t H)
      : mean{p, padded(C)}, xh1{p + N * padded(C), padded(H)}, xh2{xh1.p + N * padded(H), padded(C)} {
    mu1 = xh2.p + N * xh2.ld, is1 = mu1 + H, mu2 = is1 + H, is2 = mu2 + C;
  }
};

inline int64_t saved_floats(int64_t N, int64_t C, int64_t H) {
  return 2 * N * padded(C) + N * padded(H) + 2 * H + 2 * C;
}

// β = σ(x̂2·γ2 + β2), compact (N × C): forward and backward run this same code on the same saved x̂2, so
// backward's β is forward's to the bit.
META_COLD void beta_rows(const Mat& xh2, const float* g2, const float* e2, float* beta, int64_t N, int64_t C) {
  const Rows o = affine_rows(xh2, g2, e2, N, C);
  for (int64_t n = 0; n < N; ++n) {
    float* bn = beta + n * C;
    int64_t c = 0;
    for (; c + VB <= C; c += VB) F32::store(bn + c, vsigmoid(F32::load(o.row(n) + c, VB)), VB);
    if (c < C) F32::store(bn + c, vsigmoid(F32::load(o.row(n) + c, VB)), C - c);
  }
}

// The β network on the (N × C) spatial means `mean` (compact rows): β (compact N × C) and what backward needs
// (`save`); the running statistics moved as `bn1` and `bn2` ask.
META_COLD void net_forward(const float* mean, float* beta, float* save, const float* w1, const float* b1,
                           const float* w2, const float* b2, const BnArgs& bn1, const BnArgs& bn2, int64_t N,
                           int64_t C, int64_t H) {
  const Saved sv(save, N, C, H);
  std::memset(save, 0, saved_floats(N, C, H) * sizeof(float));
  for (int64_t n = 0; n < N; ++n) std::memcpy(sv.mean.row(n), mean + n * C, C * sizeof(float));
  dot_rows(sv.mean, padded_copy(w1, H, C), b1, sv.xh1, N, H);  // h1, normalised in place below
  bn_rows_stats(sv.xh1, bn1, sv.mu1, sv.is1, N, H);
  normalise_rows(sv.xh1, sv.mu1, sv.is1, N, H);
  // h2: row updates over whole vectors of C (a dot product of only H values per output would spend more on
  // its lane sums than on its products)
  const Rows o1 = affine_rows(sv.xh1, bn1.w, bn1.b, N, H);
  axpy_rows(o1.p, o1.ld, 1, N, H, transposed_copy(w2, C, H), sv.xh2);
  add_bias_rows(sv.xh2, b2, N, C);
  bn_rows_stats(sv.xh2, bn2, sv.mu2, sv.is2, N, C);
  normalise_rows(sv.xh2, sv.mu2, sv.is2, N, C);
  beta_rows(sv.xh2, bn2.w, bn2.b, beta, N, C);
}

template <class IO>
META_COLD void meta_forward(const void* x, bool nsc, float* beta, float* save, const float* w1, const float* b1,
                            const float* w2, const float* b2, const BnArgs& bn1, const BnArgs& bn2, int64_t N,
                            int64_t C, int64_t S, int64_t H, int threads) {
  std::vector<float> mean(N * C);
  spatial_sums<IO>(x, nsc, mean.data(), N, C, S, threads);
  const float inv = float(1.0 / double(S));  // the mean as torch's sum·(1/S)
  for (float& m : mean) m *= inv;
  net_forward(mean.data(), beta, save, w1, b1, w2, b2, bn1, bn2, N, C, H);
}

// Backward of net_forward given dβ and β (compact N × C): the parameters' gradients (grads: fc1 weight (H × C),
// fc1 bias, bn1 weight, bn1 bias (H), fc2 weight (C × H), fc2 bias, bn2 weight, bn2 bias (C)) and, if dmean is not
// null, the gradient of the mean rows (compact N × C).
META_COLD void net_backward(float* dmean, const float* dbeta, const float* beta, const float* save, const float* w1,
                            const float* w2, const float* g1, const float* e1, const float* g2, int batch1, int batch2,
                            float* const* grads, int64_t N, int64_t C, int64_t H) {
  const Saved sv((float*)save, N, C, H);
  const Rows w1p = padded_copy(w1, H, C), w2p = padded_copy(w2, C, H), o1 = affine_rows(sv.xh1, g1, e1, N, H);
  Rows dz2(N, C);
  for (int64_t n = 0; n < N; ++n) {  // σ'
    float* __restrict__ d = dz2.row(n);
    const float *__restrict__ b = beta + n * C, *__restrict__ db = dbeta + n * C;
    for (int64_t c = 0; c < C; ++c) d[c] = db[c] * ((1.0f - b[c]) * b[c]);
  }
  bn_rows_backward(dz2, sv.xh2, sv.is2, g2, batch2 != 0, grads[6], grads[7], N, C);
  {  // fc2: weight (C × H) = Σ_n dz2[n][c]·o1[n][:], bias = Σ_n dz2
    Rows dw(C, H);
    axpy_rows(dz2.p, 1, dz2.ld, C, N, o1, dw);
    copy_unpadded(dw, grads[4], C, H);
    column_sums(dz2, grads[5], N, C);
  }
  Rows dz1(N, H);  // o1's gradient dz2·W2, then h1's
  axpy_rows(dz2.p, dz2.ld, 1, N, C, w2p, dz1);
  bn_rows_backward(dz1, sv.xh1, sv.is1, g1, batch1 != 0, grads[2], grads[3], N, H);
  {  // fc1: weight (H × C) = Σ_n dz1[n][j]·mean[n][:], bias = Σ_n dz1
    Rows dw(H, C);
    axpy_rows(dz1.p, 1, dz1.ld, H, N, sv.mean, dw);
    copy_unpadded(dw, grads[0], H, C);
    column_sums(dz1, grads[1], N, H);
  }
  if (!dmean) return;
  Rows dm(N, C);
  axpy_rows(dz1.p, dz1.ld, 1, N, H, w1p, dm);
  for (int64_t n = 0; n < N; ++n) std::memcpy(dmean + n * C, dm.row(n), C * sizeof(float));
}

// net_backward on the spatial mean of x, and dx (if not null) += dmean/S.
template <class IO>
META_COLD void meta_backward(void* dx, bool nsc, const float* dbeta, const float* beta, const float* save,
                             const float* w1, const float* w2, const float* g1, const float* e1, const float* g2,
                             int batch1, int batch2, float* const* grads, int64_t N, int64_t C, int64_t S, int64_t H,
                             int threads) {
  std::vector<float> g(dx ? N * C : 0);
  net_backward(dx ? g.data() : nullptr, dbeta, beta, save, w1, w2, g1, e1, g2, batch1, batch2, grads, N, C, H);
  if (!dx) return;
  const float inv = float(1.0 / double(S));  // torch's sum·(1/S): the sum's gradient is dmean·(1/S)
  for (float& v : g) v *= inv;
  add_row_values<IO>(dx, nsc, g.data(), N, C, S, threads);
}

}  // namespace

// C ABI for ctypes. x, dx: dense (N, C, S) storage, "ncs" or "nsc" (nsc != 0), in the named dtype; every other
// array fp32 and contiguous; save: meta_saved_floats(N, C, H) floats; rm*, rv*: null for no running statistics;
// grads: the 8 gradient arrays listed at meta_backward; dx may be null.
#define META_EXPORT(NAME, IO)                                                                                  \
  extern "C" void meta_fwd_##NAME(const void* x, int nsc, float* beta, float* save, const float* w1,            \
                                  const float* b1, const float* g1, const float* e1, float* rm1, float* rv1,   \
                                  int batch1, double momentum1, double eps1, const float* w2, const float* b2, \
                                  const float* g2, const float* e2, float* rm2, float* rv2, int batch2,        \
                                  double momentum2, double eps2, int64_t N, int64_t C, int64_t S, int64_t H,   \
                                  int threads) {                                                               \
    const BnArgs bn1{g1, e1, rm1, rv1, batch1 != 0, momentum1, eps1};                                         \
    const BnArgs bn2{g2, e2, rm2, rv2, batch2 != 0, momentum2, eps2};                                         \
    meta_forward<IO>(x, nsc != 0, beta, save, w1, b1, w2, b2, bn1, bn2, N, C, S, H, threads);                  \
  }                                                                                                            \
  extern "C" void meta_bwd_##NAME(void* dx, int nsc, const float* dbeta, const float* beta, const float* save, \
                                  const float* w1, const float* g1, const float* e1, const float* w2,          \
                                  const float* g2, int batch1, int batch2, float* const* grads, int64_t N,     \
                                  int64_t C, int64_t S, int64_t H, int threads) {                              \
    meta_backward<IO>(dx, nsc != 0, dbeta, beta, save, w1, w2, g1, e1, g2, batch1, batch2, grads, N, C, S, H,  \
                      threads);                                                                                \
  }

META_EXPORT(f32, F32)
META_EXPORT(bf16, BF16)

extern "C" void meta_beta(const float* save, const float* g2, const float* e2, float* beta, int64_t N, int64_t C,
                          int64_t H) {  // β (compact N × C) from what forward saved
  beta_rows(Saved((float*)save, N, C, H).xh2, g2, e2, beta, N, C);
}

extern "C" int64_t meta_saved_floats(int64_t N, int64_t C, int64_t H) { return saved_floats(N, C, H); }

// The β network alone on given (N × C) spatial means (the BatchNorm+ACON op takes them from its statistics):
// meta_fwd/meta_bwd without the pass over x, with the mean's gradient written to dmean (compact N × C).
extern "C" void meta_net_fwd(const float* mean, float* beta, float* save, const float* w1, const float* b1,
                             const float* g1, const float* e1, float* rm1, float* rv1, int batch1, double momentum1,
                             double eps1, const float* w2, const float* b2, const float* g2, const float* e2,
                             float* rm2, float* rv2, int batch2, double momentum2, double eps2, int64_t N, int64_t C,
                             int64_t H) {
  const BnArgs bn1{g1, e1, rm1, rv1, batch1 != 0, momentum1, eps1};
  const BnArgs bn2{g2, e2, rm2, rv2, batch2 != 0, momentum2, eps2};
  net_forward(mean, beta, save, w1, b1, w2, b2, bn1, bn2, N, C, H);
}

extern "C" void meta_net_bwd(float* dmean, const float* dbeta, const float* beta, const float* save, const float* w1,
                             const float* g1, const float* e1, const float* w2, const float* g2, int batch1,
                             int batch2, float* const* grads, int64_t N, int64_t C, int64_t H) {
  net_backward(dmean, dbeta, beta, save, w1, w2, g1, e1, g2, batch1, batch2, grads, N, C, H);
}

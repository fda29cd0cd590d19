// The β network's building blocks for meta_rows.h (Meta-ACON-C): small dense products on zero-padded rows
// (every internal rows × K matrix has rows of padded(K) floats, zero past K, so no loop has a partial vector)
// and BatchNorm on (N, K) rows, forward (torch.batch_norm's statistics and running-statistics update) and
// backward (torch's native_batch_norm_backward). Included by meta_rows.h; sums run in fixed orders.

#pragma once

#include <algorithm>
#include <cmath>

#include "acon_rows.h"

// Out of line: GCC caps how much inlining may grow the translation unit, and this header's functions, inlined
// freely, used up the cap that the ACON-C kernels' per-chunk math needs (bwd_math and vexp_neg were then
// called, not inlined, and the ACON-C backward kernel ran about 15% slower). With these out of line the
// ACON-C row loops compile as without this header (only the once-per-call finish/difference stay calls).
#define META_COLD __attribute__((noinline))

namespace {

inline int64_t padded(int64_t k) { return (k + VB - 1) / VB * VB; }

// ---- small dense products on padded rows ---------------------------------------------------------------

struct Mat {  // rows of ld floats (ld = padded(K)), zero past K
  float* p;
  int64_t ld;
  float* row(int64_t r) const { return p + r * ld; }
};

struct Rows : Mat {  // a zeroed Mat that owns its memory
  std::vector<float> v;
  Rows(int64_t rows, int64_t K) : Mat{nullptr, padded(K)}, v(rows * padded(K), 0.0f) { p = v.data(); }
  Rows(Rows&& o) noexcept : Mat{o.p, o.ld}, v(std::move(o.v)) { p = v.data(); }
};

META_COLD Rows padded_copy(const float* src, int64_t rows, int64_t K) {
  Rows m(rows, K);
  for (int64_t r = 0; r < rows; ++r) std::memcpy(m.row(r), src + r * K, K * sizeof(float));
  return m;
}

META_COLD void copy_unpadded(const Mat& m, float* dst, int64_t rows, int64_t K) {
  for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + r * K, m.row(r), K * sizeof(float));
}

// out[n][m] = bias[m] + Σ_k a[n][k]·b[m][k] for m < M (zero past M); a, b padded to the same K. Two rows of a
// and VB/2 rows of b at a time: VB dot products in vector lanes (each b load serves two rows of a), then one
// transpose-and-add tree (acon_rows.h's sum_tree) gives their VB sums in one vector.
META_COLD void dot_rows(const Mat& a, const Mat& b, const float* bias, const Mat& out, int64_t N, int64_t M) {
  constexpr int HB = int(VB) / 2;
  const int64_t Kp = a.ld;
  std::vector<float> bp(padded(M) + VB, 0.0f);
  std::memcpy(bp.data(), bias, M * sizeof(float));
  for (int64_t n = 0; n < N; n += 2) {
    const float *a0 = a.row(n), *a1 = a.row(std::min<int64_t>(n + 1, N - 1));  // past N: discarded
    for (int64_t m0 = 0; m0 < M; m0 += HB) {
      const float* br[HB];
      for (int t = 0; t < HB; ++t) br[t] = b.row(std::min<int64_t>(m0 + t, M - 1));  // past M: discarded
      std::array<vf, VB> acc{};
      for (int64_t k = 0; k < Kp; k += VB) {
        const vf v0 = F32::load(a0 + k, VB), v1 = F32::load(a1 + k, VB);
        for (int t = 0; t < HB; ++t) {
          const vf bv = F32::load(br[t] + k, VB);
          acc[t] += v0 * bv, acc[t + HB] += v1 * bv;
        }
      }
      sum_tree<HB>(acc.data());  // lane t: row n, output m0 + t; lane HB + t: row n + 1
      float lanes[VB];
      F32::store(lanes, acc[0], VB);
      for (int r = 0; r < 2 && n + r < N; ++r)
        for (int t = 0; t < HB && m0 + t < M; ++t) out.row(n + r)[m0 + t] = lanes[r * HB + t] + bp[m0 + t];
    }
  }
}

// out[i][:] = Σ_k A(i, k)·b[k][:] over whole padded rows of b, with A(i, k) = a[i·ai + k·ak], k < K. Four rows
// of out and NV vectors of columns at a time (each b load serves four rows).
template <int NV>
inline void axpy_block(const float* a, int64_t ai, int64_t ak, int64_t i0, int64_t rows, int64_t K, const Mat& b,
                       int64_t col, const Mat& out) {
  const float* ar[4];
  for (int r = 0; r < 4; ++r) ar[r] = a + std::min<int64_t>(i0 + r, rows - 1) * ai;  // past rows: discarded
  std::array<vf, 4 * NV> acc{};
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = b.row(k) + col;
    vf bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = F32::load(bk + v * VB, VB);
    for (int r = 0; r < 4; ++r) {
      const vf s = splat(ar[r][k * ak]);
      for (int v = 0; v < NV; ++v) acc[r * NV + v] += s * bv[v];
    }
  }
  for (int r = 0; r < 4 && i0 + r < rows; ++r)
    for (int v = 0; v < NV; ++v) F32::store(out.row(i0 + r) + col + v * VB, acc[r * NV + v], VB);
}

META_COLD void axpy_rows(const float* a, int64_t ai, int64_t ak, int64_t rows, int64_t K, const Mat& b,
                         const Mat& out) {
  const int64_t vecs = b.ld / VB;
  for (int64_t i = 0; i < rows; i += 4) {
    int64_t v = 0;
    for (; v + 4 <= vecs; v += 4) axpy_block<4>(a, ai, ak, i, rows, K, b, v * VB, out);
    if (vecs - v == 3) axpy_block<3>(a, ai, ak, i, rows, K, b, v * VB, out);
    if (vecs - v == 2) axpy_block<2>(a, ai, ak, i, rows, K, b, v * VB, out);
    if (vecs - v == 1) axpy_block<1>(a, ai, ak, i, rows, K, b, v * VB, out);
  }
}

// The (K × rows) transpose of src (rows × K), its rows padded: fc2's weight for row updates (axpy_rows). In
// tiles of T × T whose source and destination lines stay in L1: row by row, a power-of-two row length (C = 512)
// maps every destination line to the same few cache sets, and the copy took a third of the β network's time.
META_COLD Rows transposed_copy(const float* src, int64_t rows, int64_t K) {
  constexpr int64_t T = 16;
  Rows m(K, rows);
  for (int64_t r0 = 0; r0 < rows; r0 += T)
    for (int64_t k0 = 0; k0 < K; k0 += T) {
      const int64_t r1 = std::min(r0 + T, rows), k1 = std::min(k0 + T, K);
      for (int64_t k = k0; k < k1; ++k) {
        float* __restrict__ d = m.row(k);
        for (int64_t r = r0; r < r1; ++r) d[r] = src[r * K + k];
      }
    }
  return m;
}

// out[n][m] += bias[m] for m < M.
META_COLD void add_bias_rows(const Mat& out, const float* __restrict__ bias, int64_t N, int64_t M) {
  for (int64_t n = 0; n < N; ++n) {
    float* __restrict__ o = out.row(n);
    for (int64_t m = 0; m < M; ++m) o[m] += bias[m];
  }
}

// ---- BatchNorm on rows ---------------------------------------------------------------------------------

struct BnArgs {  // one BatchNorm's parameters and mode (torch.batch_norm's arguments)
  const float *w, *b;
  float *rm, *rv;  // null: none (track_running_stats=False)
  bool batch;      // normalise with the batch's statistics (else the running ones)
  double momentum, eps;
};

// The mean and 1/std a BatchNorm normalises the N rows of h (K channels) with; the running statistics are
// moved when `batch` and present.
META_COLD void bn_rows_stats(const Mat& h, const BnArgs& a, float* mean_out, float* invstd_out, int64_t N,
                             int64_t K) {
  std::vector<double> mu(K, 0.0), var(K, 0.0);
  if (a.batch) {
    double* __restrict__ m = mu.data();
    double* __restrict__ v = var.data();
    for (int64_t n = 0; n < N; ++n) {
      const float* __restrict__ hn = h.row(n);
      for (int64_t k = 0; k < K; ++k) m[k] += hn[k];
    }
    for (int64_t k = 0; k < K; ++k) m[k] /= double(N);
    for (int64_t n = 0; n < N; ++n) {
      const float* __restrict__ hn = h.row(n);
      for (int64_t k = 0; k < K; ++k) v[k] += (hn[k] - m[k]) * (hn[k] - m[k]);
    }
    for (int64_t k = 0; k < K; ++k) var[k] /= double(N);
    const double keep = 1.0 - a.momentum, unbias = double(N) / double(N > 1 ? N - 1 : 1);
    for (int64_t k = 0; k < K; ++k) {
      if (a.rm) a.rm[k] = float(keep * a.rm[k] + a.momentum * mu[k]);
      if (a.rv) a.rv[k] = float(keep * a.rv[k] + a.momentum * var[k] * unbias);
    }
  } else {
    for (int64_t k = 0; k < K; ++k) mu[k] = a.rm[k], var[k] = a.rv[k];
  }
  for (int64_t k = 0; k < K; ++k) mean_out[k] = float(mu[k]), invstd_out[k] = float(1.0 / std::sqrt(var[k] + a.eps));
}

// In place over h: x̂ = (h - mean)·invstd.
META_COLD void normalise_rows(const Mat& h, const float* mean, const float* invstd, int64_t N, int64_t K) {
  for (int64_t n = 0; n < N; ++n) {
    float* __restrict__ hn = h.row(n);
    for (int64_t k = 0; k < K; ++k) hn[k] = (hn[k] - mean[k]) * invstd[k];
  }
}

// In place over dz (N rows of K): BatchNorm's input gradient; dw = Σ dz·x̂ and db = Σ dz per channel.
META_COLD void bn_rows_backward(const Mat& dz, const Mat& xh, const float* invstd, const float* w, bool batch,
                                float* dw, float* db, int64_t N, int64_t K) {
  std::vector<double> sd(K, 0.0), sdx(K, 0.0);
  double* __restrict__ s0 = sd.data();
  double* __restrict__ s1 = sdx.data();
  for (int64_t n = 0; n < N; ++n) {
    const float *__restrict__ d = dz.row(n), *__restrict__ x = xh.row(n);
    for (int64_t k = 0; k < K; ++k) s0[k] += d[k], s1[k] += double(d[k]) * x[k];
  }
  std::vector<float> scale(K), g(K), kx(K);
  for (int64_t k = 0; k < K; ++k) {
    dw[k] = float(sdx[k]), db[k] = float(sd[k]);
    scale[k] = invstd[k] * w[k];
    g[k] = batch ? float(sd[k] / N) : 0.0f;
    kx[k] = batch ? float(sdx[k] / N) : 0.0f;
  }
  const float *__restrict__ sc = scale.data(), *__restrict__ gk = g.data(), *__restrict__ xk = kx.data();
  for (int64_t n = 0; n < N; ++n) {
    float* __restrict__ d = dz.row(n);
    const float* __restrict__ x = xh.row(n);
    if (batch)
      for (int64_t k = 0; k < K; ++k) d[k] = (d[k] - gk[k] - x[k] * xk[k]) * sc[k];
    else
      for (int64_t k = 0; k < K; ++k) d[k] *= sc[k];
  }
}

META_COLD void column_sums(const Mat& m, float* __restrict__ out, int64_t N, int64_t K) {  // Σ over rows
  for (int64_t k = 0; k < K; ++k) out[k] = 0.0f;
  for (int64_t n = 0; n < N; ++n) {
    const float* __restrict__ r = m.row(n);
    for (int64_t k = 0; k < K; ++k) out[k] += r[k];
  }
}

META_COLD Rows affine_rows(const Mat& xh, const float* w, const float* b, int64_t N, int64_t K) {  // x̂·w + b
  Rows o(N, K);
  for (int64_t n = 0; n < N; ++n) {
    float* __restrict__ on = o.row(n);
    const float* __restrict__ xn = xh.row(n);
    for (int64_t k = 0; k < K; ++k) on[k] = xn[k] * w[k] + b[k];
  }
  return o;
}

}  // namespace

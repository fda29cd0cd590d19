// The "aligned" row walker of the C++ CPU kernels (acon_cpu.cpp), for rows of S = Q·VB + T values (S >= VB).
// Each row's first Q·VB values run as Q whole chunks on the row's own parameters: no chunk holds two rows, so
// there are none of the row walker's parameter blends and sum splits (acon_rows.h), which cost about a third
// of the time per value at 7×7 with 16 lanes, and more with 8 (where the row walker's loop is slower even on
// long rows). The T values left at the end of VB consecutive rows run together as T chunks whose lane l is row
// g0 + l, on per-lane parameters (fp32 with AVX-512: one hardware gather per input and one scatter; else lane
// by lane). A row's sum is the transpose-and-add tree of its Q chunks' lanes plus its T tail terms in order:
// the same whichever rows share its group, so the sums depend on S alone, not on the blocks or the threads
// (the row walker's chunks start at each block's first row, so its sums follow the blocks). Against the row
// walker the sums are in another order, or differently contracted: the last bits differ.
// aligned_rows_serve says which rows take it. Included by acon_cpu.cpp and bn_acon_cpu.h.

#pragma once

#include <type_traits>

#include "acon_rows.h"

namespace {

// Which rows take the aligned walker, by vector width, dtype and kernel, as measured against the row walker
// (benchmarks/cpu_2026-12-07_aligned_rows.md): rows of whole vectors always; with 16 lanes, fp32 tails of one
// or two values with AVX-512's gather and scatter (four, at 14×14, are 15 % slower) and no bf16 tails (lane
// by lane they cost more than the blends); with 8 lanes (AVX2) every row (7×7 40 %, 14×14 16 % faster); with
// 4, every row in backward kernels (5–10 % faster) and none in forward ones (7×7 13 %, whole vectors 1–2 %
// slower). The BatchNorm+ACON passes (bn_acon_cpu.h) follow the same rules: `backward` for the one that
// stores dz and sums, the forward rule for the statistics (sums only) and the input-gradient pass (stores
// only), which at 4 lanes were 10 % and 30 % slower at 7×7 on this walker. Lane offsets within a group must
// fit in 32 bits.
template <class IO>
inline bool aligned_rows_serve(int64_t S, bool backward) {
  if (S < VB || S >= (int64_t(1) << 26)) return false;
  if (VB == 4) return backward;
  const int64_t T = S % VB;
  if (T == 0) return true;
#if ACON_VB == 16 && defined(__AVX512F__)
  return std::is_same_v<IO, F32> && T <= 2;
#else
  return true;
#endif
}

// Rows r0..r1-1 (channel r % C) of S values, for a row kernel K as walk_rows takes (acon_rows.h) that also
// provides `lanes(o, idx, n, q)`: the chunk whose lane l < n is value o + idx[l], on the per-lane parameters
// q, returning its NQ terms; lanes >= n are loaded as 0, never stored, and their terms are discarded here.
template <class K>
void walk_rows_aligned(const K& kernel, const RowParams<K::NP>& P, float* const* sums_out, int64_t C, int64_t S,
                       int64_t r0, int64_t r1) {
  constexpr int NP = K::NP, NQ = K::NQ;
  const K k = kernel;
  const int64_t Q = S / VB, T = S % VB;
  for (int64_t g0 = r0; g0 < r1; g0 += VB) {
    const int64_t G = std::min<int64_t>(VB, r1 - g0);
    std::array<std::array<vf, VB>, NQ> slot{};
    const int64_t c0 = g0 % C;  // the group's first channel
    int64_t c = c0;
    for (int64_t l = 0; l < G; ++l) {
      const int64_t r = g0 + l;
      const Vecs<NP> cur = P.at(r, c);
      Vecs<NQ> acc{};
      for (int64_t j = 0; j < Q; ++j) {
        const Vecs<NQ> t = k.template chunk<true>(r * S + j * VB, VB, cur);
        for (int q = 0; q < NQ; ++q) acc[q] += t[q];
      }
      for (int q = 0; q < NQ; ++q) slot[q][l] = acc[q];
      c = c + 1 == C ? 0 : c + 1;
    }
    Vecs<NQ> rows{};  // lane l: the sums of row g0 + l
    for (int q = 0; q < NQ; ++q) {
      sum_tree<int(VB) / 2>(slot[q].data());
      rows[q] = slot[q][0];
    }
    if (T > 0) {
      Vecs<NP> lanes_p;
      if (c0 + G <= C) {  // channels c0 .. c0 + G - 1 (and rows g0 .. g0 + G - 1): one load per parameter
        for (int j = 0; j < NP; ++j) lanes_p[j] = F32::load(P.src[j] + (P.by_row[j] ? g0 : c0), G);
      } else {
        alignas(64) float pv[NP > 0 ? NP : 1][VB] = {};
        c = c0;
        for (int64_t l = 0; l < G; ++l) {
          for (int j = 0; j < NP; ++j) pv[j][l] = P.src[j][P.by_row[j] ? g0 + l : c];
          c = c + 1 == C ? 0 : c + 1;
        }
        for (int j = 0; j < NP; ++j) lanes_p[j] = F32::load(pv[j], VB);
      }
      const vi m = LANE < (int32_t)G;
      const vi idx = LANE * (int32_t)S + (int32_t)(Q * VB);  // row g0 + l's tail, from value g0·S
      for (int64_t j = 0; j < T; ++j) {
        const Vecs<NQ> t = k.lanes(g0 * S + j, idx, G, lanes_p);
        for (int q = 0; q < NQ; ++q) rows[q] += m ? t[q] : vf{};
      }
    }
    for (int q = 0; q < NQ; ++q) F32::store(sums_out[q] + g0, rows[q], G);
  }
}

// walk_rows_aligned over R rows split into blocks, as walk_blocks (acon_rows.h).
template <class K>
void walk_blocks_aligned(const K& k, const RowParams<K::NP>& P, float* const* sums_out, int64_t R, int64_t C,
                         int64_t S, int64_t blocks, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t b = 0; b < blocks; ++b)
    walk_rows_aligned(k, P, sums_out, C, S, R * b / blocks, R * (b + 1) / blocks);
}

// walk_blocks_aligned where aligned_rows_serve<IO>(S, BACKWARD) says so (BACKWARD: the backward rule, for kernels
// that store and sum), else walk_blocks.
template <class IO, bool BACKWARD, class K>
void walk_blocks_by_rule(const K& k, const RowParams<K::NP>& P, float* const* sums_out, int64_t R, int64_t C,
                         int64_t S, int64_t blocks, int threads) {
  if (aligned_rows_serve<IO>(S, BACKWARD)) walk_blocks_aligned(k, P, sums_out, R, C, S, blocks, threads);
  else walk_blocks(k, P, sums_out, R, C, S, blocks, threads);
}

// Values p[idx[l]] for lanes l < n (0 past n), and the store of a vector's first n lanes to p[idx[l]]: with
// AVX-512 in fp32 one masked hardware gather or scatter, otherwise lane by lane.
template <class IO>
inline vf gather_lanes(const typename IO::T* p, vi idx, int64_t n) {
#if ACON_VB == 16 && defined(__AVX512F__)
  if constexpr (std::is_same_v<IO, F32>) {
    __m512i iv;
    std::memcpy(&iv, &idx, sizeof iv);
    const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), (__mmask16)((1u << n) - 1u), iv, p, 4);
    vf r;
    std::memcpy(&r, &v, sizeof r);
    return r;
  }
#endif
  alignas(64) float v[VB] = {};
  for (int64_t l = 0; l < n; ++l) v[l] = IO::load(p + idx[l], 1)[0];
  return F32::load(v, VB);
}

template <class IO>
inline void scatter_lanes(typename IO::T* p, vi idx, int64_t n, vf v) {
#if ACON_VB == 16 && defined(__AVX512F__)
  if constexpr (std::is_same_v<IO, F32>) {
    __m512i iv;
    __m512 vv;
    std::memcpy(&iv, &idx, sizeof iv);
    std::memcpy(&vv, &v, sizeof vv);
    _mm512_mask_i32scatter_ps(p, (__mmask16)((1u << n) - 1u), iv, vv, 4);
    return;
  }
#endif
  alignas(64) float a[VB];
  F32::store(a, v, VB);
  for (int64_t l = 0; l < n; ++l) IO::store(p + idx[l], splat(a[l]), 1);
}

}  // namespace

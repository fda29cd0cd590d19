// The "ncs" row walker of the C++ CPU kernels (acon_cpu.cpp, bn_acon_cpu.h): rows of S >= VB contiguous
// values, one per (n, c), walked as vector chunks laid end to end, with per-row sums in a fixed order.
// Included by acon_cpu.cpp and bn_acon_cpu.h (one translation unit).

#pragma once

#include <array>

#include "acon_math.h"

namespace {

template <int Q>
using Vecs = std::array<vf, Q>;

template <class IO, bool FULL>
inline vf load_chunk(const typename IO::T* p, int64_t n) {  // FULL: a fixed-size load (no library copy)
  if constexpr (FULL) return IO::load(p, VB);
  else return IO::load(p, n);
}

template <class IO, bool FULL>
inline void store_chunk(typename IO::T* p, vf v, int64_t n) {
  if constexpr (FULL) IO::store(p, v, VB);
  else IO::store(p, v, n);
}

// Sums of the rows of a block, VB rows at a time: each finished row parks its NQ accumulator vectors in
// the next slot, and every VB rows (and at the block's end) one transpose-and-add tree turns the VB
// vectors of each quantity into one vector of VB row sums. That costs about 3 shuffles and adds per row
// per quantity instead of the 2·log2(VB) of a shuffle-tree sum per row. A row's lanes are added in the
// same order whatever its slot, so the sums do not depend on how rows fall into groups.
constexpr int lane_lo(int h, int j) {  // pairing level h: lane j takes h-lane runs from a then b, low halves
  return (j % (2 * h) < h) ? (j / (2 * h)) * 2 * h + j % (2 * h) : int(VB) + (j / (2 * h)) * 2 * h + j % (2 * h) - h;
}
template <int H, size_t... J>
inline vf pair_sum(vf a, vf b, std::index_sequence<J...>) {
  return __builtin_shufflevector(a, b, lane_lo(H, J)...) + __builtin_shufflevector(a, b, (lane_lo(H, J) + H)...);
}
template <int H>
inline void sum_tree(vf* v) {  // v[0..2H) -> v[0..H); at H = 1, lane j of v[0] is the sum of the old v[j]
  for (int i = 0; i < H; ++i) v[i] = pair_sum<H>(v[i], v[i + H], std::make_index_sequence<VB>{});
  if constexpr (H > 1) sum_tree<H / 2>(v);
}

template <int NQ>
struct RowSums {  // quantity q of row r goes to out[q][r]
  std::array<std::array<vf, VB>, NQ> slot{};
  float* const* out;
  int64_t first, used = 0;  // row of slot 0, slots in use
  RowSums(float* const* out_, int64_t r0) : out(out_), first(r0) {}
  void park(const Vecs<NQ>& a) {
    for (int q = 0; q < NQ; ++q) slot[q][used] = a[q];
    if (++used == VB) flush();
  }
  void flush() {
    if (used == 0) return;
    for (int q = 0; q < NQ; ++q) {
      sum_tree<int(VB) / 2>(slot[q].data());
      F32::store(out[q] + first, slot[q][0], used);
    }
    first += used, used = 0;
  }
};

template <int NP>
struct RowParams {  // parameter j of row r = n·C + c: src[j][c], or src[j][r] where by_row[j] (per sample)
  std::array<const float*, NP> src;
  std::array<bool, NP> by_row;
  Vecs<NP> at(int64_t r, int64_t c) const {
    Vecs<NP> v;
    for (int j = 0; j < NP; ++j) v[j] = splat(src[j][by_row[j] ? r : c]);
    return v;
  }
};

// Rows r0..r1-1 of S >= VB values, processed as chunks of VB laid end to end in one flat loop, so short
// rows cost no scalar tail. K, a row kernel, says what one chunk does: `K::chunk<FULL>(i, n, q)` works on
// values [i, i + n) (n = VB where FULL) with the NP parameter vectors q and returns the terms of its NQ
// per-row sums. A chunk inside a row gets that row's parameters; the chunk that ends a row (rem <= VB
// values of it left) gets the row's and the next row's blended by the lane mask `m` (lanes < rem are this
// row's), parks the row's sums and carries the next row's lanes into its accumulators. Lanes past the data
// (the block's last chunk) are loaded as 0, never stored, and never reach a sum.
template <class K>
void walk_rows(const K& kernel, const RowParams<K::NP>& P, float* const* sums_out, int64_t C, int64_t S,
               int64_t r0, int64_t r1) {
  constexpr int NP = K::NP, NQ = K::NQ;
  if (r0 >= r1) return;
  const K k = kernel;  // a local copy: its pointers stay in registers across the stores (memcpy may alias)
  const vf zero = {};
  Vecs<NQ> acc{};  // running sums of row r (carried over a row-ending chunk)
  RowSums<NQ> sums(sums_out, r0);
  int64_t r = r0, c = r0 % C, o = 0;  // row, its channel, offset of the chunk in the row
  Vecs<NP> cur = P.at(r, c);
  const int64_t end = r1 * S;
  for (int64_t i = r0 * S; i < end; i += VB) {
    const int64_t rem = S - o;
    if (rem > VB) {  // inside row r
      const Vecs<NQ> t = k.template chunk<true>(i, VB, cur);
      for (int q = 0; q < NQ; ++q) acc[q] += t[q];
      o += VB;
      continue;
    }
    const int64_t cn = c + 1 == C ? 0 : c + 1, rn = r + 1 < r1 ? r + 1 : r;
    const Vecs<NP> next = P.at(rn, cn);
    const vi m = LANE < (int32_t)rem;
    Vecs<NP> q;
    for (int j = 0; j < NP; ++j) q[j] = m ? cur[j] : next[j];
    const Vecs<NQ> t = end - i >= VB ? k.template chunk<true>(i, VB, q) : k.template chunk<false>(i, end - i, q);
    if constexpr (NQ > 0) {
      Vecs<NQ> row;
      for (int j = 0; j < NQ; ++j) row[j] = acc[j] + (m ? t[j] : zero), acc[j] = m ? zero : t[j];
      sums.park(row);
    }
    cur = next, o = VB - rem, r = rn, c = cn;
  }
  if constexpr (NQ > 0) sums.flush();
}

// All R = N·C rows, split into `blocks` blocks of whole rows run on `threads` threads; every row's sums
// are written (to sums_out[q][r]) whatever the split, so reductions over them do not depend on it.
template <class K>
void walk_blocks(const K& k, const RowParams<K::NP>& P, float* const* sums_out, int64_t R, int64_t C, int64_t S,
                 int64_t blocks, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t b = 0; b < blocks; ++b) walk_rows(k, P, sums_out, C, S, R * b / blocks, R * (b + 1) / blocks);
}

// Scratch memory for partial sums: per calling thread, grown as needed and kept, so a call does not map
// and fault in fresh pages (large malloc blocks are fresh mmaps each time).
inline float* scratch(size_t n) {
  thread_local std::vector<float> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

inline std::vector<float> difference(const float* p1, const float* p2, int64_t C) {  // d = p1 - p2
  std::vector<float> d(C);
  for (int64_t c = 0; c < C; ++c) d[c] = p1[c] - p2[c];
  return d;
}

// Final ACON gradients from partial sums laid out (N, K, C) (K = 1 row per (n, c) for "ncs", K blocks per
// sample for "nsc"), summed in a fixed order over (n, k): with d of c,
// g1 = Σ ss (Σ dy·x·g), g2 = Σ sx - g1 and gb = d·Σ st, over k and also n unless β is per sample.
inline void finish(const float* __restrict__ ss, const float* __restrict__ st, const float* __restrict__ sx,
                   const float* d, float* __restrict__ g1, float* __restrict__ g2, float* __restrict__ gb,
                   int64_t N, int64_t K, int64_t C, bool per_sample) {
  for (int64_t c = 0; c < C; ++c) g1[c] = g2[c] = 0.0f;
  for (int64_t j = 0; j < (per_sample ? N : 1) * C; ++j) gb[j] = 0.0f;
  for (int64_t n = 0; n < N; ++n) {
    float* gbn = gb + (per_sample ? n * C : 0);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t q = (n * K + k) * C;
      for (int64_t c = 0; c < C; ++c) g1[c] += ss[q + c], g2[c] += sx[q + c], gbn[c] += st[q + c];
    }
  }
  for (int64_t c = 0; c < C; ++c) g2[c] -= g1[c];
  for (int64_t n = 0; n < (per_sample ? N : 1); ++n)
    for (int64_t c = 0; c < C; ++c) gb[n * C + c] *= d[c];
}

}  // namespace

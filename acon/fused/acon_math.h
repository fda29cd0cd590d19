// Vector math of the ACON-C CPU kernels (acon_cpu.cpp): vector types sized to the ISA, fp32/bf16 loads and
// stores, e^-z, σ and σ', and the per-chunk forward and backward formulas. Included once, by acon_cpu.cpp.
// NaN and ±Inf conventions: see acon_cpu.cpp's header and acon.fused.native's docstring.

#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>
#if defined(__AVX512F__) || defined(__AVX__) || defined(__SSE__)
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
  static vf widen(vh h) { return (vf)(__builtin_convertvector(h, vu) << 16); }
  static vh narrow(vf v) {
    vu b = (vu)v;
    vu r = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
    r = (v == v) ? r : (vu{} + 0x7FC0u);
    return __builtin_convertvector(r, vh);
  }
  static vf load(const T* p, int64_t n) {
    vh h = {};
    if (n == VB) std::memcpy(&h, p, sizeof h);
    else std::memcpy(&h, p, n * sizeof(T));
    return widen(h);
  }
  static void store(T* p, vf v, int64_t n) {
    const vh h = narrow(v);
    if (n == VB) std::memcpy(p, &h, sizeof h);
    else std::memcpy(p, &h, n * sizeof(T));
  }
};

// lo > z ? lo : z and hi < z ? hi : z, which keep a NaN z (it fails the comparison): one max/min instruction
// on x86, whose max/min return their second operand when either is NaN.
template <class V, class F>
inline vf via(vf a, vf b, F f) {
  V x, y;
  std::memcpy(&x, &a, sizeof x);
  std::memcpy(&y, &b, sizeof y);
  x = f(x, y);
  std::memcpy(&a, &x, sizeof x);
  return a;
}
inline vf max_keep_nan(vf lo, vf z) {
#if ACON_VB == 16 && defined(__AVX512F__)
  return via<__m512>(lo, z, [](__m512 a, __m512 b) { return _mm512_max_ps(a, b); });
#elif ACON_VB == 8 && defined(__AVX__)
  return via<__m256>(lo, z, [](__m256 a, __m256 b) { return _mm256_max_ps(a, b); });
#elif ACON_VB == 4 && defined(__SSE__)
  return via<__m128>(lo, z, [](__m128 a, __m128 b) { return _mm_max_ps(a, b); });
#else
  return lo > z ? lo : z;
#endif
}
inline vf min_keep_nan(vf hi, vf z) {
#if ACON_VB == 16 && defined(__AVX512F__)
  return via<__m512>(hi, z, [](__m512 a, __m512 b) { return _mm512_min_ps(a, b); });
#elif ACON_VB == 8 && defined(__AVX__)
  return via<__m256>(hi, z, [](__m256 a, __m256 b) { return _mm256_min_ps(a, b); });
#elif ACON_VB == 4 && defined(__SSE__)
  return via<__m128>(hi, z, [](__m128 a, __m128 b) { return _mm_min_ps(a, b); });
#else
  return hi < z ? hi : z;
#endif
}

// Bounds of vexp_neg's argument: below EXP_LO e^-z would overflow. Above EXP_HI it is exactly 0: with
// AVX-512's scalef e^-z underflows through the subnormals to 0 (from z ≈ 104); where 2^n is built in the
// exponent bits, n = -127 gives the bit pattern of 0, so e^-z is 0 from z ≈ 87.7 (true value < 1e-38), and
// EXP_HI keeps n >= -127 (n = -128 would give the pattern of -inf).
#if ACON_VB == 16 && defined(__AVX512F__)
constexpr float EXP_LO = -88.0f, EXP_HI = 110.0f;
#else
constexpr float EXP_LO = -88.0f, EXP_HI = 88.3f;
#endif

// e^-z, z clamped to [EXP_LO, EXP_HI] so that a NaN z stays NaN (e^-NaN is NaN, never a bound's value):
// range reduction e^-z = 2^n·e^r and a degree-5 minimax polynomial for e^r (1.9e-7 relative in fp32
// arithmetic). The kernels' x·σ(x) is then within 5.5e-7 relative of fp64 for |x| <= 87 (3.2e-7 for |x| <= 5;
// the earlier Cephes degree-7 form with a two-constant ln 2 gave 2.1e-7): the tests' tolerance is 1e-5, and
// the two fused multiply-adds saved are about 8% of the backward kernel's time where it is compute-bound.
// n = round(-z·log2 e) comes from adding 1.5·2^23, which leaves n in the low mantissa bits
// (no float/int conversion); r = -z - n·ln 2 lies in [-ln2/2, ln2/2]. The code works with q = -r = z + n·ln 2,
// formed with one fused multiply-add on fp32 ln 2 (its rounding, 2e-9 per unit of n, adds at most 2.4e-7
// relative at |z| = 88 and about 1e-8 at |z| < 5), and P's odd coefficients negated, so -z is never
// formed. 2^n is applied with AVX-512's scalef, else built in the exponent bits.
inline vf vexp_neg(vf z) {
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23
  z = min_keep_nan(splat(EXP_HI), max_keep_nan(splat(EXP_LO), z));
  const vf k = z * splat(-1.44269504088896341f) + magic;
  const vf nf = k - magic;
  const vf q = z + nf * splat(0.693147180559945f);
  // e^r = 1 + r·(c1 + r·(c2 + r·(c3 + r·(c4 + r·c5)))), minimax for relative error on [-ln2/2, ln2/2]
  vf p = splat(-8.325664326548576e-3f);
  p = p * q + splat(4.190804436802864e-2f);
  p = p * q + splat(-1.6666939854621887e-1f);
  p = p * q + splat(4.9999043345451355e-1f);
  p = p * q + splat(-1.0f);
  p = p * q + splat(1.0f);  // e^r
#if ACON_VB == 16 && defined(__AVX512F__)
  __m512 pv, nv;
  std::memcpy(&pv, &p, sizeof pv);
  std::memcpy(&nv, &nf, sizeof nv);
  pv = _mm512_scalef_ps(pv, nv);
  std::memcpy(&p, &pv, sizeof pv);
  return p;
#else
  const vi e = ((vi)k - (vi)magic + 127) << 23;
  return p * (vf)e;
#endif
}

// σ(z) and σ'(z) = σ(z)·(1 - σ(z)) as IEEE arithmetic gives them: NaN for NaN; σ exactly 0 below EXP_LO
// (and at -inf; the true value is below 7e-39 there) and σ' exactly 0 at ±inf and wherever e^-z is 0,
// so that u·σ and u·σ' are NaN for an infinite u where they are ∞·0 in the reference formula (a clamped,
// tiny σ or σ' would give ∞ instead). σ' is formed as σ·(e^-z·σ), accurate to a few ulps where σ is near 1
// (σ - σ² there would carry σ's rounding error, which the caller multiplies by z).
struct Sig {
  vf s, sp;  // σ(z), σ'(z)
};

// σ = 0 below EXP_LO (1/(1 + e^88) would be a subnormal number, not 0); NaN compares false: kept.
inline vf zero_below_lo(vf z, vf s) { return z < splat(EXP_LO) ? vf{} : s; }

inline Sig vsigmoid2(vf z) {
  const vf e = vexp_neg(z);  // exactly 0 where it underflows (and at +inf), see EXP_HI
  const vf s = zero_below_lo(z, splat(1.0f) / (splat(1.0f) + e));
  return {s, s * (e * s)};
}

inline vf vsigmoid(vf z) { return zero_below_lo(z, splat(1.0f) / (splat(1.0f) + vexp_neg(z))); }

inline vf fwd_math(vf x, vf d, vf p, vf b) {
  vf u = d * x;
  return u * vsigmoid(b * u) + p * x;
}

// Backward of one chunk. With gx = dy·x the per-element gradient terms of p1 and β are
// dy·x·g = gx·g and dy·u·t = d·gx·t, where d is constant along a row (or per channel for "nsc"); so
// only Σ gx·g, Σ gx·t and Σ gx are accumulated, and `finish` applies d per row.
struct Grads {
  vf dx, gs, gt, gx;  // dx, and the terms of Σ gx·g, Σ gx·t and Σ gx
};

inline Grads bwd_math(vf dy, vf x, vf d, vf p, vf b) {
  const vf u = d * x;
  const Sig sg = vsigmoid2(b * u);
  const vf t = u * sg.sp;
  const vf g = sg.s + b * t;
  const vf gx = dy * x;
  return {dy * (d * g + p), gx * g, gx * t, gx};
}

// bwd_math on bd = β·d instead of β: z = bd·x, and the β term is gx·t' with t' = x·σ'(z) = t / d, so that
// the caller forms dβ as d·(d·Σ gx·t'). One multiplication less per chunk.
inline Grads bwd_math_bd(vf dy, vf x, vf d, vf p, vf bd) {
  const Sig sg = vsigmoid2(bd * x);
  const vf t = x * sg.sp;
  const vf g = sg.s + bd * t;
  const vf gx = dy * x;
  return {dy * (d * g + p), gx * g, gx * t, gx};
}

}  // namespace

// Pieces shared by dartmamba's C++ CPU kernels (selective_scan_cpu.cpp, causal_conv1d_cpu.cpp): inline vector math
// (exp, sigmoid, softplus) on at::vec, (batch, channels, L) tensors addressed through their strides, and the moves
// between such rows and time-major (L, W) scratch blocks of W adjacent channels, W = Vectorized<T>::size().
//
// Storage and compute types: tensors are stored as S (bfloat16, half, float or double) and computed in T =
// compute_t<S> (float for the 16-bit types, else S). Every load converts S -> T and every store rounds T -> S (to
// nearest even), so a kernel's scratch, state and sums are always T.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace dartmamba_cpu {

using at::vec::Vectorized;

// exp, inline (a call would spill the state vectors held in registers around it): x = k ln2 + r with
// |r| <= ln2 / 2 (Cody-Waite: ln 2 in two parts), exp(r) by a polynomial, times 2^k (in two factors, so that results
// that underflow into the subnormals, or to 0 below kMin, come out right; above log(max) they overflow to inf). The
// polynomial: in float, degree 6 fitted to exp's relative error on [-ln2/2, ln2/2] (iteratively reweighted least
// squares on Chebyshev nodes: 1.9e-9 in exact arithmetic, 7e-8 = 1.2 x 2^-24 evaluated in float, as the degree-7
// Taylor polynomial, one multiply-add cheaper); in double, Taylor to degree 13 (truncation below 1e-17). So the
// result is within about an ulp, as Sleef's exp that torch.exp uses. The clamps return x itself when it is NaN, so
// NaN propagates.
template <typename T> struct ExpTraits;
template <> struct ExpTraits<float> {
  using Int = int32_t;
  static constexpr int kMantissa = 23, kBias = 127, kDegree = 6, kLog1pTerms = 9;
  static constexpr float kPoly[kDegree + 1] = {1.0f, 1.0f, 0.49999991059303284f, 0.16666419804096222f,
                                               0.04166822507977486f, 0.008374815806746483f, 0.001383684459142387f};
  static constexpr float kLog2e = 1.44269504088896341f;
  static constexpr float kLn2Hi = 0.693115234375f;           // ln 2 with its low 12 mantissa bits cleared ...
  static constexpr float kLn2Lo = 3.194618329871446e-05f;    // ... and the rest: k * kLn2Hi is exact
  static constexpr float kMin = -104.0f;                     // exp(kMin) rounds to 0
  static constexpr float kMax = 89.0f;                       // exp(kMax) overflows to inf
};
template <> struct ExpTraits<double> {
  using Int = int64_t;
  static constexpr int kMantissa = 52, kBias = 1023, kDegree = 13, kLog1pTerms = 17;
  static constexpr double kLog2e = 1.4426950408889634074;
  static constexpr double kLn2Hi = 0.6931471803691238;       // low 21 mantissa bits cleared
  static constexpr double kLn2Lo = 1.9082146973659064e-10;
  static constexpr double kMin = -746.0;
  static constexpr double kMax = 710.0;
  static constexpr double kPoly[kDegree + 1] = {1.0, 1.0, 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720,
                                                1.0 / 5040, 1.0 / 40320, 1.0 / 362880, 1.0 / 3628800,
                                                1.0 / 39916800, 1.0 / 479001600, 1.0 / 6227020800};
};

// p * 2^k for integral k: one instruction with AVX-512 (vscalef, which rounds subnormal results correctly);
// else 2^k built in the exponent bits as two factors, so that results in the subnormal range come out right.
template <typename T>
inline Vectorized<T> scale_by_pow2(const Vectorized<T>& p, const Vectorized<T>& k) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    return Vectorized<T>(_mm512_scalef_ps(p, k));
  } else {
    return Vectorized<T>(_mm512_scalef_pd(p, k));
  }
#else
  using Tr = ExpTraits<T>;
  using IVec = Vectorized<typename Tr::Int>;
  const IVec ki = at::vec::convert_to_int_of_same_size<T>(k);
  const IVec k1 = ki >> IVec(1);
  const IVec bias(Tr::kBias), shift(Tr::kMantissa);
  return p * at::vec::cast<T>((k1 + bias) << shift) * at::vec::cast<T>((ki - k1 + bias) << shift);
#endif
}

template <typename T>
inline Vectorized<T> exp_inline(const Vectorized<T>& x) {
  using Vec = Vectorized<T>;
  using Tr = ExpTraits<T>;
  const Vec xc = at::vec::clamp_max(at::vec::clamp_min(x, Vec(Tr::kMin)), Vec(Tr::kMax));
  const Vec k = at::vec::fmadd(xc, Vec(Tr::kLog2e), Vec(T(0.5))).floor();
  const Vec r = at::vec::fmadd(k, Vec(-Tr::kLn2Lo), at::vec::fmadd(k, Vec(-Tr::kLn2Hi), xc));
  Vec p(Tr::kPoly[Tr::kDegree]);
#pragma GCC unroll 16
  for (int j = Tr::kDegree - 1; j >= 0; --j) p = at::vec::fmadd(p, r, Vec(Tr::kPoly[j]));
  return scale_by_pow2(p, k);
}

// 2^y, for the scan's decays exp(dt A) = 2^(dt A log2(e)) (A log2(e) computed once per channel block, so the
// argument costs one multiply). With AVX-512 in float: y rounded to a multiple of 1/16 by adding 1.5 * 2^19 (the
// sum's low 4 mantissa bits are then the sixteenths, which index a 16-entry table of 2^(j/16) held in one register),
// 2^f for the rest |f| <= 1/32 by its Taylor polynomial to degree 3 (truncation 9e-9 relative) applied as
// t + t (2^f - 1), and the integral part by vscalef: 10 instructions instead of 14, within 1.06 ulp of the exact
// 2^y (measured over 3.2e7 random arguments in [-30, 5]). Else (and in double) the integral part k = round(y), 2^f
// = exp(f ln 2) by exp_inline's polynomial, times 2^k, the clamps keeping -inf -> 0 and inf -> inf. NaN stays NaN.
template <typename T> struct Exp2Range;
template <> struct Exp2Range<float> { static constexpr float kMin = -151.0f, kMax = 128.5f; };
template <> struct Exp2Range<double> { static constexpr double kMin = -1076.0, kMax = 1025.0; };
template <typename T> constexpr T kLog2e = static_cast<T>(1.44269504088896340736);

template <typename T>
inline Vectorized<T> exp2_inline(const Vectorized<T>& y) {
  using Vec = Vectorized<T>;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    const __m512 table = _mm512_setr_ps(
        1.0f, 1.0442737824274138f, 1.0905077326652577f, 1.1387886347566916f, 1.1892071150027210f,
        1.2418578120734840f, 1.2968395546510096f, 1.3542555469368927f, 1.4142135623730951f, 1.4768261459394993f,
        1.5422108254079407f, 1.6104903319492543f, 1.6817928305074290f, 1.7562521603732995f, 1.8340080864093424f,
        1.9152065613971474f);
    // one clamp, below (-inf -> 0; NaN passes); above, vscalef overflows to inf by itself (checked: 128.5, 1e30
    // and +inf give inf, -1e30 and -inf give 0)
    const __m512 yc = _mm512_max_ps(_mm512_set1_ps(Exp2Range<float>::kMin), y);
    const __m512 magic = _mm512_set1_ps(786432.0f);                   // 1.5 * 2^19: ulp 1/16
    const __m512 m = _mm512_add_ps(yc, magic);
    const __m512 n = _mm512_sub_ps(m, magic);                          // y rounded to sixteenths (exact)
    const __m512 f = _mm512_sub_ps(yc, n);                             // |f| <= 1/32 (exact)
    __m512 q = _mm512_fmadd_ps(_mm512_set1_ps(0.05550410866482158f), f, _mm512_set1_ps(0.2402265069591007f));
    q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(0.6931471805599453f));
    q = _mm512_mul_ps(q, f);                                           // 2^f - 1
    const __m512 t = _mm512_permutexvar_ps(_mm512_castps_si512(m), table);   // 2^(frac(n)); index: low 4 bits
    return Vec(_mm512_scalef_ps(_mm512_fmadd_ps(t, q, t), n));         // times 2^floor(n)
  }
#endif
  using Tr = ExpTraits<T>;
  const Vec yc = at::vec::clamp_max(at::vec::clamp_min(y, Vec(Exp2Range<T>::kMin)), Vec(Exp2Range<T>::kMax));
  const Vec k = (yc + Vec(T(0.5))).floor();
  const Vec r = (yc - k) * Vec(static_cast<T>(0.693147180559945309417));
  Vec p(Tr::kPoly[Tr::kDegree]);
#pragma GCC unroll 16
  for (int j = Tr::kDegree - 1; j >= 0; --j) p = at::vec::fmadd(p, r, Vec(Tr::kPoly[j]));
  return scale_by_pow2(p, k);
}

// 1 / x: with AVX-512 in float, the 14-bit estimate and one Newton step (relative error below 2^-27, within half
// an ulp of the correctly rounded quotient: a multiply-add pair instead of a division); else a division. Where the
// estimate is 0 (x = inf, e.g. 1 + exp(-x) in the sigmoid of x < -88.7) the step would give 0 * inf = NaN: the
// estimate is kept.
template <typename T>
inline Vectorized<T> reciprocal(const Vectorized<T>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    const __m512 r = _mm512_rcp14_ps(x);
    const __m512 refined = _mm512_mul_ps(r, _mm512_fnmadd_ps(x, r, _mm512_set1_ps(2.0f)));
    return Vectorized<T>(_mm512_mask_blend_ps(_mm512_cmp_ps_mask(r, _mm512_setzero_ps(), _CMP_EQ_OQ), refined, r));
  }
#endif
  return Vectorized<T>(T(1)) / x;
}

template <typename T>
inline Vectorized<T> sigmoid(const Vectorized<T>& x) {
  const Vectorized<T> one(T(1));
  return reciprocal(one + exp_inline(x.neg()));
}

// softplus(x) = max(x, 0) + log1p(exp(-|x|)), and x itself above F.softplus's threshold 20. log1p(y) for y in
// [0, 1] as 2 atanh(s) = 2 s f(s^2), s = y / (2 + y) in [0, 1/3]: in float f is a degree-4 polynomial in s^2 fitted
// to atanh(s)/s on [0, 1/9] (iteratively reweighted least squares: 4e-9 relative in exact arithmetic, 7e-8
// evaluated in float), in double its series to 17 terms (below 1e-17).
constexpr double kSoftplusThreshold = 20.0;
constexpr float kAtanhPoly[5] = {1.0f, 0.3333315849304199f, 0.20012454688549042f, 0.13980302214622498f,
                                 0.1408916562795639f};

template <typename T>
inline Vectorized<T> softplus(const Vectorized<T>& x) {
  using Vec = Vectorized<T>;
  const Vec zero(T(0));
  const Vec y = exp_inline(at::vec::minimum(x, x.neg()));
  const Vec s = y * reciprocal(Vec(T(2)) + y), s2 = s * s;
  Vec series;
  if constexpr (std::is_same_v<T, float>) {
    series = Vec(kAtanhPoly[4]);
    for (int j = 3; j >= 0; --j) series = at::vec::fmadd(series, s2, Vec(kAtanhPoly[j]));
  } else {
    constexpr int terms = ExpTraits<T>::kLog1pTerms;
    series = Vec(T(1) / T(2 * terms - 1));
#pragma GCC unroll 32
    for (int j = terms - 2; j >= 0; --j) series = at::vec::fmadd(series, s2, Vec(T(1) / T(2 * j + 1)));
  }
  const Vec out = at::vec::fmadd(Vec(T(2)) * s, series, at::vec::clamp_min(x, zero));
  return Vec::blendv(out, x, x > Vec(static_cast<T>(kSoftplusThreshold)));
}

template <typename S> struct ComputeType { using type = S; };
template <> struct ComputeType<c10::BFloat16> { using type = float; };
template <> struct ComputeType<c10::Half> { using type = float; };
template <typename S> using compute_t = typename ComputeType<S>::type;

// Vectorized<T>::size() values at p (stored as S), converted to T.
template <typename T, typename S>
inline Vectorized<T> load_as(const S* p) {
  if constexpr (std::is_same_v<S, T>) {
    return Vectorized<T>::loadu(p);
  } else {
    Vectorized<float> out;
    at::vec::load_to_float<S>(p, out);
    return out;
  }
}

// The first n values (the other lanes 0).
template <typename T, typename S>
inline Vectorized<T> load_as(const S* p, int n) {
  if constexpr (std::is_same_v<S, T>) {
    return Vectorized<T>::loadu(p, n);
  } else {
    T buf[Vectorized<T>::size()] = {};
    for (int i = 0; i < n; ++i) buf[i] = static_cast<T>(p[i]);
    return Vectorized<T>::loadu(buf);
  }
}

template <typename S, typename T>
inline void store_as(const Vectorized<T>& v, S* p, int n = Vectorized<T>::size()) {
  if constexpr (std::is_same_v<S, T>) {
    v.store(p, n);
  } else {
    at::vec::convert_from_float<S>(v, v).store(p, n);   // lanes [0, n) of the first half: v rounded
  }
}

// A (batch, channels, L) tensor addressed through its strides; absent tensors have data == nullptr.
template <typename T>
struct Rows {
  T* data = nullptr;
  int64_t sb = 0, sd = 0, st = 0;
  Rows() = default;
  explicit Rows(const at::Tensor& t) {
    if (t.defined() && t.numel() > 0) {
      data = t.data_ptr<T>();
      sb = t.stride(0), sd = t.stride(1), st = t.stride(2);
    }
  }
  T* row(int64_t b, int64_t d) const { return data + b * sb + d * sd; }
};

// Copy lanes [0, valid) of rows d0.. of `src` into a time-major (L, W) scratch; the other lanes get 0 (and the
// reverse). With AVX-512, float rows of unit stride along L move as 16 x 16 tiles transposed in registers.
#if defined(CPU_CAPABILITY_AVX512)
inline void transpose16x16(__m512 r[16]) {  // r[i] holds row i; afterwards r[j] holds column j
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
  }
  for (int i = 0; i < 4; ++i) {  // 4 x 4 blocks within 128-bit lanes: permute the lanes
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xdd);
  }
}

inline bool gather_tiles(const float* base, int64_t sd, int valid, int64_t L, int W, float* dst) {
  if (W != 16) return false;
  __m512 r[16];
  for (int64_t t0 = 0; t0 < L; t0 += 16) {
    const int nt = static_cast<int>(std::min<int64_t>(16, L - t0));
    const __mmask16 mask = static_cast<__mmask16>((1u << nt) - 1);
    for (int j = 0; j < 16; ++j) r[j] = j < valid ? _mm512_maskz_loadu_ps(mask, base + j * sd + t0) : _mm512_setzero_ps();
    transpose16x16(r);
    for (int i = 0; i < nt; ++i) _mm512_storeu_ps(dst + (t0 + i) * 16, r[i]);
  }
  return true;
}

inline bool scatter_tiles(const float* src, int W, int64_t L, float* base, int64_t sd, int valid) {
  if (W != 16) return false;
  __m512 r[16];
  for (int64_t t0 = 0; t0 < L; t0 += 16) {
    const int nt = static_cast<int>(std::min<int64_t>(16, L - t0));
    const __mmask16 mask = static_cast<__mmask16>((1u << nt) - 1);
    for (int i = 0; i < 16; ++i) r[i] = i < nt ? _mm512_loadu_ps(src + (t0 + i) * 16) : _mm512_setzero_ps();
    transpose16x16(r);
    for (int j = 0; j < valid; ++j) _mm512_mask_storeu_ps(base + j * sd + t0, mask, r[j]);
  }
  return true;
}
#endif

template <typename T, typename S>
void gather(const Rows<S>& src, int64_t b, int64_t d0, int valid, int W, int64_t L, T* dst) {
  if (src.sd == 1 && valid == W) {   // channels adjacent (a channel-last layout): one vector per step
    const S* base = src.row(b, d0);
    for (int64_t t = 0; t < L; ++t) load_as<T>(base + t * src.st).store(dst + t * W);
    return;
  }
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float> && std::is_same_v<S, float>) {
    if (src.st == 1 && gather_tiles(src.row(b, d0), src.sd, valid, L, W, dst)) return;
  }
#endif
  for (int j = 0; j < W; ++j) {
    if (j < valid) {
      const S* row = src.row(b, d0 + j);
      for (int64_t t = 0; t < L; ++t) dst[t * W + j] = static_cast<T>(row[t * src.st]);
    } else {
      for (int64_t t = 0; t < L; ++t) dst[t * W + j] = T(0);
    }
  }
}

template <typename T, typename S>
void scatter(const T* src, const Rows<S>& dst, int64_t b, int64_t d0, int valid, int W, int64_t L) {
  if (dst.sd == 1 && valid == W) {
    S* base = dst.row(b, d0);
    for (int64_t t = 0; t < L; ++t) store_as(Vectorized<T>::loadu(src + t * W), base + t * dst.st);
    return;
  }
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float> && std::is_same_v<S, float>) {
    if (dst.st == 1 && scatter_tiles(src, W, L, dst.row(b, d0), dst.sd, valid)) return;
  }
#endif
  for (int j = 0; j < valid; ++j) {
    S* row = dst.row(b, d0 + j);
    for (int64_t t = 0; t < L; ++t) row[t * dst.st] = static_cast<S>(src[t * W + j]);
  }
}

// Reverses the order of the L rows of a time-major (L, W) scratch in place (for kernels that run right to left:
// the rows are gathered and scattered in memory order and reversed in cache).
template <typename T>
void reverse_rows(T* rows, int W, int64_t L) {
  using Vec = Vectorized<T>;
  for (int64_t t = 0, s = L - 1; t < s; ++t, --s) {
    for (int j = 0; j < W; j += Vec::size()) {
      const Vec a = Vec::loadu(rows + t * W + j), b = Vec::loadu(rows + s * W + j);
      b.store(rows + t * W + j);
      a.store(rows + s * W + j);
    }
  }
}

// Software prefetch of the next block's rows into L2, spread over the current block's steps: the gathers then read
// from cache instead of waiting for memory. Rows of unit stride along L are walked line by line; channel-last rows
// (the block's W channels adjacent, one step every st elements: a strided walk the hardware prefetchers do not
// follow far) one line per step. Other layouts are left to the hardware.
template <typename T>
struct Prefetcher {
  static constexpr int kMaxStreams = 8 * 64;
  struct Stream {
    const char* base;
    int64_t step, lines;   // bytes between lines, number of lines
    int64_t width;         // bytes of each line's span (channel-last: W channels, may straddle two lines)
    bool write;
  };
  Stream streams[kMaxStreams];
  int64_t count = 0, total = 0, per_step = 0, stream = 0, line = 0;

  void reset() { count = total = stream = line = 0; }
  // rows d0 .. d0 + valid - 1 of `r` (to be read, or written: `for_write`)
  template <typename S>
  void add(const Rows<S>& r, int64_t b, int64_t d0, int valid, int64_t L, bool for_write = false) {
    if (r.data == nullptr) return;
    if (r.st == 1) {
      const int64_t lines = (L * static_cast<int64_t>(sizeof(S)) + 63) / 64;
      for (int j = 0; j < valid && count < kMaxStreams; ++j) {
        streams[count++] = Stream{reinterpret_cast<const char*>(r.row(b, d0 + j)), 64, lines, 1, for_write};
        total += lines;
      }
    } else if (r.sd == 1 && count < kMaxStreams) {
      streams[count++] = Stream{reinterpret_cast<const char*>(r.row(b, d0)),
                                r.st * static_cast<int64_t>(sizeof(S)), L, valid * static_cast<int64_t>(sizeof(S)),
                                for_write};
      total += L;
    }
  }
  void start(int64_t steps) { per_step = steps > 0 ? (total + steps - 1) / steps : total; }
  inline void fetch(const char* at, bool write) {
    if (write) {
      __builtin_prefetch(at, 1, 2);
    } else {
      __builtin_prefetch(at, 0, 2);
    }
  }
  inline void step() {  // the next per_step lines
    for (int64_t i = 0; i < per_step && stream < count; ++i) {
      const Stream& s = streams[stream];
      const char* at = s.base + line * s.step;
      fetch(at, s.write);
      // a span that crosses a line boundary takes the next line too
      if (((reinterpret_cast<uintptr_t>(at) & 63) + s.width) > 64) fetch(at + 64, s.write);
      if (++line == s.lines) line = 0, ++stream;
    }
  }
};

// Runs fn(task, state) for every task in [0, tasks) on torch's intra-op threads, handing the tasks out one at a time
// from a shared counter: a thread that other work on the machine holds up takes fewer, instead of keeping the others
// waiting. Every thread gets its own state from make_state(). Results must not depend on which thread ran a task
// (write per-task partial sums, then reduce them in task order): they are then the same for any thread count.
template <typename MakeState, typename Fn>
void for_each_task(int64_t tasks, const MakeState& make_state, const Fn& fn) {
  std::atomic<int64_t> next{0};
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks));
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    auto state = make_state();
    for (int64_t task = next.fetch_add(1); task < tasks; task = next.fetch_add(1)) fn(task, state);
  });
}

// parts (P, ...) contiguous -> their sum over the leading dimension, added in order (deterministic).
template <typename T>
void sum_leading(const T* parts, int64_t count, int64_t size, T* out) {
  using Vec = Vectorized<T>;
  std::copy(parts, parts + size, out);
  for (int64_t p = 1; p < count; ++p) {
    const T* part = parts + p * size;
    int64_t i = 0;
    for (; i + Vec::size() <= size; i += Vec::size()) (Vec::loadu(out + i) + Vec::loadu(part + i)).store(out + i);
    for (; i < size; ++i) out[i] += part[i];
  }
}

}  // namespace dartmamba_cpu

// The 4-bit mat-vec kernels (portable, AVX2+FMA, AVX-512) and the per-call Job they share.
// See quantized_matmul.cpp for the layout and the tricks.
#pragma once

#include <cstdint>
#include <cstring>

#include "isa.h"

namespace native {

enum ScaleType : int { F32 = 0, BF16 = 1, F16 = 2 };

// ---------------------------------------------------------------------------------------------
// Scalar conversions (portable)

inline float bf16_to_f32(uint16_t v) {
  uint32_t bits = uint32_t(v) << 16;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
  uint32_t bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000 | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal half: normalise
    int shift = 0;
    while (!(mantissa & 0x400)) {
      mantissa <<= 1;
      ++shift;
    }
    bits = sign | (uint32_t(113 - shift) << 23) | ((mantissa & 0x3ff) << 13);
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

template <int T>
inline float to_f32(const void* base, int64_t index) {
  if constexpr (T == F32) {
    return static_cast<const float*>(base)[index];
  } else if constexpr (T == BF16) {
    return bf16_to_f32(static_cast<const uint16_t*>(base)[index]);
  } else {
    return f16_to_f32(static_cast<const uint16_t*>(base)[index]);
  }
}

// ---------------------------------------------------------------------------------------------
// One call's data, shared by every thread

struct Job {
  const uint32_t* w;
  const void* scales;
  const void* biases;
  int64_t N, K;
  int M, group_size;
  const float* xp;  // [M][K] permuted and pre-scaled for the vector kernels; plain for scalar
  const float* xs;  // [M][K/8] sums of each word's 8 elements of x
  float* out;       // [M][N] float32
  int64_t prefetch_words;
  // The int8 variant (QWEN3_MLX_NATIVE_INT8=1) only: x quantized to int8 per block of 32 and laid
  // out per step of 16 words as [the 4 even elements of each word][the 4 odd ones], and each
  // word's block scale.
  const int8_t* xq = nullptr;  // [M][K]
  const float* xd = nullptr;   // [M][K/8]
};

// ---------------------------------------------------------------------------------------------
// Portable kernel: plain x, group by group

template <int T>
void rows_scalar(const Job& job, int64_t r0, int64_t r1) {
  const int64_t K = job.K, words = K / 8, groups = K / job.group_size;
  const int gw = job.group_size / 8;  // words per group
  for (int64_t n = r0; n < r1; ++n) {
    const uint32_t* row = job.w + n * words;
    for (int m = 0; m < job.M; ++m) {
      const float* x = job.xp + m * K;
      const float* xs = job.xs + m * words;
      float total = 0.0f;
      for (int64_t g = 0; g < groups; ++g) {
        float dot = 0.0f, sum = 0.0f;
        for (int i = 0; i < gw; ++i) {
          uint32_t word = row[g * gw + i];
          const float* xg = x + (g * gw + i) * 8;
          for (int s = 0; s < 8; ++s) dot += float((word >> (4 * s)) & 0xf) * xg[s];
          sum += xs[g * gw + i];
        }
        total += dot * to_f32<T>(job.scales, n * groups + g) +
            sum * to_f32<T>(job.biases, n * groups + g);
      }
      job.out[m * job.N + n] = total;
    }
  }
}

#ifdef NATIVE_X86

// ---------------------------------------------------------------------------------------------
// AVX2 + FMA: 8 words (64 weights) per step, up to 2 rows of x at once


// G scales starting at p, widened to 8 lanes (lane j -> value j*G/8), as float32.
template <int T, int G>
NATIVE_AVX2 inline __m256 scales8(const void* p) {
  __m128 v;
  if constexpr (T == F32) {
    const float* f = static_cast<const float*>(p);
    if constexpr (G == 1) return _mm256_broadcast_ss(f);
    v = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(f)));
  } else {
    const uint16_t* h = static_cast<const uint16_t*>(p);
    uint32_t raw = G == 1 ? h[0] : (uint32_t(h[0]) | uint32_t(h[1]) << 16);
    __m128i bits = _mm_cvtsi32_si128(int(raw));
    if constexpr (T == BF16) {
      v = _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(bits), 16));
    } else {
      v = _mm_cvtph_ps(bits);
    }
    if constexpr (G == 1) return _mm256_set1_ps(_mm_cvtss_f32(v));
  }
  const __m256i index = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(v), index);
}

NATIVE_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int T, int GS, int MB>
NATIVE_AVX2 void block_avx2(const Job& job, int64_t n, int m0) {
  constexpr int G = 64 / GS > 0 ? 64 / GS : 1;  // groups per step
  const int64_t K = job.K, steps = K / 64, groups = K / GS;
  const uint32_t* row = job.w + n * (K / 8);
  const char* srow = static_cast<const char*>(job.scales) + n * groups * (T == F32 ? 4 : 2);
  const char* brow = static_cast<const char*>(job.biases) + n * groups * (T == F32 ? 4 : 2);
  const int64_t esize = T == F32 ? 4 : 2;
  __m256 total[MB], totalb[MB];
  for (int m = 0; m < MB; ++m) total[m] = totalb[m] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi32(0xf);
  for (int64_t c = 0; c < steps; ++c) {
    if (job.prefetch_words) _mm_prefetch(reinterpret_cast<const char*>(row + c * 8 + job.prefetch_words), _MM_HINT_T0);
    const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c * 8));
    const int64_t g = c * 64 / GS;
    const __m256 sv = scales8<T, G>(srow + g * esize);
    const __m256 bv = scales8<T, G>(brow + g * esize);
    __m256 even[MB], odd[MB];
    for (int m = 0; m < MB; ++m) even[m] = odd[m] = _mm256_setzero_ps();
#pragma GCC unroll 8
    for (int s = 0; s < 8; ++s) {
      __m256i q = s == 7 ? _mm256_srli_epi32(words, 28)
                         : _mm256_and_si256(words, _mm256_slli_epi32(low, 4 * s));
      __m256 qf = _mm256_cvtepi32_ps(q);
      _Pragma("GCC unroll 4") for (int m = 0; m < MB; ++m) {
        const float* x = job.xp + (m0 + m) * K + c * 64 + s * 8;
        if (s & 1) {
          odd[m] = _mm256_fmadd_ps(qf, _mm256_loadu_ps(x), odd[m]);
        } else {
          even[m] = _mm256_fmadd_ps(qf, _mm256_loadu_ps(x), even[m]);
        }
      }
    }
    _Pragma("GCC unroll 4") for (int m = 0; m < MB; ++m) {
      total[m] = _mm256_fmadd_ps(_mm256_add_ps(even[m], odd[m]), sv, total[m]);
      const float* xs = job.xs + (m0 + m) * (K / 8) + c * 8;
      totalb[m] = _mm256_fmadd_ps(bv, _mm256_loadu_ps(xs), totalb[m]);
    }
  }
  for (int m = 0; m < MB; ++m) job.out[(m0 + m) * job.N + n] = hsum8(_mm256_add_ps(total[m], totalb[m]));
}

template <int T, int GS>
NATIVE_AVX2 void rows_avx2(const Job& job, int64_t r0, int64_t r1) {
  for (int64_t n = r0; n < r1; ++n) {
    int m = 0;
    for (; m + 2 <= job.M; m += 2) block_avx2<T, GS, 2>(job, n, m);
    if (m < job.M) block_avx2<T, GS, 1>(job, n, m);
  }
}

// ---------------------------------------------------------------------------------------------
// AVX-512: 16 words (128 weights) per step; tiles of up to 8 rows of w and 3 rows of x


template <int T, int G>
NATIVE_AVX512 inline __m512 scales16(const void* p) {
  __m128 v;
  if constexpr (T == F32) {
    const float* f = static_cast<const float*>(p);
    if constexpr (G == 1) return _mm512_set1_ps(f[0]);
    if constexpr (G == 2) {
      v = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(f)));
    } else {
      v = _mm_loadu_ps(f);
    }
  } else {
    const uint16_t* h = static_cast<const uint16_t*>(p);
    __m128i bits;
    if constexpr (G == 4) {
      bits = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(h));
    } else {
      uint32_t raw = G == 1 ? h[0] : (uint32_t(h[0]) | uint32_t(h[1]) << 16);
      bits = _mm_cvtsi32_si128(int(raw));
    }
    if constexpr (T == BF16) {
      v = _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(bits), 16));
    } else {
      v = _mm_cvtph_ps(bits);
    }
    if constexpr (G == 1) return _mm512_set1_ps(_mm_cvtss_f32(v));
  }
  const __m512i index = G == 2
      ? _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1)
      : _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  return _mm512_permutexvar_ps(index, _mm512_castps128_ps512(v));
}

// Row n of w and its scales and biases (bytes), for the 16-word steps of the AVX-512 kernels.
template <int T, int GS>
struct Row512 {
  static constexpr int G = 128 / GS;  // groups per step: 1, 2 or 4
  static constexpr int64_t esize = T == F32 ? 4 : 2;
  const uint32_t* w;
  const char *s, *b;
  Row512(const Job& job, int64_t n)
      : w(job.w + n * (job.K / 8)),
        s(static_cast<const char*>(job.scales) + n * (job.K / GS) * esize),
        b(static_cast<const char*>(job.biases) + n * (job.K / GS) * esize) {}
};

// NB rows of w (n0..) times MB rows of x (m0..). Each 16-word step unpacks the NB rows' words
// once for all MB rows of x, and loads each x vector once for all NB rows of w; the next tile's
// words are prefetched as one linear run (its NB rows are contiguous), one line per row and step.
// Every (row of w, row of x) pair has its own sums, added in one order whatever NB and MB are:
// per step acc = q_0 x_0 + ... + q_7 x_7 (a product, then 7 FMAs), then
// total += acc * scale; total += bias * word sums of x. So each row of x gets, bit for bit, the
// result a one-row call gives it (a speculative verify pass relies on that).
template <int T, int GS, int NB, int MB>
NATIVE_AVX512 void tile_avx512(const Job& job, int64_t n0, int m0) {
  constexpr int G = Row512<T, GS>::G, esize = Row512<T, GS>::esize;
  const int64_t K = job.K, steps = K / 128, words = K / 8, groups = K / GS;
  const uint32_t* w = job.w + n0 * words;
  const char* scales = static_cast<const char*>(job.scales) + n0 * groups * esize;
  const char* biases = static_cast<const char*>(job.biases) + n0 * groups * esize;
  const float* x = job.xp + m0 * K;
  const float* xs = job.xs + m0 * words;
  __m512 total[NB][MB];
#pragma GCC unroll 8
  for (int n = 0; n < NB; ++n)
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) total[n][m] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi32(0xf);
  for (int64_t c = 0; c < steps; ++c) {
    __m512i packed[NB];
#pragma GCC unroll 8
    for (int n = 0; n < NB; ++n) {
      if (job.prefetch_words)
        _mm_prefetch(reinterpret_cast<const char*>(w + NB * words + (c * NB + n) * 16), _MM_HINT_T0);
      packed[n] = _mm512_loadu_si512(w + n * words + c * 16);
    }
    __m512 acc[NB][MB];
#pragma GCC unroll 8
    for (int s = 0; s < 8; ++s) {
      __m512 q[NB];
#pragma GCC unroll 8
      for (int n = 0; n < NB; ++n)
        q[n] = _mm512_cvtepi32_ps(s == 7 ? _mm512_srli_epi32(packed[n], 28)
                                          : _mm512_and_si512(packed[n], _mm512_slli_epi32(low, 4 * s)));
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) {
        const __m512 xv = _mm512_loadu_ps(x + m * K + c * 128 + s * 16);
#pragma GCC unroll 8
        for (int n = 0; n < NB; ++n)
          acc[n][m] = s == 0 ? _mm512_mul_ps(q[n], xv) : _mm512_fmadd_ps(q[n], xv, acc[n][m]);
      }
    }
#pragma GCC unroll 8
    for (int n = 0; n < NB; ++n) {
      const __m512 sv = scales16<T, G>(scales + (n * groups + c * G) * esize);
      const __m512 bv = scales16<T, G>(biases + (n * groups + c * G) * esize);
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) {
        total[n][m] = _mm512_fmadd_ps(acc[n][m], sv, total[n][m]);
        total[n][m] = _mm512_fmadd_ps(bv, _mm512_loadu_ps(xs + m * words + c * 16), total[n][m]);
      }
    }
  }
#pragma GCC unroll 8
  for (int n = 0; n < NB; ++n)
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m)
      job.out[(m0 + m) * job.N + n0 + n] = _mm512_reduce_add_ps(total[n][m]);
}

// NB rows of w times every row of x, in tiles of at most 3 rows of x (4 as 2 + 2).
template <int T, int GS, int NB>
NATIVE_AVX512 void tile_rows_avx512(const Job& job, int64_t n0) {
  int m = 0;
  if (job.M == 4) {
    tile_avx512<T, GS, NB, 2>(job, n0, 0);
    tile_avx512<T, GS, NB, 2>(job, n0, 2);
    return;
  }
  for (; m + 3 <= job.M; m += 3) tile_avx512<T, GS, NB, 3>(job, n0, m);
  if (job.M - m == 2) tile_avx512<T, GS, NB, 2>(job, n0, m);
  if (job.M - m == 1) tile_avx512<T, GS, NB, 1>(job, n0, m);
}

// Rows [r0, r1) of w: 8 at a time for one row of x (decode: bound by reading w), 4 for more
// (bound by the FMAs: 4 x 3 sums fit the registers); a remainder one at a time.
template <int T, int GS>
NATIVE_AVX512 void rows_avx512(const Job& job, int64_t r0, int64_t r1) {
  int64_t n = r0;
  if (job.M == 1) {
    for (; n + 8 <= r1; n += 8) tile_avx512<T, GS, 8, 1>(job, n, 0);
  } else {
    for (; n + 4 <= r1; n += 4) tile_rows_avx512<T, GS, 4>(job, n);
  }
  for (; n < r1; ++n) tile_rows_avx512<T, GS, 1>(job, n);
}

// ---------------------------------------------------------------------------------------------
// AVX-512 VNNI, int8 x (opt-in): 16 words per step. `w & 0x0f0f0f0f` holds a word's even
// nibbles as bytes and `(w >> 4) & 0x0f0f0f0f` its odd ones, so two vpdpbusd (u8 weights times
// s8 x) give each word's 8 products summed in its int32 lane, then scaled by the lane's group
// scale times its x block scale. The bias term uses the exact float sums of x, so the only
// error is x's int8 rounding (half a block step per element), as llama.cpp's Q8_0 activations.


// NB rows of w times MB rows of x, tiled as the float kernel's (tile_avx512); integer sums are
// exact, and the float steps keep one order per (row of w, row of x) whatever NB and MB are.
template <int T, int GS, int NB, int MB>
NATIVE_VNNI void tile_vnni(const Job& job, int64_t n0, int m0) {
  constexpr int G = Row512<T, GS>::G, esize = Row512<T, GS>::esize;
  const int64_t K = job.K, words = K / 8, groups = K / GS;
  const uint32_t* w = job.w + n0 * words;
  const char* scales = static_cast<const char*>(job.scales) + n0 * groups * esize;
  const char* biases = static_cast<const char*>(job.biases) + n0 * groups * esize;
  __m512 total[NB][MB], totalb[NB][MB];
#pragma GCC unroll 8
  for (int n = 0; n < NB; ++n)
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) total[n][m] = totalb[n][m] = _mm512_setzero_ps();
  const __m512i nibble = _mm512_set1_epi8(0x0f);
  for (int64_t c = 0; c < K / 128; ++c) {
#pragma GCC unroll 8
    for (int n = 0; n < NB; ++n) {
      if (job.prefetch_words)
        _mm_prefetch(reinterpret_cast<const char*>(w + NB * words + (c * NB + n) * 16), _MM_HINT_T0);
      const __m512i packed = _mm512_loadu_si512(w + n * words + c * 16);
      const __m512i even = _mm512_and_si512(packed, nibble);
      const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(packed, 4), nibble);
      const __m512 step_scales = scales16<T, G>(scales + (n * groups + c * G) * esize);
      const __m512 step_biases = scales16<T, G>(biases + (n * groups + c * G) * esize);
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) {
        const int8_t* xq = job.xq + (m0 + m) * K + c * 128;
        __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), even, _mm512_loadu_si512(xq));
        dot = _mm512_dpbusd_epi32(dot, odd, _mm512_loadu_si512(xq + 64));
        const int64_t word = (m0 + m) * words + c * 16;
        const __m512 step = _mm512_mul_ps(step_scales, _mm512_loadu_ps(job.xd + word));
        total[n][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), step, total[n][m]);
        totalb[n][m] = _mm512_fmadd_ps(step_biases, _mm512_loadu_ps(job.xs + word), totalb[n][m]);
      }
    }
  }
#pragma GCC unroll 8
  for (int n = 0; n < NB; ++n)
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m)
      job.out[(m0 + m) * job.N + n0 + n] =
          _mm512_reduce_add_ps(_mm512_add_ps(total[n][m], totalb[n][m]));
}

template <int T, int GS, int NB>
NATIVE_VNNI void tile_rows_vnni(const Job& job, int64_t n0) {
  int m = 0;
  for (; m + 3 <= job.M; m += 3) tile_vnni<T, GS, NB, 3>(job, n0, m);
  if (job.M - m == 2) tile_vnni<T, GS, NB, 2>(job, n0, m);
  if (job.M - m == 1) tile_vnni<T, GS, NB, 1>(job, n0, m);
}

template <int T, int GS>
NATIVE_VNNI void rows_vnni(const Job& job, int64_t r0, int64_t r1) {
  int64_t n = r0;
  if (job.M == 1) {
    for (; n + 8 <= r1; n += 8) tile_vnni<T, GS, 8, 1>(job, n, 0);
  } else {
    for (; n + 4 <= r1; n += 4) tile_rows_vnni<T, GS, 4>(job, n);
  }
  for (; n < r1; ++n) tile_rows_vnni<T, GS, 1>(job, n);
}

#endif  // NATIVE_X86

using RowsFn = void (*)(const Job&, int64_t, int64_t);

// The int8 kernel for an AVX-512 VNNI CPU (nullptr elsewhere: the float kernels serve).
inline RowsFn pick_int8(ScaleType type, int group_size) {
#ifdef NATIVE_X86
  auto by_group = [group_size](auto k32, auto k64, auto k128) -> RowsFn {
    return group_size == 32 ? k32 : group_size == 64 ? k64 : k128;
  };
  switch (type) {
    case F32:
      return by_group(rows_vnni<F32, 32>, rows_vnni<F32, 64>, rows_vnni<F32, 128>);
    case BF16:
      return by_group(rows_vnni<BF16, 32>, rows_vnni<BF16, 64>, rows_vnni<BF16, 128>);
    default:
      return by_group(rows_vnni<F16, 32>, rows_vnni<F16, 64>, rows_vnni<F16, 128>);
  }
#else
  (void)type;
  (void)group_size;
  return nullptr;
#endif
}

template <int T>
RowsFn pick_for_type(Isa isa, int group_size) {
#ifdef NATIVE_X86
  if (isa == AVX512) {
    switch (group_size) {
      case 32: return rows_avx512<T, 32>;
      case 64: return rows_avx512<T, 64>;
      case 128: return rows_avx512<T, 128>;
    }
  }
  if (isa == AVX2) {
    switch (group_size) {
      case 32: return rows_avx2<T, 32>;
      case 64: return rows_avx2<T, 64>;
      case 128: return rows_avx2<T, 128>;
    }
  }
#endif
  return rows_scalar<T>;
}

inline RowsFn pick(Isa isa, ScaleType type, int group_size) {
  switch (type) {
    case F32: return pick_for_type<F32>(isa, group_size);
    case BF16: return pick_for_type<BF16>(isa, group_size);
    default: return pick_for_type<F16>(isa, group_size);
  }
}

}  // namespace native

// The 4-bit mat-vec kernels (portable, AVX2+FMA; AVX-512 in matvec_avx512.h) and the per-call Job
// they share.
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

}  // namespace native

#include "matvec_avx512.h"

namespace native {

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

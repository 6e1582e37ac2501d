// The 4-bit mat-vec kernels (portable, AVX2+FMA; AVX-512 in matvec_avx512.h) and the per-call Job
// they share.
// See quantized_matmul.cpp for the layout and the tricks.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

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
  // The int8 variant (unless QWEN3_MLX_NATIVE_INT8=0) only: x quantized to int8 per block of 32
  // and laid out per step of 16 words as [the 4 even elements of each word][the 4 odd ones], and
  // each word's block scale.
  const int8_t* xq = nullptr;  // [M][K]
  const float* xd = nullptr;   // [M][K/8]
  // The float vector kernels: each group's sum of x, per row of x padded with zeros to a
  // multiple of 16 groups (group_sums_stride: whole vectors for AVX2 and AVX-512).
  const float* xg = nullptr;  // [M][group_sums_stride(K / group_size)]
};

inline int64_t group_sums_stride(int64_t groups) { return (groups + 15) / 16 * 16; }

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
// AVX2 + FMA: 8 words (64 weights) per step; tiles of 4 rows of w by up to 3 rows of x


// G scales starting at p, widened to 8 lanes (lane j -> value j*G/8), as float32.
template <int T, int G>
NATIVE_AVX2 inline __m256 scales8(const void* p) {
  __m128 v;
  if constexpr (T == F32) {
    const float* f = static_cast<const float*>(p);
    if constexpr (G == 1) return _mm256_broadcast_ss(f);
    v = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(f)));
  } else if constexpr (T == BF16) {
    // bfloat16 is float32's top half: widened in a general register, then moved over once
    const uint16_t* h = static_cast<const uint16_t*>(p);
    if constexpr (G == 1) return _mm256_castsi256_ps(_mm256_set1_epi32(int(uint32_t(h[0]) << 16)));
    const uint64_t pair = uint64_t(h[0]) << 16 | uint64_t(h[1]) << 48;
    v = _mm_castsi128_ps(_mm_cvtsi64_si128(int64_t(pair)));
  } else {
    const uint16_t* h = static_cast<const uint16_t*>(p);
    uint32_t raw = G == 1 ? h[0] : (uint32_t(h[0]) | uint32_t(h[1]) << 16);
    v = _mm_cvtph_ps(_mm_cvtsi32_si128(int(raw)));
    if constexpr (G == 1) return _mm256_set1_ps(_mm_cvtss_f32(v));
  }
  const __m256i index = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(v), index);
}

// 8 consecutive values of type T from p as float32.
template <int T>
NATIVE_AVX2 inline __m256 widen8(const char* p) {
  if constexpr (T == F32) return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (T == BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
  return _mm256_cvtph_ps(bits);
}

// The biases of 8 groups from p (of the last `left` groups, zeros past them) as float32.
template <int T>
NATIVE_AVX2 inline __m256 biases8(const char* p, int64_t left) {
  if (left >= 8) return widen8<T>(p);
  alignas(32) char tail[32] = {};
  std::memcpy(tail, p, left * (T == F32 ? 4 : 2));
  return widen8<T>(tail);
}

NATIVE_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// NB rows of w (n0..) times MB rows of x (m0..), 8 words (64 weights) per step. Each step unpacks
// the NB rows' words once for all MB rows of x; the next tile's words are prefetched as one
// linear run (its NB rows are contiguous), one line per row every other step.
// Every (row of w, row of x) pair has its own sums, added in one order whatever NB and MB are, as
// in tile_avx512: per step acc = q_0 x_0 + ... + q_7 x_7 (a product, then 7 FMAs), then
// total += acc * scale; after the last step, per 8 groups total += biases * group sums of x
// (Job::xg; one FMA per 8 groups, where a bias per step cost one per step); the 8 lanes summed
// at the end by hsum8.
// So each row of x gets, bit for bit, the result a one-row call gives it (speculative verify).
template <int T, int GS, int NB, int MB>
NATIVE_AVX2 void tile_avx2(const Job& job, int64_t n0, int m0) {
  constexpr int G = GS >= 64 ? 1 : 64 / GS;  // groups per step: 2 (GS 32) or 1
  constexpr int64_t esize = T == F32 ? 4 : 2;
  const int64_t K = job.K, steps = K / 64, words = K / 8, groups = K / GS;
  const uint32_t* w = job.w + n0 * words;
  const char* scales = static_cast<const char*>(job.scales) + n0 * groups * esize;
  const char* biases = static_cast<const char*>(job.biases) + n0 * groups * esize;
  const float* x = job.xp + m0 * K;
  // The tile's biases are read after its last step: fetched now, they arrive during the steps.
  for (int64_t byte = 0; byte < NB * groups * esize; byte += 64) _mm_prefetch(biases + byte, _MM_HINT_T0);
  __m256 total[NB][MB];
#pragma GCC unroll 8
  for (int n = 0; n < NB; ++n)
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) total[n][m] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi32(0xf);
  for (int64_t c = 0; c < steps; ++c) {
    if (job.prefetch_words && !(c & 1)) {
#pragma GCC unroll 8
      for (int n = 0; n < NB; ++n)
        _mm_prefetch(reinterpret_cast<const char*>(w + NB * words + (c * NB + 2 * n) * 8), _MM_HINT_T0);
    }
    __m256i packed[NB];
#pragma GCC unroll 8
    for (int n = 0; n < NB; ++n)
      packed[n] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + n * words + c * 8));
    __m256 acc[NB][MB];
#pragma GCC unroll 8
    for (int s = 0; s < 8; ++s) {
#pragma GCC unroll 8
      for (int n = 0; n < NB; ++n) {
        const __m256 q = _mm256_cvtepi32_ps(
            s == 7 ? _mm256_srli_epi32(packed[n], 28)
                   : _mm256_and_si256(packed[n], _mm256_slli_epi32(low, 4 * s)));
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) {
          const __m256 xv = _mm256_loadu_ps(x + m * K + c * 64 + s * 8);
          acc[n][m] = s == 0 ? _mm256_mul_ps(q, xv) : _mm256_fmadd_ps(q, xv, acc[n][m]);
        }
      }
    }
    const int64_t g = c * 64 / GS;
#pragma GCC unroll 8
    for (int n = 0; n < NB; ++n) {
      const __m256 sv = scales8<T, G>(scales + (n * groups + g) * esize);
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) total[n][m] = _mm256_fmadd_ps(acc[n][m], sv, total[n][m]);
    }
  }
  // The bias term, 8 groups at a time: sum_g bias_g * (group g's sum of x).
  const int64_t stride = group_sums_stride(groups);
  const float* xg = job.xg + m0 * stride;
  for (int64_t g = 0; g < groups; g += 8) {
#pragma GCC unroll 8
    for (int n = 0; n < NB; ++n) {
      const __m256 bv = biases8<T>(biases + (n * groups + g) * esize, groups - g);
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m)
        total[n][m] = _mm256_fmadd_ps(bv, _mm256_loadu_ps(xg + m * stride + g), total[n][m]);
    }
  }
#pragma GCC unroll 8
  for (int n = 0; n < NB; ++n)
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) job.out[(m0 + m) * job.N + n0 + n] = hsum8(total[n][m]);
}

// Blocks of the M rows of x for a tile (3 at a time, 4 as 2 + 2, a remainder of 1 or 2): calls
// tile(std::integral_constant<int, rows>{}, first row) per block. Shared by the AVX2 and AVX-512
// float kernels.
template <typename Tile>
inline void x_blocks(int M, Tile tile) {
  if (M == 4) {
    tile(std::integral_constant<int, 2>{}, 0);
    tile(std::integral_constant<int, 2>{}, 2);
    return;
  }
  int m = 0;
  for (; m + 3 <= M; m += 3) tile(std::integral_constant<int, 3>{}, m);
  if (M - m == 2) tile(std::integral_constant<int, 2>{}, m);
  if (M - m == 1) tile(std::integral_constant<int, 1>{}, m);
}

// NB rows of w times every row of x.
template <int T, int GS, int NB>
NATIVE_AVX2 void tile_rows_avx2(const Job& job, int64_t n0) {
  x_blocks(job.M, [&](auto rows, int m) { tile_avx2<T, GS, NB, decltype(rows)::value>(job, n0, m); });
}

// Rows [r0, r1) of w, 4 at a time (a chunk is a multiple of 8 rows), the matrix's last 1-3 rows
// one at a time. 4 x 3 sums and their totals overflow the 16 ymm registers, but the totals are
// touched once a step, so their spills cost little: measured on a Zen 5 (2560 -> 4096, one
// thread, CPU time, words from DRAM), 4 rows of w beat 2 by 6-13% for 1-8 rows of x, and 8 by
// 4-6% for one row of x. Without the prefetch one row of x took 1.2-1.7x as long.
template <int T, int GS>
NATIVE_AVX2 void rows_avx2(const Job& job, int64_t r0, int64_t r1) {
  int64_t n = r0;
  for (; n + 4 <= r1; n += 4) tile_rows_avx2<T, GS, 4>(job, n);
  for (; n < r1; ++n) tile_rows_avx2<T, GS, 1>(job, n);
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

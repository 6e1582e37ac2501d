// The quantized-cache attention kernels (quantized_simd.h) in AVX2+FMA: 8 lanes.
//
// This file alone is compiled with -mavx2 -mfma (CMakeLists.txt) so that one kernel body serves
// both ISAs (per-function target attributes cannot follow a template parameter). Nothing here
// runs unless chosen_isa() found AVX2, and everything but avx2_kernels is in an unnamed
// namespace, so no AVX2 code can stand in for a portable function elsewhere.

#include "quantized_kernels.h"

// The flags of CMakeLists.txt (x86-64 with GCC or Clang).
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define QUANT_SIMD 1
#endif

namespace native {

#ifdef QUANT_SIMD
namespace {

struct Avx2 {
  using V = __m256;
  static constexpr int L = 8;
  // Tiles within 16 registers: TB * RB sums in `dots` (and 4 TB for the widened rows, scales and
  // biases), RB * SN * 2 in `weigh`.
  static constexpr int key_rows(int RB) { return RB >= 4 ? 1 : 2; }
  static constexpr int column_steps(int RB) { return RB >= 4 ? 1 : RB == 2 ? 2 : 4; }

  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static float first(V v) { return _mm256_cvtss_f32(v); }
  static float sum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static float top(V v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static V round(V x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static V pow2(V k) {  // 2^k for whole k in [-126, 127]: k + 127 as the exponent bits
    const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23));
  }
  static __m256i bytes8(const uint8_t* p) {  // 8 bytes, each widened to an int32 lane
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
  template <int BITS>
  static void widen(const uint8_t* row, int i, V& lo, V& hi) {
    if constexpr (BITS == 8) {
      lo = _mm256_cvtepi32_ps(bytes8(row + i));
      hi = _mm256_cvtepi32_ps(bytes8(row + i + 8));
    } else {
      const __m256i x = bytes8(row + i / 2);
      lo = _mm256_cvtepi32_ps(_mm256_and_si256(x, _mm256_set1_epi32(0xf)));
      hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(x, 4));
    }
  }
};

#include "simd_math.h"
#include "quantized_simd.h"

}  // namespace
#endif

// Without the flags (another compiler or CPU family) the portable kernels stand in.
QuantKernels avx2_kernels(int bits) {
#ifdef QUANT_SIMD
  return kernels_for<Avx2>(bits);
#else
  return scalar_kernels(bits);
#endif
}

}  // namespace native

// The prefill matmul (gemm_simd.h) in AVX2+FMA: 8 lanes, tiles of 6 rows x 16 columns (12 sums,
// 2 weight vectors and a broadcast in 16 registers).
//
// This file alone is compiled with AVX2 flags (CMakeLists.txt), like quantized_avx2.cpp; nothing
// here runs unless chosen_isa() found AVX2, and everything but gemm_avx2_kernels is in an
// unnamed namespace.

#include "gemm.h"
#include "prefill_attention.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

#include "simd_float.h"
#define GEMM_SIMD 1
#endif

namespace native {

#ifdef GEMM_SIMD
namespace {

struct Avx2 : FloatAvx2 {
  using IV = __m256i;
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V round(V x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static V pow2(V k) {  // 2^k for whole k in [-126, 127]: k + 127 as the exponent bits
    const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23));
  }
  static IV gather(const uint32_t* p, int64_t stride, int valid) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i row = _mm256_min_epi32(lane, _mm256_set1_epi32(valid - 1));
    return _mm256_i32gather_epi32(reinterpret_cast<const int*>(p),
                                  _mm256_mullo_epi32(row, _mm256_set1_epi32(int(stride))), 4);
  }
  static V nibble(IV words, int s) {
    return _mm256_cvtepi32_ps(
        _mm256_and_si256(_mm256_srl_epi32(words, _mm_cvtsi32_si128(4 * s)), _mm256_set1_epi32(0xf)));
  }
  static float half(uint16_t h) { return _cvtsh_ss(h); }
};

#include "gemm_simd.h"
#include "simd_math.h"
#include "prefill_attention_simd.h"

}  // namespace
#endif

// Without the flags (another compiler or CPU family) the portable kernels stand in.
GemmKernels gemm_avx2_kernels() {
#ifdef GEMM_SIMD
  return gemm_kernels_for<Avx2>();
#else
  return gemm_scalar_kernels();
#endif
}

AttentionKernels attention_avx2_kernels() {
#ifdef GEMM_SIMD
  return attention_kernels_for<Avx2>();
#else
  return attention_scalar_kernels();
#endif
}

}  // namespace native

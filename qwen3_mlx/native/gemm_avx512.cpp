// The prefill matmul (gemm_simd.h) in AVX-512: 16 lanes, tiles of 12 rows x 32 columns (24 sums,
// 2 weight vectors and a broadcast in 32 registers).
//
// This file alone is compiled with AVX-512 flags (CMakeLists.txt), like quantized_avx512.cpp;
// nothing here runs unless chosen_isa() found AVX-512, and everything but gemm_avx512_kernels is
// in an unnamed namespace.

#include "gemm.h"
#include "prefill_attention.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

#include "simd_float.h"
#define GEMM_SIMD 1
#endif

namespace native {

#ifdef GEMM_SIMD
namespace {

struct Avx512 : FloatAvx512 {
  using IV = __m512i;
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V round(V x) {
    return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static V pow2(V k) {  // 2^k for whole k in [-126, 127]: k + 127 as the exponent bits
    const __m512i biased = _mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(biased, 23));
  }
  static IV gather(const uint32_t* p, int64_t stride, int valid) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i row = _mm512_min_epi32(lane, _mm512_set1_epi32(valid - 1));
    return _mm512_i32gather_epi32(_mm512_mullo_epi32(row, _mm512_set1_epi32(int(stride))), p, 4);
  }
  static V nibble(IV words, int s) {
    return _mm512_cvtepi32_ps(
        _mm512_and_si512(_mm512_srl_epi32(words, _mm_cvtsi32_si128(4 * s)), _mm512_set1_epi32(0xf)));
  }
  static float half(uint16_t h) { return _cvtsh_ss(h); }
};

#include "gemm_simd.h"
#include "simd_math.h"
#include "prefill_attention_simd.h"

}  // namespace
#endif

// Without the flags (another compiler or CPU family) the portable kernels stand in.
GemmKernels gemm_avx512_kernels() {
#ifdef GEMM_SIMD
  return gemm_kernels_for<Avx512>();
#else
  return gemm_scalar_kernels();
#endif
}

AttentionKernels attention_avx512_kernels() {
#ifdef GEMM_SIMD
  return attention_kernels_for<Avx512>();
#else
  return attention_scalar_kernels();
#endif
}

}  // namespace native

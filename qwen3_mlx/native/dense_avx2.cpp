// The bf16-weight kernels (dense_simd.h) in AVX2+FMA: 8 lanes; the matmul's tile is 6 rows x 16
// columns (gemm_simd.h's multiply_tile: 12 sums, 2 weight vectors and a broadcast in 16 registers).
//
// This file alone is compiled with AVX2 flags (CMakeLists.txt), like gemm_avx2.cpp; nothing here
// runs unless chosen_isa() found AVX2, and everything but dense_avx2_kernels is in an unnamed
// namespace.

#include "dense.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#include "simd_float.h"
#define DENSE_SIMD 1
#endif

namespace native {

#ifdef DENSE_SIMD
namespace {

struct Avx2 : FloatAvx2 {
  static void widen(const uint16_t* p, V& even, V& odd) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int(0xffff0000u))));
  }
  static void widen_pairs(const uint16_t* p, int64_t stride, int valid, V& even, V& odd) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i row = _mm256_min_epi32(lane, _mm256_set1_epi32(valid - 1));
    const __m256i v = _mm256_i32gather_epi32(reinterpret_cast<const int*>(p),
                                             _mm256_mullo_epi32(row, _mm256_set1_epi32(int(stride))), 2);
    even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int(0xffff0000u))));
  }
};

#include "gemm_simd.h"
#include "dense_simd.h"

}  // namespace
#endif

DenseKernels dense_avx2_kernels() {
#ifdef DENSE_SIMD
  return dense_kernels_for<Avx2>();
#else
  return dense_scalar_kernels();
#endif
}

}  // namespace native

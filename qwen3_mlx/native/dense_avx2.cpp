// The bf16-weight kernels (dense_simd.h) in AVX2+FMA: 8 lanes; the matmul's tile is 6 rows x 16
// columns (gemm_simd.h's multiply_tile: 12 sums, 2 weight vectors and a broadcast in 16 registers).
//
// This file alone is compiled with AVX2 flags (CMakeLists.txt), like gemm_avx2.cpp; nothing here
// runs unless chosen_isa() found AVX2, and everything but dense_avx2_kernels is in an unnamed
// namespace.

#include "dense.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DENSE_SIMD 1
#endif

namespace native {

#ifdef DENSE_SIMD
namespace {

struct Avx2 {
  static constexpr int L = 8, MR = 6;
  using V = __m256;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V a) { _mm256_storeu_ps(p, a); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static float sum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
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

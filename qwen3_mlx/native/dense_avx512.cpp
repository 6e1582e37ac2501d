// The bf16-weight kernels (dense_simd.h) in AVX-512: 16 lanes; the matmul's tile is the 4-bit
// matmul's (12 rows x 32 columns, gemm_simd.h).
//
// This file alone is compiled with AVX-512 flags (CMakeLists.txt), like gemm_avx512.cpp; nothing
// here runs unless chosen_isa() found AVX-512, and everything but dense_avx512_kernels is in an
// unnamed namespace.

#include "dense.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__FMA__)
#include <immintrin.h>

#include "simd_float.h"
#define DENSE_SIMD 1
#endif

namespace native {

#ifdef DENSE_SIMD
namespace {

struct Avx512 : FloatAvx512 {
  static void widen(const uint16_t* p, V& even, V& odd) {
    const __m512i v = _mm512_loadu_si512(p);
    even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int(0xffff0000u))));
  }
  static void widen_pairs(const uint16_t* p, int64_t stride, int valid, V& even, V& odd) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i row = _mm512_min_epi32(lane, _mm512_set1_epi32(valid - 1));
    const __m512i v = _mm512_i32gather_epi32(_mm512_mullo_epi32(row, _mm512_set1_epi32(int(stride))), p, 2);
    even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int(0xffff0000u))));
  }
};

#include "gemm_simd.h"
#include "dense_simd.h"

}  // namespace
#endif

// Without the flags (another compiler or CPU family) the portable kernels stand in.
DenseKernels dense_avx512_kernels() {
#ifdef DENSE_SIMD
  return dense_kernels_for<Avx512>();
#else
  return dense_scalar_kernels();
#endif
}

}  // namespace native

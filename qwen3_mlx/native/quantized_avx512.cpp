// The quantized-cache attention kernels (quantized_simd.h) in AVX-512: 16 lanes.
//
// This file alone is compiled with AVX-512 flags (CMakeLists.txt) so that one kernel body serves
// both ISAs (per-function target attributes cannot follow a template parameter). Nothing here
// runs unless chosen_isa() found AVX-512 F/BW/VL/DQ, and everything but avx512_kernels is in an
// unnamed namespace, so no AVX-512 code can stand in for a portable function elsewhere.

#include "quantized_kernels.h"

// The flags of CMakeLists.txt (x86-64 with GCC or Clang).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__FMA__)
#include <immintrin.h>
#define QUANT_SIMD 1
#endif

namespace native {

#ifdef QUANT_SIMD
namespace {

struct Avx512 {
  using V = __m512;
  static constexpr int L = 16;
  // Tiles within 32 registers: TB * RB sums in `dots` (and 4 TB for the widened rows, scales and
  // biases), RB * SN * 2 in `weigh`; at least 8 independent sums, as FMA latency (4 cycles) times
  // its throughput (2 a cycle) asks.
  static constexpr int key_rows(int RB) { return RB >= 4 ? 2 : 4; }
  static constexpr int column_steps(int RB) { return RB >= 4 ? 2 : RB == 2 ? 4 : 8; }

  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static float first(V v) { return _mm512_cvtss_f32(v); }
  static float sum(V v) { return _mm512_reduce_add_ps(v); }
  static float top(V v) { return _mm512_reduce_max_ps(v); }
  static V round(V x) {
    return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static V pow2(V k) {  // 2^k for whole k in [-126, 127]: k + 127 as the exponent bits
    const __m512i biased = _mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(biased, 23));
  }
  static __m512i bytes16(const uint8_t* p) {  // 16 bytes, each widened to an int32 lane
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  template <int BITS>
  static void widen(const uint8_t* row, int i, V& lo, V& hi) {
    if constexpr (BITS == 8) {
      lo = _mm512_cvtepi32_ps(bytes16(row + i));
      hi = _mm512_cvtepi32_ps(bytes16(row + i + 16));
    } else {
      const __m512i x = bytes16(row + i / 2);
      lo = _mm512_cvtepi32_ps(_mm512_and_si512(x, _mm512_set1_epi32(0xf)));
      hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(x, 4));
    }
  }
};

#include "simd_math.h"
#include "quantized_simd.h"

}  // namespace
#endif

// Without the flags (another compiler or CPU family) the portable kernels stand in.
QuantKernels avx512_kernels(int bits) {
#ifdef QUANT_SIMD
  return kernels_for<Avx512>(bits);
#else
  return scalar_kernels(bits);
#endif
}

}  // namespace native

// The opt-in bf16-dot mat-vec (QWEN3_MLX_NATIVE_DENSE_BF16=1; AVX512-BF16 only): x rounded to bf16
// (nearest-even) and one `vdpbf16ps` per 32 weights, as llama.cpp's BF16 path does, where the exact
// mat-vec (dense_simd.h) widens the weights with a shift and an AND and issues two FMAs. The
// products are exact and the sums float32, but x keeps only 8 significant bits: results drift
// by about 2^-9 of sum |x w| (measured in tests/test_dense.py), so it is never the default.
//
// This file alone is compiled with AVX-512 and AVX512-BF16 flags (CMakeLists.txt); nothing here
// runs unless dense_bf16_supported() said so.

#include "dense.h"

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

#include "simd_float.h"
#define DENSE_BF16 1
#endif

namespace native {

#ifdef DENSE_BF16
namespace {

template <int M, int R>
void dots(const uint16_t* x, int64_t K, const DenseMatrix& m, int64_t n) {
  __m512 acc[M][R];
  for (int i = 0; i < M; ++i)
    for (int r = 0; r < R; ++r) acc[i][r] = _mm512_setzero_ps();
  const uint16_t* w = m.w + n * K;
  for (int64_t k = 0; k < K; k += 32) {
    __m512i wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) wv[r] = _mm512_loadu_si512(w + r * K + k);
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i * K + k);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], xv, (__m512bh)wv[r]);
    }
  }
  for (int i = 0; i < M; ++i)
    for (int r = 0; r < R; ++r) m.out[i * m.N + n + r] = FloatAvx512::sum(acc[i][r]);
}

template <int M>
void rows_m(const uint16_t* x, int64_t K, const DenseMatrix& m, int64_t n0, int64_t n1) {
  constexpr int R = M == 1 ? 8 : M <= 4 ? 4 : 2;
  int64_t n = n0;
  for (; n + R <= n1; n += R) dots<M, R>(x, K, m, n);
  for (; n < n1; ++n) dots<M, 1>(x, K, m, n);
}

}  // namespace
#endif

bool dense_bf16_supported() {
#ifdef DENSE_BF16
  static const bool bf16 = __builtin_cpu_supports("avx512bf16");
  return bf16;
#else
  return false;
#endif
}

void dense_bf16_rows(const uint16_t* x, int M, int64_t K, const DenseMatrix& m, int64_t n0,
                     int64_t n1) {
#ifdef DENSE_BF16
  switch (M) {
    case 1: return rows_m<1>(x, K, m, n0, n1);
    case 2: return rows_m<2>(x, K, m, n0, n1);
    case 3: return rows_m<3>(x, K, m, n0, n1);
    case 4: return rows_m<4>(x, K, m, n0, n1);
    case 5: return rows_m<5>(x, K, m, n0, n1);
    case 6: return rows_m<6>(x, K, m, n0, n1);
    case 7: return rows_m<7>(x, K, m, n0, n1);
    default: return rows_m<8>(x, K, m, n0, n1);
  }
#endif
}

}  // namespace native

// The portable bf16-weight kernels (dense.h; plain loops the compiler may vectorize for the
// baseline ISA) and the mat-vec's layout of x that every ISA's kernel shares.

#include <cstring>

#include "dense.h"

namespace native {
namespace {

float widen(uint16_t h) {
  const uint32_t bits = uint32_t(h) << 16;  // a bf16 is the high half of a float32
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

void rows_scalar(const float* x, int M, int64_t K, const DenseMatrix& m, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* w = m.w + n * K;
    for (int i = 0; i < M; ++i) {
      float total = 0.0f;
      for (int64_t k = 0; k < K; ++k) total += x[i * K + k] * widen(w[k]);
      m.out[i * m.N + n] = total;
    }
  }
}

// x is packed by pack_rows for MR = 1: block by block of GEMM_KC columns, row after row.
void panels_scalar(const GemmRows& x, const DenseMatrix& m, int64_t p0, int64_t p1) {
  const int64_t n1 = p1 < m.N ? p1 : m.N;
  for (int64_t n = p0; n < n1; ++n) {
    const uint16_t* w = m.w + n * x.K;
    for (int i = 0; i < x.M; ++i) {
      float total = 0.0f;
      for (int64_t k0 = 0; k0 < x.K; k0 += GEMM_KC) {
        const int64_t kc = x.K - k0 < GEMM_KC ? x.K - k0 : GEMM_KC;
        const float* row = x.packed + k0 * x.M + i * kc;
        for (int64_t k = 0; k < kc; ++k) total += row[k] * widen(w[k0 + k]);
      }
      m.out[i * m.N + n] = total;
    }
  }
}

}  // namespace

DenseKernels dense_scalar_kernels() { return {1, 1, 1, rows_scalar, panels_scalar}; }

void dense_layout(const float* x, int M, int64_t K, int lanes, float* out) {
  if (lanes == 1) {
    std::memcpy(out, x, sizeof(float) * size_t(M) * size_t(K));
    return;
  }
  for (int64_t k = 0; k < K; k += 2 * lanes)
    for (int i = 0; i < M; ++i) {
      const float* in = x + i * K + k;
      float* step = out + k * M + i * 2 * lanes;
      for (int j = 0; j < lanes; ++j) {
        step[j] = in[2 * j];
        step[lanes + j] = in[2 * j + 1];
      }
    }
}

}  // namespace native

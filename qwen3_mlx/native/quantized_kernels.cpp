// The portable quantized-cache attention kernels (quantized_kernels.h), the reference for the
// SIMD ones, and the conversions between element orders.

#include "quantized_kernels.h"

#include <algorithm>

#include "attention.h"

namespace native {
namespace {

// Element i of a packed row as an integer 0..2^BITS-1. The uint32 words are little-endian (x86-64,
// arm64), so at 4 bits element i is in byte i / 2, the even one in the low nibble.
template <int BITS>
int element(const uint8_t* row, int i) {
  if constexpr (BITS == 8) return row[i];
  return (row[i / 2] >> (4 * (i % 2))) & 0xf;
}

// Element i of row t dequantized: scale_g * q + bias_g.
template <int BITS>
float value(const uint8_t* row, RowScales scales, int64_t n, int64_t t, int group, int i) {
  const int64_t g = i / group;
  return scales.scale[g * n + t] * float(element<BITS>(row, i)) + scales.bias[g * n + t];
}

template <int BITS>
void scores_scalar(const PackedRows& k, RowScales ks, const float* q, const QuantShape& shape,
                   float* score) {
  const int64_t n = k.n;
  for (int64_t t = 0; t < n; ++t)
    for (int r = 0; r < shape.R; ++r) {
      float total = 0.0f;
      for (int i = 0; i < shape.D; ++i)
        total += q[r * shape.D + i] * value<BITS>(k.first + t * k.stride, ks, n, t, shape.group, i);
      score[r * n + t] = total;
    }
}

void softmax_scalar(float* score, int64_t n, int R, float* top, float* sum) {
  for (int r = 0; r < R; ++r) softmax_chunk(score + r * n, n, 1, top + r, sum + r);
}

template <int BITS>
void values_scalar(const PackedRows& v, RowScales vs, const float* p, const QuantShape& shape,
                   float* acc) {
  const int R = shape.R, D = shape.D;
  const int64_t n = v.n;
  std::fill(acc, acc + R * D, 0.0f);
  for (int64_t t = 0; t < n; ++t)
    for (int i = 0; i < D; ++i) {
      const float x = value<BITS>(v.first + t * v.stride, vs, n, t, shape.group, i);
      for (int r = 0; r < R; ++r) acc[r * D + i] += p[r * n + t] * x;
    }
}

}  // namespace

QuantKernels scalar_kernels(int bits) {
  if (bits == 8) return {scores_scalar<8>, softmax_scalar, values_scalar<8>, 0};
  return {scores_scalar<4>, softmax_scalar, values_scalar<4>, 0};
}

void to_kernel_order(const float* in, float* out, int64_t count, int lanes) {
  if (lanes == 0) {
    std::copy(in, in + count, out);
    return;
  }
  for (int64_t block = 0; block < count; block += 2 * lanes)
    for (int j = 0; j < lanes; ++j) {
      out[block + j] = in[block + 2 * j];
      out[block + lanes + j] = in[block + 2 * j + 1];
    }
}

void from_kernel_order(const float* in, float* out, int64_t count, int lanes) {
  if (lanes == 0) {
    std::copy(in, in + count, out);
    return;
  }
  for (int64_t block = 0; block < count; block += 2 * lanes)
    for (int j = 0; j < lanes; ++j) {
      out[block + 2 * j] = in[block + j];
      out[block + 2 * j + 1] = in[block + lanes + j];
    }
}

}  // namespace native

// The kernels of the decode attention over a quantized KV cache (attention.cpp) for one chunk of
// context of one KV head: scores, softmax and weighted values, for all R query rows of the head.
// Portable C++ in quantized_kernels.cpp; AVX2+FMA and AVX-512 in quantized_avx2.cpp and
// quantized_avx512.cpp, one body (quantized_simd.h) for both.
//
// Deliberately free of other headers' inline functions: the SIMD files are compiled with ISA
// flags, and an inline function emitted there could be picked by the linker for every caller.
#pragma once

#include <cstdint>

namespace native {

// n packed rows (8 or 4 bits per element): row t's bytes at first + t * stride.
struct PackedRows {
  const uint8_t* first;
  int64_t stride, n;
};

struct QuantShape {
  int R, D, group;  // query rows per KV head, head dimension, elements per scale
  int groups() const { return D / group; }
};

// The n rows' scales and biases as float32 [G, n]: one row per group, so that the kernels'
// loops over tokens run over contiguous floats.
struct RowScales {
  const float* scale;
  const float* bias;
};

// score[r * n + t] = q_r . k_t for the n key rows, q [R, D] in the kernels' element order (see
// `lanes`).
using QuantScoresFn = void (*)(const PackedRows& k, RowScales ks, const float* q,
                               const QuantShape& shape, float* score);
// score[r * n + t] -> e^(score - top[r]) in place, top[r] the row's max and sum[r] its new sum.
using SoftmaxFn = void (*)(float* score, int64_t n, int R, float* top, float* sum);
// acc[r * D + i] = sum_t p[r * n + t] v_t[i] over the n value rows, acc [R, D] in the kernels'
// element order.
using QuantValuesFn = void (*)(const PackedRows& v, RowScales vs, const float* p,
                               const QuantShape& shape, float* acc);

struct QuantKernels {
  QuantScoresFn scores;
  SoftmaxFn softmax;
  QuantValuesFn values;
  // The element order of q and acc: 0 is the natural one. Else (4 bits, SIMD) `lanes` packed bytes
  // widen to their low nibbles and then their high nibbles, so each block of 2 * lanes elements
  // holds its even elements first, then its odd ones: no shuffle in the kernels. A block never
  // crosses a group (groups are multiples of 32 elements, blocks at most 32).
  int lanes;
};

QuantKernels scalar_kernels(int bits);
// Only on a CPU with AVX2+FMA, or AVX-512 F/BW/VL/DQ (the portable ones where built without).
QuantKernels avx2_kernels(int bits);
QuantKernels avx512_kernels(int bits);

// `count` floats (a multiple of 2 * lanes) from the natural order to the kernels' order and back.
void to_kernel_order(const float* in, float* out, int64_t count, int lanes);
void from_kernel_order(const float* in, float* out, int64_t count, int lanes);

}  // namespace native

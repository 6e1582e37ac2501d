// The bf16-weight kernels (dense_simd.h): out[M, N] = x[M, K] @ widen(w).T for float32 x and a
// bf16 weight w [N, K] read in place. Widening bf16 to float32 is exact (a bf16 is the high half
// of a float32), and every product and sum is float32, so results are within float32 rounding of
// MLX's matmul over the widened weights, and no float32 copy of the matrix exists at any time.
//
// Like gemm.h this header declares plain data and functions only (no inline code): the SIMD files
// are compiled with ISA flags, and an inline function emitted there could be picked by the linker
// for every caller.
#pragma once

#include <cstdint>

#include "gemm.h"

namespace native {

// One matrix of one call.
struct DenseMatrix {
  const uint16_t* w;  // [N, K] bf16
  int64_t N;
  float* out;  // [M, N] float32
};

// Output rows [n0, n1) of the mat-vec for the M (<= 8) rows of x, laid out by dense_layout.
using DenseRowsFn = void (*)(const float* x, int M, int64_t K, const DenseMatrix& matrix,
                             int64_t n0, int64_t n1);
// Output columns [panel_begin * NR, panel_end * NR) of the matmul for every row of x (packed by
// pack_rows for MR; gemm.h), the weights widened one [GEMM_KC][NR] tile at a time.
using DensePanelsFn = void (*)(const GemmRows& rows, const DenseMatrix& matrix,
                               int64_t panel_begin, int64_t panel_end);

struct DenseKernels {
  int L;       // float32 lanes: the mat-vec needs K % (2 L) == 0 (L = 1: any K)
  int MR, NR;  // the matmul's register tile
  DenseRowsFn rows;
  DensePanelsFn panels;
};

DenseKernels dense_scalar_kernels();
// Only on a CPU with AVX2+FMA, or AVX-512 F/BW/VL/DQ (the portable ones where built without).
DenseKernels dense_avx2_kernels();
DenseKernels dense_avx512_kernels();

// x [M, K] float32 into the mat-vec's layout for `lanes` (L): step by step of 2 L columns, each
// row's even elements, then its odd ones (as a vector of 2 L bf16 widens into its even and odd
// lanes), the M rows of a step together (one stream of loads, never M streams 4 KB apart).
void dense_layout(const float* x, int M, int64_t K, int lanes, float* out);

// The opt-in bf16-dot mat-vec (dense_bf16.cpp): whether this CPU runs it (AVX512-BF16, the
// library built with it), and output rows [n0, n1) for the M (<= 8) rows of x rounded to bf16
// [M, K] (K a multiple of 32).
bool dense_bf16_supported();
void dense_bf16_rows(const uint16_t* x, int M, int64_t K, const DenseMatrix& matrix, int64_t n0,
                     int64_t n1);

}  // namespace native

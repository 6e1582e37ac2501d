// The 4-bit prefill matmul's kernels (gemm_simd.h): out[M, N] (+)= x[M, K] @ dequantize(w).T for
// many rows of x, with w read in place and dequantized one tile at a time, right before use.
//
// Shape of the work: x is packed once per call (pack_rows) into blocks of KC columns, and in each
// block into tiles of MR rows stored k-major ([kc][MR], zero rows past M). A worker takes a range
// of panels of NR output columns; per block of KC it dequantizes the panel's [kc][NR] float32
// tile (a few KB, L1-resident) and runs an MR x NR register-blocked FMA kernel over every row
// tile. No float32 copy of the matrix exists at any time: only one tile per thread.
//
// Like quantized_kernels.h this header declares plain data and functions only (no inline code):
// the SIMD files are compiled with ISA flags, and an inline function emitted there could be
// picked by the linker for every caller.
#pragma once

#include <cstdint>

namespace native {

// One matrix of one call; scales and biases [N, K / group] of `scale_type` (ScaleType, kernels.h).
struct GemmMatrix {
  const uint32_t* w;  // [N, K / 8]
  const void* scales;
  const void* biases;
  int scale_type;
  int64_t N;
  float* out;  // [M, N] float32
};

// x packed by pack_rows for the kernel's MR.
struct GemmRows {
  const float* packed;
  int M;
  int64_t K;
  int group_size;
};

// Output columns [panel_begin * NR, panel_end * NR) (clipped to N) for every row.
using GemmPanelsFn = void (*)(const GemmRows& rows, const GemmMatrix& matrix, int64_t panel_begin,
                              int64_t panel_end);

struct GemmKernels {
  int MR, NR;  // rows and columns of the register tile
  GemmPanelsFn panels;
};

constexpr int GEMM_KC = 256;  // columns of x per block (a multiple of every group size)

GemmKernels gemm_scalar_kernels();
// Only on a CPU with AVX2+FMA+F16C, or AVX-512 F/BW/VL/DQ (the portable ones where built without).
GemmKernels gemm_avx2_kernels();
GemmKernels gemm_avx512_kernels();

// Floats pack_rows writes for M rows of K and tiles of MR rows.
int64_t packed_rows_size(int M, int64_t K, int MR);
// x [M, K] float32 into the kernels' blocked, tiled layout (see above).
void pack_rows(const float* x, int M, int64_t K, int MR, float* packed);

}  // namespace native

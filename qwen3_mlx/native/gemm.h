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
#include <vector>

#include "isa.h"

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
// Row tiles [t0, t1) of x [M, K] float32 into the kernels' blocked, tiled layout (see above).
void pack_rows(const float* x, int M, int64_t K, int MR, int t0, int t1, float* packed);
// All of x's row tiles, on the calling thread.
void pack_rows(const float* x, int M, int64_t K, int MR, float* packed);

// The int8 variant (gemm_vnni.cpp; the Python face asks for it by default): x rounded to int8
// per block of 32 and packed like the float kernels' x, a quad of bytes per row and 4 columns,
// with each block's step [K / 32][rows] and each group's float32 sum [K / group][rows] (rows
// padded to tiles of MR).
struct GemmInt8Rows {
  const int8_t* packed;
  const float* steps;
  const float* sums;
  int M;
  int64_t K;
  int group_size;
};

using GemmInt8PanelsFn = void (*)(const GemmInt8Rows& rows, const GemmMatrix& matrix,
                                  int64_t panel_begin, int64_t panel_end);

struct GemmInt8Kernels {
  int MR, NR;
  GemmInt8PanelsFn panels;  // nullptr where built without AVX-512 VNNI
};

// Only on a CPU with AVX-512 VNNI (int8_supported()).
GemmInt8Kernels gemm_vnni_kernels();
// Row tiles [t0, t1) of x [M, K] float32 into GemmInt8Rows' arrays (K a multiple of 32 and of
// the group); AVX-512 VNNI only.
void pack_rows_int8(const float* x, int M, int64_t K, int group, int t0, int t1, int8_t* packed,
                    float* steps, float* sums);

// out = x @ dequantize(w).T for every matrix (gemm.cpp): x [M, K] float32 packed once (in
// parallel), then panels of every matrix's output columns in one pool run on `threads` threads;
// with `int8` (AVX-512 VNNI only) the int8 variant.
void run_gemm(const float* x, int M, int64_t K, Isa isa, bool int8, int threads, int group_size,
              const std::vector<GemmMatrix>& matrices);

}  // namespace native

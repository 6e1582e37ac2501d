// The kernels a decoder layer's decode step runs, as plain functions on float32 rows: each op of
// ops.h runs one of them as its own graph node, and decode_layer.cpp runs them all in one node.
// Sharing them keeps the fused layer bit for bit the separate ops.
#pragma once

#include <cstdint>
#include <vector>

#include "mlx/mlx.h"

namespace native {

// quantized_matmul.cpp: one matrix of a mat-vec call (4-bit affine w [N, K / 8], scales and
// biases [N, K / group] of ScaleType `type`) and where its float32 result row goes.
struct Matrix {
  const uint32_t* w;
  const void *s, *b;
  int type;  // ScaleType: F32, BF16 or F16
  int64_t N;
  float* out;  // [M][N]
};

// The Matrix for evaluated (w, scales, biases), its result rows at out.
Matrix matrix_of(const mlx::core::array& w, const mlx::core::array& scales,
                 const mlx::core::array& biases, float* out);
// Refuses, with a message, a matrix for rows of K that the kernels cannot take.
void check_matrix(int64_t K, const mlx::core::array& w, const mlx::core::array& scales,
                  const mlx::core::array& biases, int group_size);

// out = x @ dequantize(w).T for M <= 8 rows x [M, K] and every matrix, one pool run for all of
// them, each row bit for bit what a one-row call gives it (int8 x where asked and the CPU has
// AVX-512 VNNI).
void quantized_matvecs(const float* x, int M, int64_t K, int group_size, int threads, bool int8,
                       const std::vector<Matrix>& matrices);

// decode_ops.cpp: h = x + delta and normed = rms_norm(h) * w over rows of D.
void add_rms_norm_rows(const float* x, const float* delta, const float* w, float* h, float* normed,
                       int64_t count, int64_t D, float eps);
// q [B, L, Hq * D] and k [B, L, Hk * D] to rope(rms_norm(head)) as [B, H, L, D].
void qk_norm_rope_rows(const float* q, const float* k, const float* q_weight,
                       const float* k_weight, const float* inv_freq, float eps, int64_t offset,
                       float factor, int64_t B, int64_t L, int64_t Hq, int64_t Hk, int64_t D,
                       float* q_out, float* k_out);
// out = silu(gate) * up.
void swiglu_rows(const float* gate, const float* up, float* out, int64_t count);

// float_attention.cpp: the last L of T positions q [B, Hq, L, D] (not yet scaled; R = Hq / Hkv
// query heads per KV head) over keys and values [B, Hkv, T, D] with element strides k_strides /
// v_strides, causal; out [B, Hq, L, D]. Each position's result is bit for bit what a call with
// L = 1 over the keys it sees gives.
void float_decode_attention(const float* q, const float* k, const int64_t* k_strides,
                            const float* v, const int64_t* v_strides, int64_t B, int64_t Hkv,
                            int64_t T, int R, int D, float scale, int threads, float* out,
                            int64_t L = 1);

}  // namespace native

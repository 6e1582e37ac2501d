// Every op the extension offers (bindings.cpp is their Python face). Each builds an MLX graph node
// (a primitive evaluated on a CPU stream) and checks its inputs, throwing std::invalid_argument
// with a message where the kernels cannot take them.
#pragma once

#include <vector>

#include "mlx/mlx.h"

namespace native {

namespace mx = mlx::core;

// quantized_matmul.cpp: x @ dequantize(w, scales, biases).T for 4-bit affine w, in float32, for
// every matrix with one x: the mat-vec kernels up to 8 rows of x (int8 x where asked and
// supported), the tiled matmul (gemm.h) above.
std::vector<mx::array> quantized_matmuls(const mx::array& x, const std::vector<mx::array>& ws,
                                         const std::vector<mx::array>& scales,
                                         const std::vector<mx::array>& biases, int group_size,
                                         int threads, bool int8, mx::StreamOrDevice s);
mx::array quantized_matmul(const mx::array& x, const mx::array& w, const mx::array& scales,
                           const mx::array& biases, int group_size, int threads, bool int8,
                           mx::StreamOrDevice s);

// attention.cpp: one query position over an affine-quantized KV cache (4 or 8 bits).
mx::array quantized_decode_attention(const mx::array& q, const mx::array& k,
                                     const mx::array& k_scales, const mx::array& k_biases,
                                     const mx::array& v, const mx::array& v_scales,
                                     const mx::array& v_biases, float scale, int group_size,
                                     int bits, int threads, mx::StreamOrDevice s);
// float_attention.cpp: one query position, or the last few with the causal mask, over a float32
// KV cache (any strides).
mx::array decode_attention(const mx::array& q, const mx::array& k, const mx::array& v,
                           float scale, int threads, mx::StreamOrDevice s);

// prefill_attention.cpp: the causal attention of L query positions (the last L of T) over a
// float32 KV cache (strided along its first three axes).
mx::array prefill_attention(const mx::array& q, const mx::array& k, const mx::array& v,
                            float scale, int threads, mx::StreamOrDevice s);

// decode_ops.cpp: float32 RMSNorm, non-interleaved RoPE and SwiGLU, one pass each; and fused for
// a decoder layer: the residual add with the next norm ([h, rms_norm(h)]), and q's and k's
// per-head norms with RoPE ([q, k] as [B, H, L, D]).
mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps, mx::StreamOrDevice s);
std::vector<mx::array> add_rms_norm(const mx::array& x, const mx::array& delta,
                                    const mx::array& weight, float eps, mx::StreamOrDevice s);
mx::array rope(const mx::array& x, const mx::array& inv_freq, int64_t offset, float factor,
               mx::StreamOrDevice s);
std::vector<mx::array> qk_norm_rope(const mx::array& q, const mx::array& k,
                                    const mx::array& q_weight, const mx::array& k_weight,
                                    const mx::array& inv_freq, float eps, int64_t offset,
                                    float factor, mx::StreamOrDevice s);
mx::array swiglu(const mx::array& gate, const mx::array& up, mx::StreamOrDevice s);

// decode_layer.cpp: a decoder layer of a decode step (B = 1, L from 1 to 8 positions) in two
// nodes, bit for bit the ops above. decode_qkv: [q, k, v] as [1, H, L, D] from normed =
// input_layernorm(h), the (w, scales, biases) of q, k, v, the q and k norms' weights and RoPE at
// positions offset..offset+L-1. decode_rest, after the caller wrote k and v at rows offset.. of
// the float32 cache [1, Hkv, capacity, D]: [h', normed'] from the attention over rows
// 0..offset+L-1 (causal among the L), o, the post-attention norm, the MLP and the next norm.
std::vector<mx::array> decode_qkv(const mx::array& normed, const std::vector<mx::array>& weights,
                                  const mx::array& q_weight, const mx::array& k_weight,
                                  const mx::array& inv_freq, int64_t kv_heads, int64_t offset,
                                  float factor, float eps, int group_size, int threads, bool int8,
                                  mx::StreamOrDevice s);
std::vector<mx::array> decode_rest(const mx::array& h, const mx::array& q, const mx::array& keys,
                                   const mx::array& values, const std::vector<mx::array>& weights,
                                   const mx::array& post_weight, const mx::array& next_weight,
                                   int64_t offset, float scale, float eps, float next_eps,
                                   int group_size, int threads, bool int8, mx::StreamOrDevice s);

// embedding.cpp: rows ids of a 4-bit affine quantized table (w, scales, biases) as float32
// [*ids.shape, D], computed as MLX's dequantize computes them (an id past the table: zeros).
mx::array embedding_rows(const mx::array& ids, const mx::array& w, const mx::array& scales,
                         const mx::array& biases, int group_size, mx::StreamOrDevice s);

// dense_matmul.cpp: x @ widen(w).T for float32 x and bf16 weights [N, K] read in place, for every
// weight with one x: the mat-vec kernels up to 8 rows of x (x rounded to bf16 for a bf16 dot where
// asked and supported), the tiled matmul above (dense.h).
std::vector<mx::array> dense_matmuls(const mx::array& x, const std::vector<mx::array>& ws,
                                     int threads, bool bf16, mx::StreamOrDevice s);
mx::array dense_matmul(const mx::array& x, const mx::array& w, int threads, bool bf16,
                       mx::StreamOrDevice s);

}  // namespace native

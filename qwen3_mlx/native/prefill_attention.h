// Causal attention of a prefill chunk over float32 keys and values (prefill_attention.cpp), with
// its kernels (prefill_attention_simd.h, built with the matmul's traits in gemm_*.cpp).
//
// Like gemm.h this header declares plain data and functions only (no inline code): the SIMD
// files are compiled with ISA flags.
#pragma once

#include <cstdint>

namespace native {

// q [B, Hq, L, D] contiguous; keys and values [B, Hkv, T, D] with element strides for their
// first three axes (unit last axis); out [B, Hq, L, D]. Query l sits at position T - L + l and
// attends to keys 0..T - L + l (MLX's "causal" mask, aligned to the lower right).
struct PrefillAttention {
  const float* q;
  const float* k;
  const float* v;
  // The keys once more, packed per KV head into tiles of `key_rows` keys as the scores' product
  // reads them, [B][Hkv][tiles][D][key_rows], zeros past T (pack_keys). Packed once per call:
  // every block of queries of a head reads the same tiles (before, each block copied them).
  const float* k_tiles;
  int64_t tiles;  // tiles per KV head: ceil(T / key_rows)
  int64_t k_stride[3], v_stride[3];
  float* out;
  int64_t B, Hq, Hkv, L, T;
  int D;
  float scale;
};

// One work item (a KV head's query heads over one block of query positions), with `scratch`
// floats of working memory.
using PrefillAttentionFn = void (*)(const PrefillAttention& job, int64_t item, float* scratch);

struct AttentionKernels {
  int QB;        // query positions per work item
  int columns;   // D must be a multiple of this
  int key_rows;  // keys per packed tile (the product's MR)
  PrefillAttentionFn run;
  int64_t (*scratch)(const PrefillAttention& job);  // floats of scratch per item
};

AttentionKernels attention_scalar_kernels();
AttentionKernels attention_avx2_kernels();
AttentionKernels attention_avx512_kernels();

}  // namespace native

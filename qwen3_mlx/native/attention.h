// What the two decode attentions (attention.cpp: quantized cache, float_attention.cpp: float32
// cache) share: the flash-decoding split of the context into chunks, each chunk's softmax over
// its own scores, and the merge of the chunks' partial results.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "mlx/mlx.h"

namespace native {

constexpr int64_t CHUNK = 256;  // context tokens per work item

// Partial results of every work item (KV head (b, h), chunk c): item = (b * H + h) * chunks + c.
struct Partials {
  int R, D;  // query heads per KV head, head dimension
  int64_t B, H, T, chunks;
  float* part_acc;  // [B, H, chunks, R, D]: sum_t p_t v_t
  float* part_max;  // [B, H, chunks, R]: the chunk's max score
  float* part_sum;  // [B, H, chunks, R]: sum_t p_t

  int64_t items() const { return B * H * chunks; }

  // Point the buffers into fresh storage, which the caller keeps alive while they are used.
  std::vector<float> allocate() {
    std::vector<float> storage(size_t(items()) * R * (D + 2));
    part_acc = storage.data();
    part_max = part_acc + items() * R * D;
    part_sum = part_max + items() * R;
    return storage;
  }
};

inline int64_t chunks_for(int64_t T) { return std::max<int64_t>(1, (T + CHUNK - 1) / CHUNK); }

// Scores score[t * R + r] of n tokens to p_t = e^(s_t - m) in place; m and sum_t p_t per row.
inline void softmax_chunk(float* score, int64_t n, int R, float* top, float* sum) {
  for (int r = 0; r < R; ++r) {
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < n; ++t) m = std::max(m, score[t * R + r]);
    float total = 0.0f;
    for (int64_t t = 0; t < n; ++t) {
      const float p = std::exp(score[t * R + r] - m);
      score[t * R + r] = p;
      total += p;
    }
    top[r] = m;
    sum[r] = total;
  }
}

// Merge the chunks of every (b, h, r): out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c.
inline void merge(const Partials& job, float* out) {
  const int R = job.R, D = job.D;
  for (int64_t bh = 0; bh < job.B * job.H; ++bh)
    for (int r = 0; r < R; ++r) {
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < job.chunks; ++c)
        m = std::max(m, job.part_max[(bh * job.chunks + c) * R + r]);
      float* o = out + (bh * R + r) * D;
      std::fill(o, o + D, 0.0f);
      float total = 0.0f;
      for (int64_t c = 0; c < job.chunks; ++c) {
        const int64_t item = bh * job.chunks + c;
        const float factor = std::exp(job.part_max[item * R + r] - m);
        total += factor * job.part_sum[item * R + r];
        const float* a = job.part_acc + (item * R + r) * D;
        for (int i = 0; i < D; ++i) o[i] += factor * a[i];
      }
      for (int i = 0; i < D; ++i) o[i] /= total;
    }
}

}  // namespace native

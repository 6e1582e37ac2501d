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
  int R, D;  // query rows per KV head (its query heads times L), head dimension
  int64_t B, H, T, chunks;
  // Query positions: row j of a KV head is position j % L, the last L of the T cached ones, and
  // attends to keys [0, T - L + j % L] (causal). L = 1: one position, every key.
  int64_t L = 1;
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

// How many of a chunk's tokens [t0, t0 + n) row r sees: with L > 1 (Partials::L) its position's
// keys end at T - L + r % L; with L = 1 it sees them all.
inline int64_t visible_tokens(const Partials& job, int r, int64_t t0, int64_t n) {
  if (job.L == 1) return n;
  return std::clamp<int64_t>(job.T - job.L + r % job.L + 1 - t0, 0, n);
}

// The scores of a chunk's tokens, row r's token t at score[t * R + r], set to -inf past what
// row r sees.
inline void mask_chunk(float* score, int64_t n, int R, int64_t t0, const Partials& job) {
  if (job.L == 1) return;
  for (int r = 0; r < R; ++r)
    for (int64_t t = visible_tokens(job, r, t0, n); t < n; ++t)
      score[t * R + r] = -std::numeric_limits<float>::infinity();
}

// Scores score[t * R + r] of n tokens to p_t = e^(s_t - m) in place; m and sum_t p_t per row. A
// row whose scores are all masked (-inf) gets p_t = 0, m = -inf and sum 0, which the merge
// weighs by e^(-inf) = 0: a position's result is then bit for bit the one a call over only the
// keys it sees gives.
inline void softmax_chunk(float* score, int64_t n, int R, float* top, float* sum) {
  for (int r = 0; r < R; ++r) {
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < n; ++t) m = std::max(m, score[t * R + r]);
    top[r] = m;
    float total = 0.0f;
    if (m == -std::numeric_limits<float>::infinity()) {  // every key masked
      for (int64_t t = 0; t < n; ++t) score[t * R + r] = 0.0f;
    } else {
      for (int64_t t = 0; t < n; ++t) {
        const float p = std::exp(score[t * R + r] - m);
        score[t * R + r] = p;
        total += p;
      }
    }
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

// The body of the causal prefill attention (prefill_attention.h) over the matmul's traits S
// (gemm_simd.h's multiply_tile, simd_math.h's exponential), flash-attention style: per work item
// the R query heads of one KV head over QB query positions, the keys and values in blocks of KB,
// each block's scores and weighted values as two register-tiled products, the softmax kept as a
// running max and sum per query. Scores are computed transposed, keys x queries, so the softmax
// runs down columns with every lane its own query, and the probabilities are already the
// k-major operand the values' product reads. The keys come packed in [D][MR] tiles, once per
// call (prefill_attention.cpp's pack_keys), for every block of queries to read.
// Float32 throughout (exponential within 2 ulp), so results are within float32 rounding of a
// float64 reference.

template <class S>
struct AttentionShape {
  static constexpr int MR = S::MR, NR = 2 * S::L, QB = NR * 2, KB = S::MR * 4;
  int64_t R, RQ, padded;  // query heads per KV head, query columns (R * QB), rows of O
  explicit AttentionShape(const PrefillAttention& job)
      : R(job.Hq / job.Hkv), RQ(R * QB), padded((R * QB + MR - 1) / MR * MR) {}
  // Q^T [D][RQ] in NR-column panels, scores [KB][RQ] (+ MR), O, m, l.
  int64_t scratch(int D) const { return D * RQ + KB * RQ + MR + padded * D + 2 * RQ; }
};

template <class S>
int64_t attention_scratch(const PrefillAttention& job) {
  return AttentionShape<S>(job).scratch(job.D);
}

// One work item: KV head h of batch row b, query positions [i0, i0 + QB). Query column
// c = r * QB + i is query head h * R + r at position i0 + i; St[j][c] its score of key j0 + j.
template <class S>
void attention_item(const PrefillAttention& job, int64_t item, float* scratch) {
  using V = typename S::V;
  using Shape = AttentionShape<S>;
  constexpr int L = S::L, MR = Shape::MR, NR = Shape::NR, QB = Shape::QB, KB = Shape::KB;
  const Shape shape(job);
  const int D = job.D;
  const int64_t R = shape.R, RQ = shape.RQ;
  const int64_t blocks = (job.L + QB - 1) / QB;
  const int64_t bh = item / blocks, block = blocks - 1 - item % blocks;  // longest first
  const int64_t b = bh / job.Hkv, h = bh % job.Hkv, i0 = block * QB;
  const int rows = int(job.L - i0 < QB ? job.L - i0 : QB);
  float* qt = scratch;        // [D][RQ] as panels [RQ / NR][D][NR]
  float* st = qt + D * RQ;    // [KB][RQ] (+ MR slack: the last tile reads past RQ)
  float* o = st + KB * RQ + MR;  // [padded][D]
  float* top = o + shape.padded * D;
  float* total = top + RQ;
  for (int64_t c = 0; c < RQ; ++c) {
    const int64_t r = c / QB, i = c % QB;
    const float* row = job.q + ((b * job.Hq + h * R + r) * job.L + i0 + i) * D;
    float* panel = qt + (c / NR) * D * NR + c % NR;
    for (int d = 0; d < D; ++d) panel[d * NR] = i < rows ? row[d] * job.scale : 0.0f;
    top[c] = -3.0e38f;
    total[c] = 0.0f;
  }
  for (int64_t i = 0; i < shape.padded * D; ++i) o[i] = 0.0f;
  for (int j = 0; j < MR; ++j) st[KB * RQ + j] = 0.0f;
  const float* key_tiles = job.k_tiles + bh * job.tiles * D * MR;  // [tiles][D][MR]
  const float* values = job.v + b * job.v_stride[0] + h * job.v_stride[1];
  const int64_t first = job.T - job.L + i0;  // position of the block's first query
  const int64_t last = first + rows - 1;      // the last key any of its queries sees
  for (int64_t j0 = 0; j0 <= last; j0 += KB) {
    const int n = int(last + 1 - j0 < KB ? last + 1 - j0 : KB);
    const float* kt = key_tiles + (j0 / MR) * D * MR;  // the block's keys (KB is a multiple of MR)
    for (int t = 0; t * MR < n; ++t)
      for (int64_t p = 0; p < RQ / NR; ++p)
        multiply_tile<S, MR>(kt + t * D * MR, MR, qt + p * D * NR, NR, D, st + t * MR * RQ + p * NR,
                             RQ, n - t * MR < MR ? n - t * MR : MR, NR, false);
    if (j0 + n - 1 > first) {  // the causal edge crosses this block: hide keys past each query
      for (int j = 0; j < n; ++j)
        for (int64_t c = 0; c < RQ; ++c)
          if (j0 + j > first + c % QB) st[j * RQ + c] = -3.0e38f;
    }
    for (int64_t c = 0; c < RQ; c += L) {  // running max and sum, probabilities in place
      V peak = S::load(top + c);
      for (int j = 0; j < n; ++j) peak = S::max(peak, S::load(st + j * RQ + c));
      const V alpha = exponential<S>(S::sub(S::load(top + c), peak));
      V sum = S::mul(S::load(total + c), alpha);
      for (int j = 0; j < n; ++j) {
        const V prob = exponential<S>(S::sub(S::load(st + j * RQ + c), peak));
        S::store(st + j * RQ + c, prob);
        sum = S::add(sum, prob);
      }
      S::store(top + c, peak);
      S::store(total + c, sum);
      alignas(64) float scale[L];
      S::store(scale, alpha);
      for (int lane = 0; lane < L; ++lane) {
        float* row = o + (c + lane) * D;
        const V factor = S::set1(scale[lane]);
        for (int d = 0; d < D; d += L) S::store(row + d, S::mul(S::load(row + d), factor));
      }
    }
    for (int64_t t = 0; t * MR < RQ; ++t)
      for (int p = 0; p < D / NR; ++p)
        multiply_tile<S, MR>(st + t * MR, RQ, values + j0 * job.v_stride[2] + p * NR,
                             job.v_stride[2], n, o + t * MR * D + p * NR, D, MR, NR, true);
  }
  for (int64_t c = 0; c < RQ; ++c) {
    const int64_t r = c / QB, i = c % QB;
    if (i >= rows) continue;
    float* row = job.out + ((b * job.Hq + h * R + r) * job.L + i0 + i) * D;
    const float inverse = 1.0f / total[c];
    for (int d = 0; d < D; ++d) row[d] = o[c * D + d] * inverse;
  }
}

template <class S>
AttentionKernels attention_kernels_for() {
  return {AttentionShape<S>::QB, 2 * S::L, S::MR, attention_item<S>, attention_scratch<S>};
}

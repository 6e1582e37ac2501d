// The SIMD body of the quantized-cache attention kernels (quantized_kernels.h), written once over
// a traits type S (quantized_avx2.cpp, quantized_avx512.cpp) with
//   V, L                                  a vector of L float32 lanes
//   zero, load, set1, store, add, sub, mul, max, fma, round, pow2 (2^k), sum, top (horizontal
//   max), first (lane 0)
//   widen<BITS>(row, i, lo, hi)           elements [i, i + 2L) of a packed row as two vectors
//   key_rows(RB), column_steps(RB)        the register tiles below
// Included only by those files, inside an unnamed namespace (after simd_math.h), so each ISA's
// copy stays its own.
//
// Why this shape: once the cache is packed the attention is bound by arithmetic, not bytes, so
// each packed element is widened to float32 and dequantized (scale * q + bias, one FMA) once per
// pass, then used for a whole block of query rows, and the sums stay in registers:
// - scores: TB key rows x RB query rows per pass;
// - values: RB query rows x SN steps of 2L columns per pass over a block of value rows.
// Dequantizing each element, as mlx-lm's reference does, costs an FMA per element but no
// cancellation: the shortcut q . k = s dot(q, k_int) + b sum(q) subtracts two sums of ~128 s
// |q| to leave a small score, and its rounding error was twice the reference's.

// ---------------------------------------------------------------------------------------------
// Softmax (exponential: simd_math.h)

// One row of n scores to e^(s - max) in place; its max and sum.
template <class S>
void softmax_row(float* row, int64_t n, float* top, float* sum) {
  using V = typename S::V;
  V m = S::set1(row[0]);
  int64_t t = 0;
  for (; t + S::L <= n; t += S::L) m = S::max(m, S::load(row + t));
  float peak = S::top(m);
  for (; t < n; ++t) peak = row[t] > peak ? row[t] : peak;
  const V shift = S::set1(peak);
  V total = S::zero();
  for (t = 0; t + S::L <= n; t += S::L) {
    const V p = exponential<S>(S::sub(S::load(row + t), shift));
    S::store(row + t, p);
    total = S::add(total, p);
  }
  float rest = 0.0f;
  for (; t < n; ++t) {
    row[t] = S::first(exponential<S>(S::set1(row[t] - peak)));
    rest += row[t];
  }
  *top = peak;
  *sum = S::sum(total) + rest;
}

template <class S>
void softmax(float* score, int64_t n, int R, float* top, float* sum) {
  for (int r = 0; r < R; ++r) softmax_row<S>(score + r * n, n, top + r, sum + r);
}

// ---------------------------------------------------------------------------------------------
// Scores

// score[r * n + t] (n the chunk's tokens) for TB key rows at k and RB query rows at q; ks is
// the chunk's [G, n] offset to the first of the TB rows.
template <class S, int BITS, int RB, int TB>
void dots(const uint8_t* k, int64_t stride, RowScales ks, const float* q, int64_t n,
          const QuantShape& shape, float* score) {
  using V = typename S::V;
  V acc[TB][RB];
#pragma GCC unroll 8
  for (int t = 0; t < TB; ++t)
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) acc[t][r] = S::zero();
  for (int g = 0; g < shape.groups(); ++g) {
    V scale[TB], bias[TB];
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) {
      scale[t] = S::set1(ks.scale[g * n + t]);
      bias[t] = S::set1(ks.bias[g * n + t]);
    }
    for (int i = g * shape.group; i < (g + 1) * shape.group; i += 2 * S::L) {
      V lo[TB], hi[TB];
#pragma GCC unroll 8
      for (int t = 0; t < TB; ++t) {
        S::template widen<BITS>(k + t * stride, i, lo[t], hi[t]);
        lo[t] = S::fma(lo[t], scale[t], bias[t]);
        hi[t] = S::fma(hi[t], scale[t], bias[t]);
      }
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r) {
        const V qa = S::load(q + r * shape.D + i), qb = S::load(q + r * shape.D + i + S::L);
#pragma GCC unroll 8
        for (int t = 0; t < TB; ++t) acc[t][r] = S::fma(hi[t], qb, S::fma(lo[t], qa, acc[t][r]));
      }
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < TB; ++t)
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) score[r * n + t] = S::sum(acc[t][r]);
}

// RB query rows against every key row, TB rows at a time.
template <class S, int BITS, int RB>
void score_rows(const PackedRows& k, RowScales ks, const float* q, const QuantShape& shape,
                float* score) {
  constexpr int TB = S::key_rows(RB);
  const int64_t n = k.n;
  int64_t t = 0;
  for (; t + TB <= n; t += TB)
    dots<S, BITS, RB, TB>(k.first + t * k.stride, k.stride, {ks.scale + t, ks.bias + t}, q, n,
                          shape, score + t);
  for (; t < n; ++t)
    dots<S, BITS, RB, 1>(k.first + t * k.stride, k.stride, {ks.scale + t, ks.bias + t}, q, n,
                         shape, score + t);
}

template <class S, int BITS>
void scores(const PackedRows& k, RowScales ks, const float* q, const QuantShape& shape,
            float* score) {
  const int R = shape.R, D = shape.D;
  const int64_t n = k.n;
  int r = 0;
  for (; r + 4 <= R; r += 4) score_rows<S, BITS, 4>(k, ks, q + r * D, shape, score + r * n);
  for (; r + 2 <= R; r += 2) score_rows<S, BITS, 2>(k, ks, q + r * D, shape, score + r * n);
  for (; r < R; ++r) score_rows<S, BITS, 1>(k, ks, q + r * D, shape, score + r * n);
}

// ---------------------------------------------------------------------------------------------
// Values

// acc[r * D + i] += sum_t p[r * n + t] v_t[i] for RB query rows, columns [i0, i0 + SN * 2L)
// and m value rows at v; vs and p are offset to the first of the m rows, p also to the first
// of the RB query rows.
template <class S, int BITS, int RB, int SN>
void weigh(const uint8_t* v, int64_t stride, int64_t m, RowScales vs, const float* p, int64_t n,
           const QuantShape& shape, int i0, float* acc) {
  using V = typename S::V;
  constexpr int STEP = 2 * S::L;
  V a[RB][SN][2];
  int64_t group[SN];  // each step's row in vs
#pragma GCC unroll 8
  for (int s = 0; s < SN; ++s) {
    group[s] = (i0 + s * STEP) / shape.group * n;
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
      a[r][s][0] = S::load(acc + r * shape.D + i0 + s * STEP);
      a[r][s][1] = S::load(acc + r * shape.D + i0 + s * STEP + S::L);
    }
  }
  for (int64_t t = 0; t < m; ++t) {
    V weight[RB];
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) weight[r] = S::set1(p[r * n + t]);
#pragma GCC unroll 8
    for (int s = 0; s < SN; ++s) {
      V lo, hi;
      S::template widen<BITS>(v + t * stride, i0 + s * STEP, lo, hi);
      const V scale = S::set1(vs.scale[group[s] + t]), bias = S::set1(vs.bias[group[s] + t]);
      lo = S::fma(lo, scale, bias);
      hi = S::fma(hi, scale, bias);
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r) {
        a[r][s][0] = S::fma(weight[r], lo, a[r][s][0]);
        a[r][s][1] = S::fma(weight[r], hi, a[r][s][1]);
      }
    }
  }
#pragma GCC unroll 8
  for (int s = 0; s < SN; ++s)
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
      S::store(acc + r * shape.D + i0 + s * STEP, a[r][s][0]);
      S::store(acc + r * shape.D + i0 + s * STEP + S::L, a[r][s][1]);
    }
}

// Every column from i on, in passes of SN steps, then of fewer where D leaves a remainder.
template <class S, int BITS, int RB, int SN = S::column_steps(RB)>
void weigh_columns(const uint8_t* v, int64_t stride, int64_t m, RowScales vs, const float* p,
                   int64_t n, const QuantShape& shape, float* acc, int i = 0) {
  constexpr int WIDTH = SN * 2 * S::L;
  for (; i + WIDTH <= shape.D; i += WIDTH)
    weigh<S, BITS, RB, SN>(v, stride, m, vs, p, n, shape, i, acc);
  if constexpr (SN > 1)
    weigh_columns<S, BITS, RB, SN / 2>(v, stride, m, vs, p, n, shape, acc, i);
}

template <class S, int BITS>
void values(const PackedRows& v, RowScales vs, const float* p, const QuantShape& shape,
            float* acc) {
  constexpr int64_t BLOCK = 32;  // value rows per pass: re-read from L1 by every pass
  const int R = shape.R, D = shape.D;
  const int64_t n = v.n;
  for (int64_t i = 0; i < R * D; ++i) acc[i] = 0.0f;
  for (int64_t t0 = 0; t0 < n; t0 += BLOCK) {
    const uint8_t* rows = v.first + t0 * v.stride;
    const int64_t m = n - t0 < BLOCK ? n - t0 : BLOCK;
    const RowScales block{vs.scale + t0, vs.bias + t0};
    int r = 0;
    for (; r + 4 <= R; r += 4)
      weigh_columns<S, BITS, 4>(rows, v.stride, m, block, p + r * n + t0, n, shape, acc + r * D);
    for (; r + 2 <= R; r += 2)
      weigh_columns<S, BITS, 2>(rows, v.stride, m, block, p + r * n + t0, n, shape, acc + r * D);
    for (; r < R; ++r)
      weigh_columns<S, BITS, 1>(rows, v.stride, m, block, p + r * n + t0, n, shape, acc + r * D);
  }
}

template <class S>
QuantKernels kernels_for(int bits) {
  if (bits == 8) return {scores<S, 8>, softmax<S>, values<S, 8>, 0};
  return {scores<S, 4>, softmax<S>, values<S, 4>, S::L};
}

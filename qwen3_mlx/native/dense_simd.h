// The body of the bf16-weight kernels (dense.h), written once over a traits type S
// (dense_avx2.cpp, dense_avx512.cpp) with
//   V, L                  a vector of L float32 lanes; MR rows of the matmul's register tile
//   zero, load, store, set1, fma, add, sum (of the lanes, in one fixed order)
//   widen(p, even, odd)   2 L bf16 at p as float32: elements 0, 2, .. in even, 1, 3, .. in odd
//   widen_pairs(p, stride, valid, even, odd)
//                         lanes j < L: p[r] in even and p[r + 1] in odd, r = min(j, valid - 1) stride
// and gemm_simd.h's multiply_tile (the 4-bit matmul's register-blocked FMA tile). Included only by
// those files, inside an unnamed namespace, so each ISA's copy stays its own.
//
// Mat-vec (decode, 1-8 rows): bound by reading the weights, so each weight is read once for all
// rows of x: a step widens 2 L weights of R rows (one load and two integer ops each) and feeds
// 2 M R FMAs. Every output keeps one accumulator, fed even then odd lanes, step by step along K,
// then summed in one fixed order: a row's result is bit for bit the same for any M (a speculative
// verify of 8 rows gives what one-row decode steps give).
//
// Matmul (prefill): bound by arithmetic; per block of MC rows and GEMM_KC columns a panel of NR
// output columns is widened into a small float32 tile (L1) used by every row tile of the block.

template <class S, int M, int R>
void dense_dots(const float* x, int64_t K, const DenseMatrix& m, int64_t n) {
  using V = typename S::V;
  constexpr int L = S::L;
  V acc[M][R];
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[i][r] = S::zero();
  const uint16_t* w = m.w + n * K;
  for (int64_t k = 0; k < K; k += 2 * L) {
    V even[R], odd[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) S::widen(w + r * K + k, even[r], odd[r]);
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) {
      const V xe = S::load(x + k * M + i * 2 * L), xo = S::load(x + k * M + i * 2 * L + L);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        acc[i][r] = S::fma(xe, even[r], acc[i][r]);
        acc[i][r] = S::fma(xo, odd[r], acc[i][r]);
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) m.out[i * m.N + n + r] = S::sum(acc[i][r]);
}

// R weight rows per step: M R sums and 2 R widened vectors within 32 registers (AVX-512; AVX2
// spills some), and 8 rows' streams in flight at one row of x.
template <class S, int M>
void dense_rows_m(const float* x, int64_t K, const DenseMatrix& m, int64_t n0, int64_t n1) {
  constexpr int R = M == 1 ? 8 : M <= 4 ? 4 : 2;
  int64_t n = n0;
  for (; n + R <= n1; n += R) dense_dots<S, M, R>(x, K, m, n);
  for (; n < n1; ++n) dense_dots<S, M, 1>(x, K, m, n);
}

template <class S>
void dense_rows(const float* x, int M, int64_t K, const DenseMatrix& m, int64_t n0, int64_t n1) {
  switch (M) {
    case 1: return dense_rows_m<S, 1>(x, K, m, n0, n1);
    case 2: return dense_rows_m<S, 2>(x, K, m, n0, n1);
    case 3: return dense_rows_m<S, 3>(x, K, m, n0, n1);
    case 4: return dense_rows_m<S, 4>(x, K, m, n0, n1);
    case 5: return dense_rows_m<S, 5>(x, K, m, n0, n1);
    case 6: return dense_rows_m<S, 6>(x, K, m, n0, n1);
    case 7: return dense_rows_m<S, 7>(x, K, m, n0, n1);
    default: return dense_rows_m<S, 8>(x, K, m, n0, n1);
  }
}

// b[k, j] = w[n0 + j, k0 + k] widened, for k < kc and j < NR (columns past `cols` repeat the last
// valid one or are zero; their results are never stored). One gather of 32-bit words takes a pair
// of bf16 (k, k + 1) from L rows: their low halves widen to row k of the tile, their high ones to
// row k + 1, so the tile is written transposed without a scalar store per element.
template <class S>
void widen_panel(const DenseMatrix& m, int64_t K, int64_t n0, int cols, int64_t k0, int kc,
                 float* b) {
  using V = typename S::V;
  constexpr int L = S::L, NR = 2 * L;
  for (int half = 0; half < 2; ++half) {
    const int valid = cols - half * L < L ? cols - half * L : L;
    float* out = b + half * L;
    if (valid <= 0) {
      for (int k = 0; k < kc; ++k) S::store(out + k * NR, S::zero());
      continue;
    }
    const uint16_t* first = m.w + (n0 + half * L) * K + k0;
    int k = 0;
    for (; k + 2 <= kc; k += 2) {
      V even, odd;
      S::widen_pairs(first + k, K, valid, even, odd);
      S::store(out + k * NR, even);
      S::store(out + (k + 1) * NR, odd);
    }
    if (k < kc) {  // an odd K's last column
      uint32_t* bits = reinterpret_cast<uint32_t*>(out + k * NR);
      for (int j = 0; j < L; ++j) bits[j] = uint32_t(first[(j < valid ? j : valid - 1) * K + k]) << 16;
    }
  }
}

// Output columns [p0 * NR, p1 * NR) of one bf16 matrix for every row of x (gemm_simd.h's loop).
template <class S>
void dense_panels(const GemmRows& x, const DenseMatrix& m, int64_t p0, int64_t p1) {
  panel_loop<S>(x, m.N, m.out, p0, p1, [&](int64_t n0, int cols, int64_t k0, int kc, float* b) {
    widen_panel<S>(m, x.K, n0, cols, k0, kc, b);
  });
}

template <class S>
DenseKernels dense_kernels_for() {
  return {S::L, S::MR, 2 * S::L, dense_rows<S>, dense_panels<S>};
}

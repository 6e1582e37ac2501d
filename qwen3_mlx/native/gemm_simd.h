// The body of the 4-bit prefill matmul (gemm.h), written once over a traits type S
// (gemm_scalar.cpp, gemm_avx2.cpp, gemm_avx512.cpp) with
//   V, L                          a vector of L float32 lanes; IV one of L uint32 lanes
//   zero, load, store, set1, fma, add
//   gather(p, stride, valid)      lanes j < L: p[min(j, valid - 1) * stride]
//   nibble(words, s)              float((words >> 4s) & 0xf) per lane
//   half(h)                       an IEEE half's bits as float
//   MR                            rows of the register tile (its columns are NR = 2L)
// Included only by those files, inside an unnamed namespace, so each ISA's copy stays its own.
//
// Why this shape: with hundreds of rows the matmul is bound by arithmetic, so each weight is
// dequantized once per block of MC rows into a small float32 tile (scale * q + bias, as
// mx.dequantize: the same float32 weights the dequantize + GEMM route multiplies) and then used
// by every row of the block from L1. The MR x NR tile of sums stays in registers for a block of
// KC columns: per column of the block, 2 loads of the tile and MR broadcasts feed 2 MR FMAs.
// Products and sums are float32, so results are within float32 rounding of a float64 reference.

constexpr int MC = 512;  // rows per pass over a dequantized tile (x's block stays in L2)

// Element i of a scale or bias array of ScaleType `type` (kernels.h: 0 float32, 1 bf16, 2 f16).
template <class S>
float scale_value(const void* p, int type, int64_t i) {
  if (type == 0) return static_cast<const float*>(p)[i];
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  if (type == 2) return S::half(h);
  const uint32_t bits = uint32_t(h) << 16;  // bf16: the high half of a float32
  float out;
  __builtin_memcpy(&out, &bits, 4);
  return out;
}

// c[r, j] (+)= sum_k a[k * lda + r] b[k * ldb + j] for one tile (r < MR, j < NR): `rows` and
// `cols` of them valid (all MR rows of a and NR columns of b are read).
template <class S, int MR>
void multiply_tile(const float* a, int64_t lda, const float* b, int64_t ldb, int kc, float* c,
                   int64_t ldc, int rows, int cols, bool accumulate) {
  using V = typename S::V;
  constexpr int L = S::L, NR = 2 * L;
  V acc[MR][2];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = S::zero();
  for (int k = 0; k < kc; ++k, a += lda, b += ldb) {
    const V b0 = S::load(b), b1 = S::load(b + L);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const V ar = S::set1(a[r]);
      acc[r][0] = S::fma(ar, b0, acc[r][0]);
      acc[r][1] = S::fma(ar, b1, acc[r][1]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    if (r >= rows) break;
    float* row = c + r * ldc;
    if (cols == NR) {
      V lo = acc[r][0], hi = acc[r][1];
      if (accumulate) {
        lo = S::add(lo, S::load(row));
        hi = S::add(hi, S::load(row + L));
      }
      S::store(row, lo);
      S::store(row + L, hi);
    } else {
      alignas(64) float part[NR];
      S::store(part, acc[r][0]);
      S::store(part + L, acc[r][1]);
      for (int j = 0; j < cols; ++j) row[j] = accumulate ? row[j] + part[j] : part[j];
    }
  }
}

// b[k - k0, j] = dequantized w[n0 + j, k] for k in [k0, k0 + kc), j < NR (columns past `cols`
// repeat the last valid one or are zero; their results are never stored).
template <class S>
void dequantize_panel(const GemmMatrix& m, int64_t K, int group, int64_t n0, int cols, int64_t k0,
                      int kc, float* b) {
  using V = typename S::V;
  constexpr int L = S::L, NR = 2 * L;
  const int64_t words = K / 8, groups = K / group;
  for (int half = 0; half < 2; ++half) {
    const int valid = cols - half * L < L ? cols - half * L : L;
    if (valid <= 0) {
      for (int k = 0; k < kc; ++k) S::store(b + k * NR + half * L, S::zero());
      continue;
    }
    const int64_t first = n0 + half * L;
    alignas(64) float scale[L], bias[L];
    for (int64_t g = k0 / group; g < (k0 + kc) / group; ++g) {
      for (int j = 0; j < L; ++j) {
        const int64_t index = (first + (j < valid ? j : valid - 1)) * groups + g;
        scale[j] = scale_value<S>(m.scales, m.scale_type, index);
        bias[j] = scale_value<S>(m.biases, m.scale_type, index);
      }
      const V vs = S::load(scale), vb = S::load(bias);
      for (int64_t i = g * group / 8; i < (g + 1) * group / 8; ++i) {
        const auto packed = S::gather(m.w + first * words + i, words, valid);
        float* out = b + (i * 8 - k0) * NR + half * L;
#pragma GCC unroll 8
        for (int s = 0; s < 8; ++s) S::store(out + s * NR, S::fma(S::nibble(packed, s), vs, vb));
      }
    }
  }
}

// Output columns [p0 * NR, p1 * NR) of an N-column output for every row of x: each panel of
// weights is made a float32 tile b by fill(n0, cols, k0, kc, b) (a 4-bit dequantize here, a bf16
// widen in dense_simd.h), then multiplied by every row tile of the block while it sits in L1.
template <class S, class Fill>
void panel_loop(const GemmRows& x, int64_t N, float* out, int64_t p0, int64_t p1, Fill fill) {
  constexpr int MR = S::MR, NR = 2 * S::L;
  alignas(64) float b[GEMM_KC * NR];
  const int tiles = (x.M + MR - 1) / MR;
  const int64_t padded = int64_t(tiles) * MR;
  constexpr int block_tiles = MC / MR;
  for (int t0 = 0; t0 < tiles; t0 += block_tiles) {
    const int t1 = t0 + block_tiles < tiles ? t0 + block_tiles : tiles;
    for (int64_t k0 = 0; k0 < x.K; k0 += GEMM_KC) {
      const int kc = int(x.K - k0 < GEMM_KC ? x.K - k0 : GEMM_KC);
      const float* block = x.packed + k0 * padded;
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n0 = p * NR;
        const int cols = int(N - n0 < NR ? N - n0 : NR);
        fill(n0, cols, k0, kc, b);
        for (int t = t0; t < t1; ++t) {
          const int rows = x.M - t * MR < MR ? x.M - t * MR : MR;
          multiply_tile<S, MR>(block + int64_t(t) * MR * kc, MR, b, NR, kc,
                               out + t * MR * N + n0, N, rows, cols, k0 > 0);
        }
      }
    }
  }
}

// Output columns [p0 * NR, p1 * NR) of one 4-bit matrix for every row of x.
template <class S>
void gemm_panels(const GemmRows& x, const GemmMatrix& m, int64_t p0, int64_t p1) {
  panel_loop<S>(x, m.N, m.out, p0, p1, [&](int64_t n0, int cols, int64_t k0, int kc, float* b) {
    dequantize_panel<S>(m, x.K, x.group_size, n0, cols, k0, kc, b);
  });
}

template <class S>
GemmKernels gemm_kernels_for() {
  return {S::MR, 2 * S::L, gemm_panels<S>};
}

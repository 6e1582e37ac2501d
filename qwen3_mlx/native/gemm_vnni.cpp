// The int8 prefill matmul (gemm.h, "int8"; the default where it runs) in AVX-512 VNNI: x rounded
// to int8 per block of 32 (step max|x| / 127, as llama.cpp's Q8_0 and the int8 mat-vec), the 4-bit
// weights taken as unsigned bytes, products summed exactly in int32 by vpdpbusd (64 per
// instruction, 4 times the float32 FMA's 16), then scaled in float32.
//
// Per group g of a weight row n: sum_k x_k (s q_k + b) = s sum_blocks step * dot(xq, q) + b sum(x)
// with the bias term over the exact float32 sums of x, so rounding x is the only error.
//
// Layouts. A word of w holds 8 nibbles (element 8i+s in bits 4s..4s+3): `w & 0x0f0f0f0f` is its
// even elements as 4 bytes and `(w >> 4) & 0x0f0f0f0f` its odd ones, so a panel of NR columns is
// prepared with two ANDs and a shift per 16 words, into [kc / 4][NR] groups of 4 bytes ("steps");
// x is packed to match: per word, its 4 even elements, then its 4 odd ones (a sum of products
// does not care about the order). x's int8 tiles are [kc / 4][MR][4] per block of KC (as the
// float matmul's, a byte quad per row instead of a float), its steps [K / 32][rows] and its sums
// [K / group][rows]. The register tile is 6 rows x 32 columns: 12 int32 sums for the current
// block of 32, 12 float32 sums, 2 weight vectors.
//
// Compiled with AVX-512 and VNNI flags (CMakeLists.txt); nothing here runs unless
// int8_supported() found AVX-512 VNNI; everything but the two entry points is in an unnamed
// namespace.

#include <cmath>
#include <cstring>

#include "gemm.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__F16C__)
#include <immintrin.h>
#define GEMM_VNNI 1
#endif

namespace native {

#ifdef GEMM_VNNI
namespace {

constexpr int MR = 6, L = 16, NR = 2 * L, BLOCK = 32;
constexpr int MC = 516;  // rows per pass over a prepared panel (a multiple of MR)

float scale_at(const void* p, int type, int64_t i) {
  if (type == 0) return static_cast<const float*>(p)[i];
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  if (type == 2) return _cvtsh_ss(h);
  const uint32_t bits = uint32_t(h) << 16;  // bf16: the high half of a float32
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

// The weights of columns [n0, n0 + cols) for k in [k0, k0 + kc): bytes [kc / 4][NR][4] in the
// even/odd order above, and scales and biases [kc / group][NR] as float32. Columns past `cols`
// repeat the last valid one (their results are never stored).
void prepare_panel(const GemmMatrix& m, int64_t K, int group, int64_t n0, int cols, int64_t k0,
                   int kc, uint8_t* bytes, float* scales, float* biases) {
  const int64_t words = K / 8, groups = K / group;
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i nibbles = _mm512_set1_epi32(0x0f0f0f0f);
  for (int half = 0; half < 2; ++half) {
    const int valid = cols - half * L < L ? cols - half * L : L;
    const int64_t first = n0 + (valid > 0 ? half * L : 0);
    const int last = valid > 0 ? valid - 1 : cols - 1;
    const __m512i rows = _mm512_min_epi32(lane, _mm512_set1_epi32(last));
    const __m512i offsets = _mm512_mullo_epi32(rows, _mm512_set1_epi32(int(words)));
    for (int64_t i = k0 / 8; i < (k0 + kc) / 8; ++i) {
      const __m512i w = _mm512_i32gather_epi32(offsets, m.w + first * words + i, 4);
      uint8_t* out = bytes + (i * 8 - k0) / 4 * NR * 4 + half * L * 4;
      _mm512_storeu_si512(out, _mm512_and_si512(w, nibbles));
      _mm512_storeu_si512(out + NR * 4, _mm512_and_si512(_mm512_srli_epi32(w, 4), nibbles));
    }
    for (int64_t g = k0 / group; g < (k0 + kc) / group; ++g)
      for (int j = 0; j < L; ++j) {
        const int64_t index = (first + (j < last + 1 ? j : last)) * groups + g;
        scales[(g - k0 / group) * NR + half * L + j] = scale_at(m.scales, m.scale_type, index);
        biases[(g - k0 / group) * NR + half * L + j] = scale_at(m.biases, m.scale_type, index);
      }
  }
}

// c[r, j] (+)= the tile's sums for kc columns of x: `a` its int8 quads, `steps` and `sums` its
// rows' steps per block of 32 and sums per group (`stride` floats from one block or group to the
// next), `b`, `scales`, `biases` the prepared panel.
void multiply_tile(const int8_t* a, const float* steps, const float* sums, int64_t stride,
                   const uint8_t* b, const float* scales, const float* biases, int kc, int group,
                   float* c, int64_t ldc, int rows, int cols, bool accumulate) {
  __m512 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int g = 0; g < kc / group; ++g) {
    for (int block = g * group / BLOCK; block < (g + 1) * group / BLOCK; ++block) {
      __m512i dot[MR][2];
#pragma GCC unroll 6
      for (int r = 0; r < MR; ++r) dot[r][0] = dot[r][1] = _mm512_setzero_si512();
      const uint8_t* bk = b + block * (BLOCK / 4) * NR * 4;
      const int8_t* ak = a + block * (BLOCK / 4) * MR * 4;
#pragma GCC unroll 8
      for (int step = 0; step < BLOCK / 4; ++step) {
        const __m512i w0 = _mm512_loadu_si512(bk + step * NR * 4);
        const __m512i w1 = _mm512_loadu_si512(bk + step * NR * 4 + L * 4);
#pragma GCC unroll 6
        for (int r = 0; r < MR; ++r) {
          int32_t quad;
          std::memcpy(&quad, ak + (step * MR + r) * 4, 4);
          const __m512i x = _mm512_set1_epi32(quad);
          dot[r][0] = _mm512_dpbusd_epi32(dot[r][0], w0, x);
          dot[r][1] = _mm512_dpbusd_epi32(dot[r][1], w1, x);
        }
      }
      const __m512 s0 = _mm512_loadu_ps(scales + g * NR), s1 = _mm512_loadu_ps(scales + g * NR + L);
#pragma GCC unroll 6
      for (int r = 0; r < MR; ++r) {
        const __m512 step = _mm512_set1_ps(steps[block * stride + r]);
        acc[r][0] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot[r][0]), s0), step, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot[r][1]), s1), step, acc[r][1]);
      }
    }
    const __m512 b0 = _mm512_loadu_ps(biases + g * NR), b1 = _mm512_loadu_ps(biases + g * NR + L);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m512 sum = _mm512_set1_ps(sums[g * stride + r]);
      acc[r][0] = _mm512_fmadd_ps(b0, sum, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(b1, sum, acc[r][1]);
    }
  }
  for (int r = 0; r < rows; ++r) {
    float* row = c + r * ldc;
    if (cols == NR) {
      __m512 lo = acc[r][0], hi = acc[r][1];
      if (accumulate) {
        lo = _mm512_add_ps(lo, _mm512_loadu_ps(row));
        hi = _mm512_add_ps(hi, _mm512_loadu_ps(row + L));
      }
      _mm512_storeu_ps(row, lo);
      _mm512_storeu_ps(row + L, hi);
    } else {
      alignas(64) float part[NR];
      _mm512_store_ps(part, acc[r][0]);
      _mm512_store_ps(part + L, acc[r][1]);
      for (int j = 0; j < cols; ++j) row[j] = accumulate ? row[j] + part[j] : part[j];
    }
  }
}

void panels(const GemmInt8Rows& x, const GemmMatrix& m, int64_t p0, int64_t p1) {
  alignas(64) uint8_t b[GEMM_KC * NR];
  alignas(64) float scales[GEMM_KC / BLOCK * NR], biases[GEMM_KC / BLOCK * NR];
  const int tiles = (x.M + MR - 1) / MR;
  const int64_t padded = int64_t(tiles) * MR;
  const int group = x.group_size;
  for (int t0 = 0; t0 < tiles; t0 += MC / MR) {
    const int t1 = t0 + MC / MR < tiles ? t0 + MC / MR : tiles;
    for (int64_t k0 = 0; k0 < x.K; k0 += GEMM_KC) {
      const int kc = int(x.K - k0 < GEMM_KC ? x.K - k0 : GEMM_KC);
      const int8_t* block = x.packed + k0 * padded;
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n0 = p * NR;
        const int cols = int(m.N - n0 < NR ? m.N - n0 : NR);
        prepare_panel(m, x.K, group, n0, cols, k0, kc, b, scales, biases);
        for (int t = t0; t < t1; ++t) {
          const int rows = x.M - t * MR < MR ? x.M - t * MR : MR;
          multiply_tile(block + int64_t(t) * MR * kc, x.steps + k0 / BLOCK * padded + t * MR,
                        x.sums + k0 / group * padded + t * MR, padded, b, scales, biases, kc,
                        group, m.out + t * MR * m.N + n0, m.N, rows, cols, k0 > 0);
        }
      }
    }
  }
}

}  // namespace

GemmInt8Kernels gemm_vnni_kernels() { return {MR, NR, panels}; }

void pack_rows_int8(const float* x, int M, int64_t K, int group, int t0, int t1, int8_t* packed,
                    float* steps, float* sums) {
  const int64_t padded = int64_t((M + MR - 1) / MR) * MR;
  // Per 16 bytes (2 words): each word's even elements, then its odd ones.
  const __m128i order = _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
  for (int t = t0; t < t1; ++t)
    for (int r = 0; r < MR; ++r) {
      const int row = t * MR + r;
      const float* source = x + int64_t(row < M ? row : 0) * K;
      float group_sum = 0.0f;
      for (int64_t k = 0; k < K; k += BLOCK) {
        const int64_t k0 = k / GEMM_KC * GEMM_KC;
        const int64_t kc = K - k0 < GEMM_KC ? K - k0 : GEMM_KC;
        __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();
        if (row < M) {
          lo = _mm512_loadu_ps(source + k);
          hi = _mm512_loadu_ps(source + k + L);
        }
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
        const __m512 inverse = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        steps[k / BLOCK * padded + row] = amax / 127.0f;
        // Round to nearest even (the default rounding mode), as nearbyint does.
        const __m128i q[2] = {
            _mm_shuffle_epi8(_mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(lo, inverse))), order),
            _mm_shuffle_epi8(_mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(hi, inverse))), order)};
        int32_t quads[8];
        std::memcpy(quads, q, 32);
        int8_t* tile = packed + k0 * padded + int64_t(t) * MR * kc + ((k - k0) / 4 * MR + r) * 4;
        for (int j = 0; j < 8; ++j) std::memcpy(tile + j * MR * 4, quads + j, 4);
        // The bias term's exact sums of x (float32, per block of 32 then per group).
        group_sum += _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
        if ((k + BLOCK) % group == 0) {
          sums[k / group * padded + row] = group_sum;
          group_sum = 0.0f;
        }
      }
    }
}

#else

GemmInt8Kernels gemm_vnni_kernels() { return {0, 0, nullptr}; }

void pack_rows_int8(const float*, int, int64_t, int, int, int, int8_t*, float*, float*) {}

#endif

}  // namespace native

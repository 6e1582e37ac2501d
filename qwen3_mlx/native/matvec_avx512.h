// The AVX-512 4-bit mat-vec kernels (float32 x, and int8 x with VNNI), included by
// matvec_kernels.h inside its NATIVE_X86 block, which defines the Job and the scale types first.
#pragma once

namespace native {

// ---------------------------------------------------------------------------------------------
// AVX-512: 16 words (128 weights) per step; tiles of up to 8 rows of w and 3 rows of x


template <int T, int G>
NATIVE_AVX512 inline __m512 scales16(const void* p) {
  __m128 v;
  if constexpr (T == F32) {
    const float* f = static_cast<const float*>(p);
    if constexpr (G == 1) return _mm512_set1_ps(f[0]);
    if constexpr (G == 2) {
      v = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(f)));
    } else {
      v = _mm_loadu_ps(f);
    }
  } else {
    const uint16_t* h = static_cast<const uint16_t*>(p);
    __m128i bits;
    if constexpr (G == 4) {
      bits = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(h));
    } else {
      uint32_t raw = G == 1 ? h[0] : (uint32_t(h[0]) | uint32_t(h[1]) << 16);
      bits = _mm_cvtsi32_si128(int(raw));
    }
    if constexpr (T == BF16) {
      v = _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(bits), 16));
    } else {
      v = _mm_cvtph_ps(bits);
    }
    if constexpr (G == 1) return _mm512_set1_ps(_mm_cvtss_f32(v));
  }
  const __m512i index = G == 2
      ? _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1)
      : _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  return _mm512_permutexvar_ps(index, _mm512_castps128_ps512(v));
}

// Row n of w and its scales and biases (bytes), for the 16-word steps of the AVX-512 kernels.
template <int T, int GS>
struct Row512 {
  static constexpr int G = 128 / GS;  // groups per step: 1, 2 or 4
  static constexpr int64_t esize = T == F32 ? 4 : 2;
  const uint32_t* w;
  const char *s, *b;
  Row512(const Job& job, int64_t n)
      : w(job.w + n * (job.K / 8)),
        s(static_cast<const char*>(job.scales) + n * (job.K / GS) * esize),
        b(static_cast<const char*>(job.biases) + n * (job.K / GS) * esize) {}
};

// The biases of 16 groups from p (of the last `left` groups, zeros past them) as float32: a
// masked load, so the last row's read stays inside the array.
template <int T>
NATIVE_AVX512 inline __m512 biases16(const char* p, int64_t left) {
  const __mmask16 lanes = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
  if constexpr (T == F32) return _mm512_maskz_loadu_ps(lanes, p);
  const __m256i bits = _mm256_maskz_loadu_epi16(lanes, p);
  if constexpr (T == BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
  return _mm512_cvtph_ps(bits);
}

// sums[n][m] += the bias term of NB rows of w (`biases`: the first row's) for MB rows of x from
// m0: per 16 groups, the biases times the exact group sums of x (Job::xg), after the last step.
template <int T, int NB, int MB>
NATIVE_AVX512 inline void add_bias_terms(const Job& job, const char* biases, int64_t groups, int m0,
                                         __m512 (&sums)[NB][MB]) {
  constexpr int64_t esize = T == F32 ? 4 : 2;
  const int64_t stride = group_sums_stride(groups);
  const float* xg = job.xg + m0 * stride;
  for (int64_t g = 0; g < groups; g += 16) {
#pragma GCC unroll 8
    for (int n = 0; n < NB; ++n) {
      const __m512 bv = biases16<T>(biases + (n * groups + g) * esize, groups - g);
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m)
        sums[n][m] = _mm512_fmadd_ps(bv, _mm512_loadu_ps(xg + m * stride + g), sums[n][m]);
    }
  }
}

// NB rows of w (n0..) times MB rows of x (m0..). Each 16-word step unpacks the NB rows' words
// once for all MB rows of x, and loads each x vector once for all NB rows of w; the next tile's
// words are prefetched as one linear run (its NB rows are contiguous), one line per row and step.
// Every (row of w, row of x) pair has its own sums, added in one order whatever NB and MB are:
// per step acc = q_0 x_0 + ... + q_7 x_7 (a product, then 7 FMAs), then total += acc * scale;
// after the last step, per 16 groups total += biases * group sums of x (Job::xg: one FMA per 16
// groups, where a bias per step cost one FMA per step). So each row of x gets, bit for bit, the
// result a one-row call gives it (a speculative verify pass relies on that).
template <int T, int GS, int NB, int MB>
NATIVE_AVX512 void tile_avx512(const Job& job, int64_t n0, int m0) {
  constexpr int G = Row512<T, GS>::G, esize = Row512<T, GS>::esize;
  const int64_t K = job.K, steps = K / 128, words = K / 8, groups = K / GS;
  const uint32_t* w = job.w + n0 * words;
  const char* scales = static_cast<const char*>(job.scales) + n0 * groups * esize;
  const char* biases = static_cast<const char*>(job.biases) + n0 * groups * esize;
  const float* x = job.xp + m0 * K;
  // The tile's biases are read after its last step: fetched now, they arrive during the steps
  // (read cold at the end, they stalled a one-row tile by about 12 %).
  for (int64_t byte = 0; byte < NB * groups * esize; byte += 64) _mm_prefetch(biases + byte, _MM_HINT_T0);
  __m512 total[NB][MB];
#pragma GCC unroll 8
  for (int n = 0; n < NB; ++n)
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) total[n][m] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi32(0xf);
  for (int64_t c = 0; c < steps; ++c) {
    __m512i packed[NB];
#pragma GCC unroll 8
    for (int n = 0; n < NB; ++n) {
      if (job.prefetch_words)
        _mm_prefetch(reinterpret_cast<const char*>(w + NB * words + (c * NB + n) * 16), _MM_HINT_T0);
      packed[n] = _mm512_loadu_si512(w + n * words + c * 16);
    }
    __m512 acc[NB][MB];
#pragma GCC unroll 8
    for (int s = 0; s < 8; ++s) {
      __m512 q[NB];
#pragma GCC unroll 8
      for (int n = 0; n < NB; ++n)
        q[n] = _mm512_cvtepi32_ps(s == 7 ? _mm512_srli_epi32(packed[n], 28)
                                          : _mm512_and_si512(packed[n], _mm512_slli_epi32(low, 4 * s)));
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) {
        const __m512 xv = _mm512_loadu_ps(x + m * K + c * 128 + s * 16);
#pragma GCC unroll 8
        for (int n = 0; n < NB; ++n)
          acc[n][m] = s == 0 ? _mm512_mul_ps(q[n], xv) : _mm512_fmadd_ps(q[n], xv, acc[n][m]);
      }
    }
#pragma GCC unroll 8
    for (int n = 0; n < NB; ++n) {
      const __m512 sv = scales16<T, G>(scales + (n * groups + c * G) * esize);
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) total[n][m] = _mm512_fmadd_ps(acc[n][m], sv, total[n][m]);
    }
  }
  add_bias_terms<T, NB, MB>(job, biases, groups, m0, total);
#pragma GCC unroll 8
  for (int n = 0; n < NB; ++n)
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m)
      job.out[(m0 + m) * job.N + n0 + n] = _mm512_reduce_add_ps(total[n][m]);
}

// NB rows of w times every row of x, in tiles of at most 3 rows of x (x_blocks).
template <int T, int GS, int NB>
NATIVE_AVX512 void tile_rows_avx512(const Job& job, int64_t n0) {
  x_blocks(job.M, [&](auto rows, int m) { tile_avx512<T, GS, NB, decltype(rows)::value>(job, n0, m); });
}

// Rows [r0, r1) of w: 8 at a time for one row of x (decode: bound by reading w), 4 for more
// (bound by the FMAs: 4 x 3 sums fit the registers); a remainder one at a time.
template <int T, int GS>
NATIVE_AVX512 void rows_avx512(const Job& job, int64_t r0, int64_t r1) {
  int64_t n = r0;
  if (job.M == 1) {
    for (; n + 8 <= r1; n += 8) tile_avx512<T, GS, 8, 1>(job, n, 0);
  } else {
    for (; n + 4 <= r1; n += 4) tile_rows_avx512<T, GS, 4>(job, n);
  }
  for (; n < r1; ++n) tile_rows_avx512<T, GS, 1>(job, n);
}

// ---------------------------------------------------------------------------------------------
// AVX-512 VNNI, int8 x (the default where it runs): 16 words per step. `w & 0x0f0f0f0f` holds
// a word's even nibbles as bytes and `(w >> 4) & 0x0f0f0f0f` its odd ones, so two vpdpbusd (u8
// weights times s8 x) give each word's 8 products summed in its int32 lane, then scaled by the
// lane's group scale times its x block scale. The bias term uses the exact float group sums of x
// (once per 16 groups, after the steps), so the only error is x's int8 rounding (half a block
// step per element), as llama.cpp's Q8_0 activations.


// x [M][K] (K a multiple of 128) for the int8 tiles, in one pass over x: int8 per block of 32
// (its largest magnitude maps to 127, rounded half to even), laid out per step of 16 words as
// [the 4 even elements of each word][the 4 odd ones] (xq); each word's block step (xd); and each
// group's sum of x, zero padded to group_sums_stride (xg). Every row is prepared alone, so a row
// gets the same bytes in a call of one row as in a call of eight (a verify pass relies on that).
// Vector code because it runs on one thread before the pool starts: the scalar version took
// 11 us of a 4B down projection's x per row, 55 us for a 5-position verify pass.
NATIVE_AVX512 inline void quantize_rows_vnni(const float* x, int M, int64_t K, int group_size,
                                             int8_t* xq, float* xd, float* xg) {
  const int64_t groups = K / group_size, stride = group_sums_stride(groups), words = K / 8;
  const int per_step = 128 / group_size;  // groups per step of 128: 1, 2 or 4
  const int per_group = 8 / per_step;     // vectors of 16 per group
  for (int m = 0; m < M; ++m) {
    const float* row = x + m * K;
    float* sums = xg + m * stride;
    for (int64_t g = groups; g < stride; ++g) sums[g] = 0.0f;
    for (int64_t c = 0; c < K / 128; ++c) {
      __m512 v[8];
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) v[i] = _mm512_loadu_ps(row + c * 128 + 16 * i);
      alignas(64) int8_t q[128];
      __m512 steps = _mm512_setzero_ps();
#pragma GCC unroll 4
      for (int b = 0; b < 4; ++b) {
        const float amax =
            _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[2 * b]), _mm512_abs_ps(v[2 * b + 1])));
        const __m512 inverse = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        // Rounded half to even (the default MXCSR mode), as std::nearbyint rounds.
        _mm_store_si128(reinterpret_cast<__m128i*>(q + 32 * b),
                        _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v[2 * b], inverse))));
        _mm_store_si128(reinterpret_cast<__m128i*>(q + 32 * b + 16),
                        _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v[2 * b + 1], inverse))));
        steps = _mm512_mask_mov_ps(steps, __mmask16(0xf << (4 * b)), _mm512_set1_ps(amax / 127.0f));
      }
      _mm512_storeu_ps(xd + m * words + c * 16, steps);
      // As int16 pairs, an even element is a pair's low byte and the odd one its high byte.
      int8_t* out = xq + m * K + c * 128;
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m512i pairs = _mm512_load_si512(q + 64 * h);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 32 * h), _mm512_cvtepi16_epi8(pairs));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 64 + 32 * h),
                            _mm512_cvtepi16_epi8(_mm512_srli_epi16(pairs, 8)));
      }
      for (int g = 0; g < per_step; ++g) {
        __m512 sum = v[g * per_group];
        for (int i = 1; i < per_group; ++i) sum = _mm512_add_ps(sum, v[g * per_group + i]);
        sums[c * per_step + g] = _mm512_reduce_add_ps(sum);
      }
    }
  }
}

// NB rows of w times MB rows of x, tiled as the float kernel's (tile_avx512); integer sums are
// exact, and the float steps keep one order per (row of w, row of x) whatever NB and MB are.
// The words AHEAD rows of w on are prefetched (the next tile's by default).
template <int T, int GS, int NB, int MB, int AHEAD = NB>
NATIVE_VNNI void tile_vnni(const Job& job, int64_t n0, int m0) {
  constexpr int G = Row512<T, GS>::G, esize = Row512<T, GS>::esize;
  const int64_t K = job.K, words = K / 8, groups = K / GS;
  const uint32_t* w = job.w + n0 * words;
  const char* scales = static_cast<const char*>(job.scales) + n0 * groups * esize;
  const char* biases = static_cast<const char*>(job.biases) + n0 * groups * esize;
  for (int64_t byte = 0; byte < NB * groups * esize; byte += 64) _mm_prefetch(biases + byte, _MM_HINT_T0);
  __m512 total[NB][MB], totalb[NB][MB];
#pragma GCC unroll 8
  for (int n = 0; n < NB; ++n)
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) total[n][m] = totalb[n][m] = _mm512_setzero_ps();
  const __m512i nibble = _mm512_set1_epi8(0x0f);
  for (int64_t c = 0; c < K / 128; ++c) {
#pragma GCC unroll 8
    for (int n = 0; n < NB; ++n) {
      if (job.prefetch_words)
        _mm_prefetch(reinterpret_cast<const char*>(w + AHEAD * words + (c * NB + n) * 16), _MM_HINT_T0);
      const __m512i packed = _mm512_loadu_si512(w + n * words + c * 16);
      const __m512i even = _mm512_and_si512(packed, nibble);
      const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(packed, 4), nibble);
      const __m512 step_scales = scales16<T, G>(scales + (n * groups + c * G) * esize);
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) {
        const int8_t* xq = job.xq + (m0 + m) * K + c * 128;
        __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), even, _mm512_loadu_si512(xq));
        dot = _mm512_dpbusd_epi32(dot, odd, _mm512_loadu_si512(xq + 64));
        const int64_t word = (m0 + m) * words + c * 16;
        const __m512 step = _mm512_mul_ps(step_scales, _mm512_loadu_ps(job.xd + word));
        total[n][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), step, total[n][m]);
      }
    }
  }
  add_bias_terms<T, NB, MB>(job, biases, groups, m0, totalb);  // as the float kernel's
#pragma GCC unroll 8
  for (int n = 0; n < NB; ++n)
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m)
      job.out[(m0 + m) * job.N + n0 + n] =
          _mm512_reduce_add_ps(_mm512_add_ps(total[n][m], totalb[n][m]));
}

template <int T, int GS, int NB>
NATIVE_VNNI void tile_rows_vnni(const Job& job, int64_t n0) {
  int m = 0;
  for (; m + 3 <= job.M; m += 3) tile_vnni<T, GS, NB, 3>(job, n0, m);
  if (job.M - m == 2) tile_vnni<T, GS, NB, 2>(job, n0, m);
  if (job.M - m == 1) tile_vnni<T, GS, NB, 1>(job, n0, m);
}

// Rows [r0, r1) of w, NB at a time, each tile taking all MB rows of x, prefetching 8 rows of w
// ahead (one tile of a decode step's, two of 4 rows).
template <int T, int GS, int NB, int MB>
NATIVE_VNNI void rows_vnni_tiles(const Job& job, int64_t r0, int64_t r1) {
  int64_t n = r0;
  for (; n + NB <= r1; n += NB) tile_vnni<T, GS, NB, MB, 8>(job, n, 0);
  for (; n < r1; ++n) tile_vnni<T, GS, 1, MB, 8>(job, n, 0);
}

// Up to 4 rows of x (decode, and a speculative verify pass of up to 4 positions) in one tile, so
// each word is unpacked once; more in blocks of 3 and 2, as the float kernel. Measured on one
// 2560 -> 4096 matrix, one Zen 5 thread, words from DRAM (bench_matvec_rows --int8, best of 5,
// against blocks of 3 prefetching one tile ahead): 2 / 3 / 4 rows 0.92x / 0.89x / 0.87x the time,
// 1 / 5 / 8 rows unchanged (1.03x / 0.99x / 0.98x). One tile of 4 rows for 5 or more (4 + 1,
// 4 + 4) took 1.18-1.22x, and one tile of 5 rows 1.17x.
template <int T, int GS>
NATIVE_VNNI void rows_vnni(const Job& job, int64_t r0, int64_t r1) {
  switch (job.M) {
    case 1: return rows_vnni_tiles<T, GS, 8, 1>(job, r0, r1);
    case 2: return rows_vnni_tiles<T, GS, 4, 2>(job, r0, r1);
    case 3: return rows_vnni_tiles<T, GS, 4, 3>(job, r0, r1);
    case 4: return rows_vnni_tiles<T, GS, 4, 4>(job, r0, r1);
  }
  int64_t n = r0;
  for (; n + 4 <= r1; n += 4) tile_rows_vnni<T, GS, 4>(job, n);
  for (; n < r1; ++n) tile_rows_vnni<T, GS, 1>(job, n);
}

}  // namespace native

// Decode attention over a float32 KV cache for MLX's CPU backend: one query position, or the few
// of a speculative verify pass, every query head (and position) of a KV head at once, the cache
// read in place.
//
// Why not `mx.fast.scaled_dot_product_attention`: for one query position on the CPU backend it
// runs as general matrix products through OpenBLAS, which packs the keys and values before
// multiplying: 265 us at 64 cached tokens and 3.5 ms at 1,024 per layer at Qwen3-4B's heads
// (docs/benchmarks.md). Here each key and value row is read once, for all R query heads that
// share it, with the chunked (flash-decoding) softmax of attention.cpp.
//
// Layout: q [B, Hq, L, D]; keys and values [B, Hkv, T, D] with any element strides (mlx-lm's
// cache hands back its allocation sliced along T). Query head h*R + r attends with KV head h.
// With L > 1 the positions are the last L of T, causal: position l sees keys [0, T - L + l], its
// later keys masked in the chunks (attention.h), so each gets bit for bit the result of the one-
// position step that would decode it. (The prefill attention packs the keys into its tiles once
// per call, which for a handful of positions cost 0.5 ms a layer at 128 tokens of context, seven
// times this.)
// The vector kernels (AVX2+FMA; AVX-512, about 13% faster single-threaded on the project's VM)
// need a contiguous last axis and D a multiple of 16 (32 for AVX-512); anything else takes the
// portable kernels, which follow every stride. Arithmetic is float32 throughout, so results are
// within float32 rounding of a float64 reference.

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"
#include "attention.h"
#include "strided.h"
#include "isa.h"
#include "layer_parts.h"
#include "ops.h"
#include "pool.h"

namespace mx = mlx::core;

namespace native {

namespace {

// n rows of D floats: row t at first + t * stride, its element i at + i * step.
struct Span {
  const float* first;
  int64_t stride, step, n;
};

// One cache tensor (keys or values) with the element strides of its four axes.
struct Rows {
  const float* base;
  int64_t stride[4];

  Span span(int64_t bi, int64_t h, int64_t t0, int64_t n) const {
    return {base + bi * stride[0] + h * stride[1] + t0 * stride[2], stride[2], stride[3], n};
  }
};

struct Job : Partials {
  Rows k, v;
  const float* q;  // [B, H, R, D], times the softmax scale
};

// score[t * R + r] = q_r . k_t (v: the same tokens' value rows, which the vector kernels bring
// toward L1 meanwhile), and acc[r * D + i] += sum_t p[t * R + r] v_t[i]
using ScoresFn = void (*)(const Span& k, const Span& v, const float* q, int R, int D,
                          float* score);
using ValuesFn = void (*)(const Span& v, const float* p, int R, int D, float* acc);

// ---------------------------------------------------------------------------------------------
// Portable kernels (any strides)

void scores_scalar(const Span& k, const Span&, const float* q, int R, int D, float* score) {
  for (int64_t t = 0; t < k.n; ++t) {
    const float* row = k.first + t * k.stride;
    for (int r = 0; r < R; ++r) {
      float dot = 0.0f;
      for (int i = 0; i < D; ++i) dot += q[r * D + i] * row[i * k.step];
      score[t * R + r] = dot;
    }
  }
}

void values_scalar(const Span& v, const float* p, int R, int D, float* acc) {
  for (int64_t t = 0; t < v.n; ++t) {
    const float* row = v.first + t * v.stride;
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < D; ++i) acc[r * D + i] += p[t * R + r] * row[i * v.step];
  }
}

#ifdef NATIVE_X86
// ---------------------------------------------------------------------------------------------
// AVX2 + FMA and AVX-512 (step 1; D a multiple of 16 and 32). Each ISA has two inner kernels;
// the drivers below split tokens and query rows into blocks for either.


NATIVE_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

struct Avx2 {
  // score[t * R + r] = q_r . k_t for RB query rows and TB key rows: each load feeds RB or TB FMAs.
  template <int RB, int TB>
  NATIVE_AVX2 static void dots(const float* k, int64_t stride, const float* q, int R, int D,
                            float* score) {
    __m256 acc[TB][RB];
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) {
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r) acc[t][r] = _mm256_setzero_ps();
    }
    for (int i = 0; i < D; i += 8) {
      __m256 key[TB];
#pragma GCC unroll 8
      for (int t = 0; t < TB; ++t) key[t] = _mm256_loadu_ps(k + t * stride + i);
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r) {
        const __m256 query = _mm256_loadu_ps(q + r * D + i);
#pragma GCC unroll 8
        for (int t = 0; t < TB; ++t) acc[t][r] = _mm256_fmadd_ps(key[t], query, acc[t][r]);
      }
    }
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) {
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r) score[t * R + r] = hsum(acc[t][r]);
    }
  }

  // acc[r * D + i] += sum_t p[t * R + r] v_t[i] for RB rows, 16 columns at a time.
  template <int RB>
  NATIVE_AVX2 static void weigh(const float* v, int64_t stride, int64_t n, const float* p, int R,
                             int D, float* acc) {
    for (int i = 0; i < D; i += 16) {
      __m256 a[RB][2];
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r) {
        a[r][0] = _mm256_loadu_ps(acc + r * D + i);
        a[r][1] = _mm256_loadu_ps(acc + r * D + i + 8);
      }
      for (int64_t t = 0; t < n; ++t) {
        const __m256 v0 = _mm256_loadu_ps(v + t * stride + i);
        const __m256 v1 = _mm256_loadu_ps(v + t * stride + i + 8);
#pragma GCC unroll 8
        for (int r = 0; r < RB; ++r) {
          const __m256 w = _mm256_broadcast_ss(p + t * R + r);
          a[r][0] = _mm256_fmadd_ps(w, v0, a[r][0]);
          a[r][1] = _mm256_fmadd_ps(w, v1, a[r][1]);
        }
      }
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r) {
        _mm256_storeu_ps(acc + r * D + i, a[r][0]);
        _mm256_storeu_ps(acc + r * D + i + 8, a[r][1]);
      }
    }
  }
};

struct Avx512 {  // as Avx2, twice as wide
  template <int RB, int TB>
  NATIVE_AVX512 static void dots(const float* k, int64_t stride, const float* q, int R, int D,
                              float* score) {
    __m512 acc[TB][RB];
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) {
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r) acc[t][r] = _mm512_setzero_ps();
    }
    for (int i = 0; i < D; i += 16) {
      __m512 key[TB];
#pragma GCC unroll 8
      for (int t = 0; t < TB; ++t) key[t] = _mm512_loadu_ps(k + t * stride + i);
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r) {
        const __m512 query = _mm512_loadu_ps(q + r * D + i);
#pragma GCC unroll 8
        for (int t = 0; t < TB; ++t) acc[t][r] = _mm512_fmadd_ps(key[t], query, acc[t][r]);
      }
    }
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) {
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r) score[t * R + r] = _mm512_reduce_add_ps(acc[t][r]);
    }
  }

  template <int RB>
  NATIVE_AVX512 static void weigh(const float* v, int64_t stride, int64_t n, const float* p, int R,
                               int D, float* acc) {
    for (int i = 0; i < D; i += 32) {
      __m512 a[RB][2];
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r) {
        a[r][0] = _mm512_loadu_ps(acc + r * D + i);
        a[r][1] = _mm512_loadu_ps(acc + r * D + i + 16);
      }
      for (int64_t t = 0; t < n; ++t) {
        const __m512 v0 = _mm512_loadu_ps(v + t * stride + i);
        const __m512 v1 = _mm512_loadu_ps(v + t * stride + i + 16);
#pragma GCC unroll 8
        for (int r = 0; r < RB; ++r) {
          const __m512 w = _mm512_set1_ps(p[t * R + r]);
          a[r][0] = _mm512_fmadd_ps(w, v0, a[r][0]);
          a[r][1] = _mm512_fmadd_ps(w, v1, a[r][1]);
        }
      }
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r) {
        _mm512_storeu_ps(acc + r * D + i, a[r][0]);
        _mm512_storeu_ps(acc + r * D + i + 16, a[r][1]);
      }
    }
  }
};

// Query rows in blocks of 4, 2 and 1 against TB key rows.
template <class Simd, int TB>
void dots_rows(const float* k, int64_t stride, const float* q, int R, int D, float* score) {
  int r = 0;
  for (; r + 4 <= R; r += 4) Simd::template dots<4, TB>(k, stride, q + r * D, R, D, score + r);
  for (; r + 2 <= R; r += 2) Simd::template dots<2, TB>(k, stride, q + r * D, R, D, score + r);
  for (; r < R; ++r) Simd::template dots<1, TB>(k, stride, q + r * D, R, D, score + r);
}

// Row t's D floats toward L1; past the span's end, its last row again. (With an early return
// there instead, GCC 12 at -O3 dropped every prefetch of the loops that call this.)
inline void prefetch_row(const Span& rows, int64_t t, int D) {
  const int64_t row_index = std::min(t, rows.n - 1);
  const char* row = reinterpret_cast<const char*>(rows.first + row_index * rows.stride);
  for (int byte = 0; byte < D * 4; byte += 64) _mm_prefetch(row + byte, _MM_HINT_T0);
}

// The keys KEYS_AHEAD rows on, and each value row as its key row is read: a KV head's keys and
// values are short streams (64 KB each at 128 tokens), which the hardware prefetcher alone read
// at 14-24 GB/s, under the mat-vecs' 30-40. Two streams in flight, plus the keys' head start, took
// 0.63x / 0.89x / 0.75x the time at 129 / 1,024 / 4,096 tokens with Qwen3-0.6B's heads, and 0.75x
// / 0.71x / 0.65x with Qwen3-4B's (two Zen 5 cores; `python -m benchmarks.bench_attention
// --layers 28 --builds ...`, docs/benchmarks.md).
constexpr int64_t KEYS_AHEAD = 8;

template <class Simd>
void scores_simd(const Span& k, const Span& v, const float* q, int R, int D, float* score) {
  for (int64_t t = 0; t < KEYS_AHEAD; ++t) prefetch_row(k, t, D);
  int64_t t = 0;
  for (; t + 2 <= k.n; t += 2) {
    for (int64_t u = t; u < t + 2; ++u) {
      prefetch_row(k, u + KEYS_AHEAD, D);
      prefetch_row(v, u, D);
    }
    dots_rows<Simd, 2>(k.first + t * k.stride, k.stride, q, R, D, score + t * R);
  }
  if (t < k.n) dots_rows<Simd, 1>(k.first + t * k.stride, k.stride, q, R, D, score + t * R);
}

template <class Simd>
void values_simd(const Span& v, const float* p, int R, int D, float* acc) {
  constexpr int64_t BLOCK = 32;  // value rows per pass, kept in L1 for every block of rows
  for (int64_t t0 = 0; t0 < v.n; t0 += BLOCK) {
    const float* rows = v.first + t0 * v.stride;
    const int64_t n = std::min(BLOCK, v.n - t0);
    const float* pt = p + t0 * R;
    const int64_t s = v.stride;
    int r = 0;
    for (; r + 4 <= R; r += 4) Simd::template weigh<4>(rows, s, n, pt + r, R, D, acc + r * D);
    for (; r + 2 <= R; r += 2) Simd::template weigh<2>(rows, s, n, pt + r, R, D, acc + r * D);
    for (; r < R; ++r) Simd::template weigh<1>(rows, s, n, pt + r, R, D, acc + r * D);
  }
}
#endif  // NATIVE_X86

struct Kernels {
  ScoresFn scores;
  ValuesFn values;
};

Kernels kernels_for(Isa isa, int D, bool unit_step) {
#ifdef NATIVE_X86
  if (unit_step && isa == AVX512 && D % 32 == 0) return {scores_simd<Avx512>, values_simd<Avx512>};
  if (unit_step && isa != SCALAR && D % 16 == 0) return {scores_simd<Avx2>, values_simd<Avx2>};
#endif
  return {scores_scalar, values_scalar};
}

// ---------------------------------------------------------------------------------------------
// One work item: KV head (bi, h), context tokens [t0, t0 + n): partial softmax and values

void run_chunk(const Job& job, int64_t item, Kernels kernels) {
  const int64_t c = item % job.chunks, bh = item / job.chunks;
  const int64_t bi = bh / job.H, h = bh % job.H;
  const int64_t t0 = c * CHUNK, n = std::min(job.T, t0 + CHUNK) - t0;
  const int R = job.R, D = job.D;
  std::vector<float> score(size_t(n) * R);
  const Span values = job.v.span(bi, h, t0, n);
  kernels.scores(job.k.span(bi, h, t0, n), values, job.q + bh * R * D, R, D, score.data());
  mask_chunk(score.data(), n, R, t0, job);
  softmax_chunk(score.data(), n, R, job.part_max + item * R, job.part_sum + item * R);
  float* acc = job.part_acc + item * R * D;
  std::fill(acc, acc + R * D, 0.0f);
  kernels.values(values, score.data(), R, D, acc);
}

class DecodeAttention : public mx::UnaryPrimitive {
 public:
  DecodeAttention(mx::Stream stream, float scale, int threads)
      : mx::UnaryPrimitive(stream), scale_(scale), threads_(threads) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("decode attention: CPU only");
  }
  const char* name() const override { return "DecodeAttention"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const DecodeAttention&>(other);
    return scale_ == o.scale_ && threads_ == o.threads_;
  }

 private:
  float scale_;
  int threads_;
};

void DecodeAttention::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& input : inputs) encoder.set_input_array(input);
  encoder.set_output_array(out);

  encoder.dispatch([scale = scale_, threads = threads_, q = mx::array::unsafe_weak_copy(inputs[0]),
                    k = mx::array::unsafe_weak_copy(inputs[1]),
                    v = mx::array::unsafe_weak_copy(inputs[2]),
                    out = mx::array::unsafe_weak_copy(out)]() mutable {
    const ClearVectorState clear;
    std::vector<float> qs;
    const float* query = row_major(q, qs);  // q may be a strided view (no Contiguous node for it)
    const int64_t H = k.shape(1);
    float_decode_attention(query, k.data<float>(), k.strides().data(), v.data<float>(),
                           v.strides().data(), q.shape(0), H, k.shape(2), int(q.shape(1) / H),
                           int(q.shape(3)), scale, threads, out.data<float>(), q.shape(2));
  });
}

}  // namespace

void float_decode_attention(const float* q, const float* k, const int64_t* k_strides,
                            const float* v, const int64_t* v_strides, int64_t B, int64_t Hkv,
                            int64_t T, int R, int D, float scale, int threads, float* out,
                            int64_t L) {
  const int64_t count = B * Hkv * R * L * D;
  if (T == 0) {  // nothing to attend to: zeros, as a softmax over no keys has no value
    std::fill(out, out + count, 0.0f);
    return;
  }
  Job job{};
  job.B = B;
  job.H = Hkv;
  job.T = T;
  job.R = int(R * L);  // rows of a KV head: its query heads' positions, [R][L] as in q
  job.L = L;
  job.D = D;
  job.chunks = chunks_for(T);
  const Kernels kernels = kernels_for(chosen_isa(), D, k_strides[3] == 1 && v_strides[3] == 1);
  std::vector<float> qs(q, q + count);
  for (float& x : qs) x *= scale;
  const std::vector<float> partials = job.allocate();
  job.q = qs.data();
  job.k = Rows{k, {k_strides[0], k_strides[1], k_strides[2], k_strides[3]}};
  job.v = Rows{v, {v_strides[0], v_strides[1], v_strides[2], v_strides[3]}};
  pool().run(threads, job.items(), [&](int64_t item) { run_chunk(job, item, kernels); });
  merge(job, out);
}

mx::array decode_attention(const mx::array& q, const mx::array& k, const mx::array& v,
                           float scale, int threads, mx::StreamOrDevice s) {
  if (q.dtype() != mx::float32 || q.ndim() != 4 || q.shape(2) < 1 ||
      (q.shape(2) > 1 && q.shape(2) > k.shape(2)))
    throw std::invalid_argument(
        "decode attention: q must be float32 [B, Hq, L, D], 1 <= L <= the keys' T");
  for (const auto* a : {&k, &v}) {
    if (a->dtype() != mx::float32 || a->ndim() != 4 || a->shape(0) != q.shape(0) ||
        a->shape(1) == 0 || q.shape(1) % a->shape(1) || a->shape(1) != k.shape(1) ||
        a->shape(2) != k.shape(2) || a->shape(3) != q.shape(3))
      throw std::invalid_argument(
          "decode attention: keys and values must be float32 [B, Hkv, T, D], Hq a multiple of Hkv");
  }
  auto stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu)
    throw std::invalid_argument("decode attention: CPU streams only");
  return mx::array(q.shape(), mx::float32,
                   std::make_shared<DecodeAttention>(stream, scale, threads),
                   {q, k, v});
}

}  // namespace native

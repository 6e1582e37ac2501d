// A 4-bit affine quantized mat-vec for MLX's CPU backend: y = x @ dequantize(w, scales, biases).T
// for a few rows of x (decode, small batches), near memory bandwidth.
//
// Layout (MLX affine, bits=4): w is uint32 [N, K/8], element 8*i+s of a row in bits 4s..4s+3 of
// word i; scales and biases [N, K/group] in the checkpoint's dtype (f32, bf16 or f16), read in
// place. Per group g: sum_k x_k (q_k s_g + b_g) = s_g * dot(x_g, q_g) + b_g * sum(x_g).
//
// Kernels: a vector of V words holds 8V weights; word j, nibble s is element 8j+s. x is permuted
// once per call so that the V elements for nibble s sit together, and pre-scaled by 16^-s, so a
// nibble is decoded with one AND (w & 0xF<<4s is q * 16^s, exact in float32) and one int->float
// convert; the power-of-two scaling makes every product exactly q * x. The bias term uses per-lane
// sums of x. Products and sums are float32 throughout, so results are within float32 rounding of
// a float64 reference whatever the scale dtype.
//
// The ISA is chosen at run time (AVX-512, AVX2+FMA, portable C++) with per-function target
// attributes: no -march flag, so the library runs on any x86-64. Rows are split into chunks that
// the MLX stream thread and a small worker pool pull from one atomic counter, so a descheduled
// worker never stalls the op.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define QMV_X86 1
#include <immintrin.h>
#endif

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"
#include "mlx/version.h"

namespace nb = nanobind;
namespace mx = mlx::core;

namespace qmv {

enum Isa : int { SCALAR = 0, AVX2 = 1, AVX512 = 2 };
enum ScaleType : int { F32 = 0, BF16 = 1, F16 = 2 };

// ---------------------------------------------------------------------------------------------
// Scalar conversions (portable)

inline float bf16_to_f32(uint16_t v) {
  uint32_t bits = uint32_t(v) << 16;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
  uint32_t bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000 | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal half: normalise
    int shift = 0;
    while (!(mantissa & 0x400)) {
      mantissa <<= 1;
      ++shift;
    }
    bits = sign | (uint32_t(113 - shift) << 23) | ((mantissa & 0x3ff) << 13);
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

template <int T>
inline float to_f32(const void* base, int64_t index) {
  if constexpr (T == F32) {
    return static_cast<const float*>(base)[index];
  } else if constexpr (T == BF16) {
    return bf16_to_f32(static_cast<const uint16_t*>(base)[index]);
  } else {
    return f16_to_f32(static_cast<const uint16_t*>(base)[index]);
  }
}

// ---------------------------------------------------------------------------------------------
// One call's data, shared by every thread

struct Job {
  const uint32_t* w;
  const void* scales;
  const void* biases;
  int64_t N, K;
  int M, group_size;
  const float* xp;  // [M][K] permuted and pre-scaled for the vector kernels; plain for scalar
  const float* xs;  // [M][K/8] sums of each word's 8 elements of x
  float* out;       // [M][N] float32
  int64_t prefetch_words;
};

// ---------------------------------------------------------------------------------------------
// Portable kernel: plain x, group by group

template <int T>
void rows_scalar(const Job& job, int64_t r0, int64_t r1) {
  const int64_t K = job.K, words = K / 8, groups = K / job.group_size;
  const int gw = job.group_size / 8;  // words per group
  for (int64_t n = r0; n < r1; ++n) {
    const uint32_t* row = job.w + n * words;
    for (int m = 0; m < job.M; ++m) {
      const float* x = job.xp + m * K;
      const float* xs = job.xs + m * words;
      float total = 0.0f;
      for (int64_t g = 0; g < groups; ++g) {
        float dot = 0.0f, sum = 0.0f;
        for (int i = 0; i < gw; ++i) {
          uint32_t word = row[g * gw + i];
          const float* xg = x + (g * gw + i) * 8;
          for (int s = 0; s < 8; ++s) dot += float((word >> (4 * s)) & 0xf) * xg[s];
          sum += xs[g * gw + i];
        }
        total += dot * to_f32<T>(job.scales, n * groups + g) +
            sum * to_f32<T>(job.biases, n * groups + g);
      }
      job.out[m * job.N + n] = total;
    }
  }
}

#ifdef QMV_X86

// ---------------------------------------------------------------------------------------------
// AVX2 + FMA: 8 words (64 weights) per step, up to 2 rows of x at once

#define QMV_AVX2 __attribute__((target("avx2,fma,f16c")))

// G scales starting at p, widened to 8 lanes (lane j -> value j*G/8), as float32.
template <int T, int G>
QMV_AVX2 inline __m256 scales8(const void* p) {
  __m128 v;
  if constexpr (T == F32) {
    const float* f = static_cast<const float*>(p);
    if constexpr (G == 1) return _mm256_broadcast_ss(f);
    v = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(f)));
  } else {
    const uint16_t* h = static_cast<const uint16_t*>(p);
    uint32_t raw = G == 1 ? h[0] : (uint32_t(h[0]) | uint32_t(h[1]) << 16);
    __m128i bits = _mm_cvtsi32_si128(int(raw));
    if constexpr (T == BF16) {
      v = _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(bits), 16));
    } else {
      v = _mm_cvtph_ps(bits);
    }
    if constexpr (G == 1) return _mm256_set1_ps(_mm_cvtss_f32(v));
  }
  const __m256i index = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(v), index);
}

QMV_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int T, int GS, int MB>
QMV_AVX2 void block_avx2(const Job& job, int64_t n, int m0) {
  constexpr int G = 64 / GS > 0 ? 64 / GS : 1;  // groups per step
  const int64_t K = job.K, steps = K / 64, groups = K / GS;
  const uint32_t* row = job.w + n * (K / 8);
  const char* srow = static_cast<const char*>(job.scales) + n * groups * (T == F32 ? 4 : 2);
  const char* brow = static_cast<const char*>(job.biases) + n * groups * (T == F32 ? 4 : 2);
  const int64_t esize = T == F32 ? 4 : 2;
  __m256 total[MB], totalb[MB];
  for (int m = 0; m < MB; ++m) total[m] = totalb[m] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi32(0xf);
  for (int64_t c = 0; c < steps; ++c) {
    if (job.prefetch_words) _mm_prefetch(reinterpret_cast<const char*>(row + c * 8 + job.prefetch_words), _MM_HINT_T0);
    const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c * 8));
    const int64_t g = c * 64 / GS;
    const __m256 sv = scales8<T, G>(srow + g * esize);
    const __m256 bv = scales8<T, G>(brow + g * esize);
    __m256 even[MB], odd[MB];
    for (int m = 0; m < MB; ++m) even[m] = odd[m] = _mm256_setzero_ps();
#pragma GCC unroll 8
    for (int s = 0; s < 8; ++s) {
      __m256i q = s == 7 ? _mm256_srli_epi32(words, 28)
                         : _mm256_and_si256(words, _mm256_slli_epi32(low, 4 * s));
      __m256 qf = _mm256_cvtepi32_ps(q);
      for (int m = 0; m < MB; ++m) {
        const float* x = job.xp + (m0 + m) * K + c * 64 + s * 8;
        if (s & 1) {
          odd[m] = _mm256_fmadd_ps(qf, _mm256_loadu_ps(x), odd[m]);
        } else {
          even[m] = _mm256_fmadd_ps(qf, _mm256_loadu_ps(x), even[m]);
        }
      }
    }
    for (int m = 0; m < MB; ++m) {
      total[m] = _mm256_fmadd_ps(_mm256_add_ps(even[m], odd[m]), sv, total[m]);
      const float* xs = job.xs + (m0 + m) * (K / 8) + c * 8;
      totalb[m] = _mm256_fmadd_ps(bv, _mm256_loadu_ps(xs), totalb[m]);
    }
  }
  for (int m = 0; m < MB; ++m) job.out[(m0 + m) * job.N + n] = hsum8(_mm256_add_ps(total[m], totalb[m]));
}

template <int T, int GS>
QMV_AVX2 void rows_avx2(const Job& job, int64_t r0, int64_t r1) {
  for (int64_t n = r0; n < r1; ++n) {
    int m = 0;
    for (; m + 2 <= job.M; m += 2) block_avx2<T, GS, 2>(job, n, m);
    if (m < job.M) block_avx2<T, GS, 1>(job, n, m);
  }
}

// ---------------------------------------------------------------------------------------------
// AVX-512: 16 words (128 weights) per step, up to 4 rows of x at once

#define QMV_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))

template <int T, int G>
QMV_AVX512 inline __m512 scales16(const void* p) {
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

template <int T, int GS, int MB>
QMV_AVX512 void block_avx512(const Job& job, int64_t n, int m0) {
  constexpr int G = 128 / GS;  // groups per step: 1, 2 or 4
  const int64_t K = job.K, steps = K / 128, groups = K / GS;
  const int64_t esize = T == F32 ? 4 : 2;
  const uint32_t* row = job.w + n * (K / 8);
  const char* srow = static_cast<const char*>(job.scales) + n * groups * esize;
  const char* brow = static_cast<const char*>(job.biases) + n * groups * esize;
  __m512 total[MB], totalb[MB];
  for (int m = 0; m < MB; ++m) total[m] = totalb[m] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi32(0xf);
  for (int64_t c = 0; c < steps; ++c) {
    if (job.prefetch_words) _mm_prefetch(reinterpret_cast<const char*>(row + c * 16 + job.prefetch_words), _MM_HINT_T0);
    const __m512i words = _mm512_loadu_si512(row + c * 16);
    const int64_t g = c * G;
    const __m512 sv = scales16<T, G>(srow + g * esize);
    const __m512 bv = scales16<T, G>(brow + g * esize);
    __m512 even[MB], odd[MB];
    for (int m = 0; m < MB; ++m) even[m] = odd[m] = _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int s = 0; s < 8; ++s) {
      __m512i q = s == 7 ? _mm512_srli_epi32(words, 28)
                         : _mm512_and_si512(words, _mm512_slli_epi32(low, 4 * s));
      __m512 qf = _mm512_cvtepi32_ps(q);
      for (int m = 0; m < MB; ++m) {
        const float* x = job.xp + (m0 + m) * K + c * 128 + s * 16;
        if (s & 1) {
          odd[m] = _mm512_fmadd_ps(qf, _mm512_loadu_ps(x), odd[m]);
        } else {
          even[m] = _mm512_fmadd_ps(qf, _mm512_loadu_ps(x), even[m]);
        }
      }
    }
    for (int m = 0; m < MB; ++m) {
      total[m] = _mm512_fmadd_ps(_mm512_add_ps(even[m], odd[m]), sv, total[m]);
      const float* xs = job.xs + (m0 + m) * (K / 8) + c * 16;
      totalb[m] = _mm512_fmadd_ps(bv, _mm512_loadu_ps(xs), totalb[m]);
    }
  }
  for (int m = 0; m < MB; ++m)
    job.out[(m0 + m) * job.N + n] = _mm512_reduce_add_ps(_mm512_add_ps(total[m], totalb[m]));
}

template <int T, int GS>
QMV_AVX512 void rows_avx512(const Job& job, int64_t r0, int64_t r1) {
  for (int64_t n = r0; n < r1; ++n) {
    int m = 0;
    for (; m + 4 <= job.M; m += 4) block_avx512<T, GS, 4>(job, n, m);
    switch (job.M - m) {
      case 3: block_avx512<T, GS, 3>(job, n, m); break;
      case 2: block_avx512<T, GS, 2>(job, n, m); break;
      case 1: block_avx512<T, GS, 1>(job, n, m); break;
      default: break;
    }
  }
}

#endif  // QMV_X86

using RowsFn = void (*)(const Job&, int64_t, int64_t);

template <int T>
RowsFn pick_for_type(Isa isa, int group_size) {
#ifdef QMV_X86
  if (isa == AVX512) {
    switch (group_size) {
      case 32: return rows_avx512<T, 32>;
      case 64: return rows_avx512<T, 64>;
      case 128: return rows_avx512<T, 128>;
    }
  }
  if (isa == AVX2) {
    switch (group_size) {
      case 32: return rows_avx2<T, 32>;
      case 64: return rows_avx2<T, 64>;
      case 128: return rows_avx2<T, 128>;
    }
  }
#endif
  return rows_scalar<T>;
}

RowsFn pick(Isa isa, ScaleType type, int group_size) {
  switch (type) {
    case F32: return pick_for_type<F32>(isa, group_size);
    case BF16: return pick_for_type<BF16>(isa, group_size);
    default: return pick_for_type<F16>(isa, group_size);
  }
}

// ---------------------------------------------------------------------------------------------
// ISA selection: the best the CPU has, or QWEN3_MLX_QMV_ISA=avx512|avx2|scalar (never above it)

Isa detected_isa() {
#ifdef QMV_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma"))
    return AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    return AVX2;
#endif
  return SCALAR;
}

Isa chosen_isa() {
  static const Isa best = detected_isa();
  // Read per call (a getenv is nothing beside a mat-vec), so a test can switch it in-process.
  const char* env = std::getenv("QWEN3_MLX_QMV_ISA");
  if (env == nullptr || *env == 0) return best;
  std::string want(env);
  Isa asked = want == "avx512" ? AVX512 : want == "avx2" ? AVX2 : SCALAR;
  return asked < best ? asked : best;
}

const char* isa_name(Isa isa) {
  return isa == AVX512 ? "avx512" : isa == AVX2 ? "avx2" : "scalar";
}

int64_t prefetch_bytes() {
  static const int64_t bytes = [] {
    const char* env = std::getenv("QWEN3_MLX_QMV_PREFETCH");
    return env && *env ? std::atoll(env) : int64_t(2048);
  }();
  return bytes;
}

// ---------------------------------------------------------------------------------------------
// Worker pool: the calling (MLX stream) thread works too; chunks come from one atomic counter

class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
      generation_.fetch_add(1);
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
  }

  // Run work(chunk) for chunk in [0, chunks) on up to `threads` threads, this one included.
  void run(int threads, int64_t chunks, const std::function<void(int64_t)>& work) {
    // One job at a time: a call from a second MLX stream while one runs works alone.
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (threads > 1 && chunks > 1 && busy.owns_lock()) {
      grow(threads - 1);
      std::lock_guard<std::mutex> lock(mutex_);
      work_ = &work;
      chunks_ = chunks;
      next_.store(0);
      wanted_ = threads - 1;
      generation_.fetch_add(1);
    } else {
      for (int64_t c = 0; c < chunks; ++c) work(c);
      return;
    }
    wake_.notify_all();
    drain(work);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return inside_ == 0; });
    work_ = nullptr;
  }

 private:
  void drain(const std::function<void(int64_t)>& work) {
    for (int64_t c = next_.fetch_add(1); c < chunks_; c = next_.fetch_add(1)) work(c);
  }

  void grow(int workers) {
    while (int(threads_.size()) < workers) {
      int index = int(threads_.size());
      threads_.emplace_back([this, index] { loop(index); });
    }
  }

  void loop(int index) {
    uint64_t seen = generation_.load();
    while (true) {
      // Spin briefly (ops come back to back within one token), then sleep.
      for (int i = 0; i < 2000 && generation_.load(std::memory_order_acquire) == seen; ++i) {
#ifdef QMV_X86
        _mm_pause();
#endif
      }
      const std::function<void(int64_t)>* work = nullptr;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_.load() != seen; });
        seen = generation_.load();
        if (stop_) return;
        if (work_ == nullptr || index >= wanted_) continue;
        work = work_;
        ++inside_;
      }
      drain(*work);
      {
        std::lock_guard<std::mutex> lock(mutex_);
        if (--inside_ == 0) done_.notify_all();
      }
    }
  }

  std::vector<std::thread> threads_;
  std::mutex busy_, mutex_;
  std::condition_variable wake_, done_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int64_t> next_{0};
  const std::function<void(int64_t)>* work_ = nullptr;
  int64_t chunks_ = 0;
  int wanted_ = 0, inside_ = 0;
  bool stop_ = false;
};

Pool& pool() {
  static Pool* instance = new Pool();  // never destroyed: workers may outlive static teardown
  return *instance;
}

// ---------------------------------------------------------------------------------------------
// x: any float dtype -> float32, then the kernel's layout (permuted, pre-scaled) and word sums

template <typename In>
void convert_rows(const In* in, float* out, int64_t count) {
  for (int64_t i = 0; i < count; ++i) out[i] = static_cast<float>(in[i]);
}

void prepare_x(const mx::array& x, int M, int64_t K, Isa isa, std::vector<float>& xp,
               std::vector<float>& xs) {
  std::vector<float> plain(size_t(M) * K);
  switch (x.dtype()) {
    case mx::float32: std::memcpy(plain.data(), x.data<float>(), plain.size() * 4); break;
    case mx::bfloat16: convert_rows(x.data<mx::bfloat16_t>(), plain.data(), plain.size()); break;
    case mx::float16: convert_rows(x.data<mx::float16_t>(), plain.data(), plain.size()); break;
    default: throw std::invalid_argument("qmv: x must be float32, bfloat16 or float16");
  }
  xs.assign(size_t(M) * (K / 8), 0.0f);
  for (int m = 0; m < M; ++m)
    for (int64_t i = 0; i < K / 8; ++i) {
      float sum = 0.0f;
      for (int s = 0; s < 8; ++s) sum += plain[m * K + i * 8 + s];
      xs[m * (K / 8) + i] = sum;
    }
  if (isa == SCALAR) {
    xp = std::move(plain);
    return;
  }
  // Step of V words (8V weights); element 8j+s of the step goes to s*V + j, times 16^-s (s < 7).
  const int V = isa == AVX512 ? 16 : 8;
  xp.assign(plain.size(), 0.0f);
  for (int m = 0; m < M; ++m) {
    const float* src = plain.data() + m * K;
    float* dst = xp.data() + m * K;
    for (int64_t c = 0; c < K / (8 * V); ++c)
      for (int j = 0; j < V; ++j)
        for (int s = 0; s < 8; ++s) {
          float factor = s == 7 ? 1.0f : 1.0f / float(1 << (4 * s));
          dst[c * 8 * V + s * V + j] = src[c * 8 * V + 8 * j + s] * factor;
        }
  }
  // The sums must follow the same per-step lane order as the words: they already do (word j).
}

template <typename Out>
void store(const float* in, Out* out, int64_t count) {
  for (int64_t i = 0; i < count; ++i) out[i] = static_cast<Out>(in[i]);
}

// ---------------------------------------------------------------------------------------------
// The primitive

class QuantizedMatvec : public mx::UnaryPrimitive {
 public:
  QuantizedMatvec(mx::Stream stream, int group_size, int threads)
      : mx::UnaryPrimitive(stream), group_size_(group_size), threads_(threads) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("qmv: CPU only");
  }
  const char* name() const override { return "QuantizedMatvec"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const QuantizedMatvec&>(other);
    return group_size_ == o.group_size_ && threads_ == o.threads_;
  }

 private:
  int group_size_, threads_;
};

void QuantizedMatvec::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const auto& x = inputs[0];
  const auto& w = inputs[1];
  const auto& scales = inputs[2];
  const auto& biases = inputs[3];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  encoder.set_input_array(x);
  encoder.set_input_array(w);
  encoder.set_input_array(scales);
  encoder.set_input_array(biases);
  encoder.set_output_array(out);

  const int64_t K = x.shape(-1), N = w.shape(0);
  const int M = int(x.size() / K);
  const ScaleType type =
      scales.dtype() == mx::float32 ? F32 : scales.dtype() == mx::bfloat16 ? BF16 : F16;
  Isa isa = chosen_isa();
  if (isa == AVX512 && K % 128) isa = AVX2;
  if (isa == AVX2 && K % 64) isa = SCALAR;
  const int threads = threads_;
  const int group_size = group_size_;

  encoder.dispatch([x = mx::array::unsafe_weak_copy(x), w = w.data<uint32_t>(),
                    s = scales.data<void>(), b = biases.data<void>(),
                    out = mx::array::unsafe_weak_copy(out), K, N, M, type, isa, threads,
                    group_size]() mutable {
    std::vector<float> xp, xs, result(size_t(M) * N);
    prepare_x(x, M, K, isa, xp, xs);
    Job job{w, s, b, N, K, M, group_size, xp.data(), xs.data(), result.data(),
            isa == SCALAR ? 0 : prefetch_bytes() / 4};
    RowsFn rows = pick(isa, type, group_size);
    // Chunks of >= 16 rows, about 8 per thread, so a late thread finds work left or none.
    int64_t per = std::max<int64_t>(16, N / (int64_t(std::max(threads, 1)) * 8));
    int64_t chunks = (N + per - 1) / per;
    pool().run(threads, chunks, [&](int64_t c) {
      int64_t r0 = c * per, r1 = std::min(N, r0 + per);
      rows(job, r0, r1);
    });
    switch (out.dtype()) {
      case mx::float32: std::memcpy(out.data<float>(), result.data(), result.size() * 4); break;
      case mx::bfloat16: store(result.data(), out.data<mx::bfloat16_t>(), result.size()); break;
      default: store(result.data(), out.data<mx::float16_t>(), result.size()); break;
    }
  });
}

mx::array quantized_matvec(const mx::array& x, const mx::array& w, const mx::array& scales,
                           const mx::array& biases, int group_size, int threads,
                           mx::StreamOrDevice s) {
  if (group_size != 32 && group_size != 64 && group_size != 128)
    throw std::invalid_argument("qmv: group_size must be 32, 64 or 128");
  if (w.dtype() != mx::uint32 || w.ndim() != 2)
    throw std::invalid_argument("qmv: w must be a 2-D uint32 array of 4-bit words");
  if (x.ndim() == 0) throw std::invalid_argument("qmv: x must have at least one axis");
  const int K = x.shape(-1);
  if (K == 0 || K % group_size || w.shape(1) * 8 != K)
    throw std::invalid_argument("qmv: x's last axis must be w's width * 8, a multiple of the group");
  if (scales.dtype() != biases.dtype() ||
      (scales.dtype() != mx::float32 && scales.dtype() != mx::bfloat16 &&
       scales.dtype() != mx::float16))
    throw std::invalid_argument("qmv: scales and biases must share one float dtype");
  if (scales.shape() != biases.shape() || scales.ndim() != 2 || scales.shape(0) != w.shape(0) ||
      scales.shape(1) * group_size != K)
    throw std::invalid_argument("qmv: scales and biases must be [N, K / group_size]");
  auto stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu) throw std::invalid_argument("qmv: CPU streams only");
  auto out_type = mx::promote_types(x.dtype(), scales.dtype());
  auto shape = x.shape();
  shape.back() = w.shape(0);
  // Parameters are evaluated and contiguous already: no graph node for them.
  auto dense = [&](const mx::array& a) {
    return a.is_available() && a.flags().row_contiguous ? a : mx::contiguous(a, false, stream);
  };
  return mx::array(
      shape, out_type, std::make_shared<QuantizedMatvec>(stream, group_size, threads),
      {mx::contiguous(x, false, stream), dense(w), dense(scales), dense(biases)});
}

#ifdef QMV_X86
QMV_AVX2 uint64_t read_avx2(const uint64_t* p, size_t count) {
  __m256i a = _mm256_setzero_si256(), b = a, c = a, d = a;
  for (size_t i = 0; i + 16 <= count; i += 16) {
    a = _mm256_add_epi64(a, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
    b = _mm256_add_epi64(b, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 4)));
    c = _mm256_add_epi64(c, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 8)));
    d = _mm256_add_epi64(d, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 12)));
  }
  a = _mm256_add_epi64(_mm256_add_epi64(a, b), _mm256_add_epi64(c, d));
  return uint64_t(_mm256_extract_epi64(a, 0) + _mm256_extract_epi64(a, 3));
}
#endif

uint64_t read_plain(const uint64_t* p, size_t count) {
  uint64_t a = 0, b = 0;
  for (size_t i = 0; i + 2 <= count; i += 2) {
    a += p[i];
    b += p[i + 1];
  }
  return a + b;
}

// Best read bandwidth (GB/s) over `bytes`, split over `threads` threads: the bound for a mat-vec.
double read_bandwidth(int64_t bytes, int repeats, int threads) {
  std::vector<uint64_t> buffer(size_t(bytes / 8), 1);
  threads = std::max(threads, 1);
  std::atomic<uint64_t> sink{0};
  double best = 0.0;
  for (int r = 0; r < repeats; ++r) {
    auto start = std::chrono::steady_clock::now();
    const size_t per = buffer.size() / size_t(threads);
    auto part = [&](int t) {
      const uint64_t* p = buffer.data() + per * t;
#ifdef QMV_X86
      sink += detected_isa() != SCALAR ? read_avx2(p, per) : read_plain(p, per);
#else
      sink += read_plain(p, per);
#endif
    };
    std::vector<std::thread> others;
    for (int t = 1; t < threads; ++t) others.emplace_back(part, t);
    part(0);
    for (auto& t : others) t.join();
    double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::max(best, double(per * threads * 8) / seconds / 1e9);
  }
  return best;
}

}  // namespace qmv

#define QMV_STR2(x) #x
#define QMV_STR(x) QMV_STR2(x)

NB_MODULE(QMV_MODULE_NAME, m) {
  m.doc() = "4-bit affine quantized mat-vec for MLX's CPU backend";
  m.attr("MLX_VERSION") = QMV_STR(MLX_VERSION_MAJOR) "." QMV_STR(MLX_VERSION_MINOR) "." QMV_STR(
      MLX_VERSION_PATCH);
  m.def("quantized_matvec", &qmv::quantized_matvec, nb::arg("x"), nb::arg("w"),
        nb::arg("scales"), nb::arg("biases"), nb::arg("group_size") = 64, nb::arg("threads") = 1,
        nb::kw_only(), nb::arg("stream") = nb::none(),
        "x @ dequantize(w, scales, biases).T for 4-bit affine w, computed in float32.");
  m.def("isa", [] { return std::string(qmv::isa_name(qmv::chosen_isa())); },
        "The instruction set the kernels use (after QWEN3_MLX_QMV_ISA).");
  m.def("detected_isa", [] { return std::string(qmv::isa_name(qmv::detected_isa())); },
        "The best instruction set this CPU supports.");
  m.def(
      "read_bandwidth",
      [](int64_t bytes, int repeats, int threads) {
        nb::gil_scoped_release release;
        return qmv::read_bandwidth(bytes, repeats, threads);
      },
      nb::arg("bytes") = int64_t(1) << 30, nb::arg("repeats") = 3, nb::arg("threads") = 1,
      "Best read bandwidth in GB/s over `bytes` on `threads` threads (AVX2 loads where present).");
}

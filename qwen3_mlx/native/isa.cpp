// Which instruction set the kernels run (isa.h), and the read bandwidth that bounds a mat-vec.

#include "isa.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

namespace native {

Isa detected_isa() {
#ifdef NATIVE_X86
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

ClearVectorState::~ClearVectorState() {
#ifdef NATIVE_X86
  static const bool avx = detected_isa() != SCALAR;
  if (avx) __asm__ volatile("vzeroupper" ::: "memory");
#endif
}

const char* setting(const char* name, const char* alias) {
  for (const char* key : {name, alias}) {
    const char* value = std::getenv(key);
    if (value != nullptr && *value != 0) return value;
  }
  return nullptr;
}

Isa chosen_isa() {
  static const Isa best = detected_isa();
  // Read per call (a getenv is nothing beside a kernel), so a test can switch it in-process.
  const char* env = setting("QWEN3_MLX_NATIVE_ISA", "QWEN3_MLX_QMV_ISA");
  if (env == nullptr) return best;
  std::string want(env);
  Isa asked = want == "avx512" ? AVX512 : want == "avx2" ? AVX2 : SCALAR;
  return asked < best ? asked : best;
}

const char* isa_name(Isa isa) {
  return isa == AVX512 ? "avx512" : isa == AVX2 ? "avx2" : "scalar";
}

bool int8_supported() {
#ifdef NATIVE_X86
  static const bool vnni = __builtin_cpu_supports("avx512vnni");
  return vnni && chosen_isa() == AVX512;
#else
  return false;
#endif
}

namespace {

#ifdef NATIVE_X86
NATIVE_AVX2 uint64_t read_avx2(const uint64_t* p, size_t count) {
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

// `rounds` x 24 independent float32 FMA vectors (enough to cover FMA latency x throughput).
NATIVE_AVX512 float fma_avx512(int64_t rounds) {
  __m512 acc[24];
  for (int i = 0; i < 24; ++i) acc[i] = _mm512_set1_ps(float(i));
  const __m512 a = _mm512_set1_ps(0.999f), b = _mm512_set1_ps(0.001f);
  for (int64_t r = 0; r < rounds; ++r)
#pragma GCC unroll 24
    for (int i = 0; i < 24; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
  for (int i = 1; i < 24; ++i) acc[0] = _mm512_add_ps(acc[0], acc[i]);
  return _mm512_reduce_add_ps(acc[0]);
}

NATIVE_AVX2 float fma_avx2(int64_t rounds) {
  __m256 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_ps(float(i));
  const __m256 a = _mm256_set1_ps(0.999f), b = _mm256_set1_ps(0.001f);
  for (int64_t r = 0; r < rounds; ++r)
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
  for (int i = 1; i < 12; ++i) acc[0] = _mm256_add_ps(acc[0], acc[i]);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc[0]);
  return lanes[0];
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

}  // namespace

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
#ifdef NATIVE_X86
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

double fma_peak(int threads) {
  threads = std::max(threads, 1);
  const Isa isa = detected_isa();
  const int64_t rounds = 20'000'000;
  const double flops_per_round = isa == AVX512 ? 24 * 32 : isa == AVX2 ? 12 * 16 : 2;
  std::atomic<float> sink{0.0f};
  auto part = [&] {
    float value = 0.0f;
#ifdef NATIVE_X86
    if (isa == AVX512) value = fma_avx512(rounds);
    else if (isa == AVX2) value = fma_avx2(rounds);
#endif
    sink.store(value);
  };
  double best = 0.0;
  for (int repeat = 0; repeat < 3; ++repeat) {
    auto start = std::chrono::steady_clock::now();
    std::vector<std::thread> others;
    for (int t = 1; t < threads; ++t) others.emplace_back(part);
    part();
    for (auto& t : others) t.join();
    double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::max(best, flops_per_round * rounds * threads / seconds / 1e9);
  }
  return best;
}

}  // namespace native

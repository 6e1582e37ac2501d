// The portable prefill matmul (gemm_simd.h over plain arrays, which the compiler may vectorize
// for the baseline ISA).

#include <algorithm>
#include <cmath>

#include "gemm.h"
#include "prefill_attention.h"
#include "matvec_kernels.h"

namespace native {
namespace {

struct Portable {
  static constexpr int L = 8, MR = 4;
  struct V {
    float v[L];
  };
  struct IV {
    uint32_t v[L];
  };
  static V zero() { return V{}; }
  static V load(const float* p) {
    V out;
    for (int i = 0; i < L; ++i) out.v[i] = p[i];
    return out;
  }
  static void store(float* p, const V& a) {
    for (int i = 0; i < L; ++i) p[i] = a.v[i];
  }
  static V set1(float x) {
    V out;
    for (int i = 0; i < L; ++i) out.v[i] = x;
    return out;
  }
  static V fma(const V& a, const V& b, const V& c) {
    V out;
    for (int i = 0; i < L; ++i) out.v[i] = a.v[i] * b.v[i] + c.v[i];
    return out;
  }
  static V add(const V& a, const V& b) {
    V out;
    for (int i = 0; i < L; ++i) out.v[i] = a.v[i] + b.v[i];
    return out;
  }
  template <class F>
  static V each(const V& a, const V& b, F f) {
    V out;
    for (int i = 0; i < L; ++i) out.v[i] = f(a.v[i], b.v[i]);
    return out;
  }
  static V sub(const V& a, const V& b) { return each(a, b, [](float x, float y) { return x - y; }); }
  static V mul(const V& a, const V& b) { return each(a, b, [](float x, float y) { return x * y; }); }
  static V max(const V& a, const V& b) {
    return each(a, b, [](float x, float y) { return x > y ? x : y; });
  }
  static V round(const V& x) { return each(x, x, [](float y, float) { return std::nearbyint(y); }); }
  static V pow2(const V& k) { return each(k, k, [](float y, float) { return std::ldexp(1.0f, int(y)); }); }
  static IV gather(const uint32_t* p, int64_t stride, int valid) {
    IV out;
    for (int j = 0; j < L; ++j) out.v[j] = p[(j < valid ? j : valid - 1) * stride];
    return out;
  }
  static V nibble(const IV& words, int s) {
    V out;
    for (int i = 0; i < L; ++i) out.v[i] = float((words.v[i] >> (4 * s)) & 0xf);
    return out;
  }
  static float half(uint16_t h) { return f16_to_f32(h); }
};

#include "gemm_simd.h"
#include "simd_math.h"
#include "prefill_attention_simd.h"

}  // namespace

GemmKernels gemm_scalar_kernels() { return gemm_kernels_for<Portable>(); }

AttentionKernels attention_scalar_kernels() { return attention_kernels_for<Portable>(); }

}  // namespace native

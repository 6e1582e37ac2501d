// The small float32 ops of a decode step, fused, for MLX's CPU backend: RMSNorm, RoPE and SwiGLU.
//
// Why: on the CPU backend mx.fast.rms_norm and mx.fast.rope have no kernel; they run as chains of
// 6-15 MLX ops (each a dispatch, an allocation and a pass over memory), and sigmoid's exp is
// scalar. For one token of a 4B model that measured 65 us per norm, 160 us per RoPE and 260 us per
// SwiGLU: 30 ms of a 180 ms step, for a few hundred kilobytes of arithmetic. Each op here is one
// pass. Arithmetic is float32, as MLX's; results are within a few float32 roundings of MLX's ops
// (tests/test_decode_ops.py), and callers use them only for float32 on the CPU
// (qwen3_mlx/cpu/ops.py).

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>


#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"
#include "isa.h"
#include "ops.h"

namespace mx = mlx::core;

namespace native {

namespace {

// ---------------------------------------------------------------------------------------------
// The kernels (plain loops; SwiGLU's exp has an AVX2 version, the only costly part)

void rms_norm_rows(const float* x, const float* w, float* out, int64_t rows, int64_t D, float eps) {
  for (int64_t r = 0; r < rows; ++r, x += D, out += D) {
    float lanes[8] = {};  // independent partial sums, so the compiler may vectorize
    int64_t i = 0;
    for (; i + 8 <= D; i += 8)
      for (int l = 0; l < 8; ++l) lanes[l] += x[i + l] * x[i + l];
    float total = 0.0f;
    for (; i < D; ++i) total += x[i] * x[i];
    for (int l = 0; l < 8; ++l) total += lanes[l];
    const float inverse = 1.0f / std::sqrt(total / float(D) + eps);
    for (int64_t j = 0; j < D; ++j) out[j] = w[j] * (x[j] * inverse);
  }
}

// Non-interleaved RoPE: element i pairs with i + D/2. theta = position * inv_freq in float32, as
// MLX computes it, so positions far into a long context round the same way.
void rope_rows(const float* x, const float* inv_freq, float* out, int64_t heads, int64_t L,
               int64_t D, int64_t offset, float factor) {
  const int64_t half = D / 2;
  std::vector<float> cosine(size_t(L * half)), sine(size_t(L * half));
  for (int64_t l = 0; l < L; ++l)
    for (int64_t i = 0; i < half; ++i) {
      const float theta = float(offset + l) * inv_freq[i];
      cosine[l * half + i] = std::cos(theta);
      sine[l * half + i] = std::sin(theta);
    }
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t l = 0; l < L; ++l) {
      const float* in = x + (h * L + l) * D;
      float* o = out + (h * L + l) * D;
      const float* c = cosine.data() + l * half;
      const float* s = sine.data() + l * half;
      for (int64_t i = 0; i < half; ++i) {
        const float a = in[i] * factor, b = in[i + half] * factor;
        o[i] = a * c[i] - b * s[i];
        o[i + half] = a * s[i] + b * c[i];
      }
    }
}

void swiglu_scalar(const float* gate, const float* up, float* out, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    const float g = gate[i];
    out[i] = g * (1.0f / (1.0f + std::exp(-g))) * up[i];
  }
}

#ifdef NATIVE_X86

// e^x for 8 lanes: x = n ln2 + r with |r| <= ln2/2 (ln2 in two parts, so r is exact), e^r by
// Cephes' degree-7 polynomial, 2^n through the exponent bits. About 1 ulp; inputs clamped to
// [-87.3, 88.3] (e^x stays finite and normal).
NATIVE_AVX2 inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

NATIVE_AVX2 void swiglu_avx2(const float* gate, const float* up, float* out, int64_t count) {
  const __m256 one = _mm256_set1_ps(1.0f);
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
    const __m256 sigmoid = _mm256_div_ps(one, _mm256_add_ps(one, e));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(g, sigmoid), _mm256_loadu_ps(up + i)));
  }
  swiglu_scalar(gate + i, up + i, out + i, count - i);
}
#endif

// ---------------------------------------------------------------------------------------------
// The primitives: each runs its kernel on the stream's thread (too little work to share)

// An op whose output is float32 with the shape of its first input.
class FloatOp : public mx::UnaryPrimitive {
 public:
  using mx::UnaryPrimitive::UnaryPrimitive;
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("decode ops: CPU only");
  }

 protected:
  // Allocate out, register the arrays with the stream's encoder and queue body(inputs, out).
  template <typename Body>
  void run(const std::vector<mx::array>& inputs, mx::array& out, Body body) {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& input : inputs) encoder.set_input_array(input);
    encoder.set_output_array(out);
    std::vector<mx::array> held;
    for (const auto& input : inputs) held.push_back(mx::array::unsafe_weak_copy(input));
    auto target = mx::array::unsafe_weak_copy(out);
    encoder.dispatch(
        [held = std::move(held), target, body]() mutable {
          const ClearVectorState clear;
          body(held, target);
        });
  }
};

class RmsNorm : public FloatOp {
 public:
  RmsNorm(mx::Stream stream, float eps) : FloatOp(stream), eps_(eps) {}
  const char* name() const override { return "Qwen3RmsNorm"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return eps_ == static_cast<const RmsNorm&>(other).eps_;
  }
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const float eps = eps_;
    run(inputs, out, [eps](const std::vector<mx::array>& in, mx::array& o) {
      const int64_t D = in[0].shape(-1);
      rms_norm_rows(in[0].data<float>(), in[1].data<float>(), o.data<float>(), in[0].size() / D,
                    D, eps);
    });
  }

 private:
  float eps_;
};

class Rope : public FloatOp {
 public:
  Rope(mx::Stream stream, int64_t offset, float factor)
      : FloatOp(stream), offset_(offset), factor_(factor) {}
  const char* name() const override { return "Qwen3Rope"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const Rope&>(other);
    return offset_ == o.offset_ && factor_ == o.factor_;
  }
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const int64_t offset = offset_;
    const float factor = factor_;
    run(inputs, out, [offset, factor](const std::vector<mx::array>& in, mx::array& o) {
      const auto& x = in[0];
      const int64_t D = x.shape(-1), L = x.shape(-2), heads = x.size() / (D * L);
      rope_rows(x.data<float>(), in[1].data<float>(), o.data<float>(), heads, L, D, offset, factor);
    });
  }

 private:
  int64_t offset_;
  float factor_;
};

class SwiGlu : public FloatOp {
 public:
  using FloatOp::FloatOp;
  const char* name() const override { return "Qwen3SwiGlu"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const Isa isa = chosen_isa();
    run(inputs, out, [isa](const std::vector<mx::array>& in, mx::array& o) {
      const float *gate = in[0].data<float>(), *up = in[1].data<float>();
#ifdef NATIVE_X86
      if (isa != SCALAR) return swiglu_avx2(gate, up, o.data<float>(), o.size());
#endif
      (void)isa;
      swiglu_scalar(gate, up, o.data<float>(), o.size());
    });
  }
};

mx::Stream cpu_stream(mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu)
    throw std::invalid_argument("decode ops: CPU streams only");
  return stream;
}

void require_float32(const mx::array& a, const char* what) {
  if (a.dtype() != mx::float32)
    throw std::invalid_argument(std::string("decode ops: ") + what + " must be float32");
}

}  // namespace

mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps, mx::StreamOrDevice s) {
  require_float32(x, "x");
  require_float32(weight, "weight");
  if (x.ndim() == 0 || weight.ndim() != 1 || weight.shape(0) != x.shape(-1))
    throw std::invalid_argument("decode ops: rms_norm's weight must be [x.shape[-1]]");
  auto stream = cpu_stream(s);
  return mx::array(x.shape(), mx::float32, std::make_shared<RmsNorm>(stream, eps),
                   {mx::contiguous(x, false, stream), mx::contiguous(weight, false, stream)});
}

mx::array rope(const mx::array& x, const mx::array& inv_freq, int64_t offset, float factor,
               mx::StreamOrDevice s) {
  require_float32(x, "x");
  require_float32(inv_freq, "inv_freq");
  if (x.ndim() < 2 || x.shape(-1) % 2 || inv_freq.ndim() != 1 ||
      inv_freq.shape(0) * 2 != x.shape(-1))
    throw std::invalid_argument(
        "decode ops: rope needs x [..., L, D] with D even and inv_freq [D/2]");
  if (offset < 0) throw std::invalid_argument("decode ops: rope's offset must be >= 0");
  auto stream = cpu_stream(s);
  return mx::array(x.shape(), mx::float32, std::make_shared<Rope>(stream, offset, factor),
                   {mx::contiguous(x, false, stream), mx::contiguous(inv_freq, false, stream)});
}

mx::array swiglu(const mx::array& gate, const mx::array& up, mx::StreamOrDevice s) {
  require_float32(gate, "gate");
  require_float32(up, "up");
  if (gate.shape() != up.shape())
    throw std::invalid_argument("decode ops: gate and up must have one shape");
  auto stream = cpu_stream(s);
  return mx::array(gate.shape(), mx::float32, std::make_shared<SwiGlu>(stream),
                   {mx::contiguous(gate, false, stream), mx::contiguous(up, false, stream)});
}

}  // namespace native

// The small float32 ops of a decode step, fused, for MLX's CPU backend: RMSNorm, RoPE and SwiGLU.
//
// Why: on the CPU backend mx.fast.rms_norm and mx.fast.rope have no kernel; they run as chains of
// 6-15 MLX ops (each a dispatch, an allocation and a pass over memory), and sigmoid's exp is
// scalar. For one token of a 4B model that measured 65 us per norm, 160 us per RoPE and 260 us per
// SwiGLU: 30 ms of a 180 ms step, for a few hundred kilobytes of arithmetic. Each op here is one
// pass. Arithmetic is float32, as MLX's; results are within a few float32 roundings of MLX's ops
// (tests/test_decode_ops.py), and callers use them only for float32 on the CPU
// (qwen3_mlx/cpu/ops.py).
//
// Two fused ops serve a decoder layer's decode step, where each graph node costs more than its
// arithmetic (a Python call, an MLX node to encode and a task for the stream thread; a 0.6B
// step had 1,326 nodes): add_rms_norm (the residual add and the next norm, two outputs) and
// qk_norm_rope (q's and k's per-head norms and RoPE, written in the [B, H, L, D] layout attention
// reads). Each does exactly the float32 operations of the separate ops, in the same order, so
// results are bit for bit theirs. Inputs may be strided views: a kernel copies such an input
// itself, rather than the graph holding a Contiguous node per input (most are contiguous).

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>


#include "mlx/mlx.h"
#include "mlx/primitives.h"
#include "dispatch.h"
#include "strided.h"
#include "isa.h"
#include "layer_parts.h"
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
struct RopeTable {
  RopeTable(const float* inv_freq, int64_t L, int64_t half, int64_t offset)
      : half(half), cosine(size_t(L * half)), sine(size_t(L * half)) {
    for (int64_t l = 0; l < L; ++l)
      for (int64_t i = 0; i < half; ++i) {
        const float theta = float(offset + l) * inv_freq[i];
        cosine[l * half + i] = std::cos(theta);
        sine[l * half + i] = std::sin(theta);
      }
  }

  // One row of 2 * half elements at position offset + l.
  void rotate(const float* in, float* o, int64_t l, float factor) const {
    const float* c = cosine.data() + l * half;
    const float* s = sine.data() + l * half;
    for (int64_t i = 0; i < half; ++i) {
      const float a = in[i] * factor, b = in[i + half] * factor;
      o[i] = a * c[i] - b * s[i];
      o[i + half] = a * s[i] + b * c[i];
    }
  }

  int64_t half;
  std::vector<float> cosine, sine;
};

void rope_rows(const float* x, const float* inv_freq, float* out, int64_t heads, int64_t L,
               int64_t D, int64_t offset, float factor) {
  const RopeTable table(inv_freq, L, D / 2, offset);
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t l = 0; l < L; ++l) table.rotate(x + (h * L + l) * D, out + (h * L + l) * D, l, factor);
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

// Every input's data in row-major order (copies of strided views live as long as the object).
struct DenseInputs {
  explicit DenseInputs(const std::vector<mx::array>& inputs) : scratch(inputs.size()) {
    for (size_t i = 0; i < inputs.size(); ++i) data.push_back(row_major(inputs[i], scratch[i]));
  }
  std::vector<std::vector<float>> scratch;
  std::vector<const float*> data;
};

// An op with float32 outputs, computed on the stream's thread (too little work to share).
class FloatOps : public mx::Primitive {
 public:
  using mx::Primitive::Primitive;
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("decode ops: CPU only");
  }

 protected:
  // Allocate the outputs, register the arrays with the stream's encoder and queue
  // body(inputs' data in row-major order, the inputs, the outputs).
  template <typename Body>
  void run(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs, Body body) {
    dispatch_on_stream(stream(), inputs, outputs,
                       [body](const std::vector<mx::array>& held, std::vector<mx::array>& targets) {
                         const DenseInputs in(held);
                         body(in.data, held, targets);
                       });
  }
};

using Data = std::vector<const float*>;
using Arrays = std::vector<mx::array>;

class RmsNorm : public FloatOps {
 public:
  RmsNorm(mx::Stream stream, float eps) : FloatOps(stream), eps_(eps) {}
  const char* name() const override { return "Qwen3RmsNorm"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return eps_ == static_cast<const RmsNorm&>(other).eps_;
  }
  void eval_cpu(const Arrays& inputs, Arrays& outputs) override {
    const float eps = eps_;
    run(inputs, outputs, [eps](const Data& in, const Arrays& arrays, Arrays& out) {
      const int64_t D = arrays[0].shape(-1);
      rms_norm_rows(in[0], in[1], out[0].data<float>(), arrays[0].size() / D, D, eps);
    });
  }

 private:
  float eps_;
};

// h = x + delta (x's residual stream plus a sublayer's output) and rms_norm(h): two outputs.
class AddRmsNorm : public FloatOps {
 public:
  AddRmsNorm(mx::Stream stream, float eps) : FloatOps(stream), eps_(eps) {}
  const char* name() const override { return "Qwen3AddRmsNorm"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return eps_ == static_cast<const AddRmsNorm&>(other).eps_;
  }
  void eval_cpu(const Arrays& inputs, Arrays& outputs) override {
    const float eps = eps_;
    run(inputs, outputs, [eps](const Data& in, const Arrays& arrays, Arrays& out) {
      add_rms_norm_rows(in[0], in[1], in[2], out[0].data<float>(), out[1].data<float>(),
                        int64_t(arrays[0].size()), arrays[0].shape(-1), eps);
    });
  }

 private:
  float eps_;
};

class Rope : public FloatOps {
 public:
  Rope(mx::Stream stream, int64_t offset, float factor)
      : FloatOps(stream), offset_(offset), factor_(factor) {}
  const char* name() const override { return "Qwen3Rope"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const Rope&>(other);
    return offset_ == o.offset_ && factor_ == o.factor_;
  }
  void eval_cpu(const Arrays& inputs, Arrays& outputs) override {
    const int64_t offset = offset_;
    const float factor = factor_;
    run(inputs, outputs, [offset, factor](const Data& in, const Arrays& arrays, Arrays& out) {
      const auto& x = arrays[0];
      const int64_t D = x.shape(-1), L = x.shape(-2), heads = x.size() / (D * L);
      rope_rows(in[0], in[1], out[0].data<float>(), heads, L, D, offset, factor);
    });
  }

 private:
  int64_t offset_;
  float factor_;
};

// q [B, L, Hq * D] and k [B, L, Hk * D] (the projections' outputs) to rope(rms_norm(head)) per
// head, written as [B, H, L, D]: what rms_norm, the transpose and rope compute, in one pass.
class QkNormRope : public FloatOps {
 public:
  QkNormRope(mx::Stream stream, float eps, int64_t offset, float factor)
      : FloatOps(stream), eps_(eps), offset_(offset), factor_(factor) {}
  const char* name() const override { return "Qwen3QkNormRope"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const QkNormRope&>(other);
    return eps_ == o.eps_ && offset_ == o.offset_ && factor_ == o.factor_;
  }
  void eval_cpu(const Arrays& inputs, Arrays& outputs) override {
    const float eps = eps_, factor = factor_;
    const int64_t offset = offset_;
    run(inputs, outputs, [=](const Data& in, const Arrays&, Arrays& out) {
      auto &q = out[0], &k = out[1];
      qk_norm_rope_rows(in[0], in[1], in[2], in[3], in[4], eps, offset, factor, q.shape(0),
                        q.shape(2), q.shape(1), k.shape(1), q.shape(3), q.data<float>(),
                        k.data<float>());
    });
  }

 private:
  float eps_;
  int64_t offset_;
  float factor_;
};

class SwiGlu : public FloatOps {
 public:
  using FloatOps::FloatOps;
  const char* name() const override { return "Qwen3SwiGlu"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
  void eval_cpu(const Arrays& inputs, Arrays& outputs) override {
    run(inputs, outputs, [](const Data& in, const Arrays&, Arrays& out) {
      swiglu_rows(in[0], in[1], out[0].data<float>(), out[0].size());
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

void add_rms_norm_rows(const float* x, const float* delta, const float* w, float* h, float* normed,
                       int64_t count, int64_t D, float eps) {
  for (int64_t i = 0; i < count; ++i) h[i] = x[i] + delta[i];
  rms_norm_rows(h, w, normed, count / D, D, eps);
}

void qk_norm_rope_rows(const float* q, const float* k, const float* q_weight,
                       const float* k_weight, const float* inv_freq, float eps, int64_t offset,
                       float factor, int64_t B, int64_t L, int64_t Hq, int64_t Hk, int64_t D,
                       float* q_out, float* k_out) {
  const RopeTable table(inv_freq, L, D / 2, offset);
  std::vector<float> normed(static_cast<size_t>(D));
  const float* in[2] = {q, k};
  const float* weight[2] = {q_weight, k_weight};
  float* out[2] = {q_out, k_out};
  const int64_t heads[2] = {Hq, Hk};
  for (int which = 0; which < 2; ++which) {  // q, then k
    const int64_t H = heads[which];
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t l = 0; l < L; ++l) {
          rms_norm_rows(in[which] + ((b * L + l) * H + h) * D, weight[which], normed.data(), 1, D,
                        eps);
          table.rotate(normed.data(), out[which] + ((b * H + h) * L + l) * D, l, factor);
        }
  }
}

void swiglu_rows(const float* gate, const float* up, float* out, int64_t count) {
#ifdef NATIVE_X86
  if (chosen_isa() != SCALAR) return swiglu_avx2(gate, up, out, count);
#endif
  swiglu_scalar(gate, up, out, count);
}

mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps, mx::StreamOrDevice s) {
  require_float32(x, "x");
  require_float32(weight, "weight");
  if (x.ndim() == 0 || weight.ndim() != 1 || weight.shape(0) != x.shape(-1))
    throw std::invalid_argument("decode ops: rms_norm's weight must be [x.shape[-1]]");
  return mx::array(x.shape(), mx::float32, std::make_shared<RmsNorm>(cpu_stream(s), eps),
                   {x, weight});
}

std::vector<mx::array> add_rms_norm(const mx::array& x, const mx::array& delta,
                                    const mx::array& weight, float eps, mx::StreamOrDevice s) {
  require_float32(x, "x");
  require_float32(delta, "delta");
  require_float32(weight, "weight");
  if (x.shape() != delta.shape())
    throw std::invalid_argument("decode ops: add_rms_norm's x and delta must have one shape");
  if (x.ndim() == 0 || weight.ndim() != 1 || weight.shape(0) != x.shape(-1))
    throw std::invalid_argument("decode ops: add_rms_norm's weight must be [x.shape[-1]]");
  return mx::array::make_arrays({x.shape(), x.shape()}, {mx::float32, mx::float32},
                                std::make_shared<AddRmsNorm>(cpu_stream(s), eps),
                                {x, delta, weight});
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
  return mx::array(x.shape(), mx::float32,
                   std::make_shared<Rope>(cpu_stream(s), offset, factor), {x, inv_freq});
}

std::vector<mx::array> qk_norm_rope(const mx::array& q, const mx::array& k,
                                    const mx::array& q_weight, const mx::array& k_weight,
                                    const mx::array& inv_freq, float eps, int64_t offset,
                                    float factor, mx::StreamOrDevice s) {
  for (const auto& [a, what] : {std::pair{&q, "q"}, {&k, "k"}, {&q_weight, "q_weight"},
                                {&k_weight, "k_weight"}, {&inv_freq, "inv_freq"}})
    require_float32(*a, what);
  const int64_t D = q_weight.ndim() == 1 ? q_weight.shape(0) : 0;
  if (D == 0 || D % 2 || k_weight.shape() != q_weight.shape() || inv_freq.ndim() != 1 ||
      inv_freq.shape(0) * 2 != D)
    throw std::invalid_argument(
        "decode ops: qk_norm_rope needs weights [D] with D even and inv_freq [D/2]");
  if (q.ndim() != 3 || k.ndim() != 3 || q.shape(0) != k.shape(0) || q.shape(1) != k.shape(1) ||
      q.shape(2) % D || k.shape(2) % D)
    throw std::invalid_argument(
        "decode ops: qk_norm_rope needs q [B, L, Hq * D] and k [B, L, Hk * D]");
  if (offset < 0) throw std::invalid_argument("decode ops: qk_norm_rope's offset must be >= 0");
  const int B = q.shape(0), L = q.shape(1);
  const int Hq = int(q.shape(2) / D), Hk = int(k.shape(2) / D);
  return mx::array::make_arrays({{B, Hq, L, int(D)}, {B, Hk, L, int(D)}},
                                {mx::float32, mx::float32},
                                std::make_shared<QkNormRope>(cpu_stream(s), eps, offset, factor),
                                {q, k, q_weight, k_weight, inv_freq});
}

mx::array swiglu(const mx::array& gate, const mx::array& up, mx::StreamOrDevice s) {
  require_float32(gate, "gate");
  require_float32(up, "up");
  if (gate.shape() != up.shape())
    throw std::invalid_argument("decode ops: gate and up must have one shape");
  return mx::array(gate.shape(), mx::float32, std::make_shared<SwiGlu>(cpu_stream(s)),
                   {gate, up});
}

}  // namespace native

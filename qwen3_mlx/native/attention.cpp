// Decode attention over a quantized KV cache (MLX affine, 8 or 4 bits) for MLX's CPU backend:
// one query position, every query head of a KV head at once, the cache read in place.
//
// Why not MLX's ops: mlx-lm's quantized attention is two `quantized_matmul`s and a softmax. On the
// CPU backend those run one row at a time, and with bf16 scales a scalar loop, so a quantized
// cache that reads 3.6x fewer bytes than a float32 one attended 1.3-1.5x *slower* than
// `mx.fast.scaled_dot_product_attention` (docs/benchmarks.md, issue 16). This kernel fuses the
// two products and the softmax, reads keys, values, scales and biases once, in place (scales in
// f32, bf16 or f16), and splits the context into chunks that threads pull from one counter
// (flash-decoding: each chunk keeps its own max and sum, merged at the end).
//
// Layout: keys/values packed uint32 [B, Hkv, T, D*bits/32], element i of a row at bits
// bits*(i % (32/bits)) of word i / (32/bits); scales and biases [B, Hkv, T, D/group]. The T axis
// may be a strided view (the cache's allocated buffer sliced to its offset); the last axis is
// contiguous. Query head h*R + r attends with KV head h (R = Hq / Hkv, mlx-lm's GQA order).
// Per group g of a key row: q . k = s_g * dot(q_g, k_g) + b_g * sum(q_g). Arithmetic is float32
// throughout, so results are within float32 rounding of a float64 reference.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/variant.h>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"
#include "attention.h"
#include "kernels.h"
#include "pool.h"

namespace nb = nanobind;
namespace mx = mlx::core;

namespace qmv {

Isa chosen_isa();  // qmv.cpp: the best ISA, or QWEN3_MLX_QMV_ISA

namespace {

// One packed cache tensor (keys or values) and its scales and biases, with element strides of
// the B, H and T axes (the last axis is contiguous).
struct Packed {
  const uint32_t* w;
  const uint8_t* s;
  const uint8_t* b;
  int64_t w_stride[3], s_stride[3];
  int64_t words, groups;  // per row

  const uint32_t* row(int64_t bi, int64_t h, int64_t t) const {
    return w + bi * w_stride[0] + h * w_stride[1] + t * w_stride[2];
  }
  int64_t scale_index(int64_t bi, int64_t h, int64_t t) const {
    return bi * s_stride[0] + h * s_stride[1] + t * s_stride[2];
  }
};

struct Job : Partials {
  Packed k, v;
  ScaleType type;
  int bits, group;
  const float* q;     // [B, H, R, D], times the softmax scale
  const float* qsum;  // [B, H, R, D/group]: sums of each group of q
};

float scale_at(ScaleType type, const uint8_t* base, int64_t index) {
  switch (type) {
    case F32: return to_f32<F32>(base, index);
    case BF16: return to_f32<BF16>(base, index);
    default: return to_f32<F16>(base, index);
  }
}

// Element i of a packed row as an integer 0..2^bits-1.
inline int element(const uint32_t* row, int bits, int i) {
  const int per = 32 / bits;
  return int((row[i / per] >> (bits * (i % per))) & ((1u << bits) - 1));
}

// ---------------------------------------------------------------------------------------------
// Portable kernels: scores of one key row for R query rows, and one value row into R accumulators

void scores_scalar(const Job& job, const uint32_t* row, const float* q, const float* qsum,
                   const float* s, const float* b, float* out) {
  for (int r = 0; r < job.R; ++r) {
    float total = 0.0f;
    for (int g = 0; g < job.D / job.group; ++g) {
      float dot = 0.0f;
      for (int i = g * job.group; i < (g + 1) * job.group; ++i)
        dot += q[r * job.D + i] * float(element(row, job.bits, i));
      total += s[g] * dot + b[g] * qsum[r * (job.D / job.group) + g];
    }
    out[r] = total;
  }
}

void values_scalar(const Job& job, const uint32_t* row, const float* weight, float* acc) {
  // weight[r * groups + g] = p_r * scale_g; acc[r * D + i] += weight * q_i
  const int groups = job.D / job.group;
  for (int r = 0; r < job.R; ++r)
    for (int i = 0; i < job.D; ++i)
      acc[r * job.D + i] += weight[r * groups + i / job.group] * float(element(row, job.bits, i));
}

#ifdef QMV_X86
// ---------------------------------------------------------------------------------------------
// AVX2 + FMA: 8 elements at a time (8 bytes at 8 bits, one word at 4 bits)

#define ATT_AVX2 __attribute__((target("avx2,fma,f16c")))

ATT_AVX2 inline __m256 load8(const uint32_t* row, int bits, int i) {
  if (bits == 8) {
    __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(
        reinterpret_cast<const uint8_t*>(row) + i));
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
  }
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  __m256i word = _mm256_set1_epi32(int(row[i / 8]));
  return _mm256_cvtepi32_ps(
      _mm256_and_si256(_mm256_srlv_epi32(word, shifts), _mm256_set1_epi32(0xf)));
}

ATT_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int RB>  // query rows per pass (registers)
ATT_AVX2 void scores_block(const Job& job, const uint32_t* row, const float* q,
                           const float* qsum, const float* s, const float* b, float* out) {
  const int groups = job.D / job.group;
  __m256 total[RB];
  for (int r = 0; r < RB; ++r) total[r] = _mm256_setzero_ps();
  float bias[RB] = {};
  for (int g = 0; g < groups; ++g) {
    __m256 dot[RB];
    for (int r = 0; r < RB; ++r) dot[r] = _mm256_setzero_ps();
    for (int i = g * job.group; i < (g + 1) * job.group; i += 8) {
      const __m256 k = load8(row, job.bits, i);
      for (int r = 0; r < RB; ++r) dot[r] = _mm256_fmadd_ps(k, _mm256_loadu_ps(q + r * job.D + i), dot[r]);
    }
    const __m256 scale = _mm256_set1_ps(s[g]);
    for (int r = 0; r < RB; ++r) {
      total[r] = _mm256_fmadd_ps(dot[r], scale, total[r]);
      bias[r] += b[g] * qsum[r * groups + g];
    }
  }
  for (int r = 0; r < RB; ++r) out[r] = hsum(total[r]) + bias[r];
}

ATT_AVX2 void scores_avx2(const Job& job, const uint32_t* row, const float* q, const float* qsum,
                          const float* s, const float* b, float* out) {
  const int groups = job.D / job.group;
  int r = 0;
  for (; r + 4 <= job.R; r += 4)
    scores_block<4>(job, row, q + r * job.D, qsum + r * groups, s, b, out + r);
  for (; r < job.R; ++r) scores_block<1>(job, row, q + r * job.D, qsum + r * groups, s, b, out + r);
}

ATT_AVX2 void values_avx2(const Job& job, const uint32_t* row, const float* weight, float* acc) {
  const int groups = job.D / job.group;
  for (int i = 0; i < job.D; i += 8) {
    const __m256 v = load8(row, job.bits, i);
    const int g = i / job.group;
    for (int r = 0; r < job.R; ++r) {
      float* a = acc + r * job.D + i;
      _mm256_storeu_ps(a, _mm256_fmadd_ps(_mm256_set1_ps(weight[r * groups + g]), v,
                                          _mm256_loadu_ps(a)));
    }
  }
}
#endif  // QMV_X86

using ScoresFn = void (*)(const Job&, const uint32_t*, const float*, const float*, const float*,
                          const float*, float*);
using ValuesFn = void (*)(const Job&, const uint32_t*, const float*, float*);

// ---------------------------------------------------------------------------------------------
// One work item: KV head (bi, h), context tokens [t0, t1): partial softmax and weighted values

void run_chunk(const Job& job, int64_t item, ScoresFn scores, ValuesFn values) {
  const int64_t c = item % job.chunks, bh = item / job.chunks;
  const int64_t bi = bh / job.H, h = bh % job.H;
  const int64_t t0 = c * CHUNK, t1 = std::min(job.T, t0 + CHUNK);
  const int R = job.R, D = job.D, groups = D / job.group;
  const float* q = job.q + bh * R * D;
  const float* qsum = job.qsum + bh * R * groups;

  std::vector<float> score(size_t(t1 - t0) * R), s(groups), b(groups);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t index = job.k.scale_index(bi, h, t);
    for (int g = 0; g < groups; ++g) {
      s[g] = scale_at(job.type, job.k.s, index + g);
      b[g] = scale_at(job.type, job.k.b, index + g);
    }
    scores(job, job.k.row(bi, h, t), q, qsum, s.data(), b.data(), score.data() + (t - t0) * R);
  }

  float* acc = job.part_acc + item * R * D;
  float* top = job.part_max + item * R;
  float* sum = job.part_sum + item * R;
  std::fill(acc, acc + R * D, 0.0f);
  std::vector<float> bias(size_t(R) * groups, 0.0f), weight(size_t(R) * groups);
  softmax_chunk(score.data(), t1 - t0, R, top, sum);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t index = job.v.scale_index(bi, h, t);
    for (int g = 0; g < groups; ++g) {
      const float vs = scale_at(job.type, job.v.s, index + g);
      const float vb = scale_at(job.type, job.v.b, index + g);
      for (int r = 0; r < R; ++r) {
        const float p = score[(t - t0) * R + r];
        weight[r * groups + g] = p * vs;
        bias[r * groups + g] += p * vb;
      }
    }
    values(job, job.v.row(bi, h, t), weight.data(), acc);
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < D; ++i) acc[r * D + i] += bias[r * groups + i / job.group];
}

ScaleType scale_type(const mx::array& a) {
  return a.dtype() == mx::float32 ? F32 : a.dtype() == mx::bfloat16 ? BF16 : F16;
}

// The cache tensors are views into the cache's allocation (strided along T); their last axis is
// contiguous, as mlx-lm's cache slices only along T.
Packed packed(const mx::array& w, const mx::array& s, const mx::array& b) {
  if (w.strides().back() != 1 || s.strides().back() != 1 || b.strides().back() != 1 ||
      s.strides() != b.strides())
    throw std::invalid_argument("qmv attention: the cache's last axis must be contiguous");
  Packed p{w.data<uint32_t>(), s.data<uint8_t>(), b.data<uint8_t>(), {}, {}, w.shape(3), s.shape(3)};
  for (int a = 0; a < 3; ++a) {
    p.w_stride[a] = w.strides()[a];
    p.s_stride[a] = s.strides()[a];
  }
  return p;
}

class QuantizedDecodeAttention : public mx::UnaryPrimitive {
 public:
  QuantizedDecodeAttention(mx::Stream stream, float scale, int group, int bits, int threads)
      : mx::UnaryPrimitive(stream), scale_(scale), group_(group), bits_(bits), threads_(threads) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("qmv attention: CPU only");
  }
  const char* name() const override { return "QuantizedDecodeAttention"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const QuantizedDecodeAttention&>(other);
    return scale_ == o.scale_ && group_ == o.group_ && bits_ == o.bits_ && threads_ == o.threads_;
  }

 private:
  float scale_;
  int group_, bits_, threads_;
};

void QuantizedDecodeAttention::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& input : inputs) encoder.set_input_array(input);
  encoder.set_output_array(out);

  const auto& q = inputs[0];
  Job job{};
  job.k = packed(inputs[1], inputs[2], inputs[3]);
  job.v = packed(inputs[4], inputs[5], inputs[6]);
  job.type = scale_type(inputs[2]);
  job.bits = bits_;
  job.group = group_;
  job.B = q.shape(0);
  job.H = inputs[1].shape(1);
  job.T = inputs[1].shape(2);
  job.R = int(q.shape(1) / job.H);
  job.D = int(q.shape(3));
  job.chunks = chunks_for(job.T);
  Isa isa = chosen_isa();
  const float scale = scale_;
  const int threads = threads_;

  encoder.dispatch([job, isa, scale, threads, q = mx::array::unsafe_weak_copy(q),
                    out = mx::array::unsafe_weak_copy(out)]() mutable {
    const int64_t rows = job.B * job.H * job.R, groups = job.D / job.group;
    std::vector<float> qs(size_t(rows) * job.D), qsum(size_t(rows) * groups, 0.0f);
    const float* in = q.data<float>();
    for (int64_t i = 0; i < rows * job.D; ++i) qs[i] = in[i] * scale;
    for (int64_t i = 0; i < rows * job.D; ++i) qsum[i / job.group] += qs[i];
    const std::vector<float> partials = job.allocate();
    job.q = qs.data();
    job.qsum = qsum.data();
    ScoresFn scores = scores_scalar;
    ValuesFn values = values_scalar;
#ifdef QMV_X86
    if (isa != SCALAR) {
      scores = scores_avx2;
      values = values_avx2;
    }
#endif
    if (job.T == 0) {  // nothing to attend to: zeros, as a softmax over no keys has no value
      std::fill(out.data<float>(), out.data<float>() + rows * job.D, 0.0f);
      return;
    }
    pool().run(threads, job.items(), [&](int64_t item) { run_chunk(job, item, scores, values); });
    merge(job, out.data<float>());
  });
}

}  // namespace

mx::array quantized_decode_attention(const mx::array& q, const mx::array& k, const mx::array& k_scales,
                                     const mx::array& k_biases, const mx::array& v,
                                     const mx::array& v_scales, const mx::array& v_biases,
                                     float scale, int group_size, int bits, int threads,
                                     mx::StreamOrDevice s) {
  if (bits != 4 && bits != 8) throw std::invalid_argument("qmv attention: bits must be 4 or 8");
  if (group_size != 32 && group_size != 64 && group_size != 128)
    throw std::invalid_argument("qmv attention: group_size must be 32, 64 or 128");
  if (q.dtype() != mx::float32 || q.ndim() != 4 || q.shape(2) != 1)
    throw std::invalid_argument("qmv attention: q must be float32 [B, Hq, 1, D]");
  const int D = q.shape(3);
  for (const auto* a : {&k, &v}) {
    if (a->dtype() != mx::uint32 || a->ndim() != 4 || a->shape(0) != q.shape(0) ||
        a->shape(3) * (32 / bits) != D || q.shape(1) % a->shape(1) || a->shape(1) != k.shape(1) ||
        a->shape(2) != k.shape(2))
      throw std::invalid_argument("qmv attention: keys and values must be uint32 [B, Hkv, T, D*bits/32]");
  }
  if (D % group_size) throw std::invalid_argument("qmv attention: D must be a multiple of the group");
  for (const auto* a : {&k_scales, &k_biases, &v_scales, &v_biases}) {
    if (a->dtype() != k_scales.dtype() ||
        (a->dtype() != mx::float32 && a->dtype() != mx::bfloat16 && a->dtype() != mx::float16) ||
        a->ndim() != 4 || a->shape(0) != k.shape(0) || a->shape(1) != k.shape(1) ||
        a->shape(2) != k.shape(2) || a->shape(3) * group_size != D)
      throw std::invalid_argument(
          "qmv attention: scales and biases must share one float dtype, [B, Hkv, T, D/group]");
  }
  auto stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu) throw std::invalid_argument("qmv attention: CPU streams only");
  return mx::array(
      q.shape(), mx::float32,
      std::make_shared<QuantizedDecodeAttention>(stream, scale, group_size, bits, threads),
      {mx::contiguous(q, false, stream), k, k_scales, k_biases, v, v_scales, v_biases});
}

void register_attention(nb::module_& m) {
  m.def("quantized_decode_attention", &quantized_decode_attention, nb::arg("q"), nb::arg("k"),
        nb::arg("k_scales"), nb::arg("k_biases"), nb::arg("v"), nb::arg("v_scales"),
        nb::arg("v_biases"), nb::arg("scale"), nb::arg("group_size") = 64, nb::arg("bits") = 8,
        nb::arg("threads") = 1, nb::kw_only(), nb::arg("stream") = nb::none(),
        "softmax(scale q K^T) V for one query position over an affine-quantized KV cache.");
  m.def("decode_attention", &decode_attention, nb::arg("q"), nb::arg("k"), nb::arg("v"),
        nb::arg("scale"), nb::arg("threads") = 1, nb::kw_only(), nb::arg("stream") = nb::none(),
        "softmax(scale q K^T) V for one query position over a float32 KV cache (any strides).");
}

}  // namespace qmv

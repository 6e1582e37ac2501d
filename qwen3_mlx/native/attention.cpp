// Decode attention over a quantized KV cache (MLX affine, 8 or 4 bits) for MLX's CPU backend:
// one query position, or the last few with the causal mask (a speculative verify pass; see
// float_attention.cpp), every query head of a KV head at once, the cache read in place.
//
// Why not MLX's ops: mlx-lm's quantized attention is two `quantized_matmul`s and a softmax. On the
// CPU backend those run one row at a time, and with bf16 scales a scalar loop, so a quantized
// cache that reads 3.6x fewer bytes than a float32 one attended 1.3-1.5x *slower* than
// `mx.fast.scaled_dot_product_attention` (docs/benchmarks.md, issue 16). This kernel fuses the
// two products and the softmax, reads keys, values, scales and biases once, in place (scales in
// f32, bf16 or f16), and splits the context into chunks that threads pull from one counter
// (flash-decoding: each chunk keeps its own max and sum, merged at the end). Per chunk, the
// kernels of quantized_kernels.h (portable, AVX2, AVX-512) compute the scores, the softmax and
// the weighted values; this file converts the chunk's scales once and drives them.
//
// Layout: keys/values packed uint32 [B, Hkv, T, D*bits/32], element i of a row at bits
// bits*(i % (32/bits)) of word i / (32/bits); scales and biases [B, Hkv, T, D/group]. The T axis
// may be a strided view (the cache's allocated buffer sliced to its offset); the last axis is
// contiguous. Query head h*R + r attends with KV head h (R = Hq / Hkv, mlx-lm's GQA order).
// Arithmetic is float32 throughout, each element dequantized before it is multiplied, so results
// are within float32 rounding of a float64 reference.

#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <vector>


#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"
#include "attention.h"
#include "isa.h"
#include "matvec_kernels.h"
#include "pool.h"
#include "ops.h"
#include "quantized_kernels.h"

namespace mx = mlx::core;

namespace native {

namespace {

// One packed cache tensor (keys or values) and its scales and biases, with element strides of
// the B, H and T axes (the last axis is contiguous).
struct Packed {
  const uint32_t* w;
  const uint8_t* s;
  const uint8_t* b;
  int64_t w_stride[3], s_stride[3];
  int64_t words, groups;  // per row

  PackedRows rows(int64_t bi, int64_t h, int64_t t0, int64_t n) const {
    const uint32_t* first = w + bi * w_stride[0] + h * w_stride[1] + t0 * w_stride[2];
    return {reinterpret_cast<const uint8_t*>(first), w_stride[2] * 4, n};
  }
  int64_t scale_index(int64_t bi, int64_t h, int64_t t) const {
    return bi * s_stride[0] + h * s_stride[1] + t * s_stride[2];
  }
};

struct Job : Partials {
  Packed k, v;
  int group;
  QuantKernels kernels;
  void (*scales)(const Packed&, int64_t bi, int64_t h, int64_t t0, int64_t n, float* s, float* b);
  const float* q;  // [B, H, R, D], times the softmax scale, in the kernels' element order

  QuantShape shape() const { return {R, D, group}; }
};

// Scales and biases of n rows from t0 on as float32 [groups, n]: converted once per chunk, so
// the kernels read plain floats whatever the cache keeps.
template <int TYPE>
void scales_as(const Packed& p, int64_t bi, int64_t h, int64_t t0, int64_t n, float* s,
               float* b) {
  for (int64_t t = 0; t < n; ++t) {
    const int64_t index = p.scale_index(bi, h, t0 + t);
    for (int64_t g = 0; g < p.groups; ++g) {
      s[g * n + t] = to_f32<TYPE>(p.s, index + g);
      b[g * n + t] = to_f32<TYPE>(p.b, index + g);
    }
  }
}

// One chunk's working memory, kept per thread so work items do not allocate.
struct Scratch {
  std::vector<float> buffer;
  float *score, *scale, *bias, *acc;

  Scratch& fit(int64_t n, int R, int D, int groups) {
    buffer.resize(size_t(n) * (R + 2 * groups) + size_t(R) * D);
    score = buffer.data();
    scale = score + n * R;
    bias = scale + n * groups;
    acc = bias + n * groups;
    return *this;
  }
};

// One work item: KV head bh = (bi, h), context tokens [t0, t0 + n): partial softmax and values.
void run_chunk(const Job& job, int64_t item) {
  thread_local Scratch scratch;
  const int64_t c = item % job.chunks, bh = item / job.chunks;
  const int64_t bi = bh / job.H, h = bh % job.H;
  const int64_t t0 = c * CHUNK, n = std::min(job.T, t0 + CHUNK) - t0;
  const int R = job.R, D = job.D;
  const QuantKernels& kernels = job.kernels;
  Scratch& work = scratch.fit(n, R, D, D / job.group);
  job.scales(job.k, bi, h, t0, n, work.scale, work.bias);
  kernels.scores(job.k.rows(bi, h, t0, n), {work.scale, work.bias}, job.q + bh * R * D,
                 job.shape(), work.score);
  if (job.L == 1) {
    kernels.softmax(work.score, n, R, job.part_max + item * R, job.part_sum + item * R);
  } else {
    // Each row's softmax over the keys its position sees, as its own one-position call takes it
    // (the vector softmax's order depends on the count); weight 0 for the rest.
    for (int r = 0; r < R; ++r) {
      float* row = work.score + r * n;
      const int64_t seen = visible_tokens(job, r, t0, n);
      float *top = job.part_max + item * R + r, *sum = job.part_sum + item * R + r;
      if (seen > 0) {
        kernels.softmax(row, seen, 1, top, sum);
      } else {  // none of this chunk: the merge weighs it e^(-inf) = 0
        *top = -std::numeric_limits<float>::infinity();
        *sum = 0.0f;
      }
      std::fill(row + seen, row + n, 0.0f);
    }
  }
  job.scales(job.v, bi, h, t0, n, work.scale, work.bias);
  kernels.values(job.v.rows(bi, h, t0, n), {work.scale, work.bias}, work.score, job.shape(),
                 work.acc);
  from_kernel_order(work.acc, job.part_acc + item * R * D, R * D, kernels.lanes);
}

QuantKernels kernels_for(Isa isa, int bits) {
#ifdef NATIVE_X86
  if (isa == AVX512) return avx512_kernels(bits);
  if (isa == AVX2) return avx2_kernels(bits);
#endif
  return scalar_kernels(bits);
}

decltype(Job::scales) scales_for(const mx::array& a) {
  return a.dtype() == mx::float32 ? scales_as<F32> : a.dtype() == mx::bfloat16 ? scales_as<BF16>
                                                                              : scales_as<F16>;
}

// The cache tensors are views into the cache's allocation (strided along T); their last axis is
// contiguous, as mlx-lm's cache slices only along T.
Packed packed(const mx::array& w, const mx::array& s, const mx::array& b) {
  if (w.strides().back() != 1 || s.strides().back() != 1 || b.strides().back() != 1 ||
      s.strides() != b.strides())
    throw std::invalid_argument("quantized attention: the cache's last axis must be contiguous");
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
    throw std::runtime_error("quantized attention: CPU only");
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
  job.scales = scales_for(inputs[2]);
  job.kernels = kernels_for(chosen_isa(), bits_);
  job.group = group_;
  job.B = q.shape(0);
  job.H = inputs[1].shape(1);
  job.T = inputs[1].shape(2);
  job.L = q.shape(2);
  job.R = int(q.shape(1) / job.H * job.L);  // rows of a KV head: its query heads' positions
  job.D = int(q.shape(3));
  job.chunks = chunks_for(job.T);
  const float scale = scale_;
  const int threads = threads_;

  encoder.dispatch([job, scale, threads, q = mx::array::unsafe_weak_copy(q),
                    out = mx::array::unsafe_weak_copy(out)]() mutable {
    const ClearVectorState clear;
    const int64_t count = job.B * job.H * job.R * job.D;
    std::vector<float> qs(count), qk(count);
    const float* in = q.data<float>();
    for (int64_t i = 0; i < count; ++i) qs[i] = in[i] * scale;
    to_kernel_order(qs.data(), qk.data(), count, job.kernels.lanes);
    const std::vector<float> partials = job.allocate();
    job.q = qk.data();
    if (job.T == 0) {  // nothing to attend to: zeros, as a softmax over no keys has no value
      std::fill(out.data<float>(), out.data<float>() + count, 0.0f);
      return;
    }
    pool().run(threads, job.items(), [&](int64_t item) { run_chunk(job, item); });
    merge(job, out.data<float>());
  });
}

}  // namespace

mx::array quantized_decode_attention(const mx::array& q, const mx::array& k, const mx::array& k_scales,
                                     const mx::array& k_biases, const mx::array& v,
                                     const mx::array& v_scales, const mx::array& v_biases,
                                     float scale, int group_size, int bits, int threads,
                                     mx::StreamOrDevice s) {
  if (bits != 4 && bits != 8) throw std::invalid_argument("quantized attention: bits must be 4 or 8");
  if (group_size != 32 && group_size != 64 && group_size != 128)
    throw std::invalid_argument("quantized attention: group_size must be 32, 64 or 128");
  if (q.dtype() != mx::float32 || q.ndim() != 4 || q.shape(2) < 1 ||
      (q.shape(2) > 1 && q.shape(2) > k.shape(2)))
    throw std::invalid_argument(
        "quantized attention: q must be float32 [B, Hq, L, D], 1 <= L <= the keys' T");
  const int D = q.shape(3);
  for (const auto* a : {&k, &v}) {
    if (a->dtype() != mx::uint32 || a->ndim() != 4 || a->shape(0) != q.shape(0) ||
        a->shape(3) * (32 / bits) != D || q.shape(1) % a->shape(1) || a->shape(1) != k.shape(1) ||
        a->shape(2) != k.shape(2))
      throw std::invalid_argument("quantized attention: keys and values must be uint32 [B, Hkv, T, D*bits/32]");
  }
  if (D % group_size) throw std::invalid_argument("quantized attention: D must be a multiple of the group");
  for (const auto* a : {&k_scales, &k_biases, &v_scales, &v_biases}) {
    if (a->dtype() != k_scales.dtype() ||
        (a->dtype() != mx::float32 && a->dtype() != mx::bfloat16 && a->dtype() != mx::float16) ||
        a->ndim() != 4 || a->shape(0) != k.shape(0) || a->shape(1) != k.shape(1) ||
        a->shape(2) != k.shape(2) || a->shape(3) * group_size != D)
      throw std::invalid_argument(
          "quantized attention: scales and biases must share one float dtype, [B, Hkv, T, D/group]");
  }
  auto stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu) throw std::invalid_argument("quantized attention: CPU streams only");
  return mx::array(
      q.shape(), mx::float32,
      std::make_shared<QuantizedDecodeAttention>(stream, scale, group_size, bits, threads),
      {mx::contiguous(q, false, stream), k, k_scales, k_biases, v, v_scales, v_biases});
}

}  // namespace native

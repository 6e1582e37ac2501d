// Causal attention of a prefill chunk for MLX's CPU backend over a float32 KV cache: the
// queries of one chunk against every cached key before them, read in place.
//
// Why not `mx.fast.scaled_dot_product_attention`: with a mask on the CPU backend it runs as
// general matrix products through the BLAS, and a fresh install has only MLX's reference BLAS
// (plain loops): one Qwen3-4B layer's attention for a 512-token chunk measured 6x the time of
// the layer's projections at 512 tokens of context and 45x at 4,096 (docs/benchmarks.md). Here
// the scores and weighted values are register-tiled products (prefill_attention_simd.h) with an
// online softmax, so no [L, T] matrix of scores is ever written.

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"
#include "isa.h"
#include "ops.h"
#include "pool.h"
#include "prefill_attention.h"

namespace native {
namespace {

AttentionKernels attention_kernels(Isa isa) {
  return isa == AVX512 ? attention_avx512_kernels() : isa == AVX2 ? attention_avx2_kernels()
                                                                   : attention_scalar_kernels();
}

// KV head bh's keys [T][D] (row stride `stride`) as tiles [tiles][D][MR], zeros past T.
void pack_keys(const float* keys, int64_t stride, int64_t T, int D, int MR, int64_t tiles,
               float* out) {
  for (int64_t t = 0; t < tiles; ++t)
    for (int j = 0; j < MR; ++j) {
      const int64_t key = t * MR + j;
      float* column = out + t * D * MR + j;
      if (key < T) {
        const float* row = keys + key * stride;
        for (int d = 0; d < D; ++d) column[d * MR] = row[d];
      } else {
        for (int d = 0; d < D; ++d) column[d * MR] = 0.0f;
      }
    }
}

class CausalAttention : public mx::UnaryPrimitive {
 public:
  CausalAttention(mx::Stream stream, float scale, int threads)
      : mx::UnaryPrimitive(stream), scale_(scale), threads_(threads) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("prefill attention: CPU only");
  }
  const char* name() const override { return "PrefillAttention"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const CausalAttention&>(other);
    return scale_ == o.scale_ && threads_ == o.threads_;
  }

 private:
  float scale_;
  int threads_;
};

void CausalAttention::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& input : inputs) encoder.set_input_array(input);
  encoder.set_output_array(out);
  const auto &q = inputs[0], &k = inputs[1], &v = inputs[2];
  PrefillAttention job{};
  job.B = q.shape(0);
  job.Hq = q.shape(1);
  job.L = q.shape(2);
  job.D = q.shape(3);
  job.Hkv = k.shape(1);
  job.T = k.shape(2);
  job.scale = scale_;
  for (int axis = 0; axis < 3; ++axis) {
    job.k_stride[axis] = k.strides()[axis];
    job.v_stride[axis] = v.strides()[axis];
  }
  const AttentionKernels kernels = attention_kernels(chosen_isa());
  const int threads = threads_;
  encoder.dispatch([job, kernels, threads, q = mx::array::unsafe_weak_copy(q),
                    k = mx::array::unsafe_weak_copy(k), v = mx::array::unsafe_weak_copy(v),
                    out = mx::array::unsafe_weak_copy(out)]() mutable {
    const ClearVectorState clear;
    job.q = q.data<float>();
    job.k = k.data<float>();
    job.v = v.data<float>();
    job.out = out.data<float>();
    const int MR = kernels.key_rows;
    job.tiles = (job.T + MR - 1) / MR;
    const int64_t heads = job.B * job.Hkv, per_head = job.tiles * job.D * MR;
    std::vector<float> tiles(size_t(heads * per_head));  // one layer's keys, for this call
    pool().run(threads, heads, [&](int64_t bh) {
      const float* keys = job.k + (bh / job.Hkv) * job.k_stride[0] + (bh % job.Hkv) * job.k_stride[1];
      pack_keys(keys, job.k_stride[2], job.T, job.D, MR, job.tiles, tiles.data() + bh * per_head);
    });
    job.k_tiles = tiles.data();
    const int64_t items = job.B * job.Hkv * ((job.L + kernels.QB - 1) / kernels.QB);
    const int64_t scratch = kernels.scratch(job);
    pool().run(threads, items, [&](int64_t item) {
      thread_local std::vector<float> buffer;  // a few hundred KB per thread, reused
      if (int64_t(buffer.size()) < scratch) buffer.resize(size_t(scratch));
      kernels.run(job, item, buffer.data());
    });
  });
}

}  // namespace

mx::array prefill_attention(const mx::array& q, const mx::array& k, const mx::array& v,
                            float scale, int threads, mx::StreamOrDevice s) {
  if (q.dtype() != mx::float32 || q.ndim() != 4)
    throw std::invalid_argument("prefill attention: q must be float32 [B, Hq, L, D]");
  for (const auto* a : {&k, &v}) {
    if (a->dtype() != mx::float32 || a->ndim() != 4 || a->shape(0) != q.shape(0) ||
        a->shape(1) == 0 || q.shape(1) % a->shape(1) || a->shape(1) != k.shape(1) ||
        a->shape(2) != k.shape(2) || a->shape(3) != q.shape(3) || a->shape(2) < q.shape(2))
      throw std::invalid_argument(
          "prefill attention: keys and values must be float32 [B, Hkv, T, D], T >= L, Hq a "
          "multiple of Hkv");
  }
  if (q.shape(3) % 32)
    throw std::invalid_argument("prefill attention: the head dimension must be a multiple of 32");
  auto stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu)
    throw std::invalid_argument("prefill attention: CPU streams only");
  // The kernels step along a row: a last axis with another stride is copied first.
  auto rows = [&](const mx::array& a) {
    return a.strides()[3] == 1 ? a : mx::contiguous(a, false, stream);
  };
  return mx::array(q.shape(), mx::float32, std::make_shared<CausalAttention>(stream, scale, threads),
                   {mx::contiguous(q, false, stream), rows(k), rows(v)});
}

}  // namespace native

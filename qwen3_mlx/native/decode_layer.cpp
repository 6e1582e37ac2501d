// A decoder layer of a decode step (one row, B = 1; one position, or up to 8: a speculative
// verify pass) as two graph nodes and the cache's two slice updates, for a float32 KV cache of
// mlx-lm's layout ([1, Hkv, capacity, D]).
//
// The separate ops (ops.h) make a decode step of about 17 nodes per layer: each costs Python to
// build, MLX to encode and the stream thread to dispatch, all on the two cores that run the
// mat-vecs, and every mat-vec wakes the pool's worker afresh. At Qwen3-0.6B's shape that was a
// third of the step's CPU time beside 15 ms of mat-vecs (benchmarks/bench_decode_step.py). These
// nodes run the same kernels (layer_parts.h) in the same order on the same float32 rows, so their
// results are bit for bit those of the separate ops:
//
//   decode_qkv:   q, k, v = normed @ Wq, Wk, Wv (one pool run); q, k = rope(rms_norm(head))
//   (the caller): keys[offset:offset+L], values[offset:offset+L] = k, v   (MLX's slice update)
//   decode_rest:  a = attention(q, keys[:offset+L], values[:offset+L]) (the decode attention,
//                 each position masking its later keys, as the separate ops)
//                 h1, n1 = h + a @ Wo, rms_norm(h1) * post_attention_layernorm
//                 h', normed' = h1 + (silu(n1 @ Wgate) * (n1 @ Wup)) @ Wdown, rms_norm(h') * next
//
// Why the cache write stays MLX's slice update: a node with several outputs can never donate an
// input buffer (each output holds its own list of the inputs, so none is ever the only holder),
// and writing the cache in place without donation would change arrays others may hold. The
// single-output slice update donates the buffer when no one else holds it, as before.

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <vector>

#include "mlx/mlx.h"
#include "mlx/primitives.h"
#include "dispatch.h"
#include "isa.h"
#include "layer_parts.h"
#include "ops.h"
#include "strided.h"

namespace mx = mlx::core;

namespace native {

namespace {

constexpr int64_t MAX_POSITIONS = 8;  // the mat-vec's rows (quantized_matmul.cpp's MATVEC_ROWS)

struct Params {
  int64_t offset;  // the first position: the cache row it takes
  float scale, factor, eps, next_eps;
  int group_size, threads;
  bool int8;

  bool operator==(const Params& o) const {
    return offset == o.offset && scale == o.scale && factor == o.factor && eps == o.eps &&
           next_eps == o.next_eps && group_size == o.group_size && threads == o.threads &&
           int8 == o.int8;
  }
};

// The matrix whose (w, scales, biases) are inputs first .. first + 2.
Matrix matrix(const std::vector<mx::array>& in, int first, float* out) {
  return matrix_of(in[first], in[first + 1], in[first + 2], out);
}

// [A][B][Dh] from `from` as [B][A][Dh] at `to`: a head's positions together, or a position's heads.
void swap_axes(const float* from, float* to, int64_t A, int64_t B, int64_t Dh) {
  for (int64_t a = 0; a < A; ++a)
    for (int64_t b = 0; b < B; ++b)
      std::memcpy(to + (b * A + a) * Dh, from + (a * B + b) * Dh, size_t(Dh) * 4);
}

// inputs: normed [1, L, D], (w, scales, biases) of q, k, v, q_norm's and k_norm's weights,
// inverse frequencies; outputs: q [1, Hq, L, Dh], k and v [1, Hkv, L, Dh].
void run_qkv(const Params& p, const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  std::vector<float> scratch;
  const float* normed = row_major(in[0], scratch);
  const int L = int(in[0].shape(1));
  const int64_t D = in[0].shape(2), NQ = in[1].shape(0), NK = in[4].shape(0);
  const int64_t Hk = out[1].shape(1), Dh = out[1].shape(3);
  std::vector<float> q(static_cast<size_t>(L * NQ)), k(static_cast<size_t>(L * NK));
  std::vector<float> v(static_cast<size_t>(L * NK));
  float* v_rows = L == 1 ? out[2].data<float>() : v.data();  // one position: the same layout
  quantized_matvecs(normed, L, D, p.group_size, p.threads, p.int8,
                    {matrix(in, 1, q.data()), matrix(in, 4, k.data()), matrix(in, 7, v_rows)});
  qk_norm_rope_rows(q.data(), k.data(), in[10].data<float>(), in[11].data<float>(),
                    in[12].data<float>(), p.eps, p.offset, p.factor, 1, L, NQ / Dh, Hk, Dh,
                    out[0].data<float>(), out[1].data<float>());
  if (L > 1) swap_axes(v.data(), out[2].data<float>(), L, Hk, Dh);  // [L, Hkv, Dh] -> [Hkv, L, Dh]
}

// inputs: h [1, L, D], q [1, Hq, L, Dh], keys, values, (w, scales, biases) of o, gate, up, down,
// the post-attention norm's and the next norm's weights; outputs: h' and normed' [1, L, D].
void run_rest(const Params& p, const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  std::vector<float> h_scratch, q_scratch;
  const float* h = row_major(in[0], h_scratch);
  const float* q = row_major(in[1], q_scratch);
  const auto &keys = in[2], &values = in[3];
  const int L = int(in[0].shape(1));
  const int64_t D = in[0].shape(2), Hq = in[1].shape(1), I = in[7].shape(0);
  const int64_t Hk = keys.shape(1), Dh = keys.shape(3), NQ = Hq * Dh;
  std::vector<float> attended(static_cast<size_t>(L * NQ));
  // The decode attention gives [Hq, L, Dh]; the o projection takes [L, Hq * Dh] (the same
  // layout for one position).
  std::vector<float> heads(L > 1 ? attended.size() : 0);
  float_decode_attention(q, keys.data<float>(), keys.strides().data(), values.data<float>(),
                         values.strides().data(), 1, Hk, p.offset + L, int(Hq / Hk), int(Dh),
                         p.scale, p.threads, L > 1 ? heads.data() : attended.data(), L);
  if (L > 1) swap_axes(heads.data(), attended.data(), Hq, L, Dh);
  const auto rows = static_cast<size_t>(L * D);
  std::vector<float> delta(rows), h1(rows), n1(rows);
  quantized_matvecs(attended.data(), L, NQ, p.group_size, p.threads, p.int8,
                    {matrix(in, 4, delta.data())});
  add_rms_norm_rows(h, delta.data(), in[16].data<float>(), h1.data(), n1.data(), L * D, D, p.eps);
  std::vector<float> gate(static_cast<size_t>(L * I)), up(gate.size()), inner(gate.size());
  quantized_matvecs(n1.data(), L, D, p.group_size, p.threads, p.int8,
                    {matrix(in, 7, gate.data()), matrix(in, 10, up.data())});
  swiglu_rows(gate.data(), up.data(), inner.data(), L * I);
  quantized_matvecs(inner.data(), L, I, p.group_size, p.threads, p.int8,
                    {matrix(in, 13, delta.data())});
  add_rms_norm_rows(h1.data(), delta.data(), in[17].data<float>(), out[0].data<float>(),
                    out[1].data<float>(), L * D, D, p.next_eps);
}

using Body = void (*)(const Params&, const std::vector<mx::array>&, std::vector<mx::array>&);

// A node that runs `body` on the stream's thread (the mat-vecs and the attention share the pool).
template <Body body>
class DecodePart : public mx::Primitive {
 public:
  DecodePart(mx::Stream stream, Params params, const char* name)
      : mx::Primitive(stream), p_(params), name_(name) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    dispatch_on_stream(stream(), inputs, outputs,
                       [p = p_](const std::vector<mx::array>& held,
                                std::vector<mx::array>& outs) { body(p, held, outs); });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("decode layer: CPU only");
  }
  const char* name() const override { return name_; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return p_ == static_cast<const DecodePart&>(other).p_;
  }

 private:
  Params p_;
  const char* name_;
};

void require(bool ok, const char* message) {
  if (!ok) throw std::invalid_argument(std::string("decode layer: ") + message);
}

bool float32_of(const mx::array& a, int64_t size) {
  return a.dtype() == mx::float32 && int64_t(a.size()) == size;
}

// The (w, scales, biases) triples of `weights` for rows of the given widths, checked.
void check_weights(const std::vector<mx::array>& weights, std::initializer_list<int64_t> widths,
                   int group_size) {
  require(weights.size() == 3 * widths.size(), "give (w, scales, biases) for every projection");
  size_t i = 0;
  for (int64_t K : widths) {
    check_matrix(K, weights[i], weights[i + 1], weights[i + 2], group_size);
    i += 3;
  }
}

// Parameters are evaluated and contiguous already: no graph node for them.
void add_dense(std::vector<mx::array>& inputs, const mx::array& a, mx::Stream stream) {
  inputs.push_back(a.is_available() && a.flags().row_contiguous ? a
                                                                 : mx::contiguous(a, false, stream));
}

mx::Stream cpu_stream(mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  require(stream.device == mx::Device::cpu, "CPU streams only");
  return stream;
}

}  // namespace

std::vector<mx::array> decode_qkv(const mx::array& normed, const std::vector<mx::array>& weights,
                                  const mx::array& q_weight, const mx::array& k_weight,
                                  const mx::array& inv_freq, int64_t kv_heads, int64_t offset,
                                  float factor, float eps, int group_size, int threads, bool int8,
                                  mx::StreamOrDevice s) {
  auto stream = cpu_stream(s);
  require(normed.dtype() == mx::float32 && normed.ndim() == 3 && normed.shape(0) == 1 &&
              normed.shape(1) >= 1 && normed.shape(1) <= MAX_POSITIONS,
          "normed must be float32 [1, L, D], L from 1 to 8");
  const int64_t D = normed.shape(2), L = normed.shape(1);
  check_weights(weights, {D, D, D}, group_size);
  const int64_t Dh = q_weight.size(), NQ = weights[0].shape(0);
  require(Dh % 2 == 0 && kv_heads > 0 && NQ % Dh == 0 && (NQ / Dh) % kv_heads == 0 &&
              weights[3].shape(0) == kv_heads * Dh && weights[6].shape(0) == kv_heads * Dh,
          "q, k and v must be whole heads of the norms' size, q's a multiple of k's");
  require(offset >= 0 && float32_of(q_weight, Dh) && float32_of(k_weight, Dh) &&
              float32_of(inv_freq, Dh / 2),
          "the norms' weights and the inverse frequencies must be float32 of the head's size");
  std::vector<mx::array> inputs{normed};
  for (const auto& a : weights) add_dense(inputs, a, stream);
  for (const auto* a : {&q_weight, &k_weight, &inv_freq}) add_dense(inputs, *a, stream);
  const Params params{offset, 0.0f, factor, eps, 0.0f, group_size, threads, int8};
  const mx::Shape kv{1, int(kv_heads), int(L), int(Dh)};
  return mx::array::make_arrays(
      {mx::Shape{1, int(NQ / Dh), int(L), int(Dh)}, kv, kv}, {mx::float32, mx::float32, mx::float32},
      std::make_shared<DecodePart<run_qkv>>(stream, params, "Qwen3DecodeQkv"), inputs);
}

std::vector<mx::array> decode_rest(const mx::array& h, const mx::array& q, const mx::array& keys,
                                   const mx::array& values, const std::vector<mx::array>& weights,
                                   const mx::array& post_weight, const mx::array& next_weight,
                                   int64_t offset, float scale, float eps, float next_eps,
                                   int group_size, int threads, bool int8, mx::StreamOrDevice s) {
  auto stream = cpu_stream(s);
  require(h.dtype() == mx::float32 && h.ndim() == 3 && h.shape(0) == 1 && h.shape(1) >= 1 &&
              h.shape(1) <= MAX_POSITIONS,
          "h must be float32 [1, L, D], L from 1 to 8");
  require(keys.ndim() == 4 && keys.shape() == values.shape() && keys.shape(0) == 1 &&
              keys.dtype() == mx::float32 && values.dtype() == mx::float32,
          "keys and values must be float32 [1, Hkv, capacity, head_dim]");
  const int64_t D = h.shape(2), L = h.shape(1), Hk = keys.shape(1), Dh = keys.shape(3);
  require(offset >= 0 && offset + L <= keys.shape(2), "the cache has no rows at offset");
  require(q.dtype() == mx::float32 && q.ndim() == 4 && q.shape(0) == 1 && q.shape(2) == L &&
              q.shape(3) == Dh && q.shape(1) % Hk == 0,
          "q must be float32 [1, Hq, L, head_dim], Hq a multiple of the cache's heads");
  require(weights.size() == 12, "give (w, scales, biases) for o, gate, up and down");
  const int64_t I = weights[3].shape(0);
  check_weights(weights, {q.shape(1) * Dh, D, D, I}, group_size);
  require(weights[0].shape(0) == D && weights[6].shape(0) == I && weights[9].shape(0) == D,
          "o and down must give D rows, gate and up the same number");
  require(float32_of(post_weight, D) && float32_of(next_weight, D),
          "the norms' weights must be float32 [D]");
  std::vector<mx::array> inputs{h, q, keys, values};
  for (const auto& a : weights) add_dense(inputs, a, stream);
  for (const auto* a : {&post_weight, &next_weight}) add_dense(inputs, *a, stream);
  const Params params{offset, scale, 1.0f, eps, next_eps, group_size, threads, int8};
  return mx::array::make_arrays(
      {h.shape(), h.shape()}, {mx::float32, mx::float32},
      std::make_shared<DecodePart<run_rest>>(stream, params, "Qwen3DecodeRest"), inputs);
}

}  // namespace native

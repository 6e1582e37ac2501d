// Rows of a 4-bit affine quantized embedding table as float32, for MLX's CPU backend: the token
// lookup at the start of every decode step.
//
// MLX's CPU path gathers the packed row, its scales and biases, then dequantizes through about
// 55 graph nodes (shifts, broadcasts, casts, a multiply and an add) for one token: each a node
// for Python to build and MLX to encode and dispatch, at the head of the step's critical path.
// Here it is one node computing what those nodes compute, in their order and rounding: q as
// float32, times the scale (float32), plus the bias (float32), each step rounded on its own (no
// fused multiply-add: this file builds for baseline x86-64, which has none).

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"
#include "ops.h"

namespace mx = mlx::core;

namespace native {

namespace {

// The ids of a uint32 array in row-major order, whatever its strides (a lazy reshape of the
// sampled token is a view).
std::vector<uint32_t> ids_of(const mx::array& ids) {
  std::vector<uint32_t> out(ids.size());
  const uint32_t* base = ids.data<uint32_t>();
  std::vector<int64_t> index(size_t(ids.ndim()), 0);
  for (size_t n = 0; n < out.size(); ++n) {
    int64_t offset = 0;
    for (int d = 0; d < ids.ndim(); ++d) offset += index[d] * ids.strides()[d];
    out[n] = base[offset];
    for (int d = ids.ndim() - 1; d >= 0 && ++index[d] == ids.shape(d); --d) index[d] = 0;
  }
  return out;
}

template <typename Scale>
void rows_of(const uint32_t* w, const Scale* scales, const Scale* biases,
             const std::vector<uint32_t>& ids, int64_t table_rows, int64_t D, int group_size,
             float* out) {
  const int64_t words = D / 8, groups = D / group_size;
  for (const uint32_t id : ids) {
    float* o = out;
    out += D;
    if (id >= table_rows) {  // no row to read: zeros, never memory past the table
      std::fill(o, o + D, 0.0f);
      continue;
    }
    const uint32_t* row = w + int64_t(id) * words;
    for (int64_t g = 0; g < groups; ++g) {
      const float scale = static_cast<float>(scales[id * groups + g]);
      const float bias = static_cast<float>(biases[id * groups + g]);
      for (int64_t i = g * group_size; i < (g + 1) * group_size; ++i) {
        const float q = static_cast<float>((row[i / 8] >> (4 * (i % 8))) & 0xf);
        const float scaled = q * scale;  // rounded, then the bias added and rounded: MLX's two ops
        o[i] = scaled + bias;
      }
    }
  }
}

class EmbeddingRows : public mx::UnaryPrimitive {
 public:
  EmbeddingRows(mx::Stream stream, int group_size)
      : mx::UnaryPrimitive(stream), group_size_(group_size) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& input : inputs) encoder.set_input_array(input);
    encoder.set_output_array(out);
    const int group_size = group_size_;
    encoder.dispatch([group_size, ids = mx::array::unsafe_weak_copy(inputs[0]),
                      w = mx::array::unsafe_weak_copy(inputs[1]),
                      s = mx::array::unsafe_weak_copy(inputs[2]),
                      b = mx::array::unsafe_weak_copy(inputs[3]),
                      out = mx::array::unsafe_weak_copy(out)]() mutable {
      const int64_t D = w.shape(1) * 8, V = w.shape(0);
      const std::vector<uint32_t> rows = ids_of(ids);
      float* o = out.data<float>();
      switch (s.dtype()) {
        case mx::float32:
          return rows_of(w.data<uint32_t>(), s.data<float>(), b.data<float>(), rows, V, D,
                         group_size, o);
        case mx::bfloat16:
          return rows_of(w.data<uint32_t>(), s.data<mx::bfloat16_t>(), b.data<mx::bfloat16_t>(),
                         rows, V, D, group_size, o);
        default:
          return rows_of(w.data<uint32_t>(), s.data<mx::float16_t>(), b.data<mx::float16_t>(),
                         rows, V, D, group_size, o);
      }
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("embedding rows: CPU only");
  }
  const char* name() const override { return "Qwen3EmbeddingRows"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return group_size_ == static_cast<const EmbeddingRows&>(other).group_size_;
  }

 private:
  int group_size_;
};

void require(bool ok, const char* message) {
  if (!ok) throw std::invalid_argument(std::string("embedding rows: ") + message);
}

}  // namespace

mx::array embedding_rows(const mx::array& ids, const mx::array& w, const mx::array& scales,
                         const mx::array& biases, int group_size, mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  require(stream.device == mx::Device::cpu, "CPU streams only");
  require(group_size == 32 || group_size == 64 || group_size == 128,
          "group_size must be 32, 64 or 128");
  require(w.dtype() == mx::uint32 && w.ndim() == 2, "w must be a 2-D uint32 array of 4-bit words");
  const int64_t D = w.shape(1) * 8;
  require(D % group_size == 0 && scales.ndim() == 2 && scales.shape() == biases.shape() &&
              scales.shape(0) == w.shape(0) && scales.shape(1) * group_size == D &&
              scales.dtype() == biases.dtype() &&
              (scales.dtype() == mx::float32 || scales.dtype() == mx::bfloat16 ||
               scales.dtype() == mx::float16),
          "scales and biases must share one float dtype, [rows, D / group_size]");
  require(mx::issubdtype(ids.dtype(), mx::integer), "ids must be integers");
  // Ids as uint32 (a cast node only for other integer dtypes), read in place whatever their
  // strides; an id past the table gives a row of zeros.
  auto rows = ids.dtype() == mx::uint32 ? ids : mx::astype(ids, mx::uint32, stream);
  auto shape = ids.shape();
  shape.push_back(int(D));
  auto dense = [&](const mx::array& a) {
    return a.is_available() && a.flags().row_contiguous ? a : mx::contiguous(a, false, stream);
  };
  return mx::array(std::move(shape), mx::float32,
                   std::make_shared<EmbeddingRows>(stream, group_size),
                   {rows, dense(w), dense(scales), dense(biases)});
}

}  // namespace native

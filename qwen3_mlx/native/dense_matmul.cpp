// The bf16-weight matmul for MLX's CPU backend (dense.h): x @ widen(w).T for float32 x and a bf16
// weight [N, K] read in place, for one or more matrices with one x (a layer's q/k/v or gate/up in
// one pass). Up to 8 rows of x the mat-vec kernels (bound by reading the weights), more rows the
// tiled matmul (bound by arithmetic), both split over the worker pool (pool.h).

#include <algorithm>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <vector>

#include "dense.h"
#include "dispatch.h"
#include "isa.h"
#include "mlx/primitives.h"
#include "ops.h"
#include "pool.h"
#include "strided.h"

namespace native {
namespace {

// Rows of x up to which the mat-vec runs; as quantized_matmul.cpp's MATVEC_ROWS (a speculative
// verify of up to 8 rows gives each row bit for bit what a one-row step gives).
constexpr int DENSE_MATVEC_ROWS = 8;

DenseKernels kernels_for(Isa isa) {
  return isa == AVX512 ? dense_avx512_kernels() : isa == AVX2 ? dense_avx2_kernels()
                                                               : dense_scalar_kernels();
}

// Mat-vec: x laid out once, then chunks of output rows of every matrix in one pool run (>= 16
// rows a chunk, about 8 chunks per thread per matrix).
// Whether the bf16-dot mat-vec runs: asked for (dense_matmul's bf16), and this CPU, with AVX-512
// chosen, has AVX512-BF16.
bool bf16_dot(int64_t K, bool asked) {
  return asked && K % 32 == 0 && chosen_isa() == AVX512 && dense_bf16_supported();
}

// x [M, K] float32 rounded to bf16, nearest-even (x is finite: the model's activations).
std::vector<uint16_t> round_to_bf16(const float* x, int64_t count) {
  std::vector<uint16_t> out(size_t(count), 0);
  for (int64_t i = 0; i < count; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, 4);
    out[size_t(i)] = uint16_t((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
  }
  return out;
}

// Chunks of output rows of every matrix, in one pool run (>= 16 rows a chunk, about 8 chunks per
// thread per matrix, a multiple of 4 rows).
void run_row_chunks(int threads, const std::vector<DenseMatrix>& matrices,
                    const std::function<void(const DenseMatrix&, int64_t, int64_t)>& rows) {
  std::vector<int64_t> per, first;
  int64_t chunks = 0;
  for (const auto& m : matrices) {
    per.push_back(std::max<int64_t>(16, m.N / (int64_t(std::max(threads, 1)) * 8)) / 4 * 4);
    first.push_back(chunks);
    chunks += (m.N + per.back() - 1) / per.back();
  }
  pool().run(threads, chunks, [&](int64_t c) {
    size_t i = std::upper_bound(first.begin(), first.end(), c) - first.begin() - 1;
    const int64_t n0 = (c - first[i]) * per[i], n1 = std::min(matrices[i].N, n0 + per[i]);
    rows(matrices[i], n0, n1);
  });
}

void run_rows(const float* x, int M, int64_t K, int threads, bool bf16,
              std::vector<DenseMatrix>& matrices) {
  if (bf16_dot(K, bf16)) {
    const std::vector<uint16_t> rounded = round_to_bf16(x, int64_t(M) * K);
    run_row_chunks(threads, matrices, [&](const DenseMatrix& m, int64_t n0, int64_t n1) {
      dense_bf16_rows(rounded.data(), M, K, m, n0, n1);
    });
    return;
  }
  Isa isa = chosen_isa();
  if (isa == AVX512 && K % 32) isa = AVX2;
  if (isa == AVX2 && K % 16) isa = SCALAR;
  const DenseKernels kernels = kernels_for(isa);
  std::vector<float> laid(size_t(M) * size_t(K));
  dense_layout(x, M, K, kernels.L, laid.data());
  run_row_chunks(threads, matrices, [&](const DenseMatrix& m, int64_t n0, int64_t n1) {
    kernels.rows(laid.data(), M, K, m, n0, n1);
  });
}

// Matmul: x packed once (gemm.h), then panels of every matrix's output columns in one pool run.
void run_panels(const float* x, int M, int64_t K, int threads, std::vector<DenseMatrix>& matrices) {
  const DenseKernels kernels = kernels_for(chosen_isa());
  std::vector<float> packed(size_t(packed_rows_size(M, K, kernels.MR)));
  pack_rows(x, M, K, kernels.MR, packed.data());
  const GemmRows rows{packed.data(), M, K, 0};
  std::vector<int64_t> per, first, panels;
  int64_t chunks = 0;
  for (const auto& m : matrices) {
    panels.push_back((m.N + kernels.NR - 1) / kernels.NR);
    per.push_back(std::max<int64_t>(1, panels.back() / (int64_t(std::max(threads, 1)) * 8)));
    first.push_back(chunks);
    chunks += (panels.back() + per.back() - 1) / per.back();
  }
  pool().run(threads, chunks, [&](int64_t c) {
    size_t i = std::upper_bound(first.begin(), first.end(), c) - first.begin() - 1;
    const int64_t p0 = (c - first[i]) * per[i], p1 = std::min(panels[i], p0 + per[i]);
    kernels.panels(rows, matrices[i], p0, p1);
  });
}

// inputs: x, then one weight per matrix; one float32 output per matrix.
class DenseMatmuls : public mx::Primitive {
 public:
  DenseMatmuls(mx::Stream stream, int threads, bool bf16)
      : mx::Primitive(stream), threads_(threads), bf16_(bf16) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    dispatch_on_stream(stream(), inputs, outputs, [threads = threads_, bf16 = bf16_](
                                                      const std::vector<mx::array>& held,
                                                      std::vector<mx::array>& outs) {
      const int64_t K = held[0].shape(-1);
      const int M = int(held[0].size() / K);
      std::vector<float> scratch;
      const float* x = row_major(held[0], scratch);  // x may be a strided view
      std::vector<DenseMatrix> matrices;
      for (size_t i = 0; i < outs.size(); ++i)
        matrices.push_back(DenseMatrix{held[1 + i].data<uint16_t>(), held[1 + i].shape(0),
                                       outs[i].data<float>()});
      if (M > DENSE_MATVEC_ROWS) {
        run_panels(x, M, K, threads, matrices);
      } else {
        run_rows(x, M, K, threads, bf16, matrices);
      }
    });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("dense_matmul: CPU only");
  }
  const char* name() const override { return "DenseMatmuls"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const DenseMatmuls&>(other);
    return threads_ == o.threads_ && bf16_ == o.bf16_;
  }

 private:
  int threads_;
  bool bf16_;
};

mx::array row_contiguous(const mx::array& a, mx::Stream stream) {
  return a.is_available() && a.flags().row_contiguous ? a : mx::contiguous(a, false, stream);
}

}  // namespace

std::vector<mx::array> dense_matmuls(const mx::array& x, const std::vector<mx::array>& ws,
                                     int threads, bool bf16, mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu)
    throw std::invalid_argument("dense_matmul: CPU streams only");
  if (x.dtype() != mx::float32 || x.ndim() == 0 || x.shape(-1) == 0)
    throw std::invalid_argument("dense_matmul: x must be float32 with a last axis");
  if (ws.empty()) throw std::invalid_argument("dense_matmul: give one or more weights");
  std::vector<mx::array> inputs{x};  // as it is: the kernel copies a strided view (row_major)
  std::vector<mx::Shape> shapes;
  for (const auto& w : ws) {
    if (w.dtype() != mx::bfloat16 || w.ndim() != 2 || w.shape(1) != x.shape(-1))
      throw std::invalid_argument("dense_matmul: each weight must be bfloat16 [N, K], K x's last axis");
    inputs.push_back(row_contiguous(w, stream));
    shapes.push_back(x.shape());
    shapes.back().back() = w.shape(0);
  }
  return mx::array::make_arrays(std::move(shapes), std::vector<mx::Dtype>(ws.size(), mx::float32),
                                std::make_shared<DenseMatmuls>(stream, threads, bf16), inputs);
}

mx::array dense_matmul(const mx::array& x, const mx::array& w, int threads, bool bf16,
                       mx::StreamOrDevice s) {
  return dense_matmuls(x, {w}, threads, bf16, s)[0];
}

}  // namespace native

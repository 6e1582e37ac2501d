// A 4-bit affine quantized mat-vec for MLX's CPU backend: y = x @ dequantize(w, scales, biases).T
// for a few rows of x (decode, small batches), near memory bandwidth.
//
// Layout (MLX affine, bits=4): w is uint32 [N, K/8], element 8*i+s of a row in bits 4s..4s+3 of
// word i; scales and biases [N, K/group] in the checkpoint's dtype (f32, bf16 or f16), read in
// place. Per group g: sum_k x_k (q_k s_g + b_g) = s_g * dot(x_g, q_g) + b_g * sum(x_g).
//
// Kernels: a vector of V words holds 8V weights; word j, nibble s is element 8j+s. x is permuted
// once per call so that the V elements for nibble s sit together, and pre-scaled by 16^-s, so a
// nibble is decoded with one AND (w & 0xF<<4s is q * 16^s, exact in float32) and one int->float
// convert; the power-of-two scaling makes every product exactly q * x. The bias term uses per-lane
// sums of x (AVX-512), or each group's sum of x (AVX2). Products and sums are float32 throughout, so results are within float32 rounding of
// a float64 reference whatever the scale dtype.
//
// The ISA is chosen at run time (AVX-512, AVX2+FMA, portable C++) with per-function target
// attributes: no -march flag, so the library runs on any x86-64. Rows are split into chunks that
// the MLX stream thread and a small worker pool pull from one atomic counter, so a descheduled
// worker never stalls the op.

#include <algorithm>
#include <cmath>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>



#include "mlx/mlx.h"
#include "mlx/primitives.h"
#include "dispatch.h"
#include "gemm.h"
#include "isa.h"
#include "layer_parts.h"
#include "matvec_kernels.h"
#include "ops.h"
#include "pool.h"
#include "strided.h"

namespace mx = mlx::core;

namespace native {
int64_t prefetch_bytes() {
  static const int64_t bytes = [] {
    const char* env = setting("QWEN3_MLX_NATIVE_PREFETCH", "QWEN3_MLX_QMV_PREFETCH");
    return env ? std::atoll(env) : int64_t(2048);
  }();
  return bytes;
}

// ---------------------------------------------------------------------------------------------
// x: any float dtype -> float32, then the kernel's layout (permuted, pre-scaled) and word sums

template <typename In>
void convert_rows(const In* in, float* out, int64_t count) {
  for (int64_t i = 0; i < count; ++i) out[i] = static_cast<float>(in[i]);
}

// x as row-major float32 [count]: a float32 x's own data, or a copy in `copy` of a strided view
// (the graph holds no Contiguous node for it) or of half-precision x (always contiguous).
const float* float_rows(const mx::array& x, size_t count, std::vector<float>& copy) {
  if (x.dtype() == mx::float32) return row_major(x, copy);
  copy.resize(count);
  switch (x.dtype()) {
    case mx::bfloat16: convert_rows(x.data<mx::bfloat16_t>(), copy.data(), count); break;
    case mx::float16: convert_rows(x.data<mx::float16_t>(), copy.data(), count); break;
    default: throw std::invalid_argument("quantized_matmul: x must be float32, bfloat16 or float16");
  }
  return copy.data();
}

void prepare_x(const float* plain, int M, int64_t K, Isa isa, int group_size,
               std::vector<float>& xp, std::vector<float>& xs, std::vector<float>& xg) {
  xs.assign(size_t(M) * (K / 8), 0.0f);
  for (int m = 0; m < M; ++m)
    for (int64_t i = 0; i < K / 8; ++i) {
      float sum = 0.0f;
      for (int s = 0; s < 8; ++s) sum += plain[m * K + i * 8 + s];
      xs[m * (K / 8) + i] = sum;
    }
  // Group sums (the AVX2 kernel's bias term), from the word sums in order: one row's alone.
  const int64_t groups = K / group_size, stride = group_sums_stride(groups);
  const int words_per_group = group_size / 8;
  xg.assign(size_t(M) * stride, 0.0f);
  for (int m = 0; m < M; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      float sum = 0.0f;
      for (int i = 0; i < words_per_group; ++i) sum += xs[m * (K / 8) + g * words_per_group + i];
      xg[m * stride + g] = sum;
    }
  if (isa == SCALAR) {
    xp.assign(plain, plain + size_t(M) * K);
    return;
  }
  // Step of V words (8V weights); element 8j+s of the step goes to s*V + j, times 16^-s (s < 7).
  const int V = isa == AVX512 ? 16 : 8;
  xp.assign(size_t(M) * K, 0.0f);
  for (int m = 0; m < M; ++m) {
    const float* src = plain + m * K;
    float* dst = xp.data() + m * K;
    for (int64_t c = 0; c < K / (8 * V); ++c)
      for (int j = 0; j < V; ++j)
        for (int s = 0; s < 8; ++s) {
          float factor = s == 7 ? 1.0f : 1.0f / float(1 << (4 * s));
          dst[c * 8 * V + s * V + j] = src[c * 8 * V + 8 * j + s] * factor;
        }
  }
  // The sums must follow the same per-step lane order as the words: they already do (word j).
}

template <typename Out>
void store(const float* in, Out* out, int64_t count) {
  for (int64_t i = 0; i < count; ++i) out[i] = static_cast<Out>(in[i]);
}

// ---------------------------------------------------------------------------------------------
// The primitive

// Every matrix times the same x (prepared once), rows of all of them in one pool run: chunks of
// >= 16 rows, about 4 per thread per matrix, so a late thread finds work left or none.
void run_matrices(const float* plain, int M, int64_t K, Isa isa, int threads, int group_size,
                  bool int8, const std::vector<Matrix>& matrices) {
  // Per calling thread (MLX's stream thread), reused: a call sizes them and overwrites them whole.
  thread_local std::vector<float> xp, xs, xg, xd;
  thread_local std::vector<int8_t> xq;
  if (int8) {
    xq.resize(size_t(M) * K);
    xd.resize(size_t(M) * (K / 8));
    xg.resize(size_t(M) * group_sums_stride(K / group_size));
#ifdef NATIVE_X86
    quantize_rows_vnni(plain, M, K, group_size, xq.data(), xd.data(), xg.data());
#endif
  } else {
    prepare_x(plain, M, K, isa, group_size, xp, xs, xg);
  }
  std::vector<Job> jobs;
  std::vector<RowsFn> fns;
  std::vector<int64_t> per, first;  // rows per chunk and first chunk index, per matrix
  int64_t chunks = 0;
  for (const auto& m : matrices) {
    const auto type = ScaleType(m.type);
    jobs.push_back(Job{m.w, m.s, m.b, m.N, K, M, group_size, xp.data(), xs.data(), m.out,
                       isa == SCALAR ? 0 : prefetch_bytes() / 4, xq.data(), xd.data(), xg.data()});
    fns.push_back(int8 ? pick_int8(type, group_size) : pick(isa, type, group_size));
    // A multiple of 8 rows: the AVX-512 kernel's decode tile, two of the AVX2 kernel's tiles.
    // About 4 chunks per thread: each chunk starts its rows' stream cold (the prefetch runs one
    // tile ahead within a chunk), and 8 per thread made a 0.6B decode step 4-8 % slower (medians
    // of 6-10 interleaved runs); fewer would leave more to one thread when the other is late.
    per.push_back((std::max<int64_t>(16, m.N / (int64_t(std::max(threads, 1)) * 4)) + 7) / 8 * 8);
    first.push_back(chunks);
    chunks += (m.N + per.back() - 1) / per.back();
  }
  pool().run(threads, chunks, [&](int64_t c) {
    size_t i = std::upper_bound(first.begin(), first.end(), c) - first.begin() - 1;
    const int64_t r0 = (c - first[i]) * per[i], r1 = std::min(matrices[i].N, r0 + per[i]);
    fns[i](jobs[i], r0, r1);
  });
}

// The mat-vec kernels' ISA for rows of K: AVX-512 steps take 128 weights, AVX2's 64.
Isa matvec_isa(int64_t K) {
  Isa isa = chosen_isa();
  if (isa == AVX512 && K % 128) isa = AVX2;
  if (isa == AVX2 && K % 64) isa = SCALAR;
  return isa;
}

void quantized_matvecs(const float* x, int M, int64_t K, int group_size, int threads, bool int8,
                       const std::vector<Matrix>& matrices) {
  const Isa isa = matvec_isa(K);
  run_matrices(x, M, K, isa, threads, group_size, int8 && int8_supported() && isa == AVX512,
               matrices);
}

// More rows than the mat-vec kernels take (prefill): the tiled matmul (gemm.h) on float32 x.
void run_prefill(const mx::array& x, int M, int64_t K, bool int8, int threads, int group_size,
                 const std::vector<Matrix>& matrices) {
  std::vector<GemmMatrix> jobs;
  for (const auto& m : matrices) jobs.push_back(GemmMatrix{m.w, m.s, m.b, int(m.type), m.N, m.out});
  std::vector<float> copy;
  run_gemm(float_rows(x, size_t(M) * K, copy), M, K, chosen_isa(), int8, threads, group_size, jobs);
}

Matrix matrix_of(const mx::array& w, const mx::array& scales, const mx::array& biases,
                 float* out) {
  const ScaleType type =
      scales.dtype() == mx::float32 ? F32 : scales.dtype() == mx::bfloat16 ? BF16 : F16;
  return Matrix{w.data<uint32_t>(), scales.data<void>(), biases.data<void>(), type, w.shape(0), out};
}

// Float32 results into a half-precision `out`.
void store_out(const std::vector<float>& result, mx::array& out) {
  if (out.dtype() == mx::bfloat16) {
    store(result.data(), out.data<mx::bfloat16_t>(), result.size());
  } else {
    store(result.data(), out.data<mx::float16_t>(), result.size());
  }
}

// Rows of x up to which the mat-vec kernels run (each re-decodes the weights per block of up to 3
// rows); more take the matmul (gemm.h), which decodes them once per 512 rows. Measured on a
// 2560 -> 4096 matrix, one thread (CPU time; words from DRAM): the AVX-512 mat-vec 0.22 / 0.52 /
// 0.95 ms for 1 / 4 / 8 rows (0.57 / 2.97 / 6.40 before its tiles and the -Os fix); the matmul
// took 3.3 ms for 5 to 12 rows when measured under -Os. It stays at 8 all the same: a speculative
// verify pass (up to 8 rows) must give each row bit for bit what a one-row decode step gives,
// which the mat-vec's tiles do and the matmul's order does not.
constexpr int MATVEC_ROWS = 8;

// inputs: x, then (w, scales, biases) per matrix; one output per matrix.
void eval_matvecs(mx::Stream stream, const std::vector<mx::array>& inputs,
                  std::vector<mx::array>& outputs, int group_size, int threads, bool int8_asked) {
  const auto& x = inputs[0];
  const int64_t K = x.shape(-1);
  const int M = int(x.size() / K);
  const Isa isa = matvec_isa(K);
  // int8: the mat-vec's needs K % 128 (AVX-512); the prefill matmul's any K it takes.
  const bool int8 = int8_asked && int8_supported() && (M > MATVEC_ROWS || isa == AVX512);
  dispatch_on_stream(stream, inputs, outputs, [K, M, isa, threads, group_size, int8](
                                                  const std::vector<mx::array>& held,
                                                  std::vector<mx::array>& outs) {
    // float32 outputs (x float32, the CPU policy) take the results directly; others via a copy.
    std::vector<std::vector<float>> results(outs.size());
    std::vector<Matrix> matrices;
    for (size_t i = 0; i < outs.size(); ++i) {
      const auto &w = held[1 + 3 * i], &scales = held[2 + 3 * i], &biases = held[3 + 3 * i];
      float* target = outs[i].dtype() == mx::float32 ? outs[i].data<float>() : nullptr;
      if (target == nullptr) {
        results[i].resize(size_t(M) * w.shape(0));
        target = results[i].data();
      }
      matrices.push_back(matrix_of(w, scales, biases, target));
    }
    if (M > MATVEC_ROWS) {
      run_prefill(held[0], M, K, int8, threads, group_size, matrices);
    } else {
      std::vector<float> copy;  // the kernels lay x out their own way: x itself stays as it is
      run_matrices(float_rows(held[0], size_t(M) * K, copy), M, K, isa, threads, group_size, int8,
                   matrices);
    }
    for (size_t i = 0; i < outs.size(); ++i)
      if (!results[i].empty()) store_out(results[i], outs[i]);
  });
}

// One or more matrices with one x: x prepared once and one pool run for all of them (a layer's
// q/k/v or gate/up), where separate calls each pay the dispatch, x's layout and a pool wake-up.
class QuantizedMatvecs : public mx::Primitive {
 public:
  QuantizedMatvecs(mx::Stream stream, int group_size, int threads, bool int8)
      : mx::Primitive(stream), group_size_(group_size), threads_(threads), int8_(int8) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    eval_matvecs(stream(), inputs, outputs, group_size_, threads_, int8_);
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("quantized_matmul: CPU only");
  }
  const char* name() const override { return "QuantizedMatvecs"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const QuantizedMatvecs&>(other);
    return group_size_ == o.group_size_ && threads_ == o.threads_ && int8_ == o.int8_;
  }

 private:
  int group_size_, threads_;
  bool int8_;
};

void check_matrix(const mx::array& x, const mx::array& w, const mx::array& scales,
                  const mx::array& biases, int group_size) {
  if (x.ndim() == 0) throw std::invalid_argument("quantized_matmul: x must have at least one axis");
  check_matrix(x.shape(-1), w, scales, biases, group_size);
}

void check_matrix(int64_t K, const mx::array& w, const mx::array& scales, const mx::array& biases,
                  int group_size) {
  if (group_size != 32 && group_size != 64 && group_size != 128)
    throw std::invalid_argument("quantized_matmul: group_size must be 32, 64 or 128");
  if (w.dtype() != mx::uint32 || w.ndim() != 2)
    throw std::invalid_argument("quantized_matmul: w must be a 2-D uint32 array of 4-bit words");
  if (K == 0 || K % group_size || w.shape(1) * 8 != K)
    throw std::invalid_argument("quantized_matmul: x's last axis must be w's width * 8, a multiple of the group");
  if (scales.dtype() != biases.dtype() ||
      (scales.dtype() != mx::float32 && scales.dtype() != mx::bfloat16 &&
       scales.dtype() != mx::float16))
    throw std::invalid_argument("quantized_matmul: scales and biases must share one float dtype");
  if (scales.shape() != biases.shape() || scales.ndim() != 2 || scales.shape(0) != w.shape(0) ||
      scales.shape(1) * group_size != K)
    throw std::invalid_argument("quantized_matmul: scales and biases must be [N, K / group_size]");
}

mx::Stream cpu_stream_of(mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu) throw std::invalid_argument("quantized_matmul: CPU streams only");
  return stream;
}

// Parameters are evaluated and contiguous already: no graph node for them.
mx::array dense(const mx::array& a, mx::Stream stream) {
  return a.is_available() && a.flags().row_contiguous ? a : mx::contiguous(a, false, stream);
}

std::vector<mx::array> quantized_matmuls(const mx::array& x, const std::vector<mx::array>& ws,
                                         const std::vector<mx::array>& scales,
                                         const std::vector<mx::array>& biases, int group_size,
                                         int threads, bool int8, mx::StreamOrDevice s) {
  if (ws.empty() || ws.size() != scales.size() || ws.size() != biases.size())
    throw std::invalid_argument("quantized_matmul: give one or more matrices, each with scales and biases");
  auto stream = cpu_stream_of(s);
  // A float32 x goes in as it is, strided or not (float_rows copies a view): a decode step's
  // graph then has no Contiguous node per call. Half-precision x is made contiguous here.
  std::vector<mx::array> inputs{x.dtype() == mx::float32 ? x : mx::contiguous(x, false, stream)};
  std::vector<mx::Shape> shapes;
  std::vector<mx::Dtype> dtypes;
  for (size_t i = 0; i < ws.size(); ++i) {
    check_matrix(x, ws[i], scales[i], biases[i], group_size);
    for (const auto* a : {&ws[i], &scales[i], &biases[i]}) inputs.push_back(dense(*a, stream));
    shapes.push_back(x.shape());
    shapes.back().back() = ws[i].shape(0);
    dtypes.push_back(mx::promote_types(x.dtype(), scales[i].dtype()));
  }
  return mx::array::make_arrays(
      std::move(shapes), dtypes,
      std::make_shared<QuantizedMatvecs>(stream, group_size, threads, int8), inputs);
}

mx::array quantized_matmul(const mx::array& x, const mx::array& w, const mx::array& scales,
                           const mx::array& biases, int group_size, int threads, bool int8,
                           mx::StreamOrDevice s) {
  return quantized_matmuls(x, {w}, {scales}, {biases}, group_size, threads, int8, s)[0];
}

}  // namespace native

// The extension's Python face: the module definition and nothing else. The ops are declared in
// ops.h; NATIVE_MODULE_NAME (CMakeLists.txt) carries the mlx version it was built against.

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include <string>

#include "isa.h"
#include "mlx/version.h"
#include "dense.h"
#include "ops.h"

namespace nb = nanobind;

#define NATIVE_STR2(x) #x
#define NATIVE_STR(x) NATIVE_STR2(x)

NB_MODULE(NATIVE_MODULE_NAME, m) {
  using namespace native;
  m.doc() = "qwen3-mlx's native CPU ops for MLX: 4-bit matmuls, decode attention, norms, RoPE";
  m.attr("MLX_VERSION") = NATIVE_STR(MLX_VERSION_MAJOR) "." NATIVE_STR(
      MLX_VERSION_MINOR) "." NATIVE_STR(MLX_VERSION_PATCH);

  m.def("quantized_matmul", &quantized_matmul, nb::arg("x"), nb::arg("w"), nb::arg("scales"),
        nb::arg("biases"), nb::arg("group_size") = 64, nb::arg("threads") = 1,
        nb::arg("int8") = false, nb::kw_only(), nb::arg("stream") = nb::none(),
        "x @ dequantize(w, scales, biases).T for 4-bit affine w, computed in float32 (with x "
        "rounded to int8 per block of 32 when int8, at most 8 rows and int8_supported()).");
  m.def("quantized_matmuls", &quantized_matmuls, nb::arg("x"), nb::arg("ws"), nb::arg("scales"),
        nb::arg("biases"), nb::arg("group_size") = 64, nb::arg("threads") = 1,
        nb::arg("int8") = false, nb::kw_only(), nb::arg("stream") = nb::none(),
        "[x @ dequantize(w, s, b).T for each matrix]: quantized_matmul over several matrices "
        "with one x, in one pass.");

  m.def("dense_matmul", &dense_matmul, nb::arg("x"), nb::arg("w"), nb::arg("threads") = 1,
        nb::arg("bf16") = false, nb::kw_only(), nb::arg("stream") = nb::none(),
        "x @ w.T for float32 x and a bfloat16 weight [N, K], read in place and widened exactly to "
        "float32 near the compute (no float32 copy of w); bf16: up to 8 rows, x rounded to bf16 "
        "for AVX512-BF16 dot products where dense_bf16_supported().");
  m.def("dense_bf16_supported", &dense_bf16_supported,
        "Whether dense_matmul(..., bf16=True) runs the bf16-dot mat-vec on this CPU.");
  m.def("dense_matmuls", &dense_matmuls, nb::arg("x"), nb::arg("ws"), nb::arg("threads") = 1,
        nb::arg("bf16") = false, nb::kw_only(), nb::arg("stream") = nb::none(),
        "[x @ w.T for each bfloat16 weight]: dense_matmul over several weights with one x, in one "
        "pass.");

  m.def("quantized_decode_attention", &quantized_decode_attention, nb::arg("q"), nb::arg("k"),
        nb::arg("k_scales"), nb::arg("k_biases"), nb::arg("v"), nb::arg("v_scales"),
        nb::arg("v_biases"), nb::arg("scale"), nb::arg("group_size") = 64, nb::arg("bits") = 8,
        nb::arg("threads") = 1, nb::kw_only(), nb::arg("stream") = nb::none(),
        "softmax(scale q K^T) V over an affine-quantized KV cache for one query position, or the "
        "last L of T with the causal mask, each as its one-position call gives it.");
  m.def("decode_attention", &decode_attention, nb::arg("q"), nb::arg("k"), nb::arg("v"),
        nb::arg("scale"), nb::arg("threads") = 1, nb::kw_only(), nb::arg("stream") = nb::none(),
        "softmax(scale q K^T) V over a float32 KV cache (any strides) for one query position, or the "
        "last L of T with the causal mask, each as its one-position call gives it.");

  m.def("prefill_attention", &prefill_attention, nb::arg("q"), nb::arg("k"), nb::arg("v"),
        nb::arg("scale"), nb::arg("threads") = 1, nb::kw_only(), nb::arg("stream") = nb::none(),
        "softmax(scale q K^T + causal mask) V for the last L of T positions, float32 (the mask "
        "aligned to the lower right, as MLX's \"causal\").");

  m.def("rms_norm", &rms_norm, nb::arg("x"), nb::arg("weight"), nb::arg("eps"), nb::kw_only(),
        nb::arg("stream") = nb::none(),
        "weight * x / sqrt(mean(x^2) + eps) over the last axis, float32.");
  m.def("rope", &rope, nb::arg("x"), nb::arg("inv_freq"), nb::arg("offset"),
        nb::arg("factor") = 1.0f, nb::kw_only(), nb::arg("stream") = nb::none(),
        "Non-interleaved RoPE of factor * x [..., L, D] at positions offset + l, float32.");
  m.def("add_rms_norm", &add_rms_norm, nb::arg("x"), nb::arg("delta"), nb::arg("weight"),
        nb::arg("eps"), nb::kw_only(), nb::arg("stream") = nb::none(),
        "[h, rms_norm(h, weight, eps)] for h = x + delta, float32 (a residual add and the next "
        "norm).");
  m.def("qk_norm_rope", &qk_norm_rope, nb::arg("q"), nb::arg("k"), nb::arg("q_weight"),
        nb::arg("k_weight"), nb::arg("inv_freq"), nb::arg("eps"), nb::arg("offset"),
        nb::arg("factor") = 1.0f, nb::kw_only(), nb::arg("stream") = nb::none(),
        "[rope(rms_norm(q)), rope(rms_norm(k))] per head of q [B, L, Hq * D] and k "
        "[B, L, Hk * D], as [B, H, L, D], float32.");
  m.def("swiglu", &swiglu, nb::arg("gate"), nb::arg("up"), nb::kw_only(),
        nb::arg("stream") = nb::none(), "silu(gate) * up, float32.");
  m.def("embedding_rows", &embedding_rows, nb::arg("ids"), nb::arg("w"), nb::arg("scales"),
        nb::arg("biases"), nb::arg("group_size"), nb::kw_only(), nb::arg("stream") = nb::none(),
        "Rows ids of a 4-bit affine quantized table as float32 [*ids.shape, D], as "
        "mx.dequantize computes them (an id past the table gives zeros).");
  m.def("decode_qkv", &decode_qkv, nb::arg("normed"), nb::arg("weights"), nb::arg("q_weight"),
        nb::arg("k_weight"), nb::arg("inv_freq"), nb::arg("kv_heads"), nb::arg("offset"),
        nb::arg("factor"), nb::arg("eps"), nb::arg("group_size"), nb::arg("threads") = 1,
        nb::arg("int8") = false, nb::kw_only(), nb::arg("stream") = nb::none(),
        "A decode step's [q, k, v] as [1, H, L, D] (L from 1 to 8): the projections of normed, "
        "then RoPE of q's and k's per-head norms from offset, bit for bit the separate ops.");
  m.def("decode_rest", &decode_rest, nb::arg("h"), nb::arg("q"), nb::arg("keys"),
        nb::arg("values"), nb::arg("weights"), nb::arg("post_weight"), nb::arg("next_weight"),
        nb::arg("offset"), nb::arg("scale"), nb::arg("eps"), nb::arg("next_eps"),
        nb::arg("group_size"), nb::arg("threads") = 1, nb::arg("int8") = false, nb::kw_only(),
        nb::arg("stream") = nb::none(),
        "The rest of a decode step's layer, [h', normed']: attention over cache rows "
        "0..offset+L-1 (causal among the L), o, the post-attention norm, the MLP and the next "
        "norm, bit for bit the separate ops.");

  m.def("isa", [] { return std::string(isa_name(chosen_isa())); },
        "The instruction set the kernels use (after QWEN3_MLX_NATIVE_ISA).");
  m.def("detected_isa", [] { return std::string(isa_name(detected_isa())); },
        "The best instruction set this CPU supports.");
  m.def("int8_supported", &int8_supported,
        "Whether quantized_matmul(..., int8=True) runs the int8 VNNI kernel on this CPU.");
  m.def(
      "read_bandwidth",
      [](int64_t bytes, int repeats, int threads) {
        nb::gil_scoped_release release;
        return read_bandwidth(bytes, repeats, threads);
      },
      nb::arg("bytes") = int64_t(1) << 30, nb::arg("repeats") = 3, nb::arg("threads") = 1,
      "Best read bandwidth in GB/s over `bytes` on `threads` threads (AVX2 loads where present).");
  m.def(
      "fma_peak",
      [](int threads) {
        nb::gil_scoped_release release;
        return fma_peak(threads);
      },
      nb::arg("threads") = 1, "Best float32 GFLOP/s of independent FMAs on `threads` threads.");
}

// The instruction sets the kernels are written for, which one this CPU runs, and the one set of
// function target macros every kernel uses.
//
// Kernels for AVX2 and AVX-512 carry NATIVE_AVX2 / NATIVE_AVX512 / NATIVE_VNNI (per-function
// target attributes), so the library is built without -march and runs on any x86-64: code for
// an ISA runs only after chosen_isa() found it. The kernels whose one template body serves
// several ISAs (quantized_avx*.cpp, gemm_avx*.cpp) cannot take an attribute per instantiation;
// their files are compiled with the same feature lists as flags (CMakeLists.txt, NATIVE_*_FLAGS),
// which must stay equal to these.
#pragma once

#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#define NATIVE_X86 1
#include <immintrin.h>
#define NATIVE_AVX2 __attribute__((target("avx2,fma,f16c")))
#define NATIVE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define NATIVE_VNNI \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
#endif

namespace native {

// Ends a kernel's use of the vector registers on the calling thread (RAII: declare one at the top
// of each body dispatched on MLX's stream thread). MLX's own CPU kernels that run next on that
// thread are built for baseline x86-64 (SSE); while the upper halves of the AVX registers are
// dirty, each of their SSE instructions merges into them (measured on a Zen 5: a following
// mx.fast.scaled_dot_product_attention ran 3.4x slower). vzeroupper clears them; it exists only
// where AVX does.
struct ClearVectorState {
  ClearVectorState() = default;
  ClearVectorState(const ClearVectorState&) = delete;
  ClearVectorState& operator=(const ClearVectorState&) = delete;
  ~ClearVectorState();
};

enum Isa : int { SCALAR = 0, AVX2 = 1, AVX512 = 2 };

// The best ISA this CPU supports.
Isa detected_isa();
// The ISA the kernels use: detected_isa(), or lower where QWEN3_MLX_NATIVE_ISA (or its old
// name QWEN3_MLX_QMV_ISA) = avx512|avx2|scalar asks (never above the CPU's). Read per call.
Isa chosen_isa();
const char* isa_name(Isa isa);
// Whether the int8 kernels (block_vnni, gemm_vnni; the default where they run) can run: AVX-512
// VNNI, AVX-512 chosen.
bool int8_supported();
// The environment variable `name`, else its old name `alias` (the extension was called qmv),
// else nullptr; empty values count as unset.
const char* setting(const char* name, const char* alias);
// Best read bandwidth in GB/s over `bytes` on `threads` threads: the bound for a mat-vec.
double read_bandwidth(int64_t bytes, int repeats, int threads);
// Best float32 GFLOP/s of independent FMAs on `threads` threads (the widest vectors the CPU has):
// the bound for a prefill.
double fma_peak(int threads);

}  // namespace native

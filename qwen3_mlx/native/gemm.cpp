// The prefill matmul's driver (gemm.h): packs x once per call, in parallel, into the layout of the
// chosen kernels (float32, or int8 where asked and AVX-512 VNNI runs), then hands panels of every
// matrix's output columns to the pool. Compiled for baseline x86-64: the kernels it calls run in
// their own ISA files.

#include <algorithm>
#include <vector>

#include "gemm.h"
#include "pool.h"

namespace native {

namespace {

GemmKernels float_kernels(Isa isa) {
  return isa == AVX512 ? gemm_avx512_kernels() : isa == AVX2 ? gemm_avx2_kernels()
                                                              : gemm_scalar_kernels();
}

// Run pack(t0, t1) over `tiles` row tiles on the pool: packing is a pass over x that one thread
// would otherwise make while the others wait (about a tenth of a 2-thread 4B down projection).
template <class Pack>
void pack_in_parallel(int tiles, int threads, const Pack& pack) {
  const int per = std::max(1, tiles / (std::max(threads, 1) * 4));
  pool().run(threads, (tiles + per - 1) / per, [&](int64_t c) {
    pack(int(c) * per, std::min(tiles, int(c + 1) * per));
  });
}

// Panels of every matrix's output columns in one pool run: chunks of about 1/8 of a thread's
// share of each matrix, so a late thread finds work left or none.
template <class Panels>
void run_panels(int NR, int threads, const std::vector<GemmMatrix>& matrices, const Panels& panels) {
  std::vector<int64_t> per, first, counts;  // panels per chunk, first chunk, panels per matrix
  int64_t chunks = 0;
  for (const auto& m : matrices) {
    counts.push_back((m.N + NR - 1) / NR);
    per.push_back(std::max<int64_t>(1, counts.back() / (int64_t(std::max(threads, 1)) * 8)));
    first.push_back(chunks);
    chunks += (counts.back() + per.back() - 1) / per.back();
  }
  pool().run(threads, chunks, [&](int64_t c) {
    size_t i = std::upper_bound(first.begin(), first.end(), c) - first.begin() - 1;
    const int64_t p0 = (c - first[i]) * per[i], p1 = std::min(counts[i], p0 + per[i]);
    panels(matrices[i], p0, p1);
  });
}

}  // namespace

int64_t packed_rows_size(int M, int64_t K, int MR) {
  return int64_t((M + MR - 1) / MR) * MR * K;
}

void pack_rows(const float* x, int M, int64_t K, int MR, int t0, int t1, float* packed) {
  const int64_t padded = int64_t((M + MR - 1) / MR) * MR;
  for (int64_t k0 = 0; k0 < K; k0 += GEMM_KC) {
    const int64_t kc = std::min<int64_t>(GEMM_KC, K - k0);
    float* block = packed + k0 * padded;
    for (int t = t0; t < t1; ++t) {
      float* tile = block + int64_t(t) * MR * kc;
      for (int r = 0; r < MR; ++r) {
        const int row = t * MR + r;
        if (row >= M) {
          for (int64_t k = 0; k < kc; ++k) tile[k * MR + r] = 0.0f;
          continue;
        }
        const float* source = x + row * K + k0;
        for (int64_t k = 0; k < kc; ++k) tile[k * MR + r] = source[k];
      }
    }
  }
}

void pack_rows(const float* x, int M, int64_t K, int MR, float* packed) {
  pack_rows(x, M, K, MR, 0, (M + MR - 1) / MR, packed);
}

void run_gemm(const float* x, int M, int64_t K, Isa isa, bool int8, int threads, int group_size,
              const std::vector<GemmMatrix>& matrices) {
  const GemmInt8Kernels vnni = int8 ? gemm_vnni_kernels() : GemmInt8Kernels{0, 0, nullptr};
  if (vnni.panels != nullptr) {
    const int tiles = (M + vnni.MR - 1) / vnni.MR;
    const int64_t padded = int64_t(tiles) * vnni.MR;
    std::vector<int8_t> packed(size_t(padded * K));
    std::vector<float> steps(size_t(padded * (K / 32))), sums(size_t(padded * (K / group_size)));
    pack_in_parallel(tiles, threads, [&](int t0, int t1) {
      pack_rows_int8(x, M, K, group_size, t0, t1, packed.data(), steps.data(), sums.data());
    });
    const GemmInt8Rows rows{packed.data(), steps.data(), sums.data(), M, K, group_size};
    run_panels(vnni.NR, threads, matrices, [&](const GemmMatrix& m, int64_t p0, int64_t p1) {
      vnni.panels(rows, m, p0, p1);
    });
    return;
  }
  const GemmKernels kernels = float_kernels(isa);
  const int tiles = (M + kernels.MR - 1) / kernels.MR;
  std::vector<float> packed(size_t(packed_rows_size(M, K, kernels.MR)));
  pack_in_parallel(tiles, threads, [&](int t0, int t1) {
    pack_rows(x, M, K, kernels.MR, t0, t1, packed.data());
  });
  const GemmRows rows{packed.data(), M, K, group_size};
  run_panels(kernels.NR, threads, matrices, [&](const GemmMatrix& m, int64_t p0, int64_t p1) {
    kernels.panels(rows, m, p0, p1);
  });
}

}  // namespace native

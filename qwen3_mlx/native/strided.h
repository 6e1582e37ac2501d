// Row-major data of a float32 array that may be a strided view, for kernels dispatched on MLX's
// stream thread. A kernel that copies the rare strided input itself spares the graph a
// Contiguous node per input (each one a node to build and encode, most of them no-ops).
#pragma once

#include <cstdint>
#include <vector>

#include "mlx/mlx.h"

namespace native {

namespace mx = mlx::core;

// a's elements in row-major order: its own data when it is row-contiguous, else a copy in
// scratch (a transposed or sliced view).
inline const float* row_major(const mx::array& a, std::vector<float>& scratch) {
  if (a.flags().row_contiguous || a.size() == 0) return a.data<float>();
  scratch.resize(a.size());
  const int axes = a.ndim();
  const int64_t inner = a.shape(-1), step = a.strides()[axes - 1];
  std::vector<int64_t> index(size_t(axes), 0);
  const float* base = a.data<float>();
  for (size_t row = 0; row < a.size() / size_t(inner); ++row) {
    int64_t offset = 0;
    for (int d = 0; d + 1 < axes; ++d) offset += index[d] * a.strides()[d];
    float* out = scratch.data() + row * inner;
    for (int64_t i = 0; i < inner; ++i) out[i] = base[offset + i * step];
    for (int d = axes - 2; d >= 0 && ++index[d] == a.shape(d); --d) index[d] = 0;
  }
  return scratch.data();
}

}  // namespace native

// The one ranking rule of every top-k, on every device (csrc/cpu/topk.cpp,
// csrc/cuda/topk.cu): the better score first (larger when Largest), NaN after
// every number whichever way we rank, and equal scores (NaNs among them) by
// ascending training index. It is a strict total order on (score, index)
// pairs, so top-k(k) is a prefix of top-k(k + 1), every slot of a top-k with
// k <= N holds a real training index, and all devices return the same indices.
// +-inf are ordinary extreme values.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define EXEMPLAR_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define EXEMPLAR_HOST_DEVICE inline
#endif

namespace exemplar {

template <typename scalar_t, bool Largest>
struct RankOrder {
  // True when (v1, i1) ranks strictly before (v2, i2).
  EXEMPLAR_HOST_DEVICE static bool before(scalar_t v1, int64_t i1, scalar_t v2, int64_t i2) {
    const bool nan1 = v1 != v1, nan2 = v2 != v2;
    if (nan1 != nan2) return nan2;
    if (!nan1 && v1 != v2) return Largest ? v1 > v2 : v1 < v2;
    return i1 < i2;
  }
};

}  // namespace exemplar

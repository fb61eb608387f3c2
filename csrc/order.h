// The one ranking rule of every top-k, on every device (the CPU heap in
// csrc/cpu/topk.cpp, the fused kernel in csrc/cuda/topk.cu, and the sort-merge
// of composite.cpp through rank_order_first below; Python's ops/order.py
// merge_topk is the same rule): the better score first (larger when Largest), NaN after
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

#include <ATen/ATen.h>

#include <limits>

namespace exemplar {

// RankOrder on whole rows of a tensor, from sorts any device has (the
// device-generic top-k in composite.cpp): the positions of the first k of
// each row of v (T, n), ranked by two stable sorts — by value with NaN as the
// worst number, then NaN after every number. Ties keep their order in v, so v
// must hold tied entries in ascending training index, as the running best
// followed by a tile in index order does.
inline at::Tensor rank_order_first(const at::Tensor& v, int64_t k, bool largest) {
  const double worst = largest ? -std::numeric_limits<double>::infinity()
                               : std::numeric_limits<double>::infinity();
  auto nan = at::isnan(v);
  auto by_value = std::get<1>(at::sort(v.masked_fill(nan, worst), std::optional<bool>(true), 1, largest));
  auto by_nan =
      std::get<1>(at::sort(nan.gather(1, by_value).to(at::kByte), std::optional<bool>(true), 1, false));
  return by_value.gather(1, by_nan).narrow(1, 0, std::min<int64_t>(k, v.size(1)));
}

}  // namespace exemplar


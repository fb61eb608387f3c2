// Streaming top-k on the CPU: score tiles come from the shared GEMM producers
// (csrc/tiles.h); each test row keeps a size-k heap whose root is its worst
// kept score, so a tile costs one comparison per score once the heap is warm.
// Extra memory: the (T, k) outputs plus one tile, never (T, N).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "../checks.h"
#include "../order.h"
#include "../tiles.h"

namespace exemplar {
namespace {

// A size-k heap per test row whose root is its worst kept entry under
// RankOrder. Slots with index -1 are empty and rank after everything, so the
// root is empty until the heap is full.
template <typename scalar_t, bool Largest>
struct RowHeap {
  using Order = RankOrder<scalar_t, Largest>;

  static bool worse(scalar_t v1, int64_t i1, scalar_t v2, int64_t i2) {
    if (i1 < 0 || i2 < 0) return i1 < 0 && i2 >= 0;
    return Order::before(v2, i2, v1, i1);
  }

  static void push(scalar_t* val, int64_t* idx, int64_t k, scalar_t x, int64_t i) {
    if (idx[0] >= 0 && !Order::before(x, i, val[0], idx[0])) return;
    int64_t pos = 0;
    for (;;) {
      int64_t child = 2 * pos + 1;
      if (child >= k) break;
      if (child + 1 < k && worse(val[child + 1], idx[child + 1], val[child], idx[child])) ++child;
      if (!worse(val[child], idx[child], x, i)) break;
      val[pos] = val[child];
      idx[pos] = idx[child];
      pos = child;
    }
    val[pos] = x;
    idx[pos] = i;
  }

  static void sort(scalar_t* val, int64_t* idx, int64_t k, std::vector<int64_t>& order,
                   std::vector<scalar_t>& v, std::vector<int64_t>& ix) {
    order.resize(k);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(),
              [&](int64_t a, int64_t b) { return Order::before(val[a], idx[a], val[b], idx[b]); });
    v.assign(val, val + k);
    ix.assign(idx, idx + k);
    for (int64_t j = 0; j < k; ++j) {
      val[j] = v[order[j]];
      idx[j] = ix[order[j]];
    }
  }
};

template <typename scalar_t, bool Largest>
void stream_topk(TileScorer& scorer, int64_t N, int64_t k, at::Tensor& values,
                 at::Tensor& indices) {
  using Heap = RowHeap<scalar_t, Largest>;
  indices.fill_(-1);
  scalar_t* val = values.data_ptr<scalar_t>();
  int64_t* idx = indices.data_ptr<int64_t>();
  stream_tiles(scorer, N, values.options(),
               [&](int64_t t0, int64_t tb, int64_t n0, int64_t nt, const at::Tensor& tile) {
                 const scalar_t* s = tile.data_ptr<scalar_t>();
                 at::parallel_for(0, tb, 16, [&](int64_t begin, int64_t end) {
                   for (int64_t t = begin; t < end; ++t) {
                     scalar_t* v = val + (t0 + t) * k;
                     int64_t* ix = idx + (t0 + t) * k;
                     const scalar_t* row = s + t * nt;
                     for (int64_t j = 0; j < nt; ++j) Heap::push(v, ix, k, row[j], n0 + j);
                   }
                 });
               });
  at::parallel_for(0, scorer.tests(), 64, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> order, ix;
    std::vector<scalar_t> v;
    for (int64_t t = begin; t < end; ++t) Heap::sort(val + t * k, idx + t * k, k, order, v, ix);
  });
}

std::tuple<at::Tensor, at::Tensor> run_topk(TileScorer& scorer, const at::Tensor& R, int64_t k,
                                            bool largest) {
  const int64_t T = scorer.tests(), N = R.size(0);
  auto values = at::empty({T, k}, R.options());
  auto indices = at::empty({T, k}, R.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(R.scalar_type(), "topk_cpu", [&] {
    if (largest) {
      stream_topk<scalar_t, true>(scorer, N, k, values, indices);
    } else {
      stream_topk<scalar_t, false>(scorer, N, k, values, indices);
    }
  });
  return {values, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(exemplar, CPU, m) {
  m.impl("topk", &general_topk<run_topk>);
  m.impl("topk_rank1", &rank1_topk<run_topk>);
}

}  // namespace exemplar

// Streaming top-k on the CPU: score tiles come from the shared GEMM producers
// (csrc/tiles.h); each test row keeps a size-k heap whose root is its worst
// kept score, so a tile costs one comparison per score once the heap is warm.
// Extra memory: the (T, k) outputs plus one tile, never (T, N).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <vector>

#include "../exemplar.h"
#include "../tiles.h"

namespace exemplar {
namespace {

template <typename scalar_t, bool Largest>
struct RowHeap {
  static bool better(scalar_t a, scalar_t b) { return Largest ? a > b : a < b; }
  static scalar_t worst() {
    return Largest ? -std::numeric_limits<scalar_t>::infinity()
                   : std::numeric_limits<scalar_t>::infinity();
  }

  // A heap whose slots have index -1 is not yet full; ties with the root keep
  // the earlier training index.
  static void push(scalar_t* val, int64_t* idx, int64_t k, scalar_t x, int64_t i) {
    if (idx[0] >= 0 && !better(x, val[0])) return;
    int64_t pos = 0;
    for (;;) {
      int64_t child = 2 * pos + 1;
      if (child >= k) break;
      if (child + 1 < k && better(val[child], val[child + 1])) ++child;  // worse child
      if (!better(x, val[child])) break;
      val[pos] = val[child];
      idx[pos] = idx[child];
      pos = child;
    }
    val[pos] = x;
    idx[pos] = i;
  }

  // Best first; equal scores by ascending training index.
  static void sort(scalar_t* val, int64_t* idx, int64_t k, std::vector<int64_t>& order,
                   std::vector<scalar_t>& v, std::vector<int64_t>& ix) {
    order.resize(k);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      if (val[a] != val[b]) return better(val[a], val[b]);
      return idx[a] < idx[b];
    });
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
  values.fill_(Heap::worst());
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

std::tuple<at::Tensor, at::Tensor> topk_cpu(const at::Tensor& S, const at::Tensor& R,
                                            const at::Tensor& Phi, const at::Tensor& inv_norm,
                                            int64_t k, bool largest) {
  check_topk(S, R, Phi, inv_norm, k);
  GeneralScorer scorer(S, R, Phi, inv_norm);
  return run_topk(scorer, R, k, largest);
}

std::tuple<at::Tensor, at::Tensor> topk_rank1_cpu(const at::Tensor& alpha, const at::Tensor& beta,
                                                  const at::Tensor& R, const at::Tensor& Phi,
                                                  const at::Tensor& inv_norm, int64_t k,
                                                  bool largest) {
  check_topk_rank1(alpha, beta, R, Phi, inv_norm, k);
  Rank1Scorer scorer(alpha, beta, R, Phi, inv_norm);
  return run_topk(scorer, R, k, largest);
}

TORCH_LIBRARY_IMPL(exemplar, CPU, m) {
  m.impl("topk", &topk_cpu);
  m.impl("topk_rank1", &topk_rank1_cpu);
}

}  // namespace exemplar

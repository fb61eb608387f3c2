// The bf16 screen's consumer on CUDA (csrc/screen.h; its GEMMs are cuBLAS's
// through ATen): per tile, one kernel writes every pair's lower and upper
// bound, the k best lower bounds per row are kept with at::topk (values only,
// no order needed), and a second kernel appends the training rows whose upper
// bound reaches the row's k-th best to a per-row buffer by atomic slot. A
// buffer that fills sets a flag; the op then answers on the exact path. The
// one host sync is at the end (the candidates' width and the flag).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <torch/library.h>

#include <limits>

#include "../screen.h"

namespace exemplar {
namespace {

constexpr int kThreads = 256;

__global__ void general_bounds(const __nv_bfloat16* sc, const float* w, const double* scale, GeneralPair pair,
                               double sign, int64_t cells, int64_t nt, double* lo, double* hi) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= cells) return;
  double s, b;
  pair(__bfloat162float(sc[idx]), w[idx], scale[idx % nt], s, b);
  lo[idx] = sign * s - b;
  hi[idx] = sign * s + b;
}

__global__ void low_rank_bounds(const __nv_bfloat16* a, const __nv_bfloat16* c, const float* an, const float* bn,
                                const float* rn, const float* pn, const double* scale, LowRankPair pair,
                                double sign, int64_t m, int64_t cells, int64_t nt, double* lo, double* hi) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= cells) return;
  const int64_t t = idx / nt, i = idx % nt;
  LowRankPair::Partial partial;
  for (int64_t j = 0; j < m; ++j) {
    const int64_t at = (t * m + j) * nt + i;
    pair.term(__bfloat162float(a[at]), __bfloat162float(c[at]), an[t * m + j], bn[t * m + j], rn[i], pn[i], partial);
  }
  double s, b;
  pair.finish(partial, scale[i], s, b);
  lo[idx] = sign * s - b;
  hi[idx] = sign * s + b;
}

__global__ void append_candidates(const double* hi, const double* threshold, int64_t cells, int64_t nt, int64_t n0,
                                  int64_t capacity, int* count, int64_t* cand, double* upper, int* overflow) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= cells) return;
  const int64_t t = idx / nt;
  if (hi[idx] < threshold[t]) return;
  const int slot = atomicAdd(count + t, 1);
  if (slot >= capacity) {
    atomicExch(overflow, 1);
    return;
  }
  cand[t * capacity + slot] = n0 + idx % nt;
  upper[t * capacity + slot] = hi[idx];
}

unsigned blocks_for(int64_t cells) { return static_cast<unsigned>((cells + kThreads - 1) / kThreads); }

class CudaConsumer {
 public:
  CudaConsumer(const Bf16Screen& screen, int64_t k, bool largest)
      : k_(k), sign_(largest ? 1.0 : -1.0),
        capacity_(candidate_capacity(screen.train_rows(), k)) {
    auto options = screen.test_norms().options();
    const int64_t T = screen.tests();
    best_ = at::full({T, k}, -std::numeric_limits<double>::infinity(), options.dtype(at::kDouble));
    cand_ = at::full({T, capacity_}, -1, options.dtype(at::kLong));
    upper_ = at::empty({T, capacity_}, options.dtype(at::kDouble));
    count_ = at::zeros({T}, options.dtype(at::kInt));
    overflow_ = at::zeros({1}, options.dtype(at::kInt));
  }

  void consume(const Bf16Screen& screen, int64_t n0, int64_t nt, int64_t t0, int64_t tb,
               const std::pair<at::Tensor, at::Tensor>& tile) {
    const int64_t cells = tb * nt;
    if (cells == 0) return;
    auto stream = at::cuda::getCurrentCUDAStream();
    auto lo = at::empty({tb, nt}, best_.options()), hi = at::empty({tb, nt}, best_.options());
    const auto* first = reinterpret_cast<const __nv_bfloat16*>(tile.first.const_data_ptr());
    const double* scale = screen.scale().const_data_ptr<double>();
    if (screen.general()) {
      general_bounds<<<blocks_for(cells), kThreads, 0, stream>>>(first, tile.second.const_data_ptr<float>(), scale,
                                                                  screen.general_pair(), sign_, cells, nt,
                                                                  lo.data_ptr<double>(), hi.data_ptr<double>());
    } else {
      const int64_t m = screen.terms();
      low_rank_bounds<<<blocks_for(cells), kThreads, 0, stream>>>(
          first, reinterpret_cast<const __nv_bfloat16*>(tile.second.const_data_ptr()),
          screen.test_norms().const_data_ptr<float>() + t0 * m,
          screen.test_right_norms().const_data_ptr<float>() + t0 * m, screen.train_norms().const_data_ptr<float>(),
          screen.train_right_norms().const_data_ptr<float>(), scale, screen.low_rank_pair(), sign_, m, cells, nt,
          lo.data_ptr<double>(), hi.data_ptr<double>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto best = best_.narrow(0, t0, tb);
    best.copy_(std::get<0>(at::topk(at::cat({best, lo}, 1), k_, 1, /*largest=*/true, /*sorted=*/false)));
    auto threshold = best.amin(1);
    append_candidates<<<blocks_for(cells), kThreads, 0, stream>>>(
        hi.const_data_ptr<double>(), threshold.const_data_ptr<double>(), cells, nt, n0, capacity_,
        count_.data_ptr<int>() + t0, cand_.data_ptr<int64_t>() + t0 * capacity_,
        upper_.data_ptr<double>() + t0 * capacity_, overflow_.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  std::pair<at::Tensor, at::Tensor> candidates() {
    if (overflow_.item<int>() != 0) return {at::Tensor(), at::Tensor()};
    auto keep = (cand_ >= 0).logical_and_(upper_ >= best_.amin(1, /*keepdim=*/true));
    auto survivors = keep.sum(1);
    const int64_t width = std::max<int64_t>(1, survivors.max().item<int64_t>());
    auto order = std::get<1>(at::sort(keep.to(at::kByte), /*stable=*/true, 1, /*descending=*/true)).narrow(1, 0, width);
    auto cand = at::where(keep.gather(1, order), cand_.gather(1, order), at::full_like(order, -1));
    return {cand, survivors};
  }

 private:
  int64_t k_;
  double sign_;
  int64_t capacity_;
  at::Tensor best_, cand_, upper_, count_, overflow_;
};

}  // namespace

TORCH_LIBRARY_IMPL(exemplar, CUDA, m) {
  m.impl("screened_topk", &screened_topk<CudaConsumer>);
  m.impl("screened_topk_rank1", &screened_topk_rank1<CudaConsumer>);
}

}  // namespace exemplar

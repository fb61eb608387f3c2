// CUDA registrations. The device-generic ops (csrc/composite.cpp) run here on
// cuBLAS/cuSOLVER through ATen; each gets a device guard for its inputs' GPU.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../exemplar.h"

namespace exemplar {
namespace {

template <auto Fn, typename... Args>
auto guarded(const at::Tensor& first, const Args&... rest) {
  c10::cuda::CUDAGuard guard(first.device());
  return Fn(first, rest...);
}

}  // namespace

TORCH_LIBRARY_IMPL(exemplar, CUDA, m) {
  m.impl("residuals", &residuals_cuda);
  m.impl("topk", &topk_cuda);
  m.impl("topk_rank1", &topk_rank1_cuda);
  m.impl("kfac_factors", &guarded<kfac_factors, at::Tensor>);
  m.impl("ekfac_eigenvalues", &guarded<ekfac_eigenvalues, at::Tensor, at::Tensor, at::Tensor>);
  m.impl("exact_hessian", &guarded<exact_hessian, at::Tensor>);
  m.impl("eigenbasis_norms", &guarded<eigenbasis_norms, at::Tensor, at::Tensor, at::Tensor, at::Tensor>);
  m.impl("dense_norms", &guarded<dense_norms, at::Tensor, at::Tensor>);
  m.impl("scores", &guarded<scores, at::Tensor, at::Tensor, at::Tensor>);
  m.impl("scores_rank1", &guarded<scores_rank1, at::Tensor, at::Tensor, at::Tensor, at::Tensor>);
}

}  // namespace exemplar

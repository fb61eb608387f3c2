// r = softmax(z) - e_y, one warp per row; C may be large (1000s), so lanes
// stride over classes and reduce with shuffles.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"

namespace exemplar {
namespace {

constexpr int kWarpsPerBlock = 8;

template <typename T>
__device__ T warp_max(T v) {
  for (int offset = 16; offset > 0; offset /= 2) v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

template <typename T>
__device__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename scalar_t>
__global__ void residuals_kernel(const scalar_t* __restrict__ logits,  // (N, C)
                                 const int64_t* __restrict__ labels,   // (N,)
                                 scalar_t* __restrict__ out,           // (N, C)
                                 int64_t N, int64_t C) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= N) return;  // whole warp leaves together: row is warp-uniform
  const scalar_t* z = logits + row * C;
  scalar_t* r = out + row * C;
  const int64_t y = labels[row];
  scalar_t zmax = -INFINITY;
  for (int64_t c = lane; c < C; c += 32) zmax = max(zmax, z[c]);
  zmax = warp_max(zmax);
  scalar_t total = 0;
  for (int64_t c = lane; c < C; c += 32) total += exp(z[c] - zmax);
  const scalar_t scale = scalar_t(1) / warp_sum(total);
  for (int64_t c = lane; c < C; c += 32) r[c] = exp(z[c] - zmax) * scale - (c == y ? scalar_t(1) : scalar_t(0));
}

}  // namespace

at::Tensor residuals_cuda(const at::Tensor& logits_, const at::Tensor& labels_) {
  check_logits_labels("exemplar::residuals", logits_, labels_);
  c10::cuda::CUDAGuard guard(logits_.device());
  auto logits = logits_.contiguous();
  auto labels = labels_.contiguous();
  const int64_t N = logits.size(0), C = logits.size(1);
  TORCH_CHECK(C >= 1, "exemplar::residuals: logits must have C >= 1 classes, got shape ", logits.sizes());
  check_labels_in_range("exemplar::residuals", labels, C);
  auto out = at::empty_like(logits);
  if (N == 0) return out;
  const dim3 grid((N + kWarpsPerBlock - 1) / kWarpsPerBlock);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "residuals_cuda", [&] {
    residuals_kernel<scalar_t><<<grid, kWarpsPerBlock * 32, 0, stream>>>(
        logits.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), N, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace exemplar

namespace exemplar {
TORCH_LIBRARY_IMPL(exemplar, CUDA, m) { m.impl("residuals", &residuals_cuda); }
}  // namespace exemplar

// r = softmax(z) - e_y per row, numerically stable (max subtracted).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "../checks.h"

namespace exemplar {

at::Tensor residuals_cpu(const at::Tensor& logits_, const at::Tensor& labels_) {
  const char* op = "exemplar::residuals";
  check_logits_labels(op, logits_, labels_);
  auto logits = logits_.contiguous();
  auto labels = labels_.contiguous();
  const int64_t N = logits.size(0), C = logits.size(1);
  TORCH_CHECK(C >= 1, op, ": logits must have C >= 1 classes, got shape ", logits.sizes());
  check_labels_in_range(op, labels, C);
  const int64_t* y = labels.data_ptr<int64_t>();
  auto out = at::empty_like(logits);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "residuals_cpu", [&] {
    const scalar_t* z = logits.data_ptr<scalar_t>();
    scalar_t* r = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* zi = z + i * C;
        scalar_t* ri = r + i * C;
        scalar_t zmax = zi[0];
        for (int64_t c = 1; c < C; ++c) zmax = std::max(zmax, zi[c]);
        scalar_t total = 0;
        for (int64_t c = 0; c < C; ++c) {
          ri[c] = std::exp(zi[c] - zmax);
          total += ri[c];
        }
        const scalar_t scale = scalar_t(1) / total;
        for (int64_t c = 0; c < C; ++c) ri[c] *= scale;
        ri[y[i]] -= scalar_t(1);
      }
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(exemplar, CPU, m) { m.impl("residuals", &residuals_cpu); }

}  // namespace exemplar

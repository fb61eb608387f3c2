// Calls exemplar::topk from C++ through the dispatcher and checks it against
// the top-k of exemplar::scores: what a C++ user linking libexemplar does.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <iostream>

int main() {
  torch::manual_seed(0);
  const int64_t T = 3, N = 257, C = 4, Dp = 9, k = 5;
  auto opts = torch::TensorOptions().dtype(torch::kFloat64);
  auto S = torch::randn({T, C, Dp}, opts), R = torch::randn({N, C}, opts);
  auto Phi = torch::randn({N, Dp}, opts), inv_norm = torch::rand({N}, opts) + 0.1;

  auto scores = c10::Dispatcher::singleton()
                    .findSchemaOrThrow("exemplar::scores", "")
                    .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const at::Tensor&)>();
  auto topk = c10::Dispatcher::singleton()
                  .findSchemaOrThrow("exemplar::topk", "")
                  .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                            const at::Tensor&, const at::Tensor&,
                                                            int64_t, bool)>();
  auto dense = scores.call(S, R, Phi, inv_norm);
  auto truth = torch::einsum("tcd,ic,id->ti", {S, R, Phi}) * inv_norm;
  auto [values, indices] = topk.call(S, R, Phi, inv_norm, k, true);
  auto want = std::get<0>(dense.topk(k, 1));
  const bool ok = torch::allclose(dense, truth, 1e-12, 1e-12) && torch::equal(values, want) &&
                  torch::equal(dense.gather(1, indices), values);
  std::cout << (ok ? "exemplar C++ smoke: ok" : "exemplar C++ smoke: MISMATCH") << std::endl;
  return ok ? 0 : 1;
}

// The one library of schemas. Each implementation registers itself beside its
// code: csrc/composite.cpp once for every device (CompositeExplicitAutograd),
// csrc/cpu/ for CPU, csrc/cuda/ for CUDA; the fake kernels for torch.compile
// (and the meta device) live in python/exemplar/ops/kernels.py, the Python
// module in csrc/python/; autograd is registered once, below.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <string>

namespace {

const char* const kSchemas[] = {
    "residuals(Tensor logits, Tensor labels) -> Tensor",
    "kfac_factors(Tensor phi, Tensor logits) -> (Tensor, Tensor)",
    "ekfac_eigenvalues(Tensor phi, Tensor logits, Tensor qa, Tensor qg) -> Tensor",
    "exact_hessian(Tensor phi, Tensor logits) -> Tensor",
    "eigenbasis_norms(Tensor r, Tensor phi, Tensor qg, Tensor qa, Tensor w) -> (Tensor, Tensor)",
    "dense_norms(Tensor r, Tensor phi, Tensor hinv) -> (Tensor, Tensor)",
    "cholesky_norms(Tensor r, Tensor phi, Tensor chol) -> (Tensor, Tensor)",
    "cholesky_quad_norms(Tensor r, Tensor phi, Tensor chol) -> Tensor",
    "scores(Tensor s, Tensor r, Tensor phi, Tensor inv_norm) -> Tensor",
    "scores_rank1(Tensor alpha, Tensor beta, Tensor r, Tensor phi, Tensor inv_norm) -> Tensor",
    "topk(Tensor s, Tensor r, Tensor phi, Tensor inv_norm, int k, bool largest) -> (Tensor, Tensor)",
    "topk_rank1(Tensor alpha, Tensor beta, Tensor r, Tensor phi, Tensor inv_norm, int k, bool largest) -> (Tensor, Tensor)",
    // The two implementations behind topk on CUDA, by name: the device-generic
    // streamed one (the default there) and the fused CUDA kernel.
    "streamed_topk(Tensor s, Tensor r, Tensor phi, Tensor inv_norm, int k, bool largest) -> (Tensor, Tensor)",
    "streamed_topk_rank1(Tensor alpha, Tensor beta, Tensor r, Tensor phi, Tensor inv_norm, int k, bool largest) -> (Tensor, Tensor)",
    "fused_topk(Tensor s, Tensor r, Tensor phi, Tensor inv_norm, int k, bool largest) -> (Tensor, Tensor)",
    "fused_topk_rank1(Tensor alpha, Tensor beta, Tensor r, Tensor phi, Tensor inv_norm, int k, bool largest) -> (Tensor, Tensor)",
    // topk with the bf16 screen (csrc/screen.h): the same answer, and how many
    // training rows each test row rescored exactly.
    "screened_topk(Tensor s, Tensor r, Tensor phi, Tensor inv_norm, int k, bool largest) -> (Tensor, Tensor, Tensor)",
    "screened_topk_rank1(Tensor alpha, Tensor beta, Tensor r, Tensor phi, Tensor inv_norm, int k, bool largest) -> (Tensor, Tensor, Tensor)",
};

}  // namespace

TORCH_LIBRARY(exemplar, m) {
  for (const char* schema : kSchemas) m.def(schema);
}

// No op has a derivative. Operands that require grad (features straight from
// a model) are fine: every op runs below autograd, and backward through an
// output raises "derivative for exemplar::<op> is not implemented".
TORCH_LIBRARY_IMPL(exemplar, Autograd, m) {
  for (const char* schema : kSchemas) {
    const std::string name(schema);
    m.impl(name.substr(0, name.find('(')).c_str(), torch::autograd::autogradNotImplementedFallback());
  }
}

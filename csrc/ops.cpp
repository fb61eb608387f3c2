// The one library of schemas. Each implementation registers itself beside its
// code: csrc/composite.cpp once for every device (CompositeExplicitAutograd),
// csrc/cpu/ for CPU, csrc/cuda/ for CUDA; the fake kernels for torch.compile
// live in python/exemplar/ops.py, the Python module in csrc/python/.
#include <torch/library.h>

TORCH_LIBRARY(exemplar, m) {
  m.def("residuals(Tensor logits, Tensor labels) -> Tensor");
  m.def("kfac_factors(Tensor phi, Tensor logits) -> (Tensor, Tensor)");
  m.def("ekfac_eigenvalues(Tensor phi, Tensor logits, Tensor qa, Tensor qg) -> Tensor");
  m.def("exact_hessian(Tensor phi, Tensor logits) -> Tensor");
  m.def("eigenbasis_norms(Tensor r, Tensor phi, Tensor qg, Tensor qa, Tensor w) -> (Tensor, Tensor)");
  m.def("dense_norms(Tensor r, Tensor phi, Tensor hinv) -> (Tensor, Tensor)");
  m.def("cholesky_norms(Tensor r, Tensor phi, Tensor chol) -> (Tensor, Tensor)");
  m.def("cholesky_quad_norms(Tensor r, Tensor phi, Tensor chol) -> Tensor");
  m.def("scores(Tensor s, Tensor r, Tensor phi, Tensor inv_norm) -> Tensor");
  m.def("scores_rank1(Tensor alpha, Tensor beta, Tensor r, Tensor phi, Tensor inv_norm) -> Tensor");
  m.def("topk(Tensor s, Tensor r, Tensor phi, Tensor inv_norm, int k, bool largest) -> (Tensor, Tensor)");
  m.def("topk_rank1(Tensor alpha, Tensor beta, Tensor r, Tensor phi, Tensor inv_norm, int k, bool largest) -> (Tensor, Tensor)");
  // The two implementations behind topk on CUDA, by name: the device-generic
  // streamed one (the default there) and the fused CUDA kernel.
  m.def("streamed_topk(Tensor s, Tensor r, Tensor phi, Tensor inv_norm, int k, bool largest) -> (Tensor, Tensor)");
  m.def("streamed_topk_rank1(Tensor alpha, Tensor beta, Tensor r, Tensor phi, Tensor inv_norm, int k, bool largest) -> (Tensor, Tensor)");
  m.def("fused_topk(Tensor s, Tensor r, Tensor phi, Tensor inv_norm, int k, bool largest) -> (Tensor, Tensor)");
  m.def("fused_topk_rank1(Tensor alpha, Tensor beta, Tensor r, Tensor phi, Tensor inv_norm, int k, bool largest) -> (Tensor, Tensor)");
  // topk with the bf16 screen (csrc/screen.h): the same answer, and how many
  // training rows each test row rescored exactly.
  m.def("screened_topk(Tensor s, Tensor r, Tensor phi, Tensor inv_norm, int k, bool largest) -> (Tensor, Tensor, Tensor)");
  m.def("screened_topk_rank1(Tensor alpha, Tensor beta, Tensor r, Tensor phi, Tensor inv_norm, int k, bool largest) -> (Tensor, Tensor, Tensor)");
}

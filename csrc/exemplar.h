// Declarations shared by the CPU and CUDA implementations, and the argument
// checks every implementation runs first, so a bad call gets the same message
// on every device.
//
// Shape letters: N train rows, T test rows, C classes, Dp = D' feature columns
// (the bias column, when there is one, is already appended by the caller).
#pragma once

#include <ATen/ATen.h>
#include <tuple>

namespace exemplar {

// ---------------------------------------------------------------- checks

#define EXEMPLAR_CHECK_DIM(op, x, d, shape)                                    \
  TORCH_CHECK((x).dim() == (d), op, ": ", #x, " must be ", shape, ", a ", d,   \
              "-d tensor, got shape ", (x).sizes())

#define EXEMPLAR_CHECK_SIZE(op, x, dim, expected, shape, what)                 \
  TORCH_CHECK((x).size(dim) == (expected), op, ": ", #x, " must be ", shape,   \
              " with ", what, "=", (expected), ", got shape ", (x).sizes())

inline void check_floating(const char* op, const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              op, ": ", name, " must be float32 or float64, got ", x.scalar_type());
}

inline void check_same(const char* op, const at::Tensor& x, const char* name,
                       const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(x.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ",
              x.scalar_type(), " but ", ref_name, " has ", ref.scalar_type());
  TORCH_CHECK(x.device() == ref.device(), op, ": ", name, " is on ", x.device(),
              " but ", ref_name, " is on ", ref.device());
}

// The factored training gradients: R (N, C), Phi (N, Dp).
inline void check_factored(const char* op, const at::Tensor& R, const at::Tensor& Phi) {
  EXEMPLAR_CHECK_DIM(op, R, 2, "(N, C)");
  EXEMPLAR_CHECK_DIM(op, Phi, 2, "(N, Dp)");
  check_floating(op, R, "R");
  check_same(op, Phi, "Phi", R, "R");
  TORCH_CHECK(R.size(0) >= 1, op, ": the training set is empty (R has N=0 rows)");
  EXEMPLAR_CHECK_SIZE(op, Phi, 0, R.size(0), "(N, Dp)", "N from R");
}

// The training-side operands of every score op: R (N, C), Phi (N, Dp), inv_norm (N,).
inline void check_train(const char* op, const at::Tensor& R, const at::Tensor& Phi,
                        const at::Tensor& inv_norm) {
  check_factored(op, R, Phi);
  EXEMPLAR_CHECK_DIM(op, inv_norm, 1, "(N,)");
  check_same(op, inv_norm, "inv_norm", R, "R");
  EXEMPLAR_CHECK_SIZE(op, inv_norm, 0, R.size(0), "(N,)", "N from R");
}

// S (T, C, Dp): the preconditioned test gradients of the general path.
inline void check_general(const char* op, const at::Tensor& S, const at::Tensor& R,
                          const at::Tensor& Phi, const at::Tensor& inv_norm) {
  check_train(op, R, Phi, inv_norm);
  EXEMPLAR_CHECK_DIM(op, S, 3, "(T, C, Dp)");
  check_same(op, S, "S", R, "R");
  EXEMPLAR_CHECK_SIZE(op, S, 1, R.size(1), "(T, C, Dp)", "C from R");
  EXEMPLAR_CHECK_SIZE(op, S, 2, Phi.size(1), "(T, C, Dp)", "Dp from Phi");
}

// alpha (T, C), beta (T, Dp): the rank-1 factors S_t = alpha_t beta_t^T.
inline void check_rank1(const char* op, const at::Tensor& alpha, const at::Tensor& beta,
                        const at::Tensor& R, const at::Tensor& Phi,
                        const at::Tensor& inv_norm) {
  check_train(op, R, Phi, inv_norm);
  EXEMPLAR_CHECK_DIM(op, alpha, 2, "(T, C)");
  EXEMPLAR_CHECK_DIM(op, beta, 2, "(T, Dp)");
  check_same(op, alpha, "alpha", R, "R");
  check_same(op, beta, "beta", R, "R");
  EXEMPLAR_CHECK_SIZE(op, alpha, 1, R.size(1), "(T, C)", "C from R");
  EXEMPLAR_CHECK_SIZE(op, beta, 1, Phi.size(1), "(T, Dp)", "Dp from Phi");
  EXEMPLAR_CHECK_SIZE(op, beta, 0, alpha.size(0), "(T, Dp)", "T from alpha");
}

inline void check_k(const char* op, int64_t k, int64_t N) {
  TORCH_CHECK(k >= 1 && k <= N, op, ": k must be in [1, N] = [1, ", N, "], got k=", k);
}

// The full argument checks of exemplar::topk and exemplar::topk_rank1, run
// first by every device's implementation.
inline void check_topk(const at::Tensor& S, const at::Tensor& R, const at::Tensor& Phi,
                       const at::Tensor& inv_norm, int64_t k) {
  check_general("exemplar::topk", S, R, Phi, inv_norm);
  check_k("exemplar::topk", k, R.size(0));
}

inline void check_topk_rank1(const at::Tensor& alpha, const at::Tensor& beta, const at::Tensor& R,
                             const at::Tensor& Phi, const at::Tensor& inv_norm, int64_t k) {
  check_rank1("exemplar::topk_rank1", alpha, beta, R, Phi, inv_norm);
  check_k("exemplar::topk_rank1", k, R.size(0));
}

// logits (N, C), labels (N,) int64.
inline void check_logits_labels(const char* op, const at::Tensor& logits,
                                const at::Tensor& labels) {
  EXEMPLAR_CHECK_DIM(op, logits, 2, "(N, C)");
  EXEMPLAR_CHECK_DIM(op, labels, 1, "(N,)");
  check_floating(op, logits, "logits");
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ",
              labels.scalar_type());
  TORCH_CHECK(labels.device() == logits.device(), op, ": labels is on ", labels.device(),
              " but logits is on ", logits.device());
  EXEMPLAR_CHECK_SIZE(op, labels, 0, logits.size(0), "(N,)", "N from logits");
}

// labels (N,) int64 in [0, C), on any device. On CUDA this costs one host sync,
// which buys a catchable error where a device assert would kill the context.
inline void check_labels_in_range(const char* op, const at::Tensor& labels, int64_t C) {
  if (labels.numel() == 0) return;
  auto bad = at::logical_or(labels < 0, labels >= C);
  if (!bad.any().item<bool>()) return;
  const int64_t i = bad.nonzero()[0][0].item<int64_t>();
  TORCH_CHECK(false, op, ": labels must be in [0, C) = [0, ", C, "), got labels[", i, "]=",
              labels[i].item<int64_t>());
}

// Phi (N, Dp), logits (N, C): the inputs of every curvature statistic.
inline void check_phi_logits(const char* op, const at::Tensor& Phi, const at::Tensor& logits) {
  EXEMPLAR_CHECK_DIM(op, Phi, 2, "(N, Dp)");
  EXEMPLAR_CHECK_DIM(op, logits, 2, "(N, C)");
  check_floating(op, Phi, "Phi");
  check_same(op, logits, "logits", Phi, "Phi");
  TORCH_CHECK(Phi.size(0) >= 1, op, ": the training set is empty (Phi has N=0 rows)");
  EXEMPLAR_CHECK_SIZE(op, logits, 0, Phi.size(0), "(N, C)", "N from Phi");
}

// ---------------------------------------------------------------- tiling

// Rows of the training set scored per step. The general path holds a
// (rows, C*Dp) gradient tile, so rows shrink as C*Dp grows; a fixed size for a
// given shape keeps the dense and top-k paths bit-identical.
inline int64_t train_tile_rows(int64_t C, int64_t Dp, bool rank1) {
  const int64_t budget = int64_t(1) << 20;  // elements in the gradient tile: stays cache-sized
  const int64_t width = rank1 ? (C + Dp) : (C * Dp);
  return std::max<int64_t>(256, std::min<int64_t>(4096, budget / std::max<int64_t>(width, 1)));
}
constexpr int64_t kTestBlockRows = 1024;

// ---------------------------------------------------------------- ops
// Device-generic (ATen compositions, registered for CPU and CUDA):

// Phi (N, Dp), logits (N, C) -> A (Dp, Dp) = Phi^T Phi / N, G (C, C) = mean of diag(p) - p p^T
std::tuple<at::Tensor, at::Tensor> kfac_factors(const at::Tensor& Phi, const at::Tensor& logits);
// Phi (N, Dp), logits (N, C), QA (Dp, Dp), QG (C, C) -> Lambda* (C, Dp)
at::Tensor ekfac_eigenvalues(const at::Tensor& Phi, const at::Tensor& logits,
                             const at::Tensor& QA, const at::Tensor& QG);
// Phi (N, Dp), logits (N, C) -> H (C*Dp, C*Dp), row-major flattening c*Dp + d
at::Tensor exact_hessian(const at::Tensor& Phi, const at::Tensor& logits);
// R (N, C), Phi (N, Dp), QG (C, C), QA (Dp, Dp), w (C, Dp)
//   -> (sum r'^2 phi'^2 w^2, sum r'^2 phi'^2 w), each (N,)
std::tuple<at::Tensor, at::Tensor> eigenbasis_norms(const at::Tensor& R, const at::Tensor& Phi,
                                                    const at::Tensor& QG, const at::Tensor& QA,
                                                    const at::Tensor& w);
// R (N, C), Phi (N, Dp), Hinv (C*Dp, C*Dp) -> (|Hinv g|^2, g^T Hinv g), each (N,)
std::tuple<at::Tensor, at::Tensor> dense_norms(const at::Tensor& R, const at::Tensor& Phi,
                                               const at::Tensor& Hinv);
// S (T, C, Dp), R (N, C), Phi (N, Dp), inv_norm (N,) -> (T, N)
at::Tensor scores(const at::Tensor& S, const at::Tensor& R, const at::Tensor& Phi,
                  const at::Tensor& inv_norm);
// alpha (T, C), beta (T, Dp), R (N, C), Phi (N, Dp), inv_norm (N,) -> (T, N)
at::Tensor scores_rank1(const at::Tensor& alpha, const at::Tensor& beta, const at::Tensor& R,
                        const at::Tensor& Phi, const at::Tensor& inv_norm);

// Device-specific (csrc/cpu, csrc/cuda):
// logits (N, C), labels (N,) -> R = softmax(logits) - onehot(labels), (N, C)
at::Tensor residuals_cpu(const at::Tensor& logits, const at::Tensor& labels);
std::tuple<at::Tensor, at::Tensor> topk_cpu(const at::Tensor& S, const at::Tensor& R,
                                            const at::Tensor& Phi, const at::Tensor& inv_norm,
                                            int64_t k, bool largest);
std::tuple<at::Tensor, at::Tensor> topk_rank1_cpu(const at::Tensor& alpha, const at::Tensor& beta,
                                                  const at::Tensor& R, const at::Tensor& Phi,
                                                  const at::Tensor& inv_norm, int64_t k,
                                                  bool largest);

}  // namespace exemplar

#ifdef EXEMPLAR_WITH_CUDA
namespace exemplar {
at::Tensor residuals_cuda(const at::Tensor& logits, const at::Tensor& labels);
std::tuple<at::Tensor, at::Tensor> topk_cuda(const at::Tensor& S, const at::Tensor& R,
                                             const at::Tensor& Phi, const at::Tensor& inv_norm,
                                             int64_t k, bool largest);
std::tuple<at::Tensor, at::Tensor> topk_rank1_cuda(const at::Tensor& alpha, const at::Tensor& beta,
                                                   const at::Tensor& R, const at::Tensor& Phi,
                                                   const at::Tensor& inv_norm, int64_t k,
                                                   bool largest);
}  // namespace exemplar
#endif

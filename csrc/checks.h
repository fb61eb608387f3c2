// The argument checks every implementation of an op runs first, so a bad call
// gets the same message on every device (and from C++, where no Python layer
// checks anything).
//
// Shape letters: N train rows, T test rows, C classes, Dp = D' feature columns
// (the bias column, when there is one, is already appended by the caller).
#pragma once

#include <ATen/ATen.h>

namespace exemplar {

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

// Two per-example matrices of one non-empty training set: first (N, .), second (N, .),
// floating point, same dtype and device.
inline void check_rows(const char* op, const at::Tensor& first, const char* first_name,
                       const char* first_shape, const at::Tensor& second,
                       const char* second_name, const char* second_shape) {
  TORCH_CHECK(first.dim() == 2, op, ": ", first_name, " must be ", first_shape,
              ", a 2-d tensor, got shape ", first.sizes());
  TORCH_CHECK(second.dim() == 2, op, ": ", second_name, " must be ", second_shape,
              ", a 2-d tensor, got shape ", second.sizes());
  check_floating(op, first, first_name);
  check_same(op, second, second_name, first, first_name);
  TORCH_CHECK(first.size(0) >= 1, op, ": the training set is empty (", first_name,
              " has N=0 rows)");
  TORCH_CHECK(second.size(0) == first.size(0), op, ": ", second_name, " must be ", second_shape,
              " with N from ", first_name, "=", first.size(0), ", got shape ", second.sizes());
}

// The factored training gradients: R (N, C), Phi (N, Dp).
inline void check_factored(const char* op, const at::Tensor& R, const at::Tensor& Phi) {
  check_rows(op, R, "R", "(N, C)", Phi, "Phi", "(N, Dp)");
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

// alpha (T, C), beta (T, Dp): the rank-1 factors S_t = alpha_t beta_t^T; or
// alpha (T, m, C), beta (T, m, Dp): rank m, S_t = sum_j alpha_tj beta_tj^T.
inline void check_rank1(const char* op, const at::Tensor& alpha, const at::Tensor& beta,
                        const at::Tensor& R, const at::Tensor& Phi,
                        const at::Tensor& inv_norm) {
  check_train(op, R, Phi, inv_norm);
  TORCH_CHECK(alpha.dim() == 2 || alpha.dim() == 3, op, ": alpha must be (T, C) or (T, m, C), got shape ",
              alpha.sizes());
  const bool rank_m = alpha.dim() == 3;
  const char* alpha_shape = rank_m ? "(T, m, C)" : "(T, C)";
  const char* beta_shape = rank_m ? "(T, m, Dp)" : "(T, Dp)";
  EXEMPLAR_CHECK_DIM(op, beta, alpha.dim(), beta_shape);
  check_same(op, alpha, "alpha", R, "R");
  check_same(op, beta, "beta", R, "R");
  EXEMPLAR_CHECK_SIZE(op, alpha, alpha.dim() - 1, R.size(1), alpha_shape, "C from R");
  EXEMPLAR_CHECK_SIZE(op, beta, beta.dim() - 1, Phi.size(1), beta_shape, "Dp from Phi");
  EXEMPLAR_CHECK_SIZE(op, beta, 0, alpha.size(0), beta_shape, "T from alpha");
  if (rank_m) {
    EXEMPLAR_CHECK_SIZE(op, beta, 1, alpha.size(1), beta_shape, "m from alpha");
    TORCH_CHECK(alpha.size(1) >= 1, op, ": alpha must have rank m >= 1, got shape ", alpha.sizes());
  }
}

inline void check_k(const char* op, int64_t k, int64_t N) {
  TORCH_CHECK_VALUE(k >= 1 && k <= N, op, ": k must be an integer in [1, N] = [1, ", N,
                    "], got ", k);
}

// The full argument checks of exemplar::topk and exemplar::topk_rank1, run
// first by every device's implementation.
inline void check_topk(const at::Tensor& S, const at::Tensor& R, const at::Tensor& Phi,
                       const at::Tensor& inv_norm, int64_t k, const char* op = "exemplar::topk") {
  check_general(op, S, R, Phi, inv_norm);
  check_k(op, k, R.size(0));
}

inline void check_topk_rank1(const at::Tensor& alpha, const at::Tensor& beta, const at::Tensor& R,
                             const at::Tensor& Phi, const at::Tensor& inv_norm, int64_t k,
                             const char* op = "exemplar::topk_rank1") {
  check_rank1(op, alpha, beta, R, Phi, inv_norm);
  check_k(op, k, R.size(0));
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
  check_rows(op, Phi, "Phi", "(N, Dp)", logits, "logits", "(N, C)");
}

// x (n, n): a square factor or inverse on Phi's device.
inline void check_square(const char* op, const at::Tensor& x, const char* name, int64_t n,
                         const char* what, const at::Tensor& ref) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) == n && x.size(1) == n, op, ": ", name,
              " must be (", what, ", ", what, ") = (", n, ", ", n, "), got shape ", x.sizes());
  check_floating(op, x, name);
  TORCH_CHECK(x.device() == ref.device(), op, ": ", name, " is on ", x.device(),
              " but Phi is on ", ref.device());
}

}  // namespace exemplar

// Device-generic ops: ATen compositions (GEMMs dominate, the BLAS or cuBLAS
// does them), tiled over N so no N-sized temporary beyond the outputs.
// Registered once, for every device, as CompositeExplicitAutograd; each holds
// a device guard for its inputs' device, so on a second GPU the ATen calls
// and the cuBLAS handle they pick are that GPU's.
#include <ATen/DeviceGuard.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "order.h"
#include "tiles.h"

namespace exemplar {
namespace {

// x (n, m) -> |x_i|^2 (n,), squared and summed in float64 without a float64
// copy of x: |H^-1 g| ~ 1/|phi| leaves float32's range for features past ~1e19.
at::Tensor squared_norms(const at::Tensor& x) {
  return at::linalg_vector_norm(x, 2, {1}, /*keepdim=*/false, at::kDouble).square_();
}

// rows (n, C), cols (n, Dp) -> per-example gradients (n, C*Dp), row-major c*Dp + d.
at::Tensor outer_rows(const at::Tensor& rows, const at::Tensor& cols) {
  return (rows.unsqueeze(2) * cols.unsqueeze(1)).reshape({rows.size(0), -1});
}

// x (n, m), Q (m, m) -> (x Q)^2 in float64, (n, m). The rotation runs in x's
// dtype on rows scaled by a power of two (exact), so |x Q| stays near 1; the
// squares and everything after are float64, because w ~ 1/|phi|^2 and the
// squares of features beyond ~1e9 leave float32's range.
at::Tensor rotated_squares(const at::Tensor& x, const at::Tensor& Q) {
  auto peak = x.abs().amax(1, /*keepdim=*/true);
  auto scale = at::where(peak > 0, at::exp2(at::floor(at::log2(peak))), at::ones_like(peak));
  return at::mm(x / scale, Q).to(at::kDouble).mul_(scale.to(at::kDouble)).square_();
}

}  // namespace

// The curvature statistics accumulate in float64 whatever the input dtype:
// they are inverted afterwards, and float32 sums over millions of rows would
// dominate the error of every score.
std::tuple<at::Tensor, at::Tensor> kfac_factors(const at::Tensor& Phi, const at::Tensor& logits) {
  check_phi_logits("exemplar::kfac_factors", Phi, logits);
  const at::OptionalDeviceGuard guard(at::device_of(Phi));
  const int64_t N = Phi.size(0), C = logits.size(1), Dp = Phi.size(1);
  auto f64 = Phi.options().dtype(at::kDouble);
  auto A = at::zeros({Dp, Dp}, f64);
  auto G = at::zeros({C, C}, f64);
  auto p_sum = at::zeros({C}, f64);
  const int64_t rows = rows_per_tile(Dp + C);
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t n = std::min(rows, N - n0);
    auto phi = Phi.narrow(0, n0, n).to(at::kDouble);
    auto P = at::softmax(logits.narrow(0, n0, n).to(at::kDouble), 1);
    A.addmm_(phi.t(), phi);
    G.addmm_(P.t(), P, /*beta=*/1, /*alpha=*/-1);
    p_sum.add_(P.sum(0));
  }
  G.add_(at::diag(p_sum));
  return {A.div_(static_cast<double>(N)), G.div_(static_cast<double>(N))};
}

at::Tensor ekfac_eigenvalues(const at::Tensor& Phi, const at::Tensor& logits,
                             const at::Tensor& QA_, const at::Tensor& QG_) {
  const char* op = "exemplar::ekfac_eigenvalues";
  check_phi_logits(op, Phi, logits);
  const int64_t N = Phi.size(0), C = logits.size(1), Dp = Phi.size(1);
  check_square(op, QA_, "QA", Dp, "Dp", Phi);
  check_square(op, QG_, "QG", C, "C", Phi);
  const at::OptionalDeviceGuard guard(at::device_of(Phi));
  auto QA = QA_.to(at::kDouble);
  auto QG = QG_.to(at::kDouble);
  auto QG2 = QG * QG;
  auto lam = at::zeros({C, Dp}, QA.options());
  const int64_t rows = rows_per_tile(Dp + C);
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t n = std::min(rows, N - n0);
    auto P = at::softmax(logits.narrow(0, n0, n).to(at::kDouble), 1);
    // (Q_G^T Lambda_i Q_G)_cc = sum_j Q_jc^2 p_ij - (sum_j Q_jc p_ij)^2
    auto M = at::mm(P, QG2).sub_(at::mm(P, QG).square_());
    auto phi_rot = at::mm(Phi.narrow(0, n0, n).to(at::kDouble), QA).square_();
    lam.addmm_(M.t(), phi_rot);
  }
  return lam.div_(static_cast<double>(N));
}

// H = (1/N) sum_i Lambda_i (x) phi_i phi_i^T has C x C blocks
// H_cc' = -(1/N) Phi^T diag(p_c p_c') Phi for c != c', each a symmetric Gram
// matrix, and since every row of Lambda_i sums to 0, H_cc = -sum_{c' != c} H_cc'.
// So only the C(C-1)/2 blocks above the diagonal take GEMMs (one per row of
// blocks per tile, in Phi's dtype); the diagonal blocks are sums of
// same-signed terms, exact for confident fits where p (1 - p) would cancel.
// float32 data sums in float32 over at most kMaxTileRows rows (what one GEMM
// of that depth does) and in float64 across them.
at::Tensor exact_hessian(const at::Tensor& Phi, const at::Tensor& logits) {
  check_phi_logits("exemplar::exact_hessian", Phi, logits);
  const at::OptionalDeviceGuard guard(at::device_of(Phi));
  const int64_t N = Phi.size(0), C = logits.size(1), Dp = Phi.size(1), n = C * Dp;
  auto H = at::zeros({n, n}, Phi.options().dtype(at::kDouble));
  auto block = [&](const at::Tensor& M, int64_t c, int64_t c2, int64_t count = 1) {
    return M.narrow(0, c * Dp, Dp).narrow(1, c2 * Dp, count * Dp);
  };
  if (C > 1) {
    const bool narrow_sums = Phi.scalar_type() != at::kDouble;
    auto sums = narrow_sums ? at::zeros({n, n}, Phi.options()) : H;
    const int64_t rows = rows_per_tile(n);
    int64_t pending = 0;
    for (int64_t n0 = 0; n0 < N; n0 += rows) {
      const int64_t m = std::min(rows, N - n0);
      auto P = at::softmax(logits.narrow(0, n0, m).to(at::kDouble), 1).to(Phi.scalar_type());
      auto X = outer_rows(P, Phi.narrow(0, n0, m));  // p_c phi, (m, C*Dp)
      for (int64_t c = 0; c + 1 < C; ++c) {         // blocks (c, c+1..C-1) -= (p_c phi)^T (p_c' phi)
        block(sums, c, c + 1, C - c - 1)
            .addmm_(X.narrow(1, c * Dp, Dp).t(), X.narrow(1, (c + 1) * Dp, (C - c - 1) * Dp),
                    /*beta=*/1, /*alpha=*/-1);
      }
      pending += m;
      if (narrow_sums && (pending + rows > kMaxTileRows || n0 + m == N)) {
        for (int64_t c = 0; c + 1 < C; ++c) block(H, c, c + 1, C - c - 1).add_(block(sums, c, c + 1, C - c - 1));
        sums.zero_();
        pending = 0;
      }
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    auto diagonal = block(H, c, c);
    for (int64_t c2 = 0; c2 < C; ++c2) {
      if (c2 != c) diagonal.sub_(block(H, std::min(c, c2), std::max(c, c2)));
    }
  }
  for (int64_t c = 1; c < C; ++c) {  // lower blocks = upper blocks transposed
    block(H, c, 0, c).copy_(H.narrow(0, 0, c * Dp).narrow(1, c * Dp, Dp).t());
  }
  return H.div_(static_cast<double>(N));
}

std::tuple<at::Tensor, at::Tensor> eigenbasis_norms(const at::Tensor& R_, const at::Tensor& Phi_,
                                                    const at::Tensor& QG_, const at::Tensor& QA_,
                                                    const at::Tensor& w) {
  const char* op = "exemplar::eigenbasis_norms";
  check_factored(op, R_, Phi_);
  const int64_t N = R_.size(0), C = R_.size(1), Dp = Phi_.size(1);
  check_square(op, QG_, "QG", C, "C", Phi_);
  check_square(op, QA_, "QA", Dp, "Dp", Phi_);
  TORCH_CHECK(w.dim() == 2 && w.size(0) == C && w.size(1) == Dp, op,
              ": w must be (C, Dp) = (", C, ", ", Dp, "), got shape ", w.sizes());
  check_floating(op, w, "w");
  TORCH_CHECK(w.device() == Phi_.device(), op, ": w is on ", w.device(), " but Phi is on ",
              Phi_.device());
  const at::OptionalDeviceGuard guard(at::device_of(Phi_));
  auto R = R_.contiguous();
  auto Phi = Phi_.contiguous();
  auto dtype = R.scalar_type();
  auto QG = QG_.to(dtype);
  auto QA = QA_.to(dtype);
  auto w64 = w.to(at::kDouble);
  auto weights = at::cat({w64 * w64, w64}, 1);  // (C, 2 Dp)
  auto sq_norm = at::empty({N}, R.options());
  auto quad = at::empty({N}, R.options());
  const int64_t rows = rows_per_tile(3 * Dp);
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t n = std::min(rows, N - n0);
    auto r_rot = rotated_squares(R.narrow(0, n0, n), QG);
    auto phi_rot = rotated_squares(Phi.narrow(0, n0, n), QA);
    auto both = at::mm(r_rot, weights);
    sq_norm.narrow(0, n0, n).copy_((both.narrow(1, 0, Dp) * phi_rot).sum(1));
    quad.narrow(0, n0, n).copy_((both.narrow(1, Dp, Dp) * phi_rot).sum(1));
  }
  return {sq_norm, quad};
}

namespace {
// The loop every per-example norm op shares: per tile of per-example gradients
// g (rows, C*Dp), tile(g) gives that tile's (|.|^2 or undefined, quadratic form).
template <typename TileNorms>
std::tuple<at::Tensor, at::Tensor> gradient_norms(const at::Tensor& R_, const at::Tensor& Phi_,
                                                  bool squares, TileNorms tile) {
  auto R = R_.contiguous();
  auto Phi = Phi_.contiguous();
  const int64_t N = R.size(0);
  auto quad = at::empty({N}, R.options());
  auto sq_norm = squares ? at::empty({N}, R.options()) : at::Tensor();
  const int64_t rows = rows_per_tile(2 * R.size(1) * Phi.size(1));
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t n = std::min(rows, N - n0);
    auto [sq, q] = tile(outer_rows(R.narrow(0, n0, n), Phi.narrow(0, n0, n)));
    quad.narrow(0, n0, n).copy_(q);
    if (squares) sq_norm.narrow(0, n0, n).copy_(sq);
  }
  return {sq_norm, quad};
}

// Per tile: z = L^-1 g, so g^T H^-1 g = |z|^2, and with `squares` y = L^-T z =
// H^-1 g, so |H^-1 g|^2 = |y|^2. Two triangular solves cost what one GEMM
// against an explicit inverse does, and the inverse itself is never formed.
std::tuple<at::Tensor, at::Tensor> triangular_norms(const char* op, const at::Tensor& R,
                                                    const at::Tensor& Phi, const at::Tensor& L_,
                                                    bool squares) {
  check_factored(op, R, Phi);
  check_square(op, L_, "chol", R.size(1) * Phi.size(1), "C*Dp", Phi);
  const at::OptionalDeviceGuard guard(at::device_of(Phi));
  auto L = L_.to(R.scalar_type()).contiguous();
  auto Lt = L.t().contiguous();
  return gradient_norms(R, Phi, squares, [&](const at::Tensor& g) {
    auto z = at::linalg_solve_triangular(Lt, g, /*upper=*/true, /*left=*/false);  // rows g^T L^-T
    auto y = squares ? at::linalg_solve_triangular(L, z, /*upper=*/false, /*left=*/false)  // rows z^T L^-1
                     : at::Tensor();
    return std::make_tuple(squares ? squared_norms(y) : at::Tensor(), squared_norms(z));
  });
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> dense_norms(const at::Tensor& R, const at::Tensor& Phi,
                                               const at::Tensor& Hinv_) {
  const char* op = "exemplar::dense_norms";
  check_factored(op, R, Phi);
  check_square(op, Hinv_, "Hinv", R.size(1) * Phi.size(1), "C*Dp", Phi);
  const at::OptionalDeviceGuard guard(at::device_of(Phi));
  auto Hinv = Hinv_.to(R.scalar_type());
  return gradient_norms(R, Phi, /*squares=*/true, [&](const at::Tensor& g) {
    auto y = at::mm(g, Hinv);
    return std::make_tuple(squared_norms(y), at::sum(y * g, 1, /*keepdim=*/false, at::kDouble));
  });
}

std::tuple<at::Tensor, at::Tensor> cholesky_norms(const at::Tensor& R, const at::Tensor& Phi,
                                                  const at::Tensor& L) {
  return triangular_norms("exemplar::cholesky_norms", R, Phi, L, /*squares=*/true);
}

at::Tensor cholesky_quad_norms(const at::Tensor& R, const at::Tensor& Phi, const at::Tensor& L) {
  return std::get<1>(triangular_norms("exemplar::cholesky_quad_norms", R, Phi, L, /*squares=*/false));
}

namespace {
// The device-generic top-k (the default on CUDA): each (test block x train
// tile) of scores is merged with the block's running best by order.h's
// rank_order_first. The running best holds only smaller training indices, in
// RankOrder, and each tile is in index order, so ties stay by ascending index.
std::tuple<at::Tensor, at::Tensor> merged_topk(TileScorer& scorer, const at::Tensor& R, int64_t k,
                                               bool largest) {
  const int64_t T = scorer.tests(), N = R.size(0);
  const int64_t blocks = (T + kTestBlockRows - 1) / kTestBlockRows;
  std::vector<at::Tensor> best_values(blocks), best_indices(blocks);
  stream_tiles(scorer, N, R.options(),
               [&](int64_t t0, int64_t tb, int64_t n0, int64_t nt, const at::Tensor& tile) {
                 const int64_t b = t0 / kTestBlockRows;
                 auto ids = at::arange(n0, n0 + nt, R.options().dtype(at::kLong)).expand({tb, nt});
                 auto v = best_values[b].defined() ? at::cat({best_values[b], tile}, 1) : tile.clone();
                 auto i = best_indices[b].defined() ? at::cat({best_indices[b], ids}, 1) : ids.contiguous();
                 auto order = rank_order_first(v, k, largest);
                 best_values[b] = v.gather(1, order);
                 best_indices[b] = i.gather(1, order);
               });
  auto values = at::empty({T, k}, R.options());
  auto indices = at::empty({T, k}, R.options().dtype(at::kLong));
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t t0 = b * kTestBlockRows, tb = std::min(kTestBlockRows, T - t0);
    values.narrow(0, t0, tb).copy_(best_values[b]);
    indices.narrow(0, t0, tb).copy_(best_indices[b]);
  }
  return {values, indices};
}
}  // namespace

namespace {
at::Tensor dense_from(TileScorer& scorer, const at::Tensor& R) {
  auto out = at::empty({scorer.tests(), R.size(0)}, R.options());
  stream_tiles(scorer, R.size(0), R.options(),
               [&](int64_t t0, int64_t tb, int64_t n0, int64_t nt, const at::Tensor& tile) {
                 out.narrow(0, t0, tb).narrow(1, n0, nt).copy_(tile);
               });
  return out;
}
}  // namespace

at::Tensor scores(const at::Tensor& S, const at::Tensor& R, const at::Tensor& Phi,
                  const at::Tensor& inv_norm) {
  check_general("exemplar::scores", S, R, Phi, inv_norm);
  const at::OptionalDeviceGuard guard(at::device_of(R));
  return with_general_scorer(S, R, Phi, inv_norm, [&](TileScorer& scorer) { return dense_from(scorer, R); });
}

at::Tensor scores_rank1(const at::Tensor& alpha, const at::Tensor& beta, const at::Tensor& R,
                        const at::Tensor& Phi, const at::Tensor& inv_norm) {
  check_rank1("exemplar::scores_rank1", alpha, beta, R, Phi, inv_norm);
  const at::OptionalDeviceGuard guard(at::device_of(R));
  LowRankScorer scorer(alpha, beta, R, Phi, inv_norm);
  return dense_from(scorer, R);
}

TORCH_LIBRARY_IMPL(exemplar, CompositeExplicitAutograd, m) {
  m.impl("kfac_factors", &kfac_factors);
  m.impl("ekfac_eigenvalues", &ekfac_eigenvalues);
  m.impl("exact_hessian", &exact_hessian);
  m.impl("eigenbasis_norms", &eigenbasis_norms);
  m.impl("dense_norms", &dense_norms);
  m.impl("cholesky_norms", &cholesky_norms);
  m.impl("cholesky_quad_norms", &cholesky_quad_norms);
  m.impl("scores", &scores);
  // The streamed top-k serves every device but the CPU, which has its own
  // kernel (csrc/cpu/topk.cpp); by its own name it runs anywhere.
  m.impl("topk", &general_topk<merged_topk>);
  m.impl("topk_rank1", &rank1_topk<merged_topk>);
  m.impl("streamed_topk", &general_topk<merged_topk>);
  m.impl("streamed_topk_rank1", &rank1_topk<merged_topk>);
  m.impl("scores_rank1", &scores_rank1);
}

}  // namespace exemplar

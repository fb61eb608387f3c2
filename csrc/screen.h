// The bf16 screen of exemplar::screened_topk (docs/design.md §8): per tile of
// training rows, every score is computed from operands rounded to bfloat16
// (AMX / AVX512-BF16 through oneDNN on the CPU, tensor cores through cuBLAS),
// with a rigorous per-pair error bound assembled from per-row norms; a
// device's consumer (csrc/cpu/screen.cpp, csrc/cuda/screen.cu) keeps each test
// row's k best lower bounds and the training rows whose upper bound reaches
// them; the survivors are rescored exactly (float64) here and ranked in
// RankOrder. Every operand is scaled per row by a power of two (exact) so its
// largest entry lies in [1/2, 1): the reduced format can then neither
// overflow nor lose a row to underflow, whatever the input's exponent range,
// and what does underflow (entries 2^126 below their row's largest) is an
// absolute error the bound carries. Scores are compared within a test row, so
// the test rows' scales drop out; the training rows' scales are kept as
// float64 factors relative to the largest.
#pragma once

#include <ATen/ATen.h>
#include <ATen/DeviceGuard.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

#include "checks.h"
#include "order.h"
#include "tiles.h"

namespace exemplar {

// ------------------------------------------------------------ the per-pair bound
// Shared by the CPU loop and the CUDA kernel. All quantities are in the
// scaled units (every operand's largest entry < 1); s and b come back times
// the training row's scale.

// The error of one bf16 dot product of depth K whose operands' entries are at
// most 1 in magnitude: |computed - exact| <= eps(K) * sum_k |x_k||y_k| + floor(K).
// Inputs reach bf16 from float64 or float32 through at most two float32
// roundings (u_in); products of bf16 are exact in float32; the float32
// accumulation may truncate (2 * 2^-24 per add, gamma_K); the GEMM's result is
// rounded once more to bf16. Underflow (flush to zero anywhere) costs at most
// 2^-126 per input, product and partial sum: the floor.
struct DotError {
  double eps, floor;
  static DotError of_depth(int64_t K) {
    const double u_in = 0x1p-8 + 0x1p-21, u_acc = 0x1p-23, u_out = 0x1p-8;
    const double gamma = K * u_acc / (1 - K * u_acc);
    const double inner = (2 * u_in + u_in * u_in) + gamma * (1 + u_in) * (1 + u_in);
    return {inner + u_out * (1 + inner), (4.0 * K + 8) * 0x1p-126};
  }
};

// Slack for everything computed in float64 afterwards (the pair's own
// arithmetic and the exact rescoring it is compared with) and for the float32
// norms the bound is built from: relative to the bound's magnitude scale.
constexpr double kSlack = 0x1p-17;

// General path: s = sc * scale, b = (eps * w + floor) * scale with
// w >= sum_cd |S'_tcd| |g'_icd| from the norm GEMM.
struct GeneralPair {
  double eps, floor;  // eps includes the norm GEMM's own rounding of w
  EXEMPLAR_HOST_DEVICE void operator()(float sc, float w, double scale, double& s, double& b) const {
    s = static_cast<double>(sc) * scale;
    b = (eps * static_cast<double>(w) + floor) * scale;
  }
};

// Low-rank path (m terms): a_j ~ alpha'_tj . R'_i, c_j ~ beta'_tj . Phi'_i
// from the two bf16 GEMMs; an_j, bn_j the test norms, rn, pn the training
// row's norms (Cauchy-Schwarz bounds the dot products' sums of |x||y|).
// |a~ c~ - a c| <= e_a |c~| + (|a~| + e_a) e_c per term; a pair's terms are
// summed into a Partial, then finished.
struct LowRankPair {
  DotError left, right;
  double rescore;  // the exact rescoring's relative error
  struct Partial {
    double sum = 0, err = 0, size = 0;
  };
  EXEMPLAR_HOST_DEVICE void term(float a, float c, float an, float bn, float rn, float pn, Partial& p) const {
    const double ea = left.eps * an * rn + left.floor;
    const double ec = right.eps * bn * pn + right.floor;
    const double aa = a < 0 ? -a : a, cc = c < 0 ? -c : c;
    p.sum += static_cast<double>(a) * c;
    p.err += ea * cc + (aa + ea) * ec;
    p.size += (aa + ea) * (cc + ec);
  }
  EXEMPLAR_HOST_DEVICE void finish(const Partial& p, double scale, double& s, double& b) const {
    s = p.sum * scale;
    b = (p.err + (kSlack + rescore) * p.size + 0x1p-126) * scale;
  }
};

// Norms the bound is built from, computed in float32 from rows scaled below
// 1: padded for their rounding (depth n) and for squares lost to underflow.
inline at::Tensor padded_norms(const at::Tensor& x, int64_t dim) {
  const int64_t n = x.size(dim);
  return at::linalg_vector_norm(x.to(at::kFloat), 2, {dim}, false) * (1 + (n + 2) * 0x1p-23) + 0x1p-50;
}

// ------------------------------------------------------------ scaling

// Per row of x (n, ...), an exponent e_i (float64) with every |x_ij| < 2^(e_i - 1),
// from the row's 2-norm (one fast reduction in x's dtype), where that norm
// overflowed, underflowed or met NaN or inf, from the largest |entry| times
// sqrt(width); NaN where the row holds NaN or inf. A zero row gets 0.
inline at::Tensor row_exponents(const at::Tensor& x) {
  auto flat = x.reshape({x.size(0), -1});
  auto norm = at::linalg_vector_norm(flat, 2, {1}, false).to(at::kDouble);
  auto extreme = (norm >= 0x1p-60).logical_and_(norm <= 0x1p60).logical_not_();
  if (extreme.any().item<bool>()) {
    auto rows = extreme.nonzero().squeeze(1);
    auto peak = flat.index_select(0, rows).abs().amax(1).to(at::kDouble);
    norm.index_put_({rows}, peak * std::sqrt(static_cast<double>(flat.size(1))));
  }
  auto e = std::get<1>(at::frexp(norm)).to(at::kDouble) + 1;
  return at::where(at::isfinite(norm), e, at::full_like(e, std::nan("")));
}

// x * 2^e without forming 2^e, which leaves float64 where x * 2^e does not.
inline at::Tensor ldexp_safe(const at::Tensor& x, const at::Tensor& e) {
  auto half = at::floor(e / 2);
  return at::ldexp(at::ldexp(x, half), e - half);
}

// Whether every factor mantissa * 2^shift (mantissa in [1/4, 1]) is a normal
// number of x's dtype, so scaled_rows can take one multiply.
inline bool one_multiply(const at::Tensor& x, const at::Tensor& shift) {
  const double range = x.scalar_type() == at::kFloat ? 120 : 1000;
  return (shift.abs() <= range).all().item<bool>();
}

// x (n, ...) times mantissa_i * 2^shift_i per row (float64 (n,) each), stored
// as `dtype` (the products are below 1 in magnitude): one multiply by the
// factor where it is a normal number of x's dtype (an exact scaling), else
// two, each by a representable factor.
inline at::Tensor scaled_rows(const at::Tensor& x, const at::Tensor& mantissa, const at::Tensor& shift,
                              at::ScalarType dtype, bool single) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[0] = x.size(0);
  auto out = at::empty(x.sizes(), x.options().dtype(dtype));
  if (single) {
    return at::mul_out(out, x, ldexp_safe(mantissa, shift).to(x.scalar_type()).view(shape));
  }
  auto half = at::floor(shift / 2);
  auto first = x * at::ldexp(at::ones_like(half), half).to(at::kDouble).view(shape);
  return at::mul_out(out, first, at::ldexp(mantissa, shift - half).view(shape));
}

// The screen's operands, scaled and rounded. The general path: S (T, C, Dp)
// against the per-example gradient tile g'_i = R'_i (x) Phi'_i (one GEMM with
// K = C * Dp); the low-rank path: alpha (T, m, C), beta (T, m, Dp).
class Bf16Screen {
 public:
  // Whether the bound holds for these operands: all finite, and the training
  // rows' scales within what float64 holds (float32 inputs always are).
  // Computes the training rows' scale factors on the way.
  Bf16Screen(const at::Tensor& alpha, const at::Tensor& beta, const at::Tensor& R, const at::Tensor& Phi,
             const at::Tensor& inv_norm)
      : general_(!alpha.defined()), R_(R), Phi_(Phi), inv_norm_(inv_norm),
        T_(beta.size(0)), m_(general_ ? 1 : alpha.size(1)), C_(R.size(1)), Dp_(Phi.size(1)) {
    auto r_exp = row_exponents(R), p_exp = row_exponents(Phi), i_exp = row_exponents(inv_norm.unsqueeze(1));
    auto b_exp = row_exponents(beta);
    auto a_exp = general_ ? at::zeros({1}, b_exp.options()) : row_exponents(alpha);
    auto total = r_exp + p_exp + i_exp;
    if (!at::isfinite(at::cat({total, a_exp, b_exp})).all().item<bool>()) return;
    const double top = total.max().item<double>(), bottom = total.min().item<double>();
    if (top - bottom > 900) return;
    applies_ = true;
    // R'_i = R_i 2^-r_i, Phi'_i = Phi_i (inv_i 2^-i_i) 2^-p_i, and score_i / score'_i <= 1
    r_shift_ = -r_exp;
    p_shift_ = -p_exp;
    p_mantissa_ = at::ldexp(inv_norm.to(at::kDouble), -i_exp);
    scale_all_ = at::ldexp(at::ones_like(total), total - top);
    train_single_ = one_multiply(R, r_shift_) && one_multiply(Phi, p_shift_);
    const DotError rescore = {rescore_roundoff(R.scalar_type(), C_ * Dp_ + 2), 0};  // general path
    if (general_) {
      auto S = scaled_rows(beta, at::ones_like(b_exp), -b_exp, at::kDouble, one_multiply(beta, b_exp));
      test_right_ = S.reshape({T_, C_ * Dp_}).to(at::kBFloat16);
      test_norms_ = padded_norms(S, 2);  // (T, C)
      const auto dot = DotError::of_depth(C_ * Dp_);
      // w comes from a float32 GEMM of depth C over float32 norms
      general_pair_ = {(dot.eps + rescore.eps) * (1 + (C_ + 4) * 0x1p-23 + kSlack), dot.floor};
    } else {
      auto A = scaled_rows(alpha, at::ones_like(a_exp), -a_exp, at::kDouble, one_multiply(alpha, a_exp))
                   .reshape({T_ * m_, C_});
      auto B = scaled_rows(beta, at::ones_like(b_exp), -b_exp, at::kDouble, one_multiply(beta, b_exp))
                   .reshape({T_ * m_, Dp_});
      test_left_ = A.to(at::kBFloat16);
      test_right_ = B.to(at::kBFloat16);
      test_norms_ = padded_norms(A, 1);  // (T m,)
      test_right_norms_ = padded_norms(B, 1);
      low_rank_pair_ = {DotError::of_depth(C_), DotError::of_depth(Dp_), rescore_roundoff(R.scalar_type(),
                                                                                          m_ * (C_ + Dp_) + 2)};
    }
  }

  // The relative error of the exact rescoring (in the input dtype, float64
  // accumulation on the CPU's BLAS is not promised): gamma_n at its roundoff.
  static double rescore_roundoff(at::ScalarType dtype, int64_t n) {
    const double u = dtype == at::kDouble ? 0x1p-53 : 0x1p-24;
    return 2 * n * u / (1 - 2 * n * u);
  }

  bool applies() const { return applies_; }
  bool general() const { return general_; }
  int64_t train_rows() const { return R_.size(0); }
  int64_t tests() const { return T_; }
  int64_t terms() const { return m_; }
  // Training rows per tile: the gradient tile is C * Dp wide on the general
  // path; twice the float32 budget of rows_per_tile in bf16, because the
  // reduced-precision GEMMs need wide tiles to reach their rate (oneDNN's AMX
  // bf16 GEMM at K = 5130: 263 GFLOP/s on 817 rows, 680 on 4096).
  int64_t tile_rows() const { return std::clamp<int64_t>((int64_t(1) << 24) / (general_ ? C_ * Dp_ : C_ + Dp_), 256, kMaxTileRows); }
  const GeneralPair& general_pair() const { return general_pair_; }
  const LowRankPair& low_rank_pair() const { return low_rank_pair_; }
  const at::Tensor& test_norms() const { return test_norms_; }
  const at::Tensor& test_right_norms() const { return test_right_norms_; }

  // Prepare training rows [n0, n0 + nt): their scales (float64, <= 1) and
  // reduced operands.
  void load_train(int64_t n0, int64_t nt) {  // tiles in order, the first the widest
    auto r = scaled_rows(R_.narrow(0, n0, nt), at::ones({nt}, scale_all_.options()), r_shift_.narrow(0, n0, nt),
                         at::kFloat, train_single_);                                             // (nt, C)
    auto p = scaled_rows(Phi_.narrow(0, n0, nt), p_mantissa_.narrow(0, n0, nt), p_shift_.narrow(0, n0, nt),
                         at::kFloat, train_single_);                                             // (nt, Dp)
    scale_ = scale_all_.narrow(0, n0, nt);
    train_right_norms_ = padded_norms(p, 1);
    if (general_) {
      // float32 products, then one rounding pass (faster than a broadcast into
      // bf16), in buffers kept across tiles (no page faults per tile)
      if (!grad_f32_.defined()) {
        grad_f32_ = at::empty({nt, C_, Dp_}, R_.options().dtype(at::kFloat));
        grad_bf16_ = at::empty({nt, C_ * Dp_}, R_.options().dtype(at::kBFloat16));
      }
      auto products = grad_f32_.narrow(0, 0, nt);
      at::mul_out(products, r.unsqueeze(2), p.unsqueeze(1));
      train_right_ = grad_bf16_.narrow(0, 0, nt);
      train_right_.copy_(products.view({nt, C_ * Dp_}));
      norm_cols_ = (r.abs() * train_right_norms_.unsqueeze(1)).t().contiguous();  // (C, nt)
    } else {
      train_left_ = r.to(at::kBFloat16);
      train_right_ = p.to(at::kBFloat16);
      train_norms_ = padded_norms(r, 1);
    }
  }

  const at::Tensor& scale() const { return scale_; }                       // (nt,) float64
  const at::Tensor& train_norms() const { return train_norms_; }           // low-rank (nt,)
  const at::Tensor& train_right_norms() const { return train_right_norms_; }

  // cuBLAS may sum split-K partial results in bf16, which the bound does not
  // cover: not while the screen's GEMMs run.
  struct FullPrecisionReductions {
    explicit FullPrecisionReductions(bool cuda) : cuda_(cuda) {
      if (!cuda_) return;
      saved_ = at::globalContext().allowBF16ReductionCuBLAS();
      at::globalContext().setAllowBF16ReductionCuBLAS(false, saved_ != at::CuBLASReductionOption::DisallowReducedPrecisionDisallowSplitK);
    }
    ~FullPrecisionReductions() {
      if (!cuda_) return;
      at::globalContext().setAllowBF16ReductionCuBLAS(
          saved_ == at::CuBLASReductionOption::AllowReducedPrecisionWithSplitK,
          saved_ != at::CuBLASReductionOption::DisallowReducedPrecisionDisallowSplitK);
    }
    bool cuda_;
    at::CuBLASReductionOption saved_{};
  };

  // The loaded tile against tests [t0, t0 + tb): general path (screened (tb, nt)
  // bf16, w (tb, nt) float32); low-rank (a (tb m, nt), c (tb m, nt)) bf16.
  std::pair<at::Tensor, at::Tensor> tile(int64_t t0, int64_t tb) const {
    const FullPrecisionReductions reductions(R_.is_cuda());
    if (general_) {
      auto screened = at::mm(test_right_.narrow(0, t0, tb), train_right_.t());
      auto w = at::mm(test_norms_.narrow(0, t0, tb), norm_cols_);
      return {screened, w};
    }
    return {at::mm(test_left_.narrow(0, t0 * m_, tb * m_), train_left_.t()),
            at::mm(test_right_.narrow(0, t0 * m_, tb * m_), train_right_.t())};
  }

  // Exact scores of the candidates cand (T, w) (padding -1 gets NaN), computed
  // from the original operands in their dtype like the exact path, and the
  // top-k of them in RankOrder.
  std::tuple<at::Tensor, at::Tensor> rescore_topk(const at::Tensor& alpha, const at::Tensor& beta,
                                                  at::Tensor cand, int64_t k, bool largest) const {
    const int64_t N = R_.size(0), width = cand.size(1);
    // Ascending training index within each row (padding last), as RankOrder's ties need.
    cand = std::get<0>(at::sort(at::where(cand < 0, at::full_like(cand, N), cand), 1));
    auto valid = cand < N;
    auto ids = at::where(valid, cand, at::zeros_like(cand));
    auto values = at::empty({T_, width}, R_.options());
    const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 22) / std::max<int64_t>(1, width * (C_ + Dp_) * m_));
    for (int64_t t0 = 0; t0 < T_; t0 += chunk) {
      const int64_t tc = std::min(chunk, T_ - t0);
      auto rows = ids.narrow(0, t0, tc).reshape({-1});
      auto phi = Phi_.index_select(0, rows).view({tc, width, Dp_});
      // R_i inv_i first, as the exact path scales it, so no intermediate overflows where its don't
      auto r = (R_.index_select(0, rows) * inv_norm_.index_select(0, rows).unsqueeze(1)).view({tc, width, C_});
      if (general_) {  // sum_c R_ic inv_i (S_tc . Phi_i)
        values.narrow(0, t0, tc).copy_((at::bmm(phi, beta.narrow(0, t0, tc).transpose(1, 2)) * r).sum(2));
      } else {         // sum_j (alpha_tj . R_i inv_i)(beta_tj . Phi_i)
        values.narrow(0, t0, tc).copy_((at::bmm(r, alpha.narrow(0, t0, tc).transpose(1, 2)) *
                                        at::bmm(phi, beta.narrow(0, t0, tc).transpose(1, 2))).sum(2));
      }
    }
    values.masked_fill_(valid.logical_not(), std::nan(""));
    auto order = rank_order_first(values, k, largest);
    return {values.gather(1, order), cand.gather(1, order)};
  }

 private:
  bool general_, applies_ = false;
  at::Tensor R_, Phi_, inv_norm_;
  int64_t T_, m_, C_, Dp_;
  at::Tensor r_shift_, p_shift_, p_mantissa_, scale_all_;
  bool train_single_ = false;
  at::Tensor test_left_, test_right_, test_norms_, test_right_norms_;
  at::Tensor scale_, train_left_, train_right_, norm_cols_, train_norms_, train_right_norms_;
  at::Tensor grad_f32_, grad_bf16_;
  GeneralPair general_pair_{};
  LowRankPair low_rank_pair_{};
};

// The exact answer, survivors = N: what the screened ops return where the
// bound cannot hold.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> exact_topk(const at::Tensor& alpha, const at::Tensor& beta,
                                                                 const at::Tensor& R, const at::Tensor& Phi,
                                                                 const at::Tensor& inv_norm, int64_t k, bool largest) {
  using Signature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                       const at::Tensor&, const at::Tensor&, int64_t, bool);
  using General = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                     const at::Tensor&, int64_t, bool);
  auto& dispatcher = c10::Dispatcher::singleton();
  auto [values, indices] =
      alpha.defined()
          ? dispatcher.findSchemaOrThrow("exemplar::topk_rank1", "").typed<Signature>().call(alpha, beta, R, Phi,
                                                                                             inv_norm, k, largest)
          : dispatcher.findSchemaOrThrow("exemplar::topk", "").typed<General>().call(beta, R, Phi, inv_norm, k,
                                                                                     largest);
  return {values, indices, at::full({beta.size(0)}, R.size(0), R.options().dtype(at::kLong))};
}

// The op's frame around a device's consumer, which provides
//   Consumer(const Bf16Screen&, int64_t k, bool largest),
//   consume(screen, n0, nt, t0, tb, tile) for every (test block x train tile), and
//   candidates() -> (cand (T, w) int64 with padding -1, survivors (T,) int64),
//     cand undefined when it could not keep them all (then: the exact path).
// The exact path also takes operands the bound is not for: NaN or inf, or
// training rows whose scales span more than float64 holds. alpha undefined:
// the general path, beta = S (T, C, Dp); rank 1 alpha (T, C), beta (T, Dp).
template <typename Consumer>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_screen(const at::Tensor& alpha_, const at::Tensor& beta_,
                                                          const at::Tensor& R, const at::Tensor& Phi,
                                                          const at::Tensor& inv_norm, int64_t k, bool largest) {
  const at::OptionalDeviceGuard guard(at::device_of(R));
  const bool rank1 = alpha_.defined() && alpha_.dim() == 2;
  auto alpha = rank1 ? alpha_.unsqueeze(1) : alpha_;
  auto beta = rank1 ? beta_.unsqueeze(1) : beta_;
  Bf16Screen screen(alpha, beta, R.contiguous(), Phi.contiguous(), inv_norm.contiguous());
  if (!screen.applies()) return exact_topk(alpha_, beta_, R, Phi, inv_norm, k, largest);
  const int64_t N = R.size(0), T = screen.tests(), rows = screen.tile_rows();
  const int64_t block = std::max<int64_t>(1, kTestBlockRows / screen.terms());
  Consumer consumer(screen, k, largest);
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t nt = std::min(rows, N - n0);
    screen.load_train(n0, nt);
    for (int64_t t0 = 0; t0 < T; t0 += block) {
      const int64_t tb = std::min(block, T - t0);
      consumer.consume(screen, n0, nt, t0, tb, screen.tile(t0, tb));
    }
  }
  auto [cand, survivors] = consumer.candidates();
  if (!cand.defined()) return exact_topk(alpha_, beta_, R, Phi, inv_norm, k, largest);
  auto [values, indices] = screen.rescore_topk(alpha, beta, cand, k, largest);
  return {values, indices, survivors};
}

// The two ops' entry points, for a device's consumer.
template <typename Consumer>
std::tuple<at::Tensor, at::Tensor, at::Tensor> screened_topk(const at::Tensor& S, const at::Tensor& R,
                                                             const at::Tensor& Phi, const at::Tensor& inv_norm,
                                                             int64_t k, bool largest) {
  check_topk(S, R, Phi, inv_norm, k, "exemplar::screened_topk");
  return run_screen<Consumer>(at::Tensor(), S, R, Phi, inv_norm, k, largest);
}

template <typename Consumer>
std::tuple<at::Tensor, at::Tensor, at::Tensor> screened_topk_rank1(const at::Tensor& alpha, const at::Tensor& beta,
                                                                   const at::Tensor& R, const at::Tensor& Phi,
                                                                   const at::Tensor& inv_norm, int64_t k,
                                                                   bool largest) {
  check_topk_rank1(alpha, beta, R, Phi, inv_norm, k, "exemplar::screened_topk_rank1");
  return run_screen<Consumer>(alpha, beta, R, Phi, inv_norm, k, largest);
}

}  // namespace exemplar

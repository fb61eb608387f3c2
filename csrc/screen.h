// The bf16 screen of exemplar::screened_topk (docs/design.md §8): per tile of
// training rows, every score is computed from operands rounded to bfloat16
// (AMX / AVX512-BF16 through oneDNN on the CPU, tensor cores through cuBLAS),
// with a rigorous per-pair error bound assembled from per-row norms; a
// device's consumer (csrc/cpu/screen.cpp, csrc/cuda/screen.cu) keeps each test
// row's k best lower bounds and the training rows whose upper bound reaches
// them; the survivors are rescored exactly here (in the input dtype, from the
// scaled operands) and ranked in RankOrder. Every operand is scaled per row by
// a power of two (exact) so its entries are below 1/2: the reduced format can then neither
// overflow nor lose a row to underflow, whatever the input's exponent range,
// and what does underflow (entries 2^126 below their row's largest) is an
// absolute error the bound carries. Scores are compared within a test row, so
// the test rows' scales drop out; the training rows' scales are kept as
// float64 factors relative to the largest.
#pragma once

#include <ATen/ATen.h>
#include <ATen/DeviceGuard.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>
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
// most 1 in magnitude, as the GEMM returns it (rounded to bf16):
//   |computed - exact| <= eps(K) * sum_k |x_k||y_k| + out * |computed| + floor(K).
// Inputs reach bf16 from float64 or float32 through at most two float32
// roundings (u_in); products of bf16 are exact in float32; the float32
// accumulation may truncate (2 * 2^-24 per add, gamma_K); the result's
// rounding to bf16 (unit roundoff 2^-8) is relative to the result itself, so
// it costs 2^-8 / (1 - 2^-8) of |computed|, usually far less than of the
// sum of |x||y|. Underflow (flush to zero anywhere) costs at most 2^-126 per
// input, product, partial sum and the result: the floor.
constexpr double kBf16InputRoundoff = 0x1p-8 + 0x1p-21;  // u_in
struct DotError {
  double eps, out, floor;
  static DotError of_depth(int64_t K) {
    const double u_in = kBf16InputRoundoff, u_acc = 0x1p-23, u_out = 0x1p-8;
    const double gamma = K * u_acc / (1 - K * u_acc);
    return {(2 * u_in + u_in * u_in) + gamma * (1 + u_in) * (1 + u_in), u_out / (1 - u_out), (4.0 * K + 9) * 0x1p-126};
  }
};

// Slack for everything computed in float64 afterwards (the pair's own
// arithmetic and the exact rescoring it is compared with) and for the float32
// norms the bound is built from: relative to the bound's magnitude scale.
constexpr double kSlack = 0x1p-17;

// General path: s = sc * scale, b = (eps * w + out * |sc| + floor) * scale
// with w >= sum_cd |S'_tcd| |g'_icd| from the norm GEMM.
struct GeneralPair {
  double eps, out, floor;  // eps includes the norm GEMM's own rounding of w
  EXEMPLAR_HOST_DEVICE void operator()(float sc, float w, double scale, double& s, double& b) const {
    s = static_cast<double>(sc);
    b = (eps * static_cast<double>(w) + out * (s < 0 ? -s : s) + floor) * scale;
    s *= scale;
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
    const double aa = a < 0 ? -a : a, cc = c < 0 ? -c : c;
    const double ea = left.eps * an * rn + left.out * aa + left.floor;
    const double ec = right.eps * bn * pn + right.out * cc + right.floor;
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
// 1: padded for their rounding (depth n) and for squares lost to underflow;
// times `factor` where x stands for other rows (x's bf16 roundings give the
// scaled rows' norms up to 1 / (1 - u_in)).
inline at::Tensor padded_norms(const at::Tensor& x, int64_t dim, double factor = 1) {
  const int64_t n = x.size(dim);
  // float32 accumulation: float64 rows rounded to it first (the norm will not narrow), bf16 read as they are
  const auto rows = x.scalar_type() == at::kDouble ? x.to(at::kFloat) : x;
  return at::linalg_vector_norm(rows, 2, {dim}, false, at::kFloat) * ((1 + (n + 2) * 0x1p-23) * factor) + 0x1p-50;
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
inline double ldexp_safe(double x, double e) {
  const double half = std::floor(e / 2);
  return std::ldexp(std::ldexp(x, static_cast<int>(half)), static_cast<int>(e - half));
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

// The bf16 gradient tile, K-major: out (C*Dp, n) with out[c*Dp + d][i] =
// r[c][i] * p[d][i] for rT (C, n), pT (Dp, n), float32 products rounded once
// (the GEMMs run faster with the training rows as the inner dimension). On
// the CPU one fused pass (2 bytes written a value, where float32 products
// and a rounding pass move 10; that was 0.5 s of the general path at W-CPU);
// elsewhere the two ATen passes.
inline void outer_bf16(const at::Tensor& rT, const at::Tensor& pT, at::Tensor& out) {
  const int64_t C = rT.size(0), Dp = pT.size(0), n = rT.size(1);
  if (!out.is_cpu()) {
    out.view({C, Dp, n}).copy_(rT.unsqueeze(1) * pT.unsqueeze(0));
    return;
  }
  const float* r = rT.const_data_ptr<float>();
  const float* p = pT.const_data_ptr<float>();
  auto* o = static_cast<c10::BFloat16*>(out.data_ptr());
  at::parallel_for(0, C * Dp, 8, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const float* rc = r + (row / Dp) * n;
      const float* pd = p + (row % Dp) * n;
      c10::BFloat16* out_row = o + row * n;
      for (int64_t i = 0; i < n; ++i) out_row[i] = c10::BFloat16(rc[i] * pd[i]);
    }
  });
}

// The screen's operands, scaled and rounded. The general path: S (T, C, Dp)
// against the per-example gradient tile g'_i = R'_i (x) Phi'_i (one GEMM with
// K = C * Dp); the low-rank path: alpha (T, m, C), beta (T, m, Dp).
class Bf16Screen {
 public:
  // Scales and rounds the test side and the training rows' factors; applies()
  // says whether the bound holds for these operands: all finite, and the
  // training rows' scales within what float64 holds (float32 inputs always are).
  Bf16Screen(const at::Tensor& alpha, const at::Tensor& beta, const at::Tensor& R, const at::Tensor& Phi,
             const at::Tensor& inv_norm)
      : general_(!alpha.defined()), R_(R), Phi_(Phi),
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
    train_exp_ = total;
    train_single_ = one_multiply(R, r_shift_) && one_multiply(Phi, p_shift_);
    const double rescore = rescore_roundoff(R.scalar_type(), C_ * Dp_ + 2);  // general path
    if (general_) {
      auto S = scaled_rows(beta, at::ones_like(b_exp), -b_exp, at::kDouble, one_multiply(beta, b_exp));
      test_right_ = S.reshape({T_, C_ * Dp_}).to(at::kBFloat16);
      test_scaled_ = {at::Tensor(), S.to(R.scalar_type())};
      test_exp_ = b_exp;
      test_norms_ = padded_norms(S, 2);  // (T, C)
      const auto dot = DotError::of_depth(C_ * Dp_);
      // w comes from a float32 GEMM of depth C over float32 norms
      general_pair_ = {(dot.eps + rescore) * (1 + (C_ + 4) * 0x1p-23 + kSlack), dot.out, dot.floor};
    } else {
      auto A = scaled_rows(alpha, at::ones_like(a_exp), -a_exp, at::kDouble, one_multiply(alpha, a_exp))
                   .reshape({T_ * m_, C_});
      auto B = scaled_rows(beta, at::ones_like(b_exp), -b_exp, at::kDouble, one_multiply(beta, b_exp))
                   .reshape({T_ * m_, Dp_});
      test_left_ = A.to(at::kBFloat16);
      test_right_ = B.to(at::kBFloat16);
      test_scaled_ = {A.to(R.scalar_type()).view({T_, m_, C_}), B.to(R.scalar_type()).view({T_, m_, Dp_})};
      test_exp_ = a_exp + b_exp;
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
  // path; four times the float32 budget of rows_per_tile in bf16, because the
  // reduced-precision GEMMs need wide tiles to reach their rate (oneDNN's AMX
  // bf16 GEMM at K = 5130: 263 GFLOP/s on 817 rows, 680 on 4096).
  int64_t tile_rows() const {
    return std::clamp<int64_t>((int64_t(1) << 25) / (general_ ? C_ * Dp_ : C_ + Dp_), 256, kMaxTileRows);
  }
  const GeneralPair& general_pair() const { return general_pair_; }
  const LowRankPair& low_rank_pair() const { return low_rank_pair_; }
  const at::Tensor& test_norms() const { return test_norms_; }
  const at::Tensor& test_right_norms() const { return test_right_norms_; }

  // Prepare training rows [n0, n0 + nt): their scales (float64, <= 1) and
  // reduced operands.
  void load_train(int64_t n0, int64_t nt) {  // tiles in order, the first the widest
    scale_ = scale_all_.narrow(0, n0, nt);
    const auto ones = at::ones({nt}, scale_all_.options());
    if (general_) {
      auto r = scaled_rows(R_.narrow(0, n0, nt), ones, r_shift_.narrow(0, n0, nt), at::kFloat, train_single_);
      auto p = scaled_rows(Phi_.narrow(0, n0, nt), p_mantissa_.narrow(0, n0, nt), p_shift_.narrow(0, n0, nt),
                           at::kFloat, train_single_);
      train_right_norms_ = padded_norms(p, 1);
      if (!grad_.defined()) grad_ = at::empty({C_ * Dp_ * nt}, R_.options().dtype(at::kBFloat16));
      train_right_ = grad_.narrow(0, 0, C_ * Dp_ * nt).view({C_ * Dp_, nt});
      outer_bf16(r.t().contiguous(), p.t().contiguous(), train_right_);
      norm_cols_ = (r.abs() * train_right_norms_.unsqueeze(1)).t().contiguous();  // (C, nt)
      return;
    }
    // Low rank: scaled straight to bf16 (one pass each; the GEMMs take the
    // rows transposed at the same rate), norms from the bf16 rows x~, each
    // entry within u_in of the scaled value it rounds, so ||x|| <= ||x~|| /
    // (1 - u_in) (rank-1 W-CPU: 0.095 s -> 0.035 s for the whole training set).
    train_left_ = scaled_rows(R_.narrow(0, n0, nt), ones, r_shift_.narrow(0, n0, nt), at::kBFloat16,
                              train_single_);  // (nt, C)
    train_right_ = scaled_rows(Phi_.narrow(0, n0, nt), p_mantissa_.narrow(0, n0, nt), p_shift_.narrow(0, n0, nt),
                               at::kBFloat16, train_single_);  // (nt, Dp)
    train_norms_ = padded_norms(train_left_, 1, 1 / (1 - kBf16InputRoundoff));
    train_right_norms_ = padded_norms(train_right_, 1, 1 / (1 - kBf16InputRoundoff));
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
      auto screened = at::mm(test_right_.narrow(0, t0, tb), train_right_);
      auto w = at::mm(test_norms_.narrow(0, t0, tb), norm_cols_);
      return {screened, w};
    }
    return {at::mm(test_left_.narrow(0, t0 * m_, tb * m_), train_left_.t()),
            at::mm(test_right_.narrow(0, t0 * m_, tb * m_), train_right_.t())};
  }

  // Exact scores of the candidates cand (T, w) (padding -1 gets NaN; survivors
  // (T,) of them per row), and the top-k of them in RankOrder. Computed from
  // the row-scaled operands (so no intermediate overflows or underflows that
  // the score itself does not), scaled back in float64, stored in the input dtype.
  std::tuple<at::Tensor, at::Tensor> rescore_topk(at::Tensor cand, const at::Tensor& survivors, int64_t k,
                                                  bool largest) const {
    const int64_t N = R_.size(0);
    // Ascending training index within each row (padding last), as RankOrder's ties need.
    cand = std::get<0>(at::sort(at::where(cand < 0, at::full_like(cand, N), cand), 1));
    auto values = R_.is_cpu() ? rescored_on_cpu(cand) : rescored_gathered(cand, survivors);
    auto order = rank_order_first(values, k, largest);
    return {values.gather(1, order), cand.gather(1, order)};
  }

  // On the CPU: the (test, candidate) pairs grouped by training row, so each
  // candidate row is read and scaled once (in float64) and dotted with every
  // test that kept it; no gathered copies (rescored_gathered moved ~1 GB at
  // W-CPU: 0.13-0.2 s of a rank-1 screen, against 0.04 s this way).
  at::Tensor rescored_on_cpu(const at::Tensor& cand) const {
    const int64_t N = R_.size(0), width = cand.size(1);
    auto values = at::full({T_, width}, std::nan(""), R_.options());
    auto [rows, positions] = at::sort(cand.reshape({-1}));  // padding (N) last
    const int64_t real = rows.numel() - (rows == N).sum().item<int64_t>();
    auto doubles = [](const at::Tensor& e) { return e.to(at::kDouble).contiguous(); };
    const auto r_shift = doubles(r_shift_), p_shift = doubles(p_shift_), p_mantissa = doubles(p_mantissa_),
               train_exp = doubles(train_exp_), test_exp = doubles(test_exp_);
    AT_DISPATCH_FLOATING_TYPES(R_.scalar_type(), "rescored_on_cpu", [&] {
      const scalar_t* R = R_.const_data_ptr<scalar_t>();
      const scalar_t* Phi = Phi_.const_data_ptr<scalar_t>();
      const scalar_t* left = general_ ? nullptr : test_scaled_.first.const_data_ptr<scalar_t>();
      const scalar_t* right = test_scaled_.second.const_data_ptr<scalar_t>();
      const int64_t* row = rows.const_data_ptr<int64_t>();
      const int64_t* position = positions.const_data_ptr<int64_t>();
      const double *rs = r_shift.const_data_ptr<double>(), *ps = p_shift.const_data_ptr<double>(),
                   *pm = p_mantissa.const_data_ptr<double>(), *te = test_exp.const_data_ptr<double>(),
                   *ne = train_exp.const_data_ptr<double>();
      scalar_t* out = values.data_ptr<scalar_t>();
      at::parallel_for(0, real, 1, [&](int64_t begin, int64_t end) {
        while (begin > 0 && begin < end && row[begin] == row[begin - 1]) ++begin;  // a row's pairs: one thread
        while (end < real && row[end] == row[end - 1]) ++end;
        std::vector<double> r(C_), p(Dp_);
        for (int64_t q = begin; q < end; ++q) {
          const int64_t i = row[q], t = position[q] / width;
          if (q == begin || i != row[q - 1]) {
            scaled_row(R + i * C_, C_, 1.0, rs[i], r.data());
            scaled_row(Phi + i * Dp_, Dp_, pm[i], ps[i], p.data());
          }
          double v = 0;
          for (int64_t j = 0; j < m_; ++j) {
            if (general_) {  // sum_c R'_ic (S'_tc . Phi'_i)
              for (int64_t c = 0; c < C_; ++c) v += r[c] * dot(right + (t * C_ + c) * Dp_, p.data(), Dp_);
            } else {         // sum_j (alpha'_tj . R'_i)(beta'_tj . Phi'_i)
              v += dot(left + (t * m_ + j) * C_, r.data(), C_) * dot(right + (t * m_ + j) * Dp_, p.data(), Dp_);
            }
          }
          out[position[q]] = static_cast<scalar_t>(ldexp_safe(v, te[t] + ne[i]));
        }
      });
    });
    return values;
  }

  // x * mantissa * 2^shift into out, in float64, in two steps (each factor representable).
  template <typename scalar_t>
  static void scaled_row(const scalar_t* x, int64_t n, double mantissa, double shift, double* out) {
    const double half = std::floor(shift / 2);
    const double first = std::ldexp(1.0, static_cast<int>(half));
    const double second = std::ldexp(mantissa, static_cast<int>(shift - half));
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) out[d] = static_cast<double>(x[d]) * first * second;
  }

  template <typename scalar_t>
  static double dot(const scalar_t* x, const double* y, int64_t n) {
    double sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t d = 0; d < n; ++d) sum += static_cast<double>(x[d]) * y[d];
    return sum;
  }

  // Elsewhere: the candidates' rows gathered and rescored by batched GEMMs in
  // the input dtype, tests in chunks of similar survivor counts, so the
  // gathered operands are about as wide as the survivors, not as the widest row.
  at::Tensor rescored_gathered(const at::Tensor& cand, const at::Tensor& survivors) const {
    const int64_t N = R_.size(0), width = cand.size(1);
    const auto dtype = R_.scalar_type();
    auto values = at::full({T_, width}, std::nan(""), R_.options());
    auto by_count = std::get<1>(at::sort(survivors, /*stable=*/true, 0, /*descending=*/true));
    auto counts = survivors.index_select(0, by_count).cpu();
    const int64_t* count = counts.const_data_ptr<int64_t>();
    for (int64_t c0 = 0; c0 < T_;) {
      const int64_t wc = std::max<int64_t>(1, count[c0]);
      const int64_t tc = std::min(T_ - c0, std::max<int64_t>(1, (int64_t(1) << 22) / (wc * (C_ + Dp_) * m_)));
      auto tests = by_count.narrow(0, c0, tc);
      auto ids = cand.index_select(0, tests).narrow(1, 0, wc);
      auto rows = at::where(ids < N, ids, at::zeros_like(ids)).reshape({-1});
      auto r = scaled_rows(R_.index_select(0, rows), at::ones({rows.size(0)}, scale_all_.options()),
                           r_shift_.index_select(0, rows), dtype, train_single_).view({tc, wc, C_});
      auto p = scaled_rows(Phi_.index_select(0, rows), p_mantissa_.index_select(0, rows),
                           p_shift_.index_select(0, rows), dtype, train_single_).view({tc, wc, Dp_});
      at::Tensor v;
      if (general_) {  // sum_c R'_ic (S'_tc . Phi'_i)
        v = (at::bmm(p, test_scaled_.second.index_select(0, tests).transpose(1, 2)) * r).sum(2);
      } else {         // sum_j (alpha'_tj . R'_i)(beta'_tj . Phi'_i)
        v = (at::bmm(r, test_scaled_.first.index_select(0, tests).transpose(1, 2)) *
             at::bmm(p, test_scaled_.second.index_select(0, tests).transpose(1, 2))).sum(2);
      }
      auto exponent = test_exp_.index_select(0, tests).unsqueeze(1) + train_exp_.index_select(0, rows).view({tc, wc});
      auto full = at::full({tc, width}, std::nan(""), values.options());
      full.narrow(1, 0, wc).copy_(ldexp_safe(v.to(at::kDouble), exponent).masked_fill_(ids >= N, std::nan("")));
      values.index_copy_(0, tests, full);
      c0 += tc;
    }
    return values;
  }

 private:
  bool general_, applies_ = false;
  at::Tensor R_, Phi_;
  int64_t T_, m_, C_, Dp_;
  at::Tensor r_shift_, p_shift_, p_mantissa_, scale_all_, train_exp_, test_exp_;
  std::pair<at::Tensor, at::Tensor> test_scaled_;  // the scaled test operands in the input dtype
  bool train_single_ = false;
  at::Tensor test_left_, test_right_, test_norms_, test_right_norms_;
  at::Tensor scale_, train_left_, train_right_, norm_cols_, train_norms_, train_right_norms_;
  at::Tensor grad_;  // the bf16 gradient tile's buffer, kept across tiles (no page faults per tile)
  GeneralPair general_pair_{};
  LowRankPair low_rank_pair_{};
};

// Candidates a test row may hold before the op gives up on the screen and
// answers on the exact path: where ties or a bound too wide for the data let
// most rows survive, the screen would cost more than exact and its lists
// O(T N) memory. Measured maxima: 571 (W-CPU), 2,019 (Fashion-MNIST head).
inline int64_t candidate_capacity(int64_t N, int64_t k) { return std::min<int64_t>(N, 4 * k + 4096); }

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
// training rows whose scales span more than float64 holds (and T = 0). alpha undefined:
// the general path, beta = S (T, C, Dp); rank 1 alpha (T, C), beta (T, Dp).
template <typename Consumer>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_screen(const at::Tensor& alpha_, const at::Tensor& beta_,
                                                          const at::Tensor& R, const at::Tensor& Phi,
                                                          const at::Tensor& inv_norm, int64_t k, bool largest) {
  const at::OptionalDeviceGuard guard(at::device_of(R));
  if (beta_.size(0) == 0) return exact_topk(alpha_, beta_, R, Phi, inv_norm, k, largest);  // no tests
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
  auto [values, indices] = screen.rescore_topk(cand, survivors, k, largest);
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

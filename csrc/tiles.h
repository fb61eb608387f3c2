// Tiling: the one policy for how many training rows any loop over N takes at
// a time, and the streaming over (test block x train tile) score tiles that
// the dense ops and the CPU top-k share, so both see bit-identical score
// values; only the consumer of each tile differs. Memory held: one gradient
// tile and one (test block x train tile) score buffer, independent of N.
#pragma once

#include <ATen/ATen.h>
#include <ATen/DeviceGuard.h>

#include <algorithm>

#include "checks.h"

namespace exemplar {

// Rows per step of every loop over the training set, for a per-row temporary
// `width` elements wide: about four million elements (16 MB in float32), so
// no N-sized temporary exists while per-step costs (a GEMM's depth, the
// float64 accumulation of a curvature block) amortise; at least 256 rows so
// the GEMMs stay efficient, at most 4096. A fixed count for a given shape
// keeps the dense and top-k scores bit-identical.
constexpr int64_t kMaxTileRows = 4096;
inline int64_t rows_per_tile(int64_t width) {
  const int64_t budget = int64_t(1) << 22;
  return std::clamp<int64_t>(budget / std::max<int64_t>(width, 1), 256, kMaxTileRows);
}
constexpr int64_t kTestBlockRows = 1024;

class TileScorer {
 public:
  virtual ~TileScorer() = default;
  virtual int64_t tests() const = 0;
  virtual int64_t tile_rows() const = 0;
  // Prepare train rows [n0, n0 + nt).
  virtual void load_train(int64_t n0, int64_t nt) = 0;
  // out (tb, nt), contiguous: scores of tests [t0, t0 + tb) against the loaded rows.
  virtual void score(int64_t t0, int64_t tb, at::Tensor& out) = 0;
};

// score(t, i) = <vec S_t, vec(R_i Phi_i^T)> * inv_norm_i: one GEMM with K = C*Dp
// against an explicit per-example gradient tile.
class GeneralScorer final : public TileScorer {
 public:
  // S (T, C, Dp), R (N, C), Phi (N, Dp), inv_norm (N,)
  GeneralScorer(const at::Tensor& S, const at::Tensor& R, const at::Tensor& Phi,
                const at::Tensor& inv_norm)
      : S_flat_(S.reshape({S.size(0), S.size(1) * S.size(2)}).contiguous()),
        R_(R.contiguous()), Phi_(Phi.contiguous()), inv_norm_(inv_norm.contiguous()),
        rows_(rows_per_tile(R.size(1) * Phi.size(1))),
        grad_(at::empty({std::min(rows_, R.size(0)), R.size(1), Phi.size(1)}, R.options())) {}

  int64_t tests() const override { return S_flat_.size(0); }
  int64_t tile_rows() const override { return rows_; }

  void load_train(int64_t n0, int64_t nt) override {
    auto r = (R_.narrow(0, n0, nt) * inv_norm_.narrow(0, n0, nt).unsqueeze(1)).unsqueeze(2);
    tile_ = grad_.narrow(0, 0, nt);
    at::mul_out(tile_, r, Phi_.narrow(0, n0, nt).unsqueeze(1));
    tile_ = tile_.view({nt, -1});
  }

  void score(int64_t t0, int64_t tb, at::Tensor& out) override {
    at::mm_out(out, S_flat_.narrow(0, t0, tb), tile_.t());
  }

 private:
  at::Tensor S_flat_, R_, Phi_, inv_norm_;
  int64_t rows_;
  at::Tensor grad_, tile_;
};

// score(t, i) = sum_j (alpha_tj . R_i)(beta_tj . Phi_i) * inv_norm_i over the
// m rank-1 terms of S_t (m = 1: the rank-1 path): two thin GEMMs of tb*m rows
// per tile, their product summed over j. Tests go m at a time in sub-blocks of
// kTestBlockRows / m, so the GEMM outputs never exceed one score buffer.
// The general path is the case alpha_tc = e_c, beta_tc = S_t[c] (m = C): then
// the first GEMM is R_i itself, so score(t, i) = sum_c R_ic (S_t[c] . Phi_i)
// costs one GEMM with K = Dp and no per-example gradient tile is built.
class LowRankScorer final : public TileScorer {
 public:
  // General path: S (T, C, Dp), R (N, C), Phi (N, Dp), inv_norm (N,).
  LowRankScorer(const at::Tensor& S, const at::Tensor& R, const at::Tensor& Phi,
                const at::Tensor& inv_norm)
      : LowRankScorer(at::Tensor(), S, R, Phi, inv_norm) {}

  // alpha (T, C) or (T, m, C), beta likewise with Dp, R (N, C), Phi (N, Dp), inv_norm (N,);
  // an undefined alpha means the general path above.
  LowRankScorer(const at::Tensor& alpha, const at::Tensor& beta, const at::Tensor& R,
                const at::Tensor& Phi, const at::Tensor& inv_norm)
      : m_(beta.dim() == 3 ? beta.size(1) : 1),
        alpha_(alpha.defined() ? alpha.reshape({-1, alpha.size(-1)}).contiguous() : alpha),
        beta_(beta.reshape({-1, beta.size(-1)}).contiguous()), R_(R.contiguous()),
        Phi_(Phi.contiguous()), inv_norm_(inv_norm.contiguous()),
        rows_(rows_per_tile(R.size(1) + Phi.size(1))),
        sub_(std::max<int64_t>(1, kTestBlockRows / m_)) {
    const int64_t cells = std::min(beta.size(0) * m_, sub_ * m_) * std::min(rows_, R.size(0));
    if (alpha_.defined()) left_ = at::empty({cells}, R.options());
    right_ = at::empty({cells}, R.options());
  }

  int64_t tests() const override { return beta_.size(0) / m_; }
  int64_t tile_rows() const override { return rows_; }

  void load_train(int64_t n0, int64_t nt) override {
    R_tile_ = R_.narrow(0, n0, nt) * inv_norm_.narrow(0, n0, nt).unsqueeze(1);
    Phi_tile_ = Phi_.narrow(0, n0, nt);
    if (!alpha_.defined()) R_cols_ = R_tile_.t().contiguous();  // (C, nt): the general path's left side
  }

  void score(int64_t t0, int64_t tb, at::Tensor& out) override {
    const int64_t nt = out.size(1);
    for (int64_t s0 = 0; s0 < tb; s0 += sub_) {
      const int64_t sb = std::min(sub_, tb - s0), terms = sb * m_;
      auto right = right_.narrow(0, 0, terms * nt).view({terms, nt});
      at::mm_out(right, beta_.narrow(0, (t0 + s0) * m_, terms), Phi_tile_.t());
      auto rows = out.narrow(0, s0, sb);
      if (!alpha_.defined()) {
        at::sum_out(rows, right.view({sb, m_, nt}).mul_(R_cols_), 1);
        continue;
      }
      auto left = left_.narrow(0, 0, terms * nt).view({terms, nt});
      at::mm_out(left, alpha_.narrow(0, (t0 + s0) * m_, terms), R_tile_.t());
      if (m_ == 1) {
        at::mul_out(rows, left, right);
      } else {
        at::sum_out(rows, left.mul_(right).view({sb, m_, nt}), 1);
      }
    }
  }

 private:
  int64_t m_;
  at::Tensor alpha_, beta_, R_, Phi_, inv_norm_;
  int64_t rows_, sub_;
  at::Tensor left_, right_, R_tile_, Phi_tile_, R_cols_;
};

// Calls consume(t0, tb, n0, nt, tile) for every score tile, train-tile-major so
// each gradient tile is built once.
template <typename Consume>
void stream_tiles(TileScorer& scorer, int64_t N, const at::TensorOptions& options,
                  Consume&& consume) {
  const int64_t T = scorer.tests();
  const int64_t rows = scorer.tile_rows();
  auto buffer = at::empty({std::min(T, kTestBlockRows) * std::min(N, rows)}, options);
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t nt = std::min(rows, N - n0);
    scorer.load_train(n0, nt);
    for (int64_t t0 = 0; t0 < T; t0 += kTestBlockRows) {
      const int64_t tb = std::min(kTestBlockRows, T - t0);
      auto tile = buffer.narrow(0, 0, tb * nt).view({tb, nt});
      scorer.score(t0, tb, tile);
      consume(t0, tb, n0, nt, tile);
    }
  }
}

// The general path's two scorers, chosen by the memory traffic each costs:
// the explicit gradient tile writes N*C*Dp values once and reads them once per
// block of kTestBlockRows tests; the Phi GEMM writes, scales and sums T*C*N
// products. Few tests against a wide head (large C*Dp, small T) favour the
// second: at C = 1000, D = 2048, T = 20 it is 2.5x faster; at C = 10, D = 512,
// T = 1000 the gradient tile is 7 % faster (bench/RESULTS.md).
template <typename Use>
auto with_general_scorer(const at::Tensor& S, const at::Tensor& R, const at::Tensor& Phi,
                         const at::Tensor& inv_norm, Use&& use) {
  const int64_t T = S.size(0), Dp = S.size(2);
  if (3 * T < Dp * (1 + (T + kTestBlockRows - 1) / kTestBlockRows)) {
    LowRankScorer scorer(S, R, Phi, inv_norm);
    return use(static_cast<TileScorer&>(scorer));
  }
  GeneralScorer scorer(S, R, Phi, inv_norm);
  return use(static_cast<TileScorer&>(scorer));
}

// The top-k ops on their two paths, for any selection
// Select(TileScorer&, R, k, largest) -> (values (T, k), indices (T, k)).
template <auto Select>
std::tuple<at::Tensor, at::Tensor> general_topk(const at::Tensor& S, const at::Tensor& R,
                                                const at::Tensor& Phi, const at::Tensor& inv_norm,
                                                int64_t k, bool largest) {
  check_topk(S, R, Phi, inv_norm, k);
  const at::OptionalDeviceGuard guard(at::device_of(R));
  return with_general_scorer(S, R, Phi, inv_norm,
                             [&](TileScorer& scorer) { return Select(scorer, R, k, largest); });
}

template <auto Select>
std::tuple<at::Tensor, at::Tensor> rank1_topk(const at::Tensor& alpha, const at::Tensor& beta,
                                              const at::Tensor& R, const at::Tensor& Phi,
                                              const at::Tensor& inv_norm, int64_t k, bool largest) {
  check_topk_rank1(alpha, beta, R, Phi, inv_norm, k);
  const at::OptionalDeviceGuard guard(at::device_of(R));
  LowRankScorer scorer(alpha, beta, R, Phi, inv_norm);
  return Select(scorer, R, k, largest);
}

}  // namespace exemplar

// The bf16 screen's consumer on the CPU (csrc/screen.h): per test row, a
// min-heap of the k best lower bounds seen so far, whose root is the row's
// certified threshold, and the training rows whose upper bound reaches it,
// pruned again whenever the list doubles so it stays near the survivors (and
// at candidate_capacity: a row still that full sends the op to the exact path).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <limits>
#include <vector>

#include "../screen.h"

namespace exemplar {
namespace {

struct RowState {
  std::vector<double> lower;  // min-heap of the k best lower bounds
  std::vector<int64_t> ids;   // candidates, ascending training index
  std::vector<double> upper;  // their upper bounds
  size_t prune_at = 64;
  bool full = false;          // more than candidate_capacity survived pruning

  double threshold(size_t k) const { return lower.size() < k ? -std::numeric_limits<double>::infinity() : lower[0]; }

  void offer(size_t k, double lo, double hi, int64_t i) {
    if (lower.size() < k) {
      lower.push_back(lo);
      std::push_heap(lower.begin(), lower.end(), std::greater<>());
    } else if (lo > lower[0]) {
      std::pop_heap(lower.begin(), lower.end(), std::greater<>());
      lower.back() = lo;
      std::push_heap(lower.begin(), lower.end(), std::greater<>());
    }
    if (full || hi < threshold(k)) return;
    ids.push_back(i);
    upper.push_back(hi);
    if (ids.size() >= prune_at) {
      prune(k);
      prune_at = std::max<size_t>(64, 2 * ids.size());
    }
  }

  // Prunes when the list reaches capacity; full if that leaves it there.
  void cap(size_t k, size_t capacity) {
    if (ids.size() < capacity) return;
    prune(k);
    full = ids.size() >= capacity;
  }

  void prune(size_t k) {
    const double thr = threshold(k);
    size_t kept = 0;
    for (size_t j = 0; j < ids.size(); ++j) {
      if (upper[j] >= thr) {
        ids[kept] = ids[j];
        upper[kept++] = upper[j];
      }
    }
    ids.resize(kept);
    upper.resize(kept);
  }
};

// The pair loops below run once per (test, training row): built for the
// CPU's widest vectors too (AVX2, AVX-512) and picked at load time, since the
// extension is compiled for the baseline x86-64.
#if defined(__x86_64__) && defined(__GNUC__)
#define EXEMPLAR_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define EXEMPLAR_CPU_CLONES
#endif

// Each loop below writes, for every pair, a number at least its upper bound
// and, per block of kBlock training rows, the largest: the threshold scan
// then reads only the blocks that reach the row's threshold, and computes the
// bounds of the pairs that do in float64 (Pairs::bounds).
constexpr int64_t kBlock = 64;

// Sixteen running maxima per block, so the compare chain does not serialise
// (one running maximum made this scan cost more than the filter itself).
EXEMPLAR_CPU_CLONES void block_maxima(const float* hi, int64_t nt, float* maxima) {
  constexpr int64_t kLanes = 16;
  for (int64_t b0 = 0; b0 < nt; b0 += kBlock) {
    const int64_t b1 = std::min(nt, b0 + kBlock);
    float most = hi[b0];
    if (b1 - b0 == kBlock) {
      float lane[kLanes];
      for (int64_t l = 0; l < kLanes; ++l) lane[l] = hi[b0 + l];
      for (int64_t i = b0 + kLanes; i < b1; i += kLanes) {
        for (int64_t l = 0; l < kLanes; ++l) lane[l] = hi[i + l] > lane[l] ? hi[i + l] : lane[l];
      }
      for (int64_t l = 0; l < kLanes; ++l) most = lane[l] > most ? lane[l] : most;
    } else {
      for (int64_t i = b0 + 1; i < b1; ++i) most = hi[i] > most ? hi[i] : most;
    }
    maxima[b0 / kBlock] = most;
  }
}

// The general and rank-1 paths over-estimate the float64 upper bound in
// float32, twice as many lanes per instruction: the formula of GeneralPair
// and LowRankPair::term/finish, its nonnegative part (the bound b and |s|)
// raised by kFilterSlack, which is far more than the ~16 float32 roundings
// of the evaluation can take away (each at most 2^-24 of |s| + b), plus
// kFilterFloor for what float32 loses to underflow. This holds while every
// training row's scale is a normal float well inside float32
// (filter_applies); a tile where it is not passes every pair to the float64
// bounds. The formula is restated here with its constants made float32
// before the loop: the pair structs templated on the arithmetic type (tried)
// kept float64 constants in the loop, and GCC then vectorised it at half the
// width (256-bit vectors instead of 512).
constexpr float kFilterSlack = 0x1p-16f, kFilterFloor = 0x1p-120f;
inline bool filter_applies(const at::Tensor& scale) { return scale.min().item<double>() >= 0x1p-100; }

EXEMPLAR_CPU_CLONES void general_filter(GeneralPair pair, const c10::BFloat16* sc, const float* w, const float* scale,
                                        float sign, int64_t nt, float* hi) {
  const float up = 1 + kFilterSlack;
  const float eps = up * static_cast<float>(pair.eps), out = up * static_cast<float>(pair.out) + kFilterSlack,
              floor = up * static_cast<float>(pair.floor);
#pragma omp simd
  for (int64_t i = 0; i < nt; ++i) {
    const float s = static_cast<float>(sc[i]);
    hi[i] = (sign * s + (out * std::fabs(s) + (eps * w[i] + floor))) * scale[i] + kFilterFloor;
  }
}

// Rank 1: the partial sums stay in registers.
EXEMPLAR_CPU_CLONES void rank1_filter(LowRankPair pair, const c10::BFloat16* a, const c10::BFloat16* c, float an,
                                      float bn, const float* rn, const float* pn, const float* scale, float sign,
                                      int64_t nt, float* hi) {
  const float up = 1 + kFilterSlack;
  const float left = static_cast<float>(pair.left.eps) * an, left_out = static_cast<float>(pair.left.out),
              left_floor = static_cast<float>(pair.left.floor);
  const float right = static_cast<float>(pair.right.eps) * bn, right_out = static_cast<float>(pair.right.out),
              right_floor = static_cast<float>(pair.right.floor);
  const float size_slack = static_cast<float>(kSlack + pair.rescore);
#pragma omp simd
  for (int64_t i = 0; i < nt; ++i) {
    const float x = static_cast<float>(a[i]), y = static_cast<float>(c[i]), ax = std::fabs(x), ay = std::fabs(y);
    const float ea = left * rn[i] + (left_out * ax + left_floor);
    const float ec = right * pn[i] + (right_out * ay + right_floor);
    const float xs = ax + ea, ys = ay + ec, xy = x * y;
    const float bound = ea * ay + xs * ec + size_slack * (xs * ys) + 0x1p-126f;
    hi[i] = (sign * xy + kFilterSlack * std::fabs(xy) + up * bound) * scale[i] + kFilterFloor;
  }
}

// m terms (float64): terms outer, training rows inner, partial sums kept per
// row for the bounds of the pairs that pass.
EXEMPLAR_CPU_CLONES void low_rank_upper(LowRankPair pair, const c10::BFloat16* a, const c10::BFloat16* c, const float* an,
                                        const float* bn, const float* rn, const float* pn, const double* scale,
                                        double sign, int64_t m, int64_t nt, LowRankPair::Partial* partial,
                                        float* hi) {
  std::fill(partial, partial + nt, LowRankPair::Partial{});
  for (int64_t j = 0; j < m; ++j) {
    for (int64_t i = 0; i < nt; ++i) {
      pair.term(static_cast<float>(a[j * nt + i]), static_cast<float>(c[j * nt + i]), an[j], bn[j], rn[i], pn[i],
                partial[i]);
    }
  }
#pragma omp simd
  for (int64_t i = 0; i < nt; ++i) {
    double s, b;
    pair.finish(partial[i], scale[i], s, b);
    const double h = sign * s + b;  // raised before rounding to float32, so no less than h
    hi[i] = static_cast<float>(h + std::fabs(h) * 0x1p-22 + 0x1p-140);
  }
}

// One test row's pairs with the loaded training tile: every pair's upper
// bound over-estimated and each block's largest (upper), and one pair's two
// bounds in float64 (bounds).
class Pairs {
 public:
  // Test row t of the block at t0; general path: the screened scores and w
  // (float32) of the tile; low rank: the left and right GEMMs (bf16).
  Pairs(const Bf16Screen& screen, const std::pair<at::Tensor, at::Tensor>& tile, double sign, int64_t t0, int64_t t,
        int64_t nt)
      : screen_(screen), m_(screen.terms()), nt_(nt), sign_(sign),
        first_(static_cast<const c10::BFloat16*>(tile.first.const_data_ptr()) + t * m_ * nt),
        second_(static_cast<const char*>(tile.second.const_data_ptr()) + t * m_ * nt * tile.second.element_size()),
        scale_(screen.scale().const_data_ptr<double>()) {
    if (!screen.general()) {
      an_ = screen.test_norms().const_data_ptr<float>() + (t0 + t) * m_;
      bn_ = screen.test_right_norms().const_data_ptr<float>() + (t0 + t) * m_;
      rn_ = screen.train_norms().const_data_ptr<float>();
      pn_ = screen.train_right_norms().const_data_ptr<float>();
    }
  }

  // scale_f: the tile's scales in float32, undefined where the filter does not apply.
  void upper(const at::Tensor& scale_f, float* hi, float* maxima, LowRankPair::Partial* partial) const {
    if ((screen_.general() || m_ == 1) && !scale_f.defined()) {
      std::fill(hi, hi + nt_, std::numeric_limits<float>::infinity());
    } else if (screen_.general()) {
      general_filter(screen_.general_pair(), first_, w(), scale_f.const_data_ptr<float>(), static_cast<float>(sign_),
                     nt_, hi);
    } else if (m_ == 1) {
      rank1_filter(screen_.low_rank_pair(), first_, c(), an_[0], bn_[0], rn_, pn_, scale_f.const_data_ptr<float>(),
                   static_cast<float>(sign_), nt_, hi);
    } else {
      low_rank_upper(screen_.low_rank_pair(), first_, c(), an_, bn_, rn_, pn_, scale_, sign_, m_, nt_, partial, hi);
    }
    block_maxima(hi, nt_, maxima);
  }

  std::pair<double, double> bounds(int64_t i, const LowRankPair::Partial* partial) const {
    double s, b;
    if (screen_.general()) {
      screen_.general_pair()(static_cast<float>(first_[i]), w()[i], scale_[i], s, b);
    } else if (m_ == 1) {
      LowRankPair::Partial one;
      screen_.low_rank_pair().term(static_cast<float>(first_[i]), static_cast<float>(c()[i]), an_[0], bn_[0], rn_[i],
                                   pn_[i], one);
      screen_.low_rank_pair().finish(one, scale_[i], s, b);
    } else {
      screen_.low_rank_pair().finish(partial[i], scale_[i], s, b);
    }
    return {sign_ * s - b, sign_ * s + b};
  }

 private:
  const float* w() const { return reinterpret_cast<const float*>(second_); }
  const c10::BFloat16* c() const { return reinterpret_cast<const c10::BFloat16*>(second_); }

  const Bf16Screen& screen_;
  int64_t m_, nt_;
  double sign_;
  const c10::BFloat16* first_;
  const char* second_;
  const double* scale_;
  const float *an_ = nullptr, *bn_ = nullptr, *rn_ = nullptr, *pn_ = nullptr;
};

class CpuConsumer {
 public:
  CpuConsumer(const Bf16Screen& screen, int64_t k, bool largest)
      : k_(static_cast<size_t>(k)), sign_(largest ? 1.0 : -1.0),
        capacity_(static_cast<size_t>(candidate_capacity(screen.train_rows(), k))), rows_(screen.tests()) {}

  // Per test row: every pair's upper bound over-estimated (Pairs::upper,
  // vectorised), then only the pairs whose estimate reaches the row's
  // threshold get their float64 bounds and go to the heap: the threshold
  // settles within the first tile, after which a few pairs in a thousand pass.
  void consume(const Bf16Screen& screen, int64_t n0, int64_t nt, int64_t t0, int64_t tb,
               const std::pair<at::Tensor, at::Tensor>& tile) {
    const int64_t m = screen.terms();
    const auto scale_f = filter_applies(screen.scale()) ? screen.scale().to(at::kFloat) : at::Tensor();
    at::parallel_for(0, tb, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> hi(nt), maxima((nt + kBlock - 1) / kBlock);
      std::vector<LowRankPair::Partial> partial(m > 1 ? nt : 0);
      for (int64_t t = begin; t < end; ++t) {
        const Pairs pairs(screen, tile, sign_, t0, t, nt);
        pairs.upper(scale_f, hi.data(), maxima.data(), partial.data());
        RowState& row = rows_[t0 + t];
        double threshold = row.threshold(k_);
        for (int64_t b0 = 0; b0 < nt; b0 += kBlock) {
          if (maxima[b0 / kBlock] < threshold) continue;
          for (int64_t i = b0; i < std::min(nt, b0 + kBlock); ++i) {
            if (hi[i] < threshold) continue;
            const auto [lower, upper] = pairs.bounds(i, partial.data());
            row.offer(k_, lower, upper, n0 + i);
            row.cap(k_, capacity_);
            threshold = row.threshold(k_);
          }
        }
      }
    });
  }

  std::pair<at::Tensor, at::Tensor> candidates() {
    const int64_t T = static_cast<int64_t>(rows_.size());
    if (std::any_of(rows_.begin(), rows_.end(), [](const RowState& row) { return row.full; })) return {};
    auto survivors = at::empty({T}, at::kLong);
    int64_t* count = survivors.data_ptr<int64_t>();
    int64_t width = 1;
    for (int64_t t = 0; t < T; ++t) {
      rows_[t].prune(k_);
      count[t] = static_cast<int64_t>(rows_[t].ids.size());
      width = std::max<int64_t>(width, static_cast<int64_t>(rows_[t].ids.size()));
    }
    auto cand = at::full({T, width}, -1, at::kLong);
    int64_t* out = cand.data_ptr<int64_t>();
    for (int64_t t = 0; t < T; ++t) std::copy(rows_[t].ids.begin(), rows_[t].ids.end(), out + t * width);
    return {cand, survivors};
  }

 private:
  size_t k_;
  double sign_;
  size_t capacity_;
  std::vector<RowState> rows_;
};

}  // namespace

TORCH_LIBRARY_IMPL(exemplar, CPU, m) {
  m.impl("screened_topk", &screened_topk<CpuConsumer>);
  m.impl("screened_topk_rank1", &screened_topk_rank1<CpuConsumer>);
}

}  // namespace exemplar

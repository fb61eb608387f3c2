// Fused score + top-k on the GPU. Never materialises the (T, N) score matrix.
//
// Phase 1 (stream_topk_kernel): block (x, y) owns a tile of kBT test rows and
// the y-th contiguous split of the training set. For each kBN-wide train tile
// it computes the (kBT x kBN) scores in registers (SIMT register-tiled GEMM;
// the general path builds the per-example gradient tile R_i (x) Phi_i on the
// fly while staging it in shared memory, so it never exists in global memory),
// then filters each score against its row's current k-th best (the FAISS
// "thresholded queue" idea) into a per-row shared candidate buffer. A tile
// contributes at most kBN candidates per row, so the buffer cannot overflow.
// Rows with candidates are merged by one warp each into the row's sorted
// top-k list, which lives in a global (L2-resident) ping-pong workspace so k
// can be large (any k <= N).
// Phase 2 (merge_splits_kernel): per row, the splits' sorted lists are merged
// pairwise in ceil(log2 splits) rounds, each pair by rank (binary search of
// each element in the other list): O(splits * min(k, N/splits) * log(k) * log(splits))
// per row, not O(splits^2 ...).
//
// Order: RankOrder (csrc/order.h), shared with the CPU: a strict total order
// with NaN last, so ranks are unique and every device returns the same indices.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <mutex>

#include "../checks.h"
#include "../order.h"

namespace exemplar {
namespace {

constexpr int kThreads = 256;  // 16 x 16; each thread owns a 4 x 4 micro-tile
constexpr int kBT = 64;        // test rows per block
constexpr int kBN = 64;        // train rows per tile
constexpr int kBK = 16;        // reduction depth per shared-memory stage
constexpr int kWarps = kThreads / 32;
constexpr int kMaxDevices = 64;
// Leading dimensions of the staged A and B tiles. The stores put a warp's 16
// consecutive reduction indices c at stride kBT (or kBN) = 64 elements, a
// multiple of the 32 banks, so all 16 hit one bank; one element of padding
// spreads them over 16 banks (float; double's stride of 130 words over even banks).
constexpr int kLdA = kBT + 1;
constexpr int kLdB = kBN + 1;

template <typename scalar_t, bool Largest>
using Order = RankOrder<scalar_t, Largest>;

// Number of entries of the sorted list (vals, idx)[0, len) that come before (v, i).
template <typename scalar_t, bool Largest>
__device__ int count_before(const scalar_t* vals, const int* idx, int len, scalar_t v, int i) {
  int lo = 0, hi = len;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (Order<scalar_t, Largest>::before(vals[mid], idx[mid], v, i)) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// Writes each entry of the sorted list a to out[its rank in the union of a and
// the sorted list b], dropping ranks >= limit. One warp; the strict order makes
// the ranks of the union a permutation, so the two calls (a, b) and (b, a) fill
// out[0, limit) exactly once.
template <typename scalar_t, bool Largest>
__device__ void scatter_by_rank(const scalar_t* av, const int* ai, int a_len, const scalar_t* bv,
                                const int* bi, int b_len, int limit, scalar_t* ov, int* oi, int lane) {
  for (int j = lane; j < a_len; j += 32) {
    const int rank = j + count_before<scalar_t, Largest>(bv, bi, b_len, av[j], ai[j]);
    if (rank < limit) {
      ov[rank] = av[j];
      oi[rank] = ai[j];
    }
  }
}

// acc (4 x 4) += A[t0.., :K] * B[:K, n0..] where A is (T, K) row-major and
// load_b(local_n, kappa) returns B[kappa, n0 + local_n] (0 outside).
template <typename scalar_t, typename LoadB>
__device__ void tile_gemm(const scalar_t* __restrict__ A, int64_t T, int64_t K, int64_t t0,
                          LoadB load_b, scalar_t (&acc)[4][4], scalar_t* As, scalar_t* Bs) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  for (int64_t kk = 0; kk < K; kk += kBK) {
    for (int e = threadIdx.x; e < kBT * kBK; e += kThreads) {
      const int r = e / kBK, c = e % kBK;
      const int64_t t = t0 + r, kappa = kk + c;
      As[c * kLdA + r] = (t < T && kappa < K) ? A[t * K + kappa] : scalar_t(0);
    }
    for (int e = threadIdx.x; e < kBN * kBK; e += kThreads) {
      const int r = e / kBK, c = e % kBK;
      const int64_t kappa = kk + c;
      Bs[c * kLdB + r] = kappa < K ? load_b(r, kappa) : scalar_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int c = 0; c < kBK; ++c) {
      scalar_t a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        a[i] = As[c * kLdA + ty + 16 * i];
        b[i] = Bs[c * kLdB + tx + 16 * i];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }
}

// A split's list never holds more than min(k, per_split) entries, so that is
// each slot's size: at T = 1, N = 1e6, k = 1e5 on 132 SMs, 16 MB instead of 418 MB.
// A row's slots are contiguous, so phase 2 merges splits [s, s + w) into the
// w * cap entries starting at slot s.
template <typename scalar_t>
struct Workspace {
  scalar_t* vals;  // (2, T, splits, cap): ping-pong sorted lists
  int* idx;        // (2, T, splits, cap)
  int* lens;       // (2, T, splits): entries in each list of each half
  int64_t T, splits, k, cap;
  __device__ int64_t offset(int buffer, int64_t t, int64_t split) const {
    return ((buffer * T + t) * splits + split) * cap;
  }
  __device__ int* len(int buffer, int64_t t, int64_t split) const {
    return lens + (buffer * T + t) * splits + split;
  }
};

template <typename scalar_t>
struct SharedState {
  scalar_t* As;         // (kBK, kLdA)
  scalar_t* Bs;         // (kBK, kLdB)
  scalar_t* cand_v;     // (kBT, kBN) candidates of the current tile
  int* cand_i;          // (kBT, kBN)
  scalar_t* sorted_v;   // (kWarps, kBN) a warp's candidates in order
  int* sorted_i;        // (kWarps, kBN)
  scalar_t* thr_v;      // (kBT,) k-th best so far (valid once len == k)
  int* thr_i;           // (kBT,)
  int* count;           // (kBT,) candidates this tile
  int* len;             // (kBT,) entries in the row's list
  int* buffer;          // (kBT,) which ping-pong half holds the list
};

template <typename scalar_t>
size_t shared_bytes() {
  return sizeof(scalar_t) * (kBK * kLdA + kBK * kLdB + kBT * kBN + kWarps * kBN + kBT) +
         sizeof(int) * (kBT * kBN + kWarps * kBN + 4 * kBT);
}

template <typename scalar_t>
__device__ SharedState<scalar_t> carve_shared(char* base) {
  SharedState<scalar_t> s;
  scalar_t* f = reinterpret_cast<scalar_t*>(base);
  s.As = f;            f += kBK * kLdA;
  s.Bs = f;            f += kBK * kLdB;
  s.cand_v = f;        f += kBT * kBN;
  s.sorted_v = f;      f += kWarps * kBN;
  s.thr_v = f;         f += kBT;
  int* n = reinterpret_cast<int*>(f);
  s.cand_i = n;        n += kBT * kBN;
  s.sorted_i = n;      n += kWarps * kBN;
  s.thr_i = n;         n += kBT;
  s.count = n;         n += kBT;
  s.len = n;           n += kBT;
  s.buffer = n;
  return s;
}

// One warp merges row r's candidates into its sorted list (ping-pong halves).
template <typename scalar_t, bool Largest>
__device__ void merge_row(SharedState<scalar_t>& sh, const Workspace<scalar_t>& ws, int r,
                          int64_t t, int64_t split, int lane, int warp) {
  using O = Order<scalar_t, Largest>;
  const int m = sh.count[r];
  const scalar_t* cv = sh.cand_v + r * kBN;
  const int* ci = sh.cand_i + r * kBN;
  scalar_t* sv = sh.sorted_v + warp * kBN;
  int* si = sh.sorted_i + warp * kBN;
  for (int j = lane; j < m; j += 32) {  // rank sort: m <= kBN, the order is strict
    int rank = 0;
    for (int l = 0; l < m; ++l) rank += O::before(cv[l], ci[l], cv[j], ci[j]);
    sv[rank] = cv[j];
    si[rank] = ci[j];
  }
  __syncwarp();
  const int len = sh.len[r];
  const int from = sh.buffer[r];
  const int64_t k = ws.k;
  const scalar_t* lv = ws.vals + ws.offset(from, t, split);
  const int* li = ws.idx + ws.offset(from, t, split);
  scalar_t* ov = ws.vals + ws.offset(1 - from, t, split);
  int* oi = ws.idx + ws.offset(1 - from, t, split);
  const int new_len = static_cast<int>(len + m < k ? len + m : k);
  scatter_by_rank<scalar_t, Largest>(lv, li, len, sv, si, m, new_len, ov, oi, lane);
  scatter_by_rank<scalar_t, Largest>(sv, si, m, lv, li, len, new_len, ov, oi, lane);
  __syncwarp();  // also orders the lanes' writes to ov/oi before lane 0 reads them
  if (lane == 0) {
    if (new_len == k) {
      sh.thr_v[r] = ov[k - 1];
      sh.thr_i[r] = oi[k - 1];
    }
    sh.len[r] = new_len;
    sh.buffer[r] = 1 - from;
    sh.count[r] = 0;
  }
  __syncwarp();
}

template <typename scalar_t, bool Largest, bool Rank1>
__global__ void __launch_bounds__(kThreads)
stream_topk_kernel(const scalar_t* __restrict__ left,   // S_flat (T, C*Dp) or alpha (T, C)
                   const scalar_t* __restrict__ beta,   // (T, Dp), rank-1 only
                   const scalar_t* __restrict__ R,      // (N, C)
                   const scalar_t* __restrict__ Phi,    // (N, Dp)
                   const scalar_t* __restrict__ inv_norm,  // (N,)
                   int64_t T, int64_t N, int64_t C, int64_t Dp, int64_t per_split,
                   Workspace<scalar_t> ws) {
  using O = Order<scalar_t, Largest>;
  extern __shared__ __align__(16) char smem[];
  auto sh = carve_shared<scalar_t>(smem);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t t0 = int64_t(blockIdx.x) * kBT;
  const int64_t split = blockIdx.y;
  const int64_t n_begin = split * per_split;
  const int64_t n_end = n_begin + per_split < N ? n_begin + per_split : N;

  for (int r = threadIdx.x; r < kBT; r += kThreads) {
    sh.count[r] = 0;
    sh.len[r] = 0;
    sh.buffer[r] = 0;
    sh.thr_v[r] = scalar_t(0);  // read only once len == k
    sh.thr_i[r] = 0;
  }
  __syncthreads();

  for (int64_t n0 = n_begin; n0 < n_end; n0 += kBN) {
    scalar_t acc[4][4] = {};
    if constexpr (Rank1) {
      scalar_t right[4][4] = {};
      tile_gemm(left, T, C, t0,
                [&](int r, int64_t c) { return n0 + r < n_end ? R[(n0 + r) * C + c] : scalar_t(0); },
                acc, sh.As, sh.Bs);
      tile_gemm(beta, T, Dp, t0,
                [&](int r, int64_t d) { return n0 + r < n_end ? Phi[(n0 + r) * Dp + d] : scalar_t(0); },
                right, sh.As, sh.Bs);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] *= right[i][j];
    } else {
      tile_gemm(left, T, C * Dp, t0,
                [&](int r, int64_t kappa) {
                  const int64_t n = n0 + r;
                  if (n >= n_end) return scalar_t(0);
                  // C * Dp < 2^31 (checked on the host): a 32-bit division, several times cheaper
                  const int c = static_cast<int>(kappa) / static_cast<int>(Dp);
                  return R[n * C + c] * Phi[n * Dp + (static_cast<int>(kappa) - c * static_cast<int>(Dp))];
                },
                acc, sh.As, sh.Bs);
    }

    // Filter against each row's threshold into the candidate buffers.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = ty + 16 * i;
      if (t0 + r >= T) continue;
      const bool full = sh.len[r] == ws.k;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t n = n0 + tx + 16 * j;
        if (n >= n_end) continue;
        const scalar_t v = acc[i][j] * inv_norm[n];
        if (full && !O::before(v, static_cast<int>(n), sh.thr_v[r], sh.thr_i[r])) continue;
        const int slot = atomicAdd(&sh.count[r], 1);
        sh.cand_v[r * kBN + slot] = v;
        sh.cand_i[r * kBN + slot] = static_cast<int>(n);
      }
    }
    __syncthreads();
    for (int r = warp; r < kBT; r += kWarps) {
      if (t0 + r < T && sh.count[r] > 0) merge_row<scalar_t, Largest>(sh, ws, r, t0 + r, split, lane, warp);
    }
    __syncthreads();
  }

  // Leave every list in half 0 for phase 2.
  for (int r = warp; r < kBT; r += kWarps) {
    const int64_t t = t0 + r;
    if (t >= T) continue;
    if (sh.buffer[r] == 1) {
      const scalar_t* sv = ws.vals + ws.offset(1, t, split);
      const int* si = ws.idx + ws.offset(1, t, split);
      scalar_t* dv = ws.vals + ws.offset(0, t, split);
      int* di = ws.idx + ws.offset(0, t, split);
      for (int j = lane; j < sh.len[r]; j += 32) {
        dv[j] = sv[j];
        di[j] = si[j];
      }
    }
    if (lane == 0) *ws.len(0, t, split) = sh.len[r];
  }
}

template <typename scalar_t, bool Largest>
__global__ void __launch_bounds__(kThreads)
merge_splits_kernel(Workspace<scalar_t> ws,
                    scalar_t* __restrict__ out_v,  // (T, k)
                    int64_t* __restrict__ out_i) {  // (T, k)
  const int64_t t = blockIdx.x;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  // Round w merges the lists at slots s and s + w (s a multiple of 2w) into
  // slot s of the other half, one warp per pair; each merged list keeps
  // min(k, both lengths) entries, which fit the 2w slots from s on.
  int from = 0;
  for (int64_t w = 1; w < ws.splits; w *= 2, from = 1 - from) {
    for (int64_t s = 2 * w * warp; s < ws.splits; s += 2 * w * kWarps) {
      const int a_len = *ws.len(from, t, s);
      const int b_len = s + w < ws.splits ? *ws.len(from, t, s + w) : 0;
      const int limit = static_cast<int>(a_len + b_len < ws.k ? a_len + b_len : ws.k);
      const scalar_t* av = ws.vals + ws.offset(from, t, s);
      const int* ai = ws.idx + ws.offset(from, t, s);
      const scalar_t* bv = ws.vals + ws.offset(from, t, s + w < ws.splits ? s + w : s);
      const int* bi = ws.idx + ws.offset(from, t, s + w < ws.splits ? s + w : s);
      scalar_t* ov = ws.vals + ws.offset(1 - from, t, s);
      int* oi = ws.idx + ws.offset(1 - from, t, s);
      scatter_by_rank<scalar_t, Largest>(av, ai, a_len, bv, bi, b_len, limit, ov, oi, lane);
      scatter_by_rank<scalar_t, Largest>(bv, bi, b_len, av, ai, a_len, limit, ov, oi, lane);
      if (lane == 0) *ws.len(1 - from, t, s) = limit;
    }
    __syncthreads();
  }
  // The splits cover N >= k rows, so the final list holds exactly k entries.
  const scalar_t* fv = ws.vals + ws.offset(from, t, 0);
  const int* fi = ws.idx + ws.offset(from, t, 0);
  for (int64_t j = threadIdx.x; j < ws.k; j += kThreads) {
    out_v[t * ws.k + j] = fv[j];
    out_i[t * ws.k + j] = fi[j];
  }
}

template <typename scalar_t, bool Largest, bool Rank1>
void launch(const at::Tensor& left, const at::Tensor& beta, const at::Tensor& R,
            const at::Tensor& Phi, const at::Tensor& inv_norm, int64_t k, at::Tensor& values,
            at::Tensor& indices) {
  const int64_t T = left.size(0), N = R.size(0), C = R.size(1), Dp = Phi.size(1);
  const int64_t test_tiles = (T + kBT - 1) / kBT;
  const int64_t train_tiles = (N + kBN - 1) / kBN;
  // Enough blocks to fill the GPU twice over; each split scans whole tiles.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(train_tiles, (2 * sms + test_tiles - 1) / test_tiles));
  const int64_t per_split = ((train_tiles + splits - 1) / splits) * kBN;
  const int64_t used_splits = (N + per_split - 1) / per_split;
  TORCH_CHECK(test_tiles <= std::numeric_limits<int>::max() && used_splits <= 65535,
              "exemplar::topk: too many test rows for one launch (T=", T, ")");

  const int64_t cap = std::min(k, per_split);
  auto opts = R.options();
  auto ws_vals = at::empty({2 * T * used_splits * cap}, opts);
  auto ws_idx = at::empty({2 * T * used_splits * cap}, opts.dtype(at::kInt));
  auto ws_lens = at::empty({2 * T * used_splits}, opts.dtype(at::kInt));
  Workspace<scalar_t> ws{ws_vals.data_ptr<scalar_t>(), ws_idx.data_ptr<int>(), ws_lens.data_ptr<int>(), T,
                         used_splits, k, cap};

  auto stream = at::cuda::getCurrentCUDAStream();
  const size_t smem = shared_bytes<scalar_t>();
  auto kernel = stream_topk_kernel<scalar_t, Largest, Rank1>;
  // The shared-memory limit is a per-device attribute of the function: set once per device.
  static std::once_flag attribute_set[kMaxDevices];
  const int device = R.get_device();
  TORCH_CHECK(device < kMaxDevices, "exemplar::fused_topk: device index ", device, " >= ", kMaxDevices);
  std::call_once(attribute_set[device], [&] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  });
  const dim3 grid(static_cast<unsigned>(test_tiles), static_cast<unsigned>(used_splits));
  kernel<<<grid, kThreads, smem, stream>>>(
      left.data_ptr<scalar_t>(), Rank1 ? beta.data_ptr<scalar_t>() : nullptr, R.data_ptr<scalar_t>(),
      Phi.data_ptr<scalar_t>(), inv_norm.data_ptr<scalar_t>(), T, N, C, Dp, per_split, ws);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  merge_splits_kernel<scalar_t, Largest><<<static_cast<unsigned>(T), kThreads, 0, stream>>>(
      ws, values.data_ptr<scalar_t>(), indices.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool Rank1>
std::tuple<at::Tensor, at::Tensor> fused_topk(const at::Tensor& left_, const at::Tensor& beta_,
                                              const at::Tensor& R_, const at::Tensor& Phi_,
                                              const at::Tensor& inv_norm_, int64_t k, bool largest) {
  c10::cuda::CUDAGuard guard(R_.device());
  const char* op = Rank1 ? "exemplar::fused_topk_rank1" : "exemplar::fused_topk";
  TORCH_CHECK(R_.is_cuda(), op, ": expected CUDA tensors, R is on ", R_.device());
  TORCH_CHECK(R_.size(0) <= std::numeric_limits<int>::max(), op,
              ": N must fit in int32 on the GPU, got N=", R_.size(0));
  TORCH_CHECK(R_.size(1) * Phi_.size(1) <= std::numeric_limits<int>::max(), op,
              ": C * Dp must fit in int32 on the GPU, got C=", R_.size(1), ", Dp=", Phi_.size(1));
  auto left = Rank1 ? left_.contiguous() : left_.reshape({left_.size(0), -1}).contiguous();
  auto beta = Rank1 ? beta_.contiguous() : beta_;
  auto R = R_.contiguous();
  auto Phi = Phi_.contiguous();
  auto inv_norm = inv_norm_.contiguous();
  const int64_t T = left.size(0);
  auto values = at::empty({T, k}, R.options());
  auto indices = at::empty({T, k}, R.options().dtype(at::kLong));
  if (T == 0) return {values, indices};
  AT_DISPATCH_FLOATING_TYPES(R.scalar_type(), "fused_topk_cuda", [&] {
    if (largest) {
      launch<scalar_t, true, Rank1>(left, beta, R, Phi, inv_norm, k, values, indices);
    } else {
      launch<scalar_t, false, Rank1>(left, beta, R, Phi, inv_norm, k, values, indices);
    }
  });
  return {values, indices};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_cuda(const at::Tensor& S, const at::Tensor& R,
                                             const at::Tensor& Phi, const at::Tensor& inv_norm,
                                             int64_t k, bool largest) {
  check_topk(S, R, Phi, inv_norm, k);
  return fused_topk<false>(S, S, R, Phi, inv_norm, k, largest);
}

std::tuple<at::Tensor, at::Tensor> topk_rank1_cuda(const at::Tensor& alpha, const at::Tensor& beta,
                                                   const at::Tensor& R, const at::Tensor& Phi,
                                                   const at::Tensor& inv_norm, int64_t k,
                                                   bool largest) {
  check_topk_rank1(alpha, beta, R, Phi, inv_norm, k);
  TORCH_CHECK(alpha.dim() == 2, "exemplar::fused_topk_rank1: the fused kernel takes rank 1, alpha (T, C); "
              "got shape ", alpha.sizes(), " (use exemplar::topk_rank1 for rank m)");
  return fused_topk<true>(alpha, beta, R, Phi, inv_norm, k, largest);
}

}  // namespace exemplar

namespace exemplar {
// Selected by name (exemplar.ops.topk(..., kernel="fused")); topk itself runs
// the streamed composite on CUDA until this kernel is proven on a GPU.
TORCH_LIBRARY_IMPL(exemplar, CUDA, m) {
  m.impl("fused_topk", &topk_cuda);
  m.impl("fused_topk_rank1", &topk_rank1_cuda);
}
}  // namespace exemplar

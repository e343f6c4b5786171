// CUDA kernel of detr_kernels::linear_sum_assignment (schema and codes: see matcher.cpp).
//
// One thread block per problem: every decoder layer times every image is solved by one launch, and the
// assignment is written on the device, so callers need no host sync. Inside a block the rows of the smaller
// side are augmented one after another (shortest augmenting paths, as on the CPU); each Dijkstra step spreads
// the column scan over the block's threads (thread t owns columns t, t + blockDim, ...) and ends in a block
// argmin. A column's tentative distance, predecessor and "done" flag are touched only by its owning thread
// during a search, so a step needs no barrier beyond the argmin's. The problem's cost matrix is staged in
// shared memory in the orientation the search reads (rows of the smaller side) when it fits, so a strided,
// transposed input (DETR's [queries, targets] costs, solved target by target) is read from global memory once
// and coalesced. Potentials are kept in double precision, as scipy does.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "matcher.h"

#include <cuda_runtime.h>
#include <math_constants.h>

#include <climits>
#include <cstdint>

namespace detr_kernels {
namespace {

// Dynamic shared memory of one block: working arrays for the largest problem of the launch, then the cost.
struct Layout {
  int64_t rows, cols;  // max over the launch of the smaller / larger side
  size_t u, v, shortest, path, row4col, col4row, visited_row, visited_col, cost, work_bytes;

  Layout(int64_t r, int64_t c) : rows(r), cols(c) {
    size_t off = 0;
    auto take = [&](size_t bytes) {
      const size_t at = off;
      off += (bytes + 15) / 16 * 16;
      return at;
    };
    u = take(sizeof(double) * r);
    v = take(sizeof(double) * c);
    shortest = take(sizeof(double) * c);
    path = take(sizeof(int) * c);
    row4col = take(sizeof(int) * c);
    col4row = take(sizeof(int) * r);
    visited_row = take(r);
    visited_col = take(c);
    cost = off;
    work_bytes = off;
  }
};

template <typename T>
__device__ __forceinline__ T* at_offset(unsigned char* base, size_t off) {
  return reinterpret_cast<T*>(base + off);
}

// Keeps the smaller (value, tie) pair; tie orders free columns first, then by column index.
__device__ __forceinline__ void keep_min(double& val, int& tie, double other_val, int other_tie) {
  if (other_val < val || (other_val == val && other_tie < tie)) {
    val = other_val;
    tie = other_tie;
  }
}

template <int kWarps>
__device__ __forceinline__ void block_argmin(double& val, int& tie, double* red_val, int* red_tie, int parity) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    keep_min(val, tie, __shfl_xor_sync(0xffffffffu, val, offset), __shfl_xor_sync(0xffffffffu, tie, offset));
  }
  if (kWarps == 1) return;
  // Double-buffered across steps, so one barrier per step suffices.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    red_val[parity * kWarps + warp] = val;
    red_tie[parity * kWarps + warp] = tie;
  }
  __syncthreads();
  for (int w = 0; w < kWarps; ++w) keep_min(val, tie, red_val[parity * kWarps + w], red_tie[parity * kWarps + w]);
}

template <typename scalar_t, int kWarps>
__global__ void __launch_bounds__(kWarps * 32) lsa_kernel(
    const scalar_t* __restrict__ cost, int64_t n, int64_t m, int64_t sp, int64_t sn, int64_t sm,
    const int64_t* __restrict__ num_cols, int64_t* __restrict__ out, Layout lay, bool staged) {
  constexpr int kThreads = kWarps * 32;
  const double inf = CUDART_INF;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ double red_val[2 * kWarps];
  __shared__ int red_tie[2 * kWarps];

  const int64_t p = blockIdx.x;
  const int tid = threadIdx.x;
  const scalar_t* g = cost + p * sp;
  int64_t* out_p = out + p * m;
  const int64_t wanted = num_cols[p];
  const int m_valid = static_cast<int>(wanted < 0 ? 0 : (wanted > m ? m : wanted));
  const bool transposed = n > m_valid;
  const int nr = transposed ? m_valid : static_cast<int>(n);
  const int nc = transposed ? static_cast<int>(n) : m_valid;
  for (int c = tid; c < m; c += kThreads) out_p[c] = -1;
  if (nr == 0) return;

  double* u = at_offset<double>(smem, lay.u);
  double* v = at_offset<double>(smem, lay.v);
  double* shortest = at_offset<double>(smem, lay.shortest);
  int* path = at_offset<int>(smem, lay.path);
  int* row4col = at_offset<int>(smem, lay.row4col);
  int* col4row = at_offset<int>(smem, lay.col4row);
  char* visited_row = at_offset<char>(smem, lay.visited_row);
  char* visited_col = at_offset<char>(smem, lay.visited_col);
  scalar_t* cs = at_offset<scalar_t>(smem, lay.cost);
  const int64_t rs_g = transposed ? sm : sn, cs_g = transposed ? sn : sm;

  // Read the valid region once in memory order (each warp a row, lanes along columns), check it, stage it
  // oriented: small-side row i, column j at i * nc + j.
  bool bad = false;
  for (int r = tid >> 5; r < n; r += kWarps) {
    for (int c = tid & 31; c < m_valid; c += 32) {
      const scalar_t x = g[r * sn + c * sm];
      bad |= isnan(static_cast<double>(x)) || static_cast<double>(x) == -inf;
      if (staged) cs[transposed ? c * nc + r : r * nc + c] = x;
    }
  }
  for (int j = tid; j < nc; j += kThreads) {
    v[j] = 0.0;
    row4col[j] = -1;
  }
  for (int i = tid; i < nr; i += kThreads) {
    u[i] = 0.0;
    col4row[i] = -1;
  }
  if (__syncthreads_or(bad)) {
    for (int c = tid; c < m; c += kThreads) out_p[c] = kInvalid;
    return;
  }

  int parity = 0;
  for (int cur = 0; cur < nr; ++cur) {
    for (int j = tid; j < nc; j += kThreads) {
      shortest[j] = inf;
      visited_col[j] = 0;
    }
    for (int i = tid; i < nr; i += kThreads) visited_row[i] = 0;
    __syncthreads();

    double min_val = 0.0;
    int row = cur, sink = -1;
    while (sink < 0) {
      if (tid == 0) visited_row[row] = 1;
      const double base = min_val - u[row];
      double best = inf;
      int tie = INT_MAX;
      for (int j = tid; j < nc; j += kThreads) {
        if (visited_col[j]) continue;
        const double c = staged ? static_cast<double>(cs[row * nc + j]) : static_cast<double>(g[row * rs_g + j * cs_g]);
        const double reduced = base + c - v[j];
        double d = shortest[j];
        if (reduced < d) {
          d = reduced;
          shortest[j] = d;
          path[j] = row;
        }
        keep_min(best, tie, d, row4col[j] == -1 ? j : nc + j);
      }
      block_argmin<kWarps>(best, tie, red_val, red_tie, parity);
      parity ^= 1;
      if (best == inf) break;  // uniform: every thread holds the same argmin
      min_val = best;
      const int col = tie < nc ? tie : tie - nc;
      if (col % kThreads == tid) visited_col[col] = 1;  // owner marks, owner reads
      if (tie < nc) {
        sink = col;
      } else {
        row = row4col[col];
      }
    }
    if (sink < 0) {
      __syncthreads();
      for (int c = tid; c < m; c += kThreads) out_p[c] = kInfeasible;
      return;
    }
    __syncthreads();  // every column's shortest/path/visited visible to all
    for (int i = tid; i < nr; i += kThreads) {
      if (i == cur) {
        u[i] += min_val;
      } else if (visited_row[i]) {
        u[i] += min_val - shortest[col4row[i]];
      }
    }
    for (int j = tid; j < nc; j += kThreads) {
      if (visited_col[j]) v[j] -= min_val - shortest[j];
    }
    __syncthreads();  // the dual update reads col4row, which the path flip below rewrites
    if (tid == 0) {
      int j = sink;
      while (true) {
        const int i = path[j];
        row4col[j] = i;
        const int next = col4row[i];
        col4row[i] = j;
        j = next;
        if (i == cur) break;
      }
    }
    __syncthreads();
  }
  for (int i = tid; i < nr; i += kThreads) {
    if (transposed) {
      out_p[i] = col4row[i];
    } else {
      out_p[col4row[i]] = i;
    }
  }
}

template <typename scalar_t, int kWarps>
void launch(const at::Tensor& cost, const at::Tensor& num_cols, at::Tensor& out, const Layout& lay, bool staged,
            size_t smem, cudaStream_t stream) {
  auto kernel = lsa_kernel<scalar_t, kWarps>;
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  kernel<<<static_cast<unsigned>(cost.size(0)), kWarps * 32, smem, stream>>>(
      cost.const_data_ptr<scalar_t>(), cost.size(1), cost.size(2), cost.stride(0), cost.stride(1), cost.stride(2),
      num_cols.const_data_ptr<int64_t>(), out.mutable_data_ptr<int64_t>(), lay, staged);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void dispatch_warps(const at::Tensor& cost, const at::Tensor& num_cols, at::Tensor& out, const Layout& lay,
                    bool staged, size_t smem, cudaStream_t stream) {
  // About four columns per thread: one warp for DETR's 100 queries, up to eight warps for wide problems.
  const int64_t want = (lay.cols + 4 * 32 - 1) / (4 * 32);
  if (want <= 1) {
    launch<scalar_t, 1>(cost, num_cols, out, lay, staged, smem, stream);
  } else if (want <= 2) {
    launch<scalar_t, 2>(cost, num_cols, out, lay, staged, smem, stream);
  } else if (want <= 4) {
    launch<scalar_t, 4>(cost, num_cols, out, lay, staged, smem, stream);
  } else {
    launch<scalar_t, 8>(cost, num_cols, out, lay, staged, smem, stream);
  }
}

at::Tensor lsa_cuda(const at::Tensor& cost, const at::Tensor& num_cols) {
  check_lsa_inputs(cost, num_cols);
  const int64_t P = cost.size(0), N = cost.size(1), M = cost.size(2);
  TORCH_CHECK(P <= INT_MAX && N < INT_MAX / 2 && M < INT_MAX / 2, "linear_sum_assignment: sizes too large: ",
              cost.sizes());
  const c10::cuda::CUDAGuard guard(cost.device());
  at::Tensor out = at::empty({P, M}, cost.options().dtype(at::kLong));
  if (P == 0) return out;
  if (M == 0 || N == 0) return out.fill_(-1);
  const at::Tensor cols = num_cols.contiguous();

  const Layout lay(std::min(N, M), std::max(N, M));
  const size_t elem = cost.scalar_type() == at::kFloat ? sizeof(float) : sizeof(double);
  const size_t staged_bytes = lay.work_bytes + elem * static_cast<size_t>(lay.rows) * static_cast<size_t>(lay.cols);
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, cost.get_device()));
  const size_t limit = static_cast<size_t>(optin) - 1024;  // headroom for the kernel's static shared memory
  TORCH_CHECK(lay.work_bytes <= limit, "linear_sum_assignment: a ", N, " x ", M,
              " problem needs more shared memory than this GPU has for the CUDA solver; use backend='cpp'");
  const bool staged = staged_bytes <= limit;
  const size_t smem = staged ? staged_bytes : lay.work_bytes;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (cost.scalar_type() == at::kFloat) {
    dispatch_warps<float>(cost, cols, out, lay, staged, smem, stream);
  } else {
    dispatch_warps<double>(cost, cols, out, lay, staged, smem, stream);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(detr_kernels, CUDA, m) { m.impl("linear_sum_assignment", &lsa_cuda); }

}  // namespace detr_kernels

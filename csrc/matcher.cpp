// Batched exact rectangular linear assignment: schema, CPU kernel (parallel over problems) and the shape
// function used by fake/meta tensors. The CUDA kernel lives in matcher_cuda.cu and registers itself on the
// same schema, so this file builds with any C++ compiler and no CUDA toolkit.
//
// Op: detr_kernels::linear_sum_assignment(Tensor cost, Tensor num_cols) -> Tensor
//   cost      [P, N, M] float32 or float64, any strides
//   num_cols  [P] int64, valid columns of each problem (clamped to [0, M]); columns beyond are ignored
//   returns   [P, M] int64: for each column the row assigned to it, -1 where unassigned or beyond num_cols.
//             A problem whose valid region holds NaN or -inf has every entry set to -2; a problem with no
//             finite complete assignment (too many +inf entries) has every entry set to -3. The op never
//             raises on data, so the CUDA kernel needs no host sync; detr_kernels.matcher turns these codes
//             into errors that name the problem.
//
// Algorithm: shortest augmenting paths with dual potentials (Jonker-Volgenant family, as described by Crouse,
// "On implementing 2D rectangular assignment algorithms", IEEE TAES 2016), the method scipy uses. Problems with
// more rows than valid columns are solved transposed, as scipy does, so the smaller side is augmented. The
// CPU kernel scans columns in scipy's order with scipy's tie rule, in double precision, so it returns scipy's
// assignment even where the optimum is not unique.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <Python.h>
#include <torch/library.h>

#include "matcher.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace detr_kernels {
namespace {

// Scratch of one problem; reused across the problems a thread solves.
struct Workspace {
  std::vector<double> cost, u, v, shortest;
  std::vector<int64_t> path, row4col, col4row, remaining;
  std::vector<char> visited_row, visited_col;

  void reset(int64_t nr, int64_t nc) {
    cost.resize(nr * nc);
    u.assign(nr, 0.0);
    v.assign(nc, 0.0);
    shortest.resize(nc);
    path.resize(nc);
    row4col.assign(nc, -1);
    col4row.assign(nr, -1);
    remaining.resize(nc);
    visited_row.resize(nr);
    visited_col.resize(nc);
  }
};

// Dijkstra-like search from free row `start` over reduced costs; returns the free column that ends the
// shortest augmenting path (or -1 when every reachable column costs +inf) and its length in `min_val`.
int64_t shortest_augmenting_path(Workspace& ws, int64_t nr, int64_t nc, int64_t start, double& min_val) {
  constexpr double inf = std::numeric_limits<double>::infinity();
  int64_t num_remaining = nc;
  // Reverse order, as scipy: with its tie rule this makes the same choices on equal reduced costs.
  for (int64_t it = 0; it < nc; ++it) ws.remaining[it] = nc - it - 1;
  std::fill(ws.visited_row.begin(), ws.visited_row.end(), 0);
  std::fill(ws.visited_col.begin(), ws.visited_col.end(), 0);
  std::fill(ws.shortest.begin(), ws.shortest.end(), inf);

  min_val = 0.0;
  int64_t row = start;
  while (true) {
    ws.visited_row[row] = 1;
    const double* cost_row = ws.cost.data() + row * nc;
    const double base = min_val - ws.u[row];
    int64_t best = -1;
    double lowest = inf;
    for (int64_t it = 0; it < num_remaining; ++it) {
      const int64_t j = ws.remaining[it];
      const double reduced = base + cost_row[j] - ws.v[j];
      if (reduced < ws.shortest[j]) {
        ws.path[j] = row;
        ws.shortest[j] = reduced;
      }
      // Prefer a free column on ties: it ends the search.
      if (ws.shortest[j] < lowest || (ws.shortest[j] == lowest && ws.row4col[j] == -1)) {
        lowest = ws.shortest[j];
        best = it;
      }
    }
    min_val = lowest;
    if (min_val == inf) return -1;
    const int64_t col = ws.remaining[best];
    ws.visited_col[col] = 1;
    ws.remaining[best] = ws.remaining[--num_remaining];
    if (ws.row4col[col] == -1) return col;
    row = ws.row4col[col];
  }
}

// Solves the nr x nc problem held in ws.cost (nr <= nc); fills ws.col4row. Returns false when infeasible.
bool solve(Workspace& ws, int64_t nr, int64_t nc) {
  for (int64_t cur = 0; cur < nr; ++cur) {
    double min_val = 0.0;
    const int64_t sink = shortest_augmenting_path(ws, nr, nc, cur, min_val);
    if (sink < 0) return false;
    // Dual update keeps reduced costs non-negative and zero along matched edges.
    ws.u[cur] += min_val;
    for (int64_t i = 0; i < nr; ++i) {
      if (ws.visited_row[i] && i != cur) ws.u[i] += min_val - ws.shortest[ws.col4row[i]];
    }
    for (int64_t j = 0; j < nc; ++j) {
      if (ws.visited_col[j]) ws.v[j] -= min_val - ws.shortest[j];
    }
    // Flip the matching along the path back to `cur`.
    int64_t j = sink;
    while (true) {
      const int64_t i = ws.path[j];
      ws.row4col[j] = i;
      std::swap(ws.col4row[i], j);
      if (i == cur) break;
    }
  }
  return true;
}

template <typename scalar_t>
void solve_problem(const scalar_t* cost, int64_t stride_n, int64_t stride_m, int64_t n, int64_t m_valid,
                   Workspace& ws, int64_t* out) {
  const bool transposed = n > m_valid;  // augment the smaller side, as scipy
  const int64_t nr = transposed ? m_valid : n;
  const int64_t nc = transposed ? n : m_valid;
  if (nr == 0) return;
  ws.reset(nr, nc);
  const int64_t rs = transposed ? stride_m : stride_n;
  const int64_t cs = transposed ? stride_n : stride_m;
  for (int64_t i = 0; i < nr; ++i) {
    for (int64_t j = 0; j < nc; ++j) {
      const double c = static_cast<double>(cost[i * rs + j * cs]);
      if (std::isnan(c) || c == -std::numeric_limits<double>::infinity()) {
        std::fill(out, out + m_valid, kInvalid);
        return;
      }
      ws.cost[i * nc + j] = c;
    }
  }
  if (!solve(ws, nr, nc)) {
    std::fill(out, out + m_valid, kInfeasible);
    return;
  }
  for (int64_t i = 0; i < nr; ++i) {
    if (transposed) {
      out[i] = ws.col4row[i];  // small-side row i is column i; its partner is a row
    } else {
      out[ws.col4row[i]] = i;
    }
  }
}

at::Tensor lsa_cpu(const at::Tensor& cost, const at::Tensor& num_cols) {
  check_lsa_inputs(cost, num_cols);
  const int64_t P = cost.size(0), N = cost.size(1), M = cost.size(2);
  at::Tensor out = at::empty({P, M}, cost.options().dtype(at::kLong));
  out.fill_(-1);
  if (P == 0 || M == 0) return out;
  const at::Tensor cols = num_cols.contiguous();
  const int64_t* cols_ptr = cols.data_ptr<int64_t>();
  int64_t* out_ptr = out.data_ptr<int64_t>();
  const int64_t sp = cost.stride(0), sn = cost.stride(1), sm = cost.stride(2);
  auto run = [&](auto* base) {
    // Chunks of at least ~256k cost entries (about a millisecond of solving): smaller batches stay on the
    // calling thread, where a fork/join would cost more than it saves on a busy machine.
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, N * M));
    at::parallel_for(0, P, grain, [&](int64_t begin, int64_t end) {
      Workspace ws;
      for (int64_t p = begin; p < end; ++p) {
        const int64_t m_valid = std::min<int64_t>(std::max<int64_t>(cols_ptr[p], 0), M);
        solve_problem(base + p * sp, sn, sm, N, m_valid, ws, out_ptr + p * M);
      }
    });
  };
  if (cost.scalar_type() == at::kFloat) {
    run(cost.const_data_ptr<float>());
  } else {
    run(cost.const_data_ptr<double>());
  }
  return out;
}

// Shape function for meta and fake tensors (torch.compile, opcheck); symbolic sizes kept symbolic.
at::Tensor lsa_meta(const at::Tensor& cost, const at::Tensor& num_cols) {
  TORCH_CHECK(cost.dim() == 3, "linear_sum_assignment: cost must be [P, N, M], got ", cost.dim(), " dims");
  TORCH_CHECK(num_cols.dim() == 1, "linear_sum_assignment: num_cols must be 1-D, got ", num_cols.dim(), " dims");
  return at::empty_symint({cost.sym_size(0), cost.sym_size(2)}, cost.options().dtype(at::kLong));
}

}  // namespace

TORCH_LIBRARY(detr_kernels, m) {
  m.def("linear_sum_assignment(Tensor cost, Tensor num_cols) -> Tensor");
}

TORCH_LIBRARY_IMPL(detr_kernels, CPU, m) { m.impl("linear_sum_assignment", &lsa_cpu); }

TORCH_LIBRARY_IMPL(detr_kernels, Meta, m) { m.impl("linear_sum_assignment", &lsa_meta); }

}  // namespace detr_kernels

// Lets setup.py's build be imported as the module detr_kernels._C; importing it registers the op above.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "detr_kernels compiled ops", -1, nullptr};
  return PyModule_Create(&def);
}

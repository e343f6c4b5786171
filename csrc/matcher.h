// Shared by the CPU (matcher.cpp) and CUDA (matcher_cuda.cu) kernels of detr_kernels::linear_sum_assignment.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace detr_kernels {

// Codes written over a whole problem's output row instead of raising, so the CUDA kernel needs no host sync.
constexpr int64_t kInvalid = -2;     // NaN or -inf in the valid region
constexpr int64_t kInfeasible = -3;  // no complete assignment of finite cost

inline void check_lsa_inputs(const at::Tensor& cost, const at::Tensor& num_cols) {
  TORCH_CHECK(cost.dim() == 3, "linear_sum_assignment: cost must be [P, N, M], got ", cost.dim(), " dims");
  TORCH_CHECK(cost.scalar_type() == at::kFloat || cost.scalar_type() == at::kDouble,
              "linear_sum_assignment: cost must be float32 or float64, got ", cost.scalar_type());
  TORCH_CHECK(num_cols.dim() == 1 && num_cols.size(0) == cost.size(0),
              "linear_sum_assignment: num_cols must be [P] = [", cost.size(0), "], got ", num_cols.sizes());
  TORCH_CHECK(num_cols.scalar_type() == at::kLong, "linear_sum_assignment: num_cols must be int64, got ",
              num_cols.scalar_type());
  TORCH_CHECK(num_cols.device() == cost.device(), "linear_sum_assignment: num_cols is on ", num_cols.device(),
              " but cost is on ", cost.device());
}

}  // namespace detr_kernels

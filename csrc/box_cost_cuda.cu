// CUDA kernel of detr_kernels::matching_cost_boxes (schema and layout: see box_cost.cpp): one thread per
// (layer, image, query, target) entry, one launch for every decoder layer.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "box_cost.h"
#include "box_cost_check.h"

#include <algorithm>
#include <cuda_runtime.h>

namespace detr_kernels {
namespace {

__global__ void box_cost_kernel(const float* __restrict__ class_cost, const float* __restrict__ pred_boxes,
                                const float* __restrict__ tgt_boxes, const int64_t* __restrict__ num_targets,
                                float* __restrict__ out, int64_t total, int64_t B, int64_t Q, int64_t T,
                                float cost_class, float cost_bbox, float cost_giou) {
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = idx % T, row = idx / T;  // row = (l * B + b) * Q + q
    const int64_t b = (row / Q) % B;
    if (t >= num_targets[b]) {
      out[idx] = 0.f;
      continue;
    }
    const float4 p4 = reinterpret_cast<const float4*>(pred_boxes)[row];
    const float4 t4 = reinterpret_cast<const float4*>(tgt_boxes)[b * T + t];
    const float p[4] = {p4.x, p4.y, p4.z, p4.w}, g[4] = {t4.x, t4.y, t4.z, t4.w};
    out[idx] = pair_cost(p, g, class_cost[idx], cost_class, cost_bbox, cost_giou);
  }
}

at::Tensor box_cost_cuda(const at::Tensor& class_cost, const at::Tensor& pred_boxes, const at::Tensor& tgt_boxes,
                         const at::Tensor& num_targets, double cost_class, double cost_bbox, double cost_giou) {
  check_box_cost_inputs(class_cost, pred_boxes, tgt_boxes, num_targets);
  const c10::cuda::CUDAGuard guard(class_cost.device());
  at::Tensor out = at::empty_like(class_cost);
  const int64_t total = class_cost.numel();
  if (total == 0) return out;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, int64_t(1) << 20);
  box_cost_kernel<<<static_cast<unsigned>(blocks), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      class_cost.const_data_ptr<float>(), pred_boxes.const_data_ptr<float>(), tgt_boxes.const_data_ptr<float>(),
      num_targets.const_data_ptr<int64_t>(), out.mutable_data_ptr<float>(), total, class_cost.size(1),
      class_cost.size(2), class_cost.size(3), static_cast<float>(cost_class), static_cast<float>(cost_bbox),
      static_cast<float>(cost_giou));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(detr_kernels, CUDA, m) { m.impl("matching_cost_boxes", &box_cost_cuda); }

}  // namespace detr_kernels

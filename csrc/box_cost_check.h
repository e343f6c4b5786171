// Argument checks of detr_kernels::matching_cost_boxes, shared by its CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace detr_kernels {

inline void check_box_cost_inputs(const at::Tensor& class_cost, const at::Tensor& pred_boxes,
                                  const at::Tensor& tgt_boxes, const at::Tensor& num_targets) {
  TORCH_CHECK(class_cost.dim() == 4 && class_cost.scalar_type() == at::kFloat && class_cost.is_contiguous(),
              "matching_cost_boxes: class_cost must be contiguous float32 [L, B, Q, T], got ",
              class_cost.scalar_type(), " ", class_cost.sizes());
  const int64_t L = class_cost.size(0), B = class_cost.size(1), Q = class_cost.size(2), T = class_cost.size(3);
  TORCH_CHECK(pred_boxes.scalar_type() == at::kFloat && pred_boxes.is_contiguous() &&
                  pred_boxes.sizes() == at::IntArrayRef({L, B, Q, 4}),
              "matching_cost_boxes: pred_boxes must be contiguous float32 [L, B, Q, 4] = [", L, ", ", B, ", ", Q,
              ", 4], got ", pred_boxes.scalar_type(), " ", pred_boxes.sizes());
  TORCH_CHECK(tgt_boxes.scalar_type() == at::kFloat && tgt_boxes.is_contiguous() &&
                  tgt_boxes.sizes() == at::IntArrayRef({B, T, 4}),
              "matching_cost_boxes: tgt_boxes must be contiguous float32 [B, T, 4] = [", B, ", ", T, ", 4], got ",
              tgt_boxes.scalar_type(), " ", tgt_boxes.sizes());
  TORCH_CHECK(num_targets.scalar_type() == at::kLong && num_targets.sizes() == at::IntArrayRef({B}),
              "matching_cost_boxes: num_targets must be int64 [B] = [", B, "], got ", num_targets.scalar_type(), " ",
              num_targets.sizes());
  for (const at::Tensor* t : {&pred_boxes, &tgt_boxes, &num_targets}) {
    TORCH_CHECK(t->device() == class_cost.device(), "matching_cost_boxes: all inputs must be on ",
                class_cost.device(), ", got one on ", t->device());
  }
}

}  // namespace detr_kernels

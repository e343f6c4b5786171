// detr_kernels::matching_cost_boxes: the elementwise part of DETR's matching cost in one pass (CPU kernel,
// schema and shape function; the CUDA kernel is in box_cost_cuda.cu).
//
//   class_cost   [L, B, Q, T] float32, the class term already computed (softmax @ positive_map^T, or a gather)
//   pred_boxes   [L, B, Q, 4] float32 cxcywh
//   tgt_boxes    [B, T, 4]    float32 cxcywh, padded
//   num_targets  [B]          int64
//   returns      [L, B, Q, T] float32: cost_bbox * L1 + cost_class * class_cost - cost_giou * GIoU, 0 on padding
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "box_cost.h"
#include "box_cost_check.h"

#include <algorithm>
#include <cmath>

namespace detr_kernels {
namespace {

at::Tensor box_cost_cpu(const at::Tensor& class_cost, const at::Tensor& pred_boxes, const at::Tensor& tgt_boxes,
                        const at::Tensor& num_targets, double cost_class, double cost_bbox, double cost_giou) {
  check_box_cost_inputs(class_cost, pred_boxes, tgt_boxes, num_targets);
  const int64_t L = class_cost.size(0), B = class_cost.size(1), Q = class_cost.size(2), T = class_cost.size(3);
  at::Tensor out = at::empty_like(class_cost);
  const float* cc = class_cost.const_data_ptr<float>();
  const float* pb = pred_boxes.const_data_ptr<float>();
  const float* tb = tgt_boxes.const_data_ptr<float>();
  const int64_t* nt = num_targets.const_data_ptr<int64_t>();
  float* o = out.mutable_data_ptr<float>();
  const float wc = static_cast<float>(cost_class), wb = static_cast<float>(cost_bbox);
  const float wg = static_cast<float>(cost_giou);
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(T, 1));
  at::parallel_for(0, L * B * Q, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {  // row = (l * B + b) * Q + q
      const int64_t b = (row / Q) % B;
      const float* p = pb + row * 4;
      const int64_t valid = nt[b];
      for (int64_t t = 0; t < T; ++t) {
        o[row * T + t] = t < valid ? pair_cost(p, tb + (b * T + t) * 4, cc[row * T + t], wc, wb, wg) : 0.f;
      }
    }
  });
  return out;
}

at::Tensor box_cost_meta(const at::Tensor& class_cost, const at::Tensor& pred_boxes, const at::Tensor& tgt_boxes,
                         const at::Tensor& num_targets, double, double, double) {
  TORCH_CHECK(class_cost.dim() == 4, "matching_cost_boxes: class_cost must be [L, B, Q, T]");
  return at::empty_like(class_cost);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(detr_kernels, m) {
  m.def("matching_cost_boxes(Tensor class_cost, Tensor pred_boxes, Tensor tgt_boxes, Tensor num_targets, "
        "float cost_class, float cost_bbox, float cost_giou) -> Tensor");
}

TORCH_LIBRARY_IMPL(detr_kernels, CPU, m) { m.impl("matching_cost_boxes", &box_cost_cpu); }

TORCH_LIBRARY_IMPL(detr_kernels, Meta, m) { m.impl("matching_cost_boxes", &box_cost_meta); }

}  // namespace detr_kernels

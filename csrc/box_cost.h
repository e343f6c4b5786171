// The box part of DETR's matching cost for one (query box, target box) pair, shared by the CPU and CUDA
// kernels of detr_kernels::matching_cost_boxes. Operation order follows detr_kernels.matcher's PyTorch formula
// (DETR's cdist p=1 and generalized_box_iou) so the fused and the reference costs agree to rounding.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define DK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DK_HOST_DEVICE inline
#endif

namespace detr_kernels {

// p, t: cxcywh boxes. Returns cost_bbox * L1(p, t) + cost_class * class_cost - cost_giou * GIoU(p, t).
DK_HOST_DEVICE float pair_cost(const float* p, const float* t, float class_cost, float cost_class, float cost_bbox,
                               float cost_giou) {
  const float l1 = fabsf(p[0] - t[0]) + fabsf(p[1] - t[1]) + fabsf(p[2] - t[2]) + fabsf(p[3] - t[3]);
  const float x0 = p[0] - 0.5f * p[2], y0 = p[1] - 0.5f * p[3], x1 = p[0] + 0.5f * p[2], y1 = p[1] + 0.5f * p[3];
  const float u0 = t[0] - 0.5f * t[2], v0 = t[1] - 0.5f * t[3], u1 = t[0] + 0.5f * t[2], v1 = t[1] + 0.5f * t[3];
  const float area1 = (x1 - x0) * (y1 - y0), area2 = (u1 - u0) * (v1 - v0);
  const float iw = fmaxf(fminf(x1, u1) - fmaxf(x0, u0), 0.f), ih = fmaxf(fminf(y1, v1) - fmaxf(y0, v0), 0.f);
  const float inter = iw * ih;
  const float uni = (area1 + area2) - inter;
  const float iou = inter / uni;
  const float cw = fmaxf(fmaxf(x1, u1) - fminf(x0, u0), 0.f), ch = fmaxf(fmaxf(y1, v1) - fminf(y0, v0), 0.f);
  const float area_c = cw * ch;
  const float giou = iou - (area_c - uni) / area_c;
  return (cost_bbox * l1 + cost_class * class_cost) + cost_giou * -giou;
}

}  // namespace detr_kernels

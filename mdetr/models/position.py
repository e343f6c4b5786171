"""Sine position encoding of image feature maps (DETR / MDETR).

Each axis gets ``num_pos_feats`` channels computed from the cumulative count of *unpadded* cells, normalized to
(0, 2*pi] per image, so a padded image gets the same encoding on its valid region as the same image unpadded.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """mask [B, H, W] (True = pad) -> pos [B, 2 * num_pos_feats, H, W] = cat(pos_y, pos_x) on channels.

    Within an axis, channel 2i holds sin(p / T^(2i/F)) and channel 2i+1 holds cos(p / T^(2i/F)), with
    p the normalized cumulative position, T = ``temperature`` and F = ``num_pos_feats``."""

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, normalize: bool = True,
                 scale: float = 2 * math.pi, eps: float = 1e-6):
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError(f"num_pos_feats must be even (sin/cos pairs), got {num_pos_feats}")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.eps = eps

    def forward(self, mask: Tensor) -> Tensor:
        valid = ~mask
        y_embed = valid.cumsum(1, dtype=torch.float32)  # [B, H, W]: 1-based row index among valid rows
        x_embed = valid.cumsum(2, dtype=torch.float32)
        if self.normalize:
            y_embed = y_embed / (y_embed[:, -1:, :] + self.eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + self.eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = self._interleave(x_embed[..., None] / dim_t)
        pos_y = self._interleave(y_embed[..., None] / dim_t)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # [B, H, W, 2F] -> [B, 2F, H, W]

    @staticmethod
    def _interleave(angles: Tensor) -> Tensor:
        """[B, H, W, F] angles -> [B, H, W, F] with sin on even channels and cos on odd ones."""
        return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=4).flatten(3)

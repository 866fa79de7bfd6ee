"""Augmentation of model-ready batches, deterministic for a given torch.Generator.

Geometry (images bilinear, masks nearest, on the same grid): rotation, scaling, shear, an
elastic warp, and flips and quarter turns, so that slices in any in-plane orientation look
familiar. Intensity: a class-wise contrast remap (so that other MR contrasts are not
strangers), gamma, contrast, a smooth bias field, blur, lower resolution and noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augmentation:
    rotation_degrees: float = 20.0
    scale: tuple[float, float] = (0.85, 1.2)
    shear: float = 0.05
    elastic: float = 0.015  # displacement amplitude, in units of the half image size
    flip_probability: float = 0.5  # each of the two axes
    quarter_turn_probability: float = 0.15
    remap_probability: float = 0.15  # replace the contrast between classes by random levels
    gamma: tuple[float, float] = (0.7, 1.4)
    contrast: tuple[float, float] = (0.85, 1.2)
    bias_field: float = 0.2  # peak relative change of the multiplicative field
    blur_probability: float = 0.15
    low_resolution_probability: float = 0.15
    noise: float = 0.02
    clean_probability: float = 0.25  # samples left as they are, so the plain data stays learnt

    def __call__(
        self, images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        clean = _uniform(generator, images.shape[0], 0, 1) < self.clean_probability
        warped, warped_masks = self.geometry(images, masks, generator)
        augmented = self.intensity(warped, warped_masks, generator)
        images = torch.where(clean[:, None, None, None], images, augmented)
        masks = torch.where(clean[:, None, None], masks, warped_masks)
        return images, masks

    def geometry(
        self, images: torch.Tensor, masks: torch.Tensor, g: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = images.shape
        angle = _uniform(g, b, -1, 1) * math.radians(self.rotation_degrees)
        angle = angle + (_uniform(g, b, 0, 1) < self.quarter_turn_probability) * (math.pi / 2)
        zoom = torch.exp(_uniform(g, b, math.log(self.scale[0]), math.log(self.scale[1])))
        flip_x = torch.where(_uniform(g, b, 0, 1) < self.flip_probability, -1.0, 1.0)
        flip_y = torch.where(_uniform(g, b, 0, 1) < self.flip_probability, -1.0, 1.0)
        shear = _uniform(g, b, -self.shear, self.shear)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1] = cos * flip_x, (-sin + shear) * flip_x
        theta[:, 1, 0], theta[:, 1, 1] = sin * flip_y, cos * flip_y
        grid = F.affine_grid(theta, (b, 1, h, w), align_corners=False)
        if self.elastic > 0:
            coarse = (torch.rand(b, 2, 5, 5, generator=g) * 2 - 1) * self.elastic
            field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
            grid = grid + field.permute(0, 2, 3, 1)
        images = F.grid_sample(
            images, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        masks = F.grid_sample(
            masks[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False
        )[:, 0].long()
        return images, masks

    def intensity(
        self, images: torch.Tensor, masks: torch.Tensor, g: torch.Generator
    ) -> torch.Tensor:
        b, _, h, w = images.shape
        n_classes = int(masks.max()) + 1
        remap = _uniform(g, b, 0, 1) < self.remap_probability
        if remap.any():
            levels = torch.rand(b, n_classes, generator=g)
            levels[:, 0] = 0.0  # background stays dark
            synthetic = torch.gather(levels, 1, masks.flatten(1)).view(b, 1, h, w)
            synthetic = _blur(synthetic, 1.0) * (0.7 + 0.6 * images.mean(1, keepdim=True))
            images = torch.where(remap[:, None, None, None], synthetic.expand_as(images), images)
        gamma = torch.exp(_uniform(g, b, math.log(self.gamma[0]), math.log(self.gamma[1])))
        images = images.clamp(0, 1) ** gamma[:, None, None, None]
        contrast = _uniform(g, b, *self.contrast)[:, None, None, None]
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        images = (images - mean) * contrast + mean
        coarse = 1 + (torch.rand(b, 1, 3, 3, generator=g) * 2 - 1) * self.bias_field
        images = images * F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
        blur = _uniform(g, b, 0, 1) < self.blur_probability
        if blur.any():
            images = torch.where(blur[:, None, None, None], _blur(images, 1.2), images)
        low = _uniform(g, b, 0, 1) < self.low_resolution_probability
        if low.any():
            factor = float(_uniform(g, 1, 2, 3)[0])
            small = F.interpolate(images, scale_factor=1 / factor, mode="area")
            coarse_images = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
            images = torch.where(low[:, None, None, None], coarse_images, images)
        noise = (
            torch.randn(images.shape, generator=g)
            * self.noise
            * _uniform(g, b, 0, 1)[:, None, None, None]
        )
        return (images + noise).clamp(0, 1)


def _uniform(g: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=g)


def _blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, round(2 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    images = F.conv2d(
        images, kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), padding=(0, radius), groups=c
    )
    return F.conv2d(
        images, kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), padding=(radius, 0), groups=c
    )

"""Image transforms built only from picklable pieces, so DataLoader workers can receive them.

torchvision is imported by the functions that build transforms, not by this module: evaluating,
searching or serving cached features never decodes an image, and importing torchvision costs
about 160 MiB of resident memory and a second and a half of start-up.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from PIL import Image


def _interpolation(name: str):
    from torchvision.transforms import InterpolationMode

    return {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
            "nearest": InterpolationMode.NEAREST}[name]


def to_rgb(image: Image.Image) -> Image.Image:
    """Greyscale radiographs and palette PNGs become 3-channel like every backbone expects."""
    return image if image.mode == "RGB" else image.convert("RGB")


@dataclass(frozen=True)
class EvalTransformConfig:
    """Resize the shorter side to `resize`, centre-crop `size`, scale to [0,1], normalise."""

    size: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    def to_json(self) -> str:
        return json.dumps({
            "size": self.size, "resize_shorter": self.resize, "crop": "center",
            "mean": list(self.mean), "std": list(self.std), "interpolation": self.interpolation,
        }, sort_keys=True)


@dataclass(frozen=True)
class AugmentConfig:
    """Mild train-time views: radiographs tolerate small crops and jitter; big crops lose findings.

    Horizontal flips swap left and right, which captions sometimes name; set hflip=0 when laterality matters.
    """

    scale: tuple[float, float] = (0.7, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.05
    hue: float = 0.0


def eval_transform(cfg: EvalTransformConfig):
    from torchvision import transforms as T

    return T.Compose([
        to_rgb,
        T.Resize(cfg.resize, interpolation=_interpolation(cfg.interpolation)),
        T.CenterCrop(cfg.size),
        T.ToTensor(),
        T.Normalize(cfg.mean, cfg.std),
    ])


def augment_transform(size: int, mean, std, interpolation: str = "bicubic",
                      cfg: AugmentConfig = AugmentConfig()):
    from torchvision import transforms as T

    return T.Compose([
        to_rgb,
        T.RandomResizedCrop(size, scale=cfg.scale, ratio=cfg.ratio, interpolation=_interpolation(interpolation)),
        T.RandomHorizontalFlip(cfg.hflip),
        T.ColorJitter(brightness=cfg.brightness, contrast=cfg.contrast, saturation=cfg.saturation, hue=cfg.hue),
        T.ToTensor(),
        T.Normalize(tuple(mean), tuple(std)),
    ])


class Letterbox:
    """Resize the longer side to `size` and pad to a square with a grey border: the whole image,
    nothing cropped away (a centre crop loses the sides of the wide figures common in papers)."""

    def __init__(self, size: int, fill: tuple[int, int, int] = (127, 127, 127), interpolation: str = "bicubic"):
        self.size, self.fill, self.interpolation = size, fill, interpolation

    def __call__(self, image: Image.Image) -> Image.Image:
        image = to_rgb(image)
        scale = self.size / max(image.size)
        w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
        resized = image.resize((w, h), Image.Resampling.BICUBIC if self.interpolation == "bicubic" else
                               Image.Resampling.BILINEAR)
        canvas = Image.new("RGB", (self.size, self.size), self.fill)
        canvas.paste(resized, ((self.size - w) // 2, (self.size - h) // 2))
        return canvas


def letterbox_transform(cfg: EvalTransformConfig):
    from torchvision import transforms as T

    return T.Compose([Letterbox(cfg.size, interpolation=cfg.interpolation), T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])


class Views:
    """Several transforms of one image, stacked: [V, 3, H, W] (a backbone tower averages their features)."""

    def __init__(self, transforms: list):
        self.transforms = transforms

    def __call__(self, image: Image.Image):
        import torch

        return torch.stack([t(image) for t in self.transforms])

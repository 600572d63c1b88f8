"""Why did it match: a heat map of the image regions that drive its score against a query.

Each backbone family draws its own map (`extract.backbones.BackboneFamily.saliency`, next to the
model code it depends on); this module turns it into the picture a person reads. The map explains
the score the user sees: the cosine between the run's adapted image embedding
(backbone, then the run's image head) and the query's embedding. It is computed on the image as the
model saw it (the backbone's eval view: resized and centre-cropped), over that view's pixels.

- CNN backbones with a spatial last stage (the default EfficientNet-Lite0): Grad-CAM, the last conv
  stage's feature maps weighted by the score's mean gradient over each map, positive part.
- open_clip ViTs: gradient-weighted attention rollout. The blocks are run from their public parts
  (checked against the tower's own output), each block's attention kept; a layer's attention is
  weighted by the score's gradient through it (head-wise, positive part) and the layers are rolled
  out as prod(I + A); the class token's row over the patches is the map.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from medembed.adapt.run import AdaptedRun
from medembed.common.errors import Incompatible
from medembed.common.tensors import unit
from medembed.extract.backbones import Backbone, family_of


@dataclass
class Explanation:
    heat: np.ndarray  # [H, W] in [0, 1] over the model's view of the image
    view: Image.Image  # that view (what the heat map is drawn over)
    score: float  # the cosine being explained

    def overlay(self, alpha: float = 0.45) -> Image.Image:
        """The view with the heat map blended over it (blue = cold, red = hot)."""
        from matplotlib import colormaps

        rgb = (colormaps["jet"](self.heat)[..., :3] * 255).astype(np.uint8)
        return Image.blend(self.view.convert("RGB"), Image.fromarray(rgb), alpha)


def _view(backbone: Backbone, pixels: torch.Tensor) -> Image.Image:
    """Undo the eval transform's normalisation: the crop the model saw, as an image."""
    mean, std = (torch.tensor(v) for v in _norm(backbone))
    first = pixels[0, 0] if pixels.dim() == 5 else pixels[0]  # several views: the first (the centre crop)
    x = (first.cpu() * std[:, None, None] + mean[:, None, None]).clamp(0, 1)
    return Image.fromarray((x.permute(1, 2, 0).numpy() * 255).astype(np.uint8))


def _norm(backbone: Backbone) -> tuple[list[float], list[float]]:
    """The mean and std the backbone's preprocessing normalises with (the first Normalize found)."""
    todo = [backbone.preprocess]
    while todo:
        t = todo.pop(0)
        if hasattr(t, "mean") and hasattr(t, "std"):
            return list(t.mean), list(t.std)
        todo += list(getattr(t, "transforms", []))
    return [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]


def _normalise(cam: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    cam = torch.nn.functional.interpolate(cam[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    cam = cam - cam.min()
    return (cam / cam.max().clamp_min(1e-12)).detach().cpu().numpy().astype(np.float32)


def _score(run: AdaptedRun, features: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    head = run.image_head.eval()
    device = next((t.device for t in (*head.parameters(), *head.buffers())), torch.device("cpu"))
    return (unit(head(features.to(device).float())) * query.to(device)).sum()


def explain(run: AdaptedRun, backbone: Backbone, image: Image.Image, query: torch.Tensor) -> Explanation:
    """The heat map of `image` against a unit query embedding [1, D] (or [D]) in the run's space."""
    pixels = backbone.preprocess(image)[None]
    query = unit(query.reshape(1, -1))
    family = family_of(backbone)
    if family is None or family.saliency is None:
        raise Incompatible(f"{backbone.name}: no explanation map for this image tower")
    heat, score = family.saliency(backbone, pixels, lambda features: _score(run, features, query))
    return Explanation(_normalise(heat.float(), tuple(pixels.shape[-2:])), _view(backbone, pixels), float(score))


def masked_score(run: AdaptedRun, backbone: Backbone, image: Image.Image, query: torch.Tensor,
                 cells: list[tuple[int, int]], grid: int = 7) -> float:
    """The score with the given cells of a grid x grid split of the view blanked (set to the
    normalised mean, i.e. 0): how much those regions carried."""
    pixels = backbone.preprocess(image)[None].clone()
    h, w = pixels.shape[-2:]
    view = pixels[:, 0] if pixels.dim() == 5 else pixels  # the view the map is drawn over
    for r, c in cells:
        view[..., r * h // grid : (r + 1) * h // grid, c * w // grid : (c + 1) * w // grid] = 0
    with torch.no_grad():
        return float(_score(run, backbone.encode_images(pixels), unit(query.reshape(1, -1))))

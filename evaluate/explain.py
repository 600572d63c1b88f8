"""Why did it match: a heat map of the image regions that drive its score against a query.

The map explains the score the user sees: the cosine between the run's adapted image embedding
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
from torch import nn

from medembed.adapt.run import AdaptedRun
from medembed.adapt.tuning.towers import open_clip_model, vit_pool, vit_tokens
from medembed.common.tensors import unit
from medembed.extract.backbones import Backbone


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


def gradcam(run: AdaptedRun, backbone: Backbone, pixels: torch.Tensor, query: torch.Tensor) -> tuple[np.ndarray, float]:
    tower = backbone.image_model.eval()
    with torch.enable_grad():
        maps, feats = tower.features_with_map(pixels.to(backbone.device))
        maps.retain_grad()
        score = _score(run, feats.float(), query)
        score.backward()
    weights = maps.grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * maps).sum(1))[0]
    return _normalise(cam, tuple(pixels.shape[-2:])), float(score.detach())


class ViTRollout:
    """The blocks of an open_clip ViT run by hand so each block's attention stays in the graph."""

    def __init__(self, visual: nn.Module):
        if getattr(visual, "attn_pool", None) is not None or not hasattr(visual, "transformer"):
            raise ValueError("explanation maps support plain open_clip VisionTransformers")
        self.visual = visual

    @staticmethod
    def _attention(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attn = block.attn
        b, n, d = x.shape
        h = attn.num_heads
        q, k, v = torch.nn.functional.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, h, d // h).transpose(1, 2) for t in (q, k, v))
        probs = torch.softmax(q @ k.transpose(-2, -1) / (d // h) ** 0.5, dim=-1)  # [B, H, N, N]
        out = (probs @ v).transpose(1, 2).reshape(b, n, d)
        return attn.out_proj(out), probs

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x, probs = vit_tokens(self.visual, pixels), []
        for block in self.visual.transformer.resblocks:
            a, p = self._attention(block, block.ln_1(x))
            probs.append(p)
            x = x + block.ls_1(a)
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        return vit_pool(self.visual, x), probs


def rollout(run: AdaptedRun, backbone: Backbone, pixels: torch.Tensor, query: torch.Tensor) -> tuple[np.ndarray, float]:
    visual = open_clip_model(backbone).visual.eval()
    vit = ViTRollout(visual)
    with torch.enable_grad():
        feats, probs = vit.forward(pixels.to(backbone.device))
        if not torch.allclose(feats, backbone.image_model(pixels.to(backbone.device)), atol=1e-4, rtol=1e-4):
            raise ValueError(f"{backbone.name}: the ViT's blocks run by hand do not reproduce its output")
        for p in probs:
            p.retain_grad()
        score = _score(run, feats, query)
        score.backward()
    n = probs[0].shape[-1]
    rolled = torch.eye(n)
    for p in probs:
        weighted = (p.grad * p).clamp_min(0).mean(1)[0].detach().cpu()  # heads weighted by the score's gradient
        layer = torch.eye(n) + weighted
        rolled = (layer / layer.sum(-1, keepdim=True)) @ rolled
    side = int(round((n - 1) ** 0.5))
    return _normalise(rolled[0, 1:].reshape(side, side), tuple(pixels.shape[-2:])), float(score.detach())


def explain(run: AdaptedRun, backbone: Backbone, image: Image.Image, query: torch.Tensor) -> Explanation:
    """The heat map of `image` against a unit query embedding [1, D] (or [D]) in the run's space."""
    pixels = backbone.preprocess(image)[None]
    query = unit(query.reshape(1, -1))
    if hasattr(backbone.image_model, "features_with_map"):
        heat, score = gradcam(run, backbone, pixels, query)
    elif open_clip_model(backbone) is not None:
        heat, score = rollout(run, backbone, pixels, query)
    else:
        raise ValueError(f"{backbone.name}: no explanation map for this image tower")
    return Explanation(heat, _view(backbone, pixels), score)


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

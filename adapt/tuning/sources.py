"""What feeds tower tuning: batches of training pairs, and the encoders that turn them into features.

Two sources give the same batches (a pair per training caption, its image, the positives mask):
- raw: images decoded from the dataset folder (random crops when augmenting) and caption tokens,
  run through the whole towers every step;
- cached: the activations entering the first unlocked block, computed once (`towers.build_mid_cache`),
  run through the unlocked tops only. With the image tower locked (LiT), the image side is the
  cache's own final image features and no image activation is computed at all.
Either way `adapt.state.fit` takes them with `Encoders` that say how a batch becomes features.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from medembed.adapt.data import caption_keys
from medembed.adapt.state import Encoders
from medembed.adapt.tuning.towers import MidActivations, plain
from medembed.cache import schema
from medembed.cache.reader import CachedSplit
from medembed.common.errors import ToolError
from medembed.extract.access import DataAccess
from medembed.extract.backbones import Backbone
from medembed.extract.imaging import DecodeOptions, open_image


@dataclass
class TuneBatch:
    images: object  # pixels [B, 3, H, W], mid-layer activations, or final image features
    texts: object  # token dict, or (mid-layer activations, pooling aux)
    positives: torch.Tensor  # [B, B] bool: text j describes image i
    image_rows: torch.Tensor | None = None  # [B] each pair's image row in the split (concept supervision)


def positives(rows: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Same image, or the same caption string under another image: never a negative."""
    return (rows[:, None] == rows[None, :]) | (keys[:, None] == keys[None, :])


@dataclass
class Pairs:
    """The training captions a tuning pass uses (all, or a fixed random subset), with their images."""

    split: CachedSplit
    subset: torch.Tensor  # caption rows, sorted
    keys: torch.Tensor  # caption key per caption row of the split

    @classmethod
    def of(cls, split: CachedSplit, max_pairs: int, seed: int) -> Pairs:
        n = split.n_captions if not max_pairs else min(max_pairs, split.n_captions)
        gen = torch.Generator().manual_seed(seed)
        subset = torch.randperm(split.n_captions, generator=gen)[:n].sort().values
        return cls(split, subset, caption_keys(split.captions))

    def order(self, gen: torch.Generator, batch_size: int, lengths: torch.Tensor | None = None,
              pool: int = 4) -> list[torch.Tensor]:
        """One epoch of batches of positions into `subset` (full batches only: a step needs negatives).

        With `lengths` (tokens per caption of the subset), each run of `pool` batches is sorted by
        length before it is cut, and the batches are shuffled: a batch then holds captions of
        similar length, so the text layers run on little padding (about 3x less on ROCO captions)."""
        perm = torch.randperm(self.subset.numel(), generator=gen)
        n = min(max(1, self.subset.numel() // batch_size) * batch_size, perm.numel())
        if lengths is not None:
            span = pool * batch_size
            perm = torch.cat([c[torch.argsort(lengths[c], stable=True)] for c in perm[:n].split(span)])
        batches = [perm[s : s + batch_size] for s in range(0, n, batch_size)]
        if lengths is not None:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
        return batches


class RawImages(torch.utils.data.Dataset):
    """(pixels, caption, image row, caption row) for caption rows, images read from the dataset folder."""

    def __init__(self, root: Path, split: CachedSplit, transform: Callable):
        self.root, self.split, self.transform = root, split, transform
        self.decode = DecodeOptions.from_provenance(split.attrs.get(schema.IMAGE_DECODING))  # the window extraction used
        self.access = DataAccess.of_cache(split.attrs, str(root))  # read only what extraction was allowed to read

    def __len__(self) -> int:
        return self.split.n_captions

    def __getitem__(self, i: int):
        row = int(self.split.caption_image[i])
        path = self.split.image_path(row, self.root)
        try:
            image = open_image(path, self.decode, access=self.access)
        except Exception as e:
            raise ToolError(f"{path}: cannot read training image ({type(e).__name__}: {e})") from e
        return self.transform(image), self.split.captions[i], row, i


def _collate(items):
    pixels, captions, rows, index = zip(*items)
    return torch.stack(pixels), list(captions), torch.tensor(rows), torch.tensor(index)


def raw_batches(pairs: Pairs, root: Path, backbone: Backbone, batch_size: int, workers: int, augment: bool,
                pin: bool = False) -> Callable[[torch.Generator], Iterator[TuneBatch]]:
    dataset = RawImages(root, pairs.split, backbone.augment if augment else backbone.preprocess)

    def epoch(gen: torch.Generator) -> Iterator[TuneBatch]:
        sampler = [pairs.subset[b].tolist() for b in pairs.order(gen, batch_size)]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                             collate_fn=_collate, pin_memory=pin)
        for pixels, captions, rows, caps in loader:
            yield TuneBatch(pixels, backbone.tokenize(captions), positives(rows, pairs.keys[caps]), rows)

    return epoch


def cached_batches(pairs: Pairs, mid: MidActivations, batch_size: int, image_row_of: torch.Tensor | None = None,
                   image_features: torch.Tensor | None = None, tokenize: Callable | None = None
                   ) -> Callable[[torch.Generator], Iterator[TuneBatch]]:
    """Batches from cached activations. `mid.texts[i]` belongs to `pairs.subset[i]` (no text cache:
    the captions are tokenized per batch); images come from `mid.images[image_row_of[row]]`, or from
    `image_features[row]` when the image tower is locked."""

    lengths = mid.text_aux.ne(0).sum(1) if mid.texts is not None else None  # tokens per cached caption

    def epoch(gen: torch.Generator) -> Iterator[TuneBatch]:
        for local in pairs.order(gen, batch_size, lengths):
            caps = pairs.subset[local]
            rows = pairs.split.caption_image[caps]
            images = image_features[rows] if image_features is not None else mid.images[image_row_of[rows]]
            if mid.texts is not None:
                texts = (mid.texts[local], mid.text_aux[local])
            else:
                texts = tokenize([pairs.split.captions[i] for i in caps.tolist()])
            yield TuneBatch(images, texts, positives(rows, pairs.keys[caps]), rows)

    return epoch


def _checkpointed(f: Callable, *args):
    return checkpoint(f, *args, use_reentrant=False)


def _tokens_through(backbone: Backbone, device: torch.device) -> Callable:
    return lambda tokens: backbone.text_model(**{k: v.to(device) for k, v in tokens.items()})


def raw_encoders(backbone: Backbone, device: torch.device) -> Encoders:
    """Whole towers every step."""
    return Encoders(image=lambda px: backbone.image_model(px.to(device, non_blocking=True)),
                    text=_tokens_through(backbone, device))


def cached_encoders(top, backbone: Backbone, device: torch.device, image_locked: bool, text_cached: bool = True,
                    grad_checkpointing: bool = False) -> Encoders:
    """The unlocked tops only (a wholly unlocked text tower: the whole text tower); each unlocked
    block's activations recomputed in the backward pass instead of stored when `grad_checkpointing`."""
    run = _checkpointed if grad_checkpointing else plain

    def image(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device, non_blocking=True).float()
        return x if image_locked else top.image_top(x, run)

    def text(t) -> torch.Tensor:
        x, aux = t
        return top.text_top(x.to(device, non_blocking=True).float(), aux.to(device), run)

    return Encoders(image=image, text=text if text_cached else _tokens_through(backbone, device))

"""Run extraction shards as Ray tasks on a local or existing cluster, then join them.

The task body is the same `extract_split` the plain loop calls, with a shard set: a shard that
dies is simply re-run (Ray retries it) and continues from its own finished batches; a finished
shard is never redone, so a killed driver re-run loses only the shards that were in flight. The
join (`cache.shards.merge_shards`) copies no feature: the split files read the shard files in place.
"""
from __future__ import annotations

import dataclasses
import os

from medembed.cache.schema import split_file
from medembed.cache.shards import merge_shards
from medembed.common.device import resolve_device
from medembed.common.ray_session import RayMissingError, ray_session
from medembed.extract.backbones import AugmentConfig, create_backbone
from medembed.extract.extraction import (
    ExtractConfig,
    ExtractError,
    ExtractSummary,
    SplitSummary,
    attach_runtime,
    cache_dir,
    check_split_overlap,
    copies_warning,
    empty_shards_note,
    extract_split,
    planned,
    read_dataset,
)
from medembed.extract.path_key import KEY_ENV
from medembed.extract.synthetic import ensure_default_dataset

# how `extract` runs: loop, its splits one after the other in this process (`extraction.extract`); ray, their
# shards as Ray tasks, then merged (`extract_with_ray`)
ENGINES = ("loop", "ray")
DEFAULT_ENGINE = "loop"


def _shard_task(cfg: ExtractConfig, split: str, id_key: str = "") -> SplitSummary:
    """One shard; `id_key`: the path key the driver named records with, which a worker on another
    machine must share (its own key would name the same images otherwise)."""
    device = resolve_device(cfg.device).type
    dataset = read_dataset(cfg)
    if dataset.id_key != id_key:
        raise ExtractError(f"{dataset.root}: this Ray worker's path key is {dataset.id_key or 'none'}, the driver's "
                           f"{id_key or 'none'}: point {KEY_ENV} at the driver's key file on every machine")
    bb = create_backbone(cfg.backbone, device=device, augment=AugmentConfig(hflip=0.0))
    attach_runtime(bb, cfg, dataset.name, device, [])
    return extract_split(bb, dataset, split, planned(bb, dataset, split, cfg)[0], device)


def extract_with_ray(cfg: ExtractConfig, address: str | None = None, shards: int | None = None,
                     num_cpus: int | None = None) -> ExtractSummary:
    """One task per (split, shard), one GPU each where the cluster has GPUs; returns the joined splits."""
    data = str(cfg.data or ensure_default_dataset())
    dataset = read_dataset(dataclasses.replace(cfg, data=data))
    splits = cfg.splits or dataset.splits
    overlap = check_split_overlap(dataset, cfg.allow_split_overlap)
    if not all((cache_dir(cfg.out, dataset.name, cfg.backbone) / split_file(s)).exists() for s in splits):
        overlap += copies_warning(dataset)  # only when some split will be written, as `extract` has it
    try:
        with ray_session(address, num_cpus) as ray:
            gpus = int(ray.cluster_resources().get("GPU", 0))
            n = shards or max(1, gpus or int(ray.cluster_resources().get("CPU", 1)))
            task = ray.remote(_shard_task).options(num_gpus=1 if gpus else 0, num_cpus=1, max_retries=2)
            base = dataclasses.replace(cfg, data=os.path.abspath(data), out=os.path.abspath(cfg.out), progress=False,
                                       workers=min(cfg.workers, 1), device="auto" if gpus else "cpu")
            refs = [task.remote(dataclasses.replace(base, shard=f"{i}/{n}"), s, dataset.id_key) for s in splits
                    for i in range(n)]
            parts = ray.get(refs)
    except RayMissingError as e:
        raise ExtractError(str(e)) from None
    folder = cache_dir(cfg.out, dataset.name, cfg.backbone)
    merge_shards(folder, splits=list(splits))
    results, notes = [], []
    for s in splits:
        mine = [p for p in parts if p.split == s]
        if empty := [i for i, p in enumerate(mine) if not p.records]:
            notes.append(empty_shards_note(s, sum(p.records for p in mine), cfg.batch_size, n, empty))
        results.append(SplitSummary(
            split=s, path=str(folder / split_file(s)), records=sum(p.records for p in mine),
            images=sum(p.images for p in mine), captions=sum(p.captions for p in mine),
            skipped=[x for p in mine for x in p.skipped], seconds=max(p.seconds for p in mine),
            images_per_s=sum(p.images_per_s for p in mine), status=f"merged from {n} Ray shards",
        ))
    return ExtractSummary(dataset=dataset.name, synthetic=bool(dataset.synthetic), backbone=cfg.backbone,
                          device="ray", out_dir=str(folder), splits=results,
                          warnings=overlap + notes + list(getattr(dataset, "warnings", [])),
                          refused=dataset.refused.lines())

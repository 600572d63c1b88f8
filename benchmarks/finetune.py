"""Periodic unfreezing, measured.

    python benchmarks/finetune.py speed [--backbone tiny-clip --images 64 --unlocked 2 --epochs 1]
        seconds per fine-tuning epoch of the raw-image path vs the cached partial unfreeze (same blocks
        unlocked, same pairs, eval transform on both so only the frozen trunk differs), plus valid R@10 of
        the heads after each; one run, printed as a Markdown table.

    python benchmarks/finetune.py roco --train 800 [--every 5 --epochs 10 --pairs 512]
        real data: a roco-rad subset (first N training images, the whole valid split) cut out of the existing
        effnet-lite0+minilm cache; adapters alone for `epochs` vs adapters with one unfreeze cycle of the top
        blocks after `every` epochs, compared on valid R@10.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ROCO = REPO.parent / "shared" / "data" / "roco-rad"
ROCO_CACHE = REPO / "features" / "roco-rad" / "effnet-lite0+minilm"


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------- speed
def _colour_dataset(root: Path, n_train: int, n_valid: int, size: int) -> Path:
    """ImageCLEF-2023-style folder of noisy coloured squares whose captions name the colour."""
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "grey": (128, 128, 128)}
    (root / "images").mkdir(parents=True, exist_ok=True)
    k = 0
    for split, n in (("train", n_train), ("valid", n_valid)):
        caps, cons = ["ID,Caption"], ["ID,CUIs"]
        for _ in range(n):
            name = list(colours)[k % 4]
            arr = np.clip(np.array(colours[name])[None, None] + rng.normal(0, 40, (size, size, 3)), 0, 255)
            Image.fromarray(arr.astype(np.uint8)).save(root / "images" / f"IMG_{k:05d}.jpg")
            caps.append(f"IMG_{k:05d},A {name} square number {k}.")
            cons.append(f"IMG_{k:05d},C000000{k % 4}")
            k += 1
        (root / f"{split}_captions.csv").write_text("\n".join(caps) + "\n")
        (root / f"{split}_concepts.csv").write_text("\n".join(cons) + "\n")
    return root


def speed(args) -> None:
    from medembed.adapt.config import AdaptConfig
    from medembed.adapt.finetune import UnfreezeConfig, fine_tune
    from medembed.adapt.losses import build_loss
    from medembed.adapt.trainer import build_towers, evaluate_split
    from medembed.cache.reader import load_split, read_attrs
    from medembed.extract.backbones import create_backbone
    from medembed.extract.pipeline import ExtractConfig, extract

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="ft-speed-"))
    try:
        data = _colour_dataset(work / "data", args.images, max(8, args.images // 4), args.size)
        cache = Path(extract(ExtractConfig(data=str(data), backbone=args.backbone, out=str(work / "features"),
                                           workers=0, progress=False)).out_dir)
        attrs = read_attrs(cache / "train.h5")
        valid = load_split(cache / "valid.h5")
        rows = []
        for cached in (False, True):
            bb = create_backbone(args.backbone)
            run_cfg = {**AdaptConfig(features_dir=str(cache), out="-", head="mlp", dim=64).to_dict(),
                       "image_dim": int(attrs["image_dim"]), "text_dim": int(attrs["text_dim"])}
            torch.manual_seed(0)
            image_head, text_head = build_towers(run_cfg)
            losses = torch.nn.ModuleList([build_loss("infonce")])
            ucfg = UnfreezeConfig(epochs=args.epochs, unlocked_layers=args.unlocked, batch_size=args.batch,
                                  backbone_lr=1e-4, head_lr=1e-3, augment=False, cached_trunk=cached)
            stats = fine_tune(bb, image_head, text_head, losses, cache / "train.h5", ucfg, torch.device("cpu"))
            with torch.no_grad():
                fresh = type(valid)(**{**valid.__dict__})
                pix = torch.stack([bb.preprocess(_open(data, loc)) for loc in valid.image_locations])
                fresh.image_features = bb.encode_images(pix).cpu()
                fresh.caption_features = bb.encode_texts(valid.captions)
            r = evaluate_split(image_head, text_head, fresh, torch.device("cpu"))
            rows.append(["cached partial unfreeze" if cached else "raw images", stats.seconds_per_epoch,
                         stats.mid_cache_seconds, stats.pairs_per_s, f"{stats.train_loss:.3f}",
                         f"{r['t2i_R@10']:.1f}", f"{r['i2t_R@10']:.1f}"])
        print(f"backbone {args.backbone}, {args.images} train images of {args.size}px, unlocked top {args.unlocked} "
              f"groups per tower, {args.epochs} epoch(s), batch {args.batch}, CPU threads {torch.get_num_threads()}\n")
        print(table(["path", "s/epoch", "trunk cache s (once)", "pairs/s", "train loss", "valid t2i R@10",
                     "valid i2t R@10"], rows))
        base = rows[0][1]
        print(f"\nspeed-up per epoch: {base / max(rows[1][1], 1e-9):.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _open(root: Path, location: str):
    from medembed.extract.records import open_image

    return open_image(str(Path(root) / location))


# -------------------------------------------------------------------------------------------- roco
def _roco_subset(work: Path, n_train: int) -> tuple[Path, Path]:
    """A dataset folder (CSV rows for the first n_train training images + all of valid, images linked)
    and the matching slice of the existing base cache, so only the fine-tuned refresh is extracted."""
    from medembed.cache.reader import load_split
    from medembed.cache.writer import write_split

    data = work / "roco-sub"
    data.mkdir(parents=True, exist_ok=True)
    if not (data / "images").exists():
        (data / "images").symlink_to(ROCO / "images")
    shutil.copy(ROCO / "cui_names.csv", data / "cui_names.csv")
    keep_ids = None
    for split in ("train", "valid"):
        for kind in ("captions", "concepts"):
            lines = (ROCO / f"{split}_{kind}.csv").read_text().splitlines()
            if split == "train":
                if kind == "captions":
                    lines = lines[: n_train + 1]
                    keep_ids = {line.split(",", 1)[0] for line in lines[1:]}
                else:
                    lines = lines[:1] + [ln for ln in lines[1:] if ln.split(",", 1)[0] in keep_ids]
            (data / f"{split}_{kind}.csv").write_text("\n".join(lines) + "\n")
    cache = work / "features" / "roco-rad" / "effnet-lite0+minilm"
    cache.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid"):
        s = load_split(ROCO_CACHE / f"{split}.h5", with_views=False)
        rows = [i for i, x in enumerate(s.image_ids) if split == "valid" or x in keep_ids]
        row_of = {r: j for j, r in enumerate(rows)}
        caps = [c for c in range(s.n_captions) if int(s.caption_image[c]) in row_of]
        sub = s.concepts[rows]
        write_split(cache / f"{split}.h5", attrs={**s.attrs, "data_root": str(data), "n_records": len(rows)},
                    image_ids=[s.image_ids[r] for r in rows], image_locations=[s.image_locations[r] for r in rows],
                    image_features=s.image_features[rows].numpy(), captions=[s.captions[c] for c in caps],
                    caption_image=np.asarray([row_of[int(s.caption_image[c])] for c in caps]),
                    caption_features=s.caption_features[caps].numpy(), concept_ids=s.concept_ids,
                    concept_names=s.concept_names, concept_indptr=sub.indptr, concept_indices=sub.indices,
                    templates=s.templates, concept_text_features=s.concept_text_features.numpy(),
                    dtype=str(s.attrs.get("dtype", "float16")))
    return data, cache


def roco(args) -> None:
    from medembed.adapt.config import AdaptConfig
    from medembed.adapt.finetune import UnfreezeConfig, train_with_unfreezing
    from medembed.adapt.trainer import train

    if not ROCO.is_dir() or not (ROCO_CACHE / "train.h5").exists():
        sys.exit(f"needs {ROCO} and the cache {ROCO_CACHE} (extract it first)")
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    t0 = time.perf_counter()
    data, cache = _roco_subset(work, args.train)
    common = dict(features_dir=str(cache), head="mlp", dim=256, batch_size=128, patience=args.epochs, seed=0,
                  device="cpu")
    base = train(AdaptConfig(out=str(work / "runs" / "adapters"), epochs=args.epochs, **common), progress=False)
    ucfg = UnfreezeConfig(every=args.every, epochs=1, unlocked_layers=args.unlocked, batch_size=32,
                          backbone_lr=args.backbone_lr, head_lr=1e-4, max_pairs=args.pairs, data=str(data),
                          extract_batch_size=32, cached_trunk=args.cached)
    ft = train_with_unfreezing(AdaptConfig(out=str(work / "runs" / "unfreeze"), epochs=args.epochs, **common), ucfg,
                               progress=True)
    rows = [["adapters alone", args.epochs, "-", f"{base['valid']['t2i_R@10']:.1f}", f"{base['valid']['i2t_R@10']:.1f}",
             f"{base['valid']['mean_recall']:.1f}"]]
    for st in ft["stages"]:
        rows.append([f"unfreeze run, stage {st['stage']}", st["epochs"], Path(st["features_dir"]).name,
                     f"{st['valid']['t2i_R@10']:.1f}", f"{st['valid']['i2t_R@10']:.1f}", f"{st['valid']['mean_recall']:.1f}"])
    print(f"\nroco-rad subset: {args.train} train images (first rows of train), all 463 valid; head mlp 256, batch 128;"
          f" unfreeze after {args.every} adapter epochs: top {args.unlocked} groups of each tower, 1 epoch on "
          f"{args.pairs or 'all'} random train pairs, batch 32, backbone lr {args.backbone_lr}, head lr 1e-4, "
          f"{'cached partial unfreeze (eval view)' if args.cached else 'raw images (random-crop augmentation)'}\n")
    print(table(["run", "adapter epochs", "cache", "valid t2i R@10", "valid i2t R@10", "valid mean recall"], rows))
    for c in ft["cycles"]:
        print(f"\ncycle ({c['path']}): {c['mid_cache_seconds']:.0f}s trunk cache, {c['seconds']:.0f}s fine-tuning ({c['pairs_per_s']} pairs/s, loss {c['train_loss']:.3f}), "
              f"{c['refresh_seconds']:.0f}s cache refresh -> {c['features_dir']}")
    print(f"total {time.perf_counter() - t0:.0f}s")
    (work / "result.json").write_text(json.dumps({"adapters": base, "unfreeze": ft, "args": vars(args)}, indent=2,
                                                 default=str))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--backbone", default="tiny-clip")
    s.add_argument("--images", type=int, default=64)
    s.add_argument("--size", type=int, default=64)
    s.add_argument("--unlocked", type=int, default=2)
    s.add_argument("--epochs", type=int, default=1)
    s.add_argument("--batch", type=int, default=16)
    s.add_argument("--threads", type=int, default=0)
    r = sub.add_parser("roco")
    r.add_argument("--train", type=int, default=800)
    r.add_argument("--every", type=int, default=5)
    r.add_argument("--epochs", type=int, default=10)
    r.add_argument("--pairs", type=int, default=512)
    r.add_argument("--unlocked", type=int, default=2)
    r.add_argument("--backbone-lr", type=float, default=3e-5)
    r.add_argument("--threads", type=int, default=0)
    r.add_argument("--cached", action="store_true", help="cycle on the cached partial unfreeze instead of raw images")
    r.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "ft-roco"))
    args = p.parse_args()
    print("command: python benchmarks/finetune.py " + " ".join(sys.argv[1:]))
    speed(args) if args.mode == "speed" else roco(args)


if __name__ == "__main__":
    main()

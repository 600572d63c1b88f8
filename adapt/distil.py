"""Distilled runs: a run's ensemble of K heads taught to one head, so the ensemble's ranking comes at
one head's cost and a K-times smaller embedding (1,024 numbers an image for the default run instead of
4,096).

The student is one head of the source's kind (by default as wide as one member, and started from the
first member's weights), trained on the train split's cached features to reproduce the ensemble's
similarities: for every batch, the KL divergence between the teacher's and the student's softmax over
the batch's images for each caption and over its captions for each image
(`losses.SimilarityDistillation`), optionally mixed with the plain contrastive loss on the true pairs.
The epoch is chosen on valid (plain-cosine mean recall), the query bank is chosen again for the
student, and the result is an ordinary run folder beside the source: eval, search, the page, index,
export and export-model take it as they take any run.

A refit teacher (the default run) has trained on valid, and so would a student it teaches (started
from its first member, taught its similarities): that student's valid recall rose to 99 against the
teacher's 38 on a small subset. The distilled run therefore does what the refit does: a student
taught by the teacher's selection heads (its heads as valid chose them, which never trained on valid)
chooses the epoch, the query bank and every valid number on valid (kept as its own
`selection.safetensors`, `valid_heads` "selection" in summary.json); then the kept student is taught
by the refit heads for that many epochs, valid unseen. That costs one more student's training
(seconds: a student trains on cached features), where marking the numbers as not held out would
leave the distilled run without any valid number to compare or choose by.
"""
from __future__ import annotations

import copy
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from medembed.adapt import checkpoint as ckpt
from medembed.adapt.heads import EnsembleHead, build_heads, fit_input_stats
from medembed.adapt.losses import InfoNCELoss, SimilarityDistillation
from medembed.adapt.run import AdaptedRun, load_adapter_run, portable_features
from medembed.adapt.run_files import FINETUNED, QUERYBANK, SELECTION
from medembed.adapt.run_querybank import calibrate
from medembed.adapt.valid_heads import BEST_HEADS, SELECTION_HEADS, valid_fields
from medembed.cache.reader import CachedSplit, load_split
from medembed.common.errors import MedembedError
from medembed.common.files import check_out_folder, folder_state, read_json, replace_folder, staging_folder
from medembed.common.ranking import recall_summary
from medembed.common.recall_keys import MEAN_RECALL
from medembed.common.tensors import unit

__all__ = ["DISTILLED_KEY", "DistilError", "DistilOptions", "DistilSummary", "distil_run", "similarity_correlation"]

DISTILLED_KEY = "distilled"  # config.json of a distilled run: {"from", "members", ...}


class DistilError(MedembedError, ValueError):
    """A distilled run that cannot be made as asked."""


@dataclass(frozen=True)
class DistilOptions:
    dim: int = 0  # the student's width; 0: one member's (and started from the first member)
    epochs: int = 30
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 1e-4
    # chosen on roco-rad valid (teacher: the default run, seed 0; BENCHMARKS.md): valid mean recall 32.1
    # against the teacher's 32.3 and one member's 30.2-31.0; temperatures 0.02-0.2 and lr 3e-4 were tried
    temperature: float = 0.1  # of the teacher's and the student's softmax
    contrastive: float = 0.5  # weight of the contrastive loss on the true pairs beside the distillation
    seed: int = 0


@dataclass
class DistilSummary:
    run_dir: str
    source: str
    dim: int
    source_dim: int
    best_epoch: int
    valid: dict  # the student's valid recall, plain cosine (a refit teacher's: its selection student's)
    teacher_valid: dict  # the teacher's, plain cosine (a refit teacher's: its heads as valid chose them)
    correlation: float  # of the student's and the teacher's valid similarity matrices (the same heads as valid)
    querybank: dict | None
    seconds: float
    refit: bool = False  # taught by a refit teacher: valid chose with a selection student, kept as selection.safetensors


@torch.no_grad()
def similarity_correlation(a: AdaptedRun, b: AdaptedRun, split: CachedSplit) -> float:
    """Pearson correlation of two runs' caption x image cosine matrices on one split."""
    sims = [(r.embed_texts(split.caption_features) @ r.embed_images(split.image_features).T).reshape(-1).double()
            for r in (a, b)]
    return float(torch.corrcoef(torch.stack(sims))[0, 1])


def _caption_picks(split: CachedSplit) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images with a caption, the first of their captions' rows in caption order, how many they have)."""
    order = torch.argsort(split.caption_image, stable=True)
    counts = torch.bincount(split.caption_image, minlength=split.n_images)
    starts = torch.cumsum(counts, 0) - counts
    images = torch.nonzero(counts).reshape(-1)
    return images, order, torch.stack([starts[images], counts[images]])


def _student(teacher: AdaptedRun, options: DistilOptions, train: CachedSplit) -> tuple[dict, torch.nn.Module, torch.nn.Module]:
    member_dim = int(teacher.config["dim"])
    dim = options.dim or member_dim
    config = {**teacher.config, "ensemble": 1, "dim": dim, "seed": options.seed}
    image_head, text_head = build_heads(config)
    if dim == member_dim and isinstance(teacher.image_head, EnsembleHead):
        image_head.load_state_dict(teacher.image_head.members[0].state_dict())
        text_head.load_state_dict(teacher.text_head.members[0].state_dict())
    else:
        fit_input_stats(image_head, [train.image_features])
        fit_input_stats(text_head, [train.caption_features])
    return config, image_head, text_head


def _check_source(run_dir: Path, teacher: AdaptedRun, out: Path) -> None:
    c = teacher.config
    if (run_dir / FINETUNED).exists():
        raise DistilError(f"{run_dir}: carries fine-tuned towers ({FINETUNED}); distil an adapter run (heads on cached features)")
    if c.get("head") == "cca" or "compact" in c or DISTILLED_KEY in c:
        what = "a closed-form cca run" if c.get("head") == "cca" else "a compact run" if "compact" in c else "already distilled"
        raise DistilError(f"{run_dir}: {what}; distil a run of trained heads")
    if int(c.get("ensemble", 1)) < 2:
        raise DistilError(f"{run_dir}: one head already (--ensemble 1); distillation teaches an ensemble to one head")
    if out.resolve() == run_dir.resolve():
        raise DistilError(f"--out {out}: is the source run; a distilled run is written beside it")


def _teach(teacher: AdaptedRun, options: DistilOptions, train: CachedSplit, valid: CachedSplit | None, epochs: int,
           out: Path, progress: bool, label: str) -> tuple[dict, torch.nn.Module, torch.nn.Module, int, dict | None]:
    """(config, image head, text head, epoch kept, its valid recall) of a student of `teacher` trained
    `epochs` epochs on train: with `valid`, the epoch of the best valid mean recall is kept; without,
    the last (valid unseen, as a refit trains)."""
    teacher_img, teacher_txt = teacher.embed_images(train.image_features), teacher.embed_texts(train.caption_features)
    torch.manual_seed(options.seed)
    config, image_head, text_head = _student(teacher, options, train)
    params = [*image_head.parameters(), *text_head.parameters()]
    opt = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    distil, contrastive = SimilarityDistillation(options.temperature), InfoNCELoss(learn_temperature=False)
    images, caption_order, (starts, counts) = _caption_picks(train)
    gen = torch.Generator().manual_seed(options.seed)
    best, best_epoch, best_state = None, epochs, None
    for epoch in tqdm(range(1, epochs + 1), desc=label, unit="epoch", disable=not progress, dynamic_ncols=True):
        image_head.train()
        text_head.train()
        perm = torch.randperm(len(images), generator=gen)
        pick = caption_order[starts[perm] + (torch.rand(len(perm), generator=gen) * counts[perm]).long()]
        for lo in range(0, len(perm), options.batch_size):
            ii, cc = images[perm[lo:lo + options.batch_size]], pick[lo:lo + options.batch_size]
            s_img, s_txt = image_head(train.image_features[ii]), text_head(train.caption_features[cc])
            loss = distil(s_img, s_txt, teacher_img[ii], teacher_txt[cc])
            if options.contrastive:
                loss = loss + options.contrastive * contrastive(unit(s_img), unit(s_txt))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        image_head.eval()
        text_head.eval()
        if valid is None:
            continue
        student = AdaptedRun(out, config, image_head, text_head)
        with torch.no_grad():
            r = recall_summary(student.embed_images(valid.image_features), student.embed_texts(valid.caption_features),
                               valid.caption_image)
        if best is None or r[MEAN_RECALL] > best[MEAN_RECALL]:
            best, best_epoch = r, epoch
            best_state = (copy.deepcopy(image_head.state_dict()), copy.deepcopy(text_head.state_dict()))
    if best_state is not None:
        image_head.load_state_dict(best_state[0])
        text_head.load_state_dict(best_state[1])
    return config, image_head, text_head, best_epoch, best


def distil_run(run_dir: str | Path, out: str | Path, options: DistilOptions | None = None, overwrite: bool = False,
               progress: bool = True) -> DistilSummary:
    """A one-head run taught by the ensemble run in `run_dir`, written whole into `out` (a new folder,
    or an earlier distilled run with `overwrite`). A refit teacher teaches twice: its selection heads a
    student that valid chooses with, then its refit heads the kept one (see the module's docstring)."""
    options = options or DistilOptions()
    run_dir, out = Path(run_dir), Path(out)
    teacher = load_adapter_run(run_dir)
    _check_source(run_dir, teacher, out)
    check_out_folder(out, overwrite, ckpt.CONFIG, "distilled run")
    if (out / ckpt.CONFIG).exists() and DISTILLED_KEY not in read_json(out / ckpt.CONFIG):
        raise DistilError(f"{out}: holds a run that is not a distilled run; choose another --out")
    checked = folder_state(out)
    t0 = time.perf_counter()
    files = teacher.split_files()
    missing = [s for s in ("train", "valid") if s not in files]
    if missing:
        raise DistilError(f"{teacher.features_dir}: no {' or '.join(missing)} split to distil on")
    train, valid = load_split(files["train"], with_views=False), load_split(files["valid"], with_views=False)
    # a refit teacher's heads trained on valid: its heads as valid chose them teach the student valid chooses
    # with, and stand for the teacher on valid
    selection = teacher.selection()
    chooser = selection or teacher
    teacher_valid = recall_summary(chooser.embed_images(valid.image_features), chooser.embed_texts(valid.caption_features),
                                   valid.caption_image)
    config, image_head, text_head, best_epoch, best = _teach(
        chooser, options, train, valid, options.epochs, out, progress,
        "distil (selection heads teach)" if selection is not None else "distil")
    chosen, refit = None, None
    if selection is not None:
        t1 = time.perf_counter()
        chosen = (image_head, text_head)
        config, image_head, text_head, _, _ = _teach(teacher, options, train, None, best_epoch, out, progress,
                                                     "distil (refit heads teach)")
        refit = {"epochs": best_epoch, "teacher": f"{run_dir.resolve() / ckpt.BEST}",
                 "seconds": round(time.perf_counter() - t1, 1)}

    work = staging_folder(out)
    try:
        config = {**config, "features_dir": str(teacher.features_dir),
                  DISTILLED_KEY: {"from": str(run_dir.resolve()), "members": int(teacher.config.get("ensemble", 1)),
                                  "best_epoch": best_epoch, **asdict(options)}}
        ckpt.write_json(work / ckpt.CONFIG, portable_features(config, out))
        ckpt.save_heads(work / ckpt.BEST, image_head, text_head)
        if chosen is not None:
            ckpt.save_heads(work / SELECTION, *chosen)
        kept = load_adapter_run(work)
        student = kept.selection() or kept  # the heads valid measured, as the trainer chooses with them
        correlation = similarity_correlation(student, chooser, valid)
        bank = calibrate(work, run=student, splits=(files["train"], valid)) if (run_dir / QUERYBANK).exists() else None
        fields = {"run_dir": str(out), "dim": config["dim"], "ensemble": 1, "best_epoch": best_epoch, "valid": best,
                  **valid_fields(SELECTION_HEADS if chosen is not None else BEST_HEADS),
                  "seconds": round(time.perf_counter() - t0, 2),
                  DISTILLED_KEY: {**config[DISTILLED_KEY], "teacher_valid": teacher_valid,
                                  "valid_similarity_correlation": round(correlation, 6)}}
        if refit is not None:
            fields["refit"] = refit
        ckpt.write_derived_summary(run_dir, work, ("dim", "ensemble", "best_epoch", "epochs_run", "seconds"), fields,
                                   bank)
        replace_folder(work, out, expected=checked)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return DistilSummary(str(out), str(run_dir), int(config["dim"]), teacher.dim, best_epoch, best, teacher_valid,
                         correlation, bank, time.perf_counter() - t0, chosen is not None)

"""medembed command line: extract -> adapt -> eval (and search).

A thin layer: each command parses its options, calls one function, prints the result.
"""
from __future__ import annotations

import importlib
import os
import sys
from collections import Counter
from dataclasses import MISSING, fields
from pathlib import Path

import click
from click.core import ParameterSource

from medembed.adapt.config import AUGMENT_KINDS, HEAD_KINDS, LOSS_KINDS, AdaptConfig
from medembed.adapt.tuning.config import TuneConfig
from medembed.common.errors import BadOption, MedembedError
from medembed.common.memory import release_large_blocks
from medembed.common.recall_keys import DEFAULT_KS, MEAN_RECALL, recall_key
from medembed.common.version import __version__

# What a user can fix, said in one line with no traceback: medembed's own errors, and the operating
# system's refusals of a path the user named (opened by the standard library or a file-format library,
# not by a check of ours), whose message names that path. Anything else -- a plain ValueError
# included -- is a bug, and keeps its traceback.
USER_ERRORS = (MedembedError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class _Commands(click.Group):
    """The command group; the one place where a user error of any command becomes one line."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            raise click.ClickException(str(e)) from e


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="medembed")
def main() -> None:
    """Embedding-first CLIP toolkit for medical image-text retrieval."""
    # offline unless the user says otherwise: a missing model fails at once instead of waiting on a network
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    release_large_blocks()


def _resolve(spec: str):
    """What `spec` names, imported now: "module:Class.field" a config dataclass's default for the field,
    "module:NAME" a module's attribute (a registry's tuple, or a function listing one, called).

    The command line reads every default and choice list from the module that owns it, but only when
    an option is parsed or shown: those modules import torch, which a start-up only to parse other
    options should not pay for."""
    module, _, path = spec.partition(":")
    name, _, field = path.partition(".")
    value = getattr(importlib.import_module(module), name)
    if field:
        return getattr(value(), field)
    return value() if callable(value) else value


class _ConfigDefault:
    """A parameter whose default is read from `config` (see `_resolve`); `convert` turns it into the
    parameter's form."""

    config: str
    convert = None

    def get_default(self, ctx: click.Context, call: bool = True):
        value = _resolve(self.config)
        return self.convert(value) if self.convert else value


class _ConfigOption(_ConfigDefault, click.Option):
    """An option whose default comes from its command's config (`config`, shown as click's [default: ...])
    and whose help may list a registry's names (`listing`: filling the help's {} when the help is shown)."""

    def __init__(self, *args, config: str | None = None, convert=None, listing: str | None = None, **kwargs):
        self.config, self.convert, self.listing = config, convert, listing
        kwargs.setdefault("show_default", config is not None)
        super().__init__(*args, **kwargs)
        self.help_template = self.help

    def get_default(self, ctx: click.Context, call: bool = True):
        return super().get_default(ctx, call) if self.config else click.Option.get_default(self, ctx, call)

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        if self.listing:
            self.help = self.help_template.format(", ".join(_resolve(self.listing)))
        return super().get_help_record(ctx)


class _ConfigArgument(_ConfigDefault, click.Argument):
    """An optional argument whose default comes from its command's config (`config`)."""

    def __init__(self, *args, config: str, **kwargs):
        self.config = config
        super().__init__(*args, required=False, **kwargs)


class _RegistryChoice(click.Choice):
    """One of a registry's names (`registry`: "module:NAME", a tuple beside the code that implements
    the choices), imported when the option is first parsed or shown."""

    def __init__(self, registry: str, case_sensitive: bool = True):
        self.registry, self.case_sensitive = registry, case_sensitive

    @property
    def choices(self) -> tuple:
        return tuple(_resolve(self.registry))


def _cfg(module_class_field: str, convert=None) -> dict:
    """Keyword arguments of an option whose default comes from a config dataclass (or a module's constant)."""
    return {"cls": _ConfigOption, "config": module_class_field, "convert": convert}


def _listed(registry: str) -> dict:
    """Keyword arguments of an option whose help lists a registry's names at its {}."""
    return {"cls": _ConfigOption, "listing": registry}


# registries more than one command chooses from
_DEVICES = "medembed.common.device:DEVICES"
_RUNTIMES = "medembed.extract.backbones.onnx_runtime:RUNTIMES"


# --- extract ---------------------------------------------------------------------------------


def _print_extract_summary(summary) -> None:
    tag = " (SYNTHETIC embedded default)" if summary.synthetic else ""
    runtime = f" | {summary.runtime}" if summary.runtime else ""
    click.echo(f"\ndataset {summary.dataset}{tag} | backbone {summary.backbone} | device {summary.device}{runtime}")
    if summary.found:
        click.echo(f"found: {summary.found}")
    click.echo(f"{'split':<8}{'records':>9}{'images':>9}{'captions':>10}{'skipped':>9}{'img/s':>9}  status")
    for s in summary.splits:
        rate = f"{s.images_per_s:.1f}" if s.images_per_s else "-"
        click.echo(f"{s.split:<8}{s.records:>9}{s.images:>9}{s.captions:>10}{len(s.skipped):>9}{rate:>9}  {s.status}")
    for s in summary.splits:
        if s.skipped:
            kinds = Counter(reason.split(" (", 1)[0] for _, _, reason in s.skipped)
            click.echo(f"  {s.split}: skipped {len(s.skipped)}: " + ", ".join(f"{n} {k}" for k, n in kinds.most_common()))
        for image_id, location, reason in s.skipped[:20]:
            click.echo(f"  skipped [{s.split}] {image_id}: {reason} ({location})")
        if len(s.skipped) > 20:
            click.echo(f"  ... and {len(s.skipped) - 20} more skipped in {s.split} (listed in the cache: skipped/)")
    for line in getattr(summary, "refused", []):
        click.echo(f"  {line}")
    for line in getattr(summary, "memory", []):
        click.echo(f"  {line}")
    for w in summary.warnings:
        click.echo(f"  warning: {w}")
    click.echo("outputs:")
    for s in summary.splits:
        click.echo(f"  {s.path}")


FOLLOW_LINKS_HELP = ("Read links that lead out of the data folder (files, folders, shards); without it they are "
                     "not read, and counted in the summary. Part of the cache's provenance.")
READABLE_PATHS_HELP = ("Identify records by their paths even where paths may name patients (image-only folders, DICOM "
                       "images), instead of by a keyed hash of the path (key: ~/.config/medembed/path-key, or "
                       "$MEDEMBED_PATH_KEY_FILE).")


def _data_reading(data, follow_links: bool, readable_paths: bool) -> dict:
    """--follow-links and --readable-paths as keyword arguments; refused without --data, where no folder is read."""
    if data is None and (follow_links or readable_paths):
        flag = "--follow-links" if follow_links else "--readable-paths"
        raise click.UsageError(f"{flag} says how --data is read: give --data too")
    return {"follow_links": follow_links, "readable_paths": readable_paths}


def _reading_options(f):
    """--follow-links and --readable-paths of the commands that read a dataset folder."""
    f = click.option("--readable-paths", is_flag=True, help=READABLE_PATHS_HELP)(f)
    return click.option("--follow-links", is_flag=True, help=FOLLOW_LINKS_HELP)(f)


@main.command()
@click.option("--data", type=click.Path(exists=True, file_okay=True), default=None,
              help="Dataset folder or annotations file (layout auto-detected). Default: the embedded synthetic set.")
@click.option("--backbone", **_cfg("medembed.extract.extraction:ExtractConfig.backbone"),
              listing="medembed.extract.backbones.registry:BUILTIN_BACKBONES",
              help="Backbone name: {}, an open_clip ARCH[@TAG], hf-hub:ORG/REPO or local-dir:PATH.")
@click.option("--splits", default=None, help="Comma-separated splits (default: all the dataset has).")
@click.option("--batch-size", **_cfg("medembed.extract.extraction:ExtractConfig.batch_size"), type=click.IntRange(min=1),
              help="Images per crash-safe batch (a re-run continues from the last finished one).")
@click.option("--workers", **_cfg("medembed.extract.extraction:ExtractConfig.workers"), type=click.IntRange(min=0), help="Image-decoding worker processes.")
@click.option("--device", type=_RegistryChoice(_DEVICES), **_cfg("medembed.extract.extraction:ExtractConfig.device"),
              help="Where the backbone runs: auto takes CUDA when torch sees a GPU (fp16 autocast there).")
@click.option("--out", **_cfg("medembed.extract.extraction:ExtractConfig.out"), type=click.Path(file_okay=False),
              help="Output folder; files go to OUT/DATASET/BACKBONE/SPLIT.h5.")
@click.option("--dtype", type=_RegistryChoice("medembed.extract.extraction:FEATURE_DTYPES"),
              **_cfg("medembed.extract.extraction:ExtractConfig.dtype"),
              help="How features are stored (float16 halves the cache; heads train in float32 either way).")
@click.option("--views", **_cfg("medembed.extract.extraction:ExtractConfig.views"), type=click.IntRange(min=0),
              help="Also store features of N randomly augmented views of each image.")
@click.option("--strict", is_flag=True, help="Stop at the first unreadable image instead of skipping it.")
@click.option("--allow-split-overlap", is_flag=True,
              help="Extract a dataset whose splits share images (by id or file) with a warning, instead of refusing "
                   "it: such images leak test into training. (A copy of an image's bytes under another id is always "
                   "a warning.)")
@click.option("--window", **_cfg("medembed.extract.extraction:ExtractConfig.window"), metavar="auto|PRESET|C,W",
              help="Intensity window for DICOM, NIfTI and 16-bit images: auto (the file's own VOI LUT or window, else "
                   "its 0.5-99.5th percentiles), a CT preset in Hounsfield units (lung, soft-tissue, bone, brain; CT "
                   "files only), or CENTRE,WIDTH for every file. Part of the cache's provenance.")
@click.option("--frames", **_cfg("medembed.extract.extraction:ExtractConfig.frames"), metavar="middle|all|N",
              help="Multi-frame DICOM and NIfTI volumes: the middle frame (axial slice), every one, or N evenly "
                   "spaced ones, each a record sharing the file's captions.")
@click.option("--runtime", type=_RegistryChoice(_RUNTIMES), **_cfg("medembed.extract.extraction:ExtractConfig.runtime"),
              help="What runs the image tower on the CPU: PyTorch, ONNX Runtime (the same graph exported once and "
                   "cached in the cache folder's graphs/; 5x the images/s of PyTorch on 2 cores), or auto (onnx when onnxruntime is "
                   "installed). Part of the cache's provenance.")
@click.option("--report-sections", default=None,
              type=_RegistryChoice("medembed.extract.datasets.mimic_cxr:REPORT_SECTIONS"),
              help="MIMIC-CXR and OpenI: the report sections that become each study's caption "
                   "[default: findings+impression, falling back to the impression, then the whole report].")
@click.option("--shard", default=None, metavar="I/N",
              help="Do only the I-th (0-based) of N contiguous blocks of each split; join with `cache merge`.")
@click.option("--engine", type=_RegistryChoice("medembed.extract.distributed:ENGINES"),
              **_cfg("medembed.extract.distributed:DEFAULT_ENGINE"),
              help="ray: run shards as Ray tasks (one GPU each where there are GPUs), then merge.")
@click.option("--address", default=None, help="Ray cluster address (default: start a local one).")
@click.option("--shards", default=None, type=click.IntRange(min=1),
              help="Shards per split with --engine ray [default: one per GPU, else one per CPU].")
@click.option("--max-memory-gb", **_cfg("medembed.extract.extraction:ExtractConfig.max_memory_gb"),
              type=click.FloatRange(min=0, min_open=True),
              help="GiB the extraction may take (the process and its decoding workers): a larger split is written "
                   "in parts sized to fit and joined without copying; a --shard or batch that cannot fit is refused.")
@_reading_options
def extract(data, backbone, splits, batch_size, workers, device, out, dtype, views, strict, allow_split_overlap, window,
            frames, runtime, report_sections, shard, engine, address, shards, max_memory_gb, follow_links,
            readable_paths) -> None:
    """Run a frozen backbone over a dataset once and cache its features in HDF5."""
    from medembed.extract.extraction import ExtractConfig
    from medembed.extract.extraction import extract as run_extract

    cfg = ExtractConfig(
        data=data, backbone=backbone, splits=splits.split(",") if splits else None, batch_size=batch_size,
        workers=workers, device=device, out=out, dtype=dtype, views=views, strict=strict, shard=shard,
        allow_split_overlap=allow_split_overlap, window=window, frames=frames, report_sections=report_sections,
        runtime=runtime, max_memory_gb=max_memory_gb, follow_links=follow_links, readable_paths=readable_paths,
    )
    if engine == "ray":
        from medembed.extract.distributed import extract_with_ray

        summary = extract_with_ray(cfg, address=address, shards=shards)
    else:
        summary = run_extract(cfg)
    _print_extract_summary(summary)

@main.group()
def cache() -> None:
    """Work on feature caches."""


@cache.command("merge")
@click.argument("out_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--copy", is_flag=True, help="Copy the features into each split file (self-contained; the shard files "
              "can then be deleted) instead of reading them from the shard files in place.")
def cache_merge(out_dir, copy) -> None:
    """Join the shard files in OUT_DIR (OUT/DATASET/BACKBONE) into one file per split.

    By default no feature is copied: each split file reads its features from the shard files beside
    it (HDF5 virtual datasets), so keep them there."""
    from medembed.cache.reader import read_attrs
    from medembed.cache.schema import FEATURES_IN_SHARDS
    from medembed.cache.shards import merge_shards

    for path in merge_shards(out_dir, copy=copy):
        in_shards = bool(read_attrs(path).get(FEATURES_IN_SHARDS))
        click.echo(f"merged {path}" + (" (features read from the shard files beside it)" if in_shards else
                                        " (self-contained)"))


# --- adapt -----------------------------------------------------------------------------------



def _adapt_option(flag: str, help_text: str, **kw):
    """An adapt option whose default is AdaptConfig's, shown as click's [default: ...]."""
    name = flag.removeprefix("--").replace("-", "_")
    return click.option(flag, name, default=_ADAPT[name], show_default=True, help=help_text, **kw)


def defaults_of(cls) -> dict:
    """A config dataclass's defaults by field name: every command takes its defaults from its config,
    so the help and a call from Python never disagree."""
    return {f.name: f.default_factory() if f.default_factory is not MISSING else f.default for f in fields(cls)}


_ADAPT = defaults_of(AdaptConfig)
_TUNE = defaults_of(TuneConfig)


def _given_on_command_line(ctx: click.Context, names) -> set[str]:
    return {n for n in names if ctx.get_parameter_source(n) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}


@main.command()
@click.option("--features", "features_dir", type=click.Path(file_okay=False), default=None,
              help="Features folder with train/valid/test.h5 [required; --resume may leave it out].")
@_adapt_option("--loss", "Training loss.", type=click.Choice(LOSS_KINDS))
@_adapt_option("--head", "Projection head; cca is solved in closed form.", type=click.Choice(HEAD_KINDS))
@_adapt_option("--epochs", "Maximum epochs; early stopping on valid mean recall.", type=click.IntRange(min=1))
@_adapt_option("--batch-size", "Pairs per step.", type=click.IntRange(min=2))
@_adapt_option("--lr", "Peak AdamW learning rate.", type=click.FloatRange(min=0, min_open=True))
@_adapt_option("--dim", "Width of each head's embedding; the run's embedding is dim x --ensemble wide.",
               type=click.IntRange(min=1))
@_adapt_option("--weight-decay", "AdamW weight decay on weight matrices.", type=click.FloatRange(min=0))
@_adapt_option("--dropout", "Hidden dropout of the mlp and residual heads.", type=click.FloatRange(0, 1, max_open=True))
@_adapt_option("--input-dropout", "Dropout on the raw cached features (mlp and linear heads).",
               type=click.FloatRange(0, 1, max_open=True))
@_adapt_option("--temperature", "Initial InfoNCE temperature (learned).", type=click.FloatRange(min=0, min_open=True))
@_adapt_option("--margin", "Margin loss: negatives are penalised above this cosine.", type=click.FloatRange(-1, 1))
@_adapt_option("--augment", "Named concepts as extra positive texts (their prompts): concepts; none; auto = "
               "concepts when the cache has named concepts and no --hard-negatives, else none.",
               type=click.Choice(AUGMENT_KINDS))
@_adapt_option("--concept-ratio", "With --augment concepts: (image, concept) pairs drawn per caption pair in an epoch.",
               type=click.FloatRange(min=0))
@_adapt_option("--ensemble", "Train K heads jointly and average their cosines.", type=click.IntRange(min=1))
@click.option("--querybank/--no-querybank", "querybank", default=_ADAPT["querybank"], show_default=True,
              help="After training, choose on valid how much to discount gallery items that are near many train "
                   "queries (hubs); eval, search and index then rank with it. --no-querybank: plain cosine.")
@click.option("--refit/--no-refit", "refit", default=None,
              help="Once valid has chosen the epoch and the query bank, train fresh heads on train + valid for that "
                   "many epochs and keep them (the run's valid numbers stay those of the choice). [default: refit "
                   "when train + valid fit within --max-memory-gb]")
@_adapt_option("--concept-loss", "Weight of an auxiliary loss: image and caption embeddings predict the image's named "
               "concepts through the concept prompts (0: off).", type=click.FloatRange(min=0))
@_adapt_option("--concept-pretrain", "Epochs of training the image head as a multi-label classifier of the images' "
               "concept labels before the contrastive epochs (0: off).", type=click.IntRange(min=0))
@_adapt_option("--graded", "Share of each InfoNCE target given to batch pairs whose images share concepts (0: plain "
               "one-hot targets).", type=click.FloatRange(0, 1, max_open=True))
@_adapt_option("--hard-negatives", "Build batches from anchors and this many pairs whose captions are among each "
               "anchor's nearest cached captions, so confusable pairs meet as negatives (0: plain shuffle).",
               type=click.IntRange(min=0))
@_adapt_option("--hard-pool", "Nearest captions each anchor's hard negatives are drawn from.", type=click.IntRange(min=1))
@_adapt_option("--ema", "Validate and keep an exponential moving average of the head weights with this decay per "
               "step (0: off).", type=click.FloatRange(0, 1, max_open=True))
@_adapt_option("--patience", "Epochs without improvement before stopping.", type=click.IntRange(min=1))
@_adapt_option("--seed", "Random seed.", type=int)
@_adapt_option("--device", "Where to train.", type=_RegistryChoice(_DEVICES))
@_adapt_option("--max-memory-gb", "Memory the run may take (GiB, the whole process): the training split is held in "
               "memory when it fits, else streamed from disk in chunks sized to fit; a budget nothing fits is refused "
               "before anything is read.", type=click.FloatRange(min=0, min_open=True))
@click.option("--keep-last", "keep_last", is_flag=True, default=_ADAPT["keep_last"],
              help="Keep last.safetensors (optimiser state, only needed to --resume) when the run finishes; "
                   "by default a finished run keeps best.safetensors only.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last finished epoch.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder, e.g. runs/NAME.")
@click.option("--unlock", default=None, metavar="SPEC",
              help="Train tower blocks together with the heads: text:N (LiT: image features stay cached), "
                   "image:N, text:all, or N / all for both towers [default: none, heads only; with "
                   "--unfreeze-every, the top 2 blocks of both towers].")
@click.option("--unfreeze-every", type=click.IntRange(min=0), default=_TUNE["every"], show_default=True,
              help="0: the unlocked blocks train with the heads every epoch (from cached activations). K: after "
                   "every K adapter epochs, one short cycle of the unlocked blocks on raw images and captions, then "
                   "a re-extracted cache; a cycle that lowers valid recall is rolled back.")
@click.option("--unfreeze-epochs", type=click.IntRange(min=1), default=_TUNE["epochs"], show_default=True,
              help="Epochs per unfreeze cycle (with --unfreeze-every K).")
@click.option("--backbone-lr", type=click.FloatRange(min=0, min_open=True), default=_TUNE["backbone_lr"],
              show_default=True,
              help="Peak learning rate of the unlocked tower blocks.")
@click.option("--grad-checkpointing", is_flag=True, help="Recompute unlocked blocks' activations to save memory.")
@click.option("--cached-trunk", is_flag=True,
              help="Unfreeze cycles train from the activations entering the first unlocked block, cached once, "
                   "instead of raw images (no random crops).")
@click.pass_context
def adapt(ctx: click.Context, resume: bool, unlock, unfreeze_every, unfreeze_epochs, backbone_lr, grad_checkpointing,
          cached_trunk, **options) -> None:
    """Train projection heads on cached features (seconds on a CPU), optionally with tower blocks."""
    from medembed.adapt.config import config_from_options
    from medembed.adapt.trainer import format_summary
    from medembed.common.locks import exclusive

    explicit = _given_on_command_line(ctx, options)
    tuning = _given_on_command_line(ctx, ["unfreeze_every", "unfreeze_epochs", "backbone_lr", "grad_checkpointing",
                                          "cached_trunk"])
    config = config_from_options(options, explicit, resume)
    with exclusive(config.out, "adapt", "wait for it to finish or choose another --out"):
        summary, extra = _adapt_run(config, resume, unlock, unfreeze_every, unfreeze_epochs, backbone_lr,
                                    grad_checkpointing, cached_trunk, tuning)
    click.echo("\n".join([format_summary(summary), *extra]))


def _adapt_run(config, resume, unlock, unfreeze_every, unfreeze_epochs, backbone_lr, grad_checkpointing, cached_trunk,
               tuning) -> tuple[dict, list[str]]:
    """One adapter, LiT or unfreezing run, as the options ask."""
    from medembed.adapt.trainer import train
    from medembed.adapt.tuning.unfreeze import train_tuned, train_with_unfreezing, tuned_summary_lines

    if (unlock is not None or unfreeze_every) and config.refit:
        raise BadOption("--refit retrains adapter heads on train + valid; a run with --unlock or --unfreeze-every "
                        "does not refit (drop --refit)")
    if unlock is None and not unfreeze_every:  # heads only; with --unfreeze-every, TuneConfig's default unlock
        if tuning:
            raise BadOption(f"--{sorted(tuning)[0].replace('_', '-')} has no effect without --unlock")
        summary, extra = train(config, resume=resume), []
    else:
        if resume:
            raise BadOption("--resume continues adapter runs only; a run with --unlock starts afresh")
        tune = TuneConfig(unlock=unlock, every=unfreeze_every, epochs=unfreeze_epochs, backbone_lr=backbone_lr,
                          grad_checkpointing=grad_checkpointing, cached_trunk=cached_trunk, seed=config.seed)
        summary = (train_with_unfreezing if unfreeze_every else train_tuned)(config, tune, progress=True)
        extra = tuned_summary_lines(summary)
    return summary, extra


@main.command()
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Run folder whose features folder moved.")
@click.option("--features", "features_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Where the run's features are now (checked against the run's recorded provenance).")
def relink(run_dir, features_dir) -> None:
    """Point a run at its features folder after the folder moved (runs moved with their features need nothing)."""
    from medembed.adapt.relink import relink as run_relink

    done = run_relink(run_dir, features_dir)
    click.echo(f"{done['run_dir']}: features {done['old']} -> {done['new']} (splits {', '.join(done['splits'])}, "
               "provenance and integrity checked)")


@main.command()
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Adapter run folder to compact (left as it is).")
@click.option("--dims", type=click.IntRange(min=1), **_cfg("medembed.adapt.compact:CompactOptions.dims"),
              help="Dimensions of the compact embedding, fewer than the run's --dim x --ensemble (4,096 for the "
                   "default run); 256 cost 0.1 mean recall on roco-rad (BENCHMARKS.md).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="New run folder, e.g. runs/NAME-256.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier compact run in --out.")
def compact(run_dir, dims, out, overwrite) -> None:
    """A compact copy of a run: its embeddings projected to --dims on the top directions of its train
    embeddings, with its own query bank; eval, search, index and export take it like any run."""
    from medembed.adapt.compact import make_compact
    from medembed.common.locks import exclusive

    with exclusive(out, "compact"):
        done = make_compact(run_dir, dims, out, overwrite=overwrite)
    bank = done.querybank["description"] if done.querybank else "plain cosine (the source run has no query bank)"
    click.echo(f"{done.run_dir}: {done.dims} of {done.source_dims} dimensions "
               f"({100 * done.variance_kept:.1f}% of the train embeddings' second moment kept); ranking: {bank}\n"
               f"see what it costs: cli.py eval --run {done.source} --run {done.run_dir}")


@main.command()
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="A run of several heads (the default --ensemble 4), e.g. runs/roco.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="New run folder, e.g. runs/NAME-1h.")
@click.option("--dim", **_cfg("medembed.adapt.distil:DistilOptions.dim"), type=click.IntRange(min=0),
              help="The student's width; 0: one member's, started from the first member's weights.")
@click.option("--epochs", **_cfg("medembed.adapt.distil:DistilOptions.epochs"), type=click.IntRange(min=1),
              help="Epochs over train; the best on valid is kept.")
@click.option("--seed", **_cfg("medembed.adapt.distil:DistilOptions.seed"), type=int,
              help="Seed of the student's initialisation (when not started from a member) and batch order.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier distilled run in --out.")
def distil(run_dir, out, dim, epochs, seed, overwrite) -> None:
    """One head taught to rank as the run's ensemble does: the ensemble's quality at one head's cost and
    a smaller embedding; eval, search, index and export take it like any run."""
    from medembed.adapt.distil import DistilOptions, distil_run
    from medembed.common.locks import exclusive

    with exclusive(out, "distil"):
        done = distil_run(run_dir, out, DistilOptions(dim=dim, epochs=epochs, seed=seed), overwrite=overwrite)
    bank = done.querybank["description"] if done.querybank else "plain cosine (the source run has no query bank)"
    chosen = (" (a student of its selection heads, which never trained on valid; the kept one was then taught by "
              f"its refit heads for {done.best_epoch} epochs)") if done.refit else ""
    click.echo(f"{done.run_dir}: one {done.dim}-d head taught by {done.source} ({done.source_dim}-d); best epoch "
               f"{done.best_epoch}; valid mean recall {done.valid[MEAN_RECALL]:.1f} (teacher "
               f"{done.teacher_valid[MEAN_RECALL]:.1f}){chosen}, similarities correlate {done.correlation:.3f}; "
               f"ranking: {bank}\nsee what it costs: cli.py eval --run {done.source} --run {done.run_dir}")


# --- eval / search ---------------------------------------------------------------------------

def _int_list(ctx, param, value: str) -> list[int]:
    try:
        ks = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not ks or min(ks) < 1:
        raise click.BadParameter(f"expected positive integers, got {value!r}")
    return ks


@main.command("eval")
@click.option("--run", "run_dirs", multiple=True, required=True, type=click.Path(exists=True),
              help="Run folder, unfreezing run folder or its finetuned.safetensors (repeat to compare runs on the "
                   "same pool; each gets its own metrics-RUN.json).")
@click.option("--data", default=None, type=click.Path(exists=True, file_okay=False),
              help="Score this dataset's raw images and captions, encoded by each run's own backbone (the fine-tuned "
                   "one for a checkpoint), instead of the run's cache.")
@click.option("--features-root", **_cfg("medembed.evaluate.plan:EvalOptions.features_root"),
              type=click.Path(file_okay=False), help="Where --data's encoding is cached (reused when up to date).")
@click.option("--split", **_cfg("medembed.evaluate.plan:EVAL_SPLIT"), help="Split to evaluate on (its whole pool).")
@click.option("-k", "--k", "ks", default=",".join(map(str, DEFAULT_KS)), show_default=True, callback=_int_list,
              help="Recall@K cut-offs (capped at the pool, with a note).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output folder, which must not exist yet [default: FIRST_RUN/eval-SPLIT, with -on-DATASET for "
                   "--data and -vs-OTHER for a comparison].")
@click.option("--overwrite", is_flag=True, help="Replace an earlier evaluation in the output folder (swapped in whole "
                                                 "once the new one is complete).")
@click.option("--cross", is_flag=True, help="Allow runs scored on different pools (datasets, splits or backbones): "
                                             "each is scored on its own pool beside that pool's own baselines.")
@click.option("--modality-concepts", default=None,
              help="Modality classes as LABEL=CUI,... [CT=C0040405,MRI=C0024485,ultrasound=C0041618,"
                   "plain x-ray=C1306645,angiogram=C0002978,PET=C0032743].")
@click.option("--min-positives", **_cfg("medembed.evaluate.zeroshot:ZeroShotConfig.min_positives"), type=click.IntRange(min=1),
              help="Zero-shot mAP/AUROC only over concepts with at least this many positive images.")
@click.option("--fewshot-seeds", **_cfg("medembed.evaluate.fewshot:FewShotConfig.seeds"), type=click.IntRange(min=1),
              help="Support sets drawn per concept and k; the figure shows their spread.")
@click.option("--fewshot-concepts", **_cfg("medembed.evaluate.fewshot:FewShotConfig.max_concepts"), type=click.IntRange(min=1),
              help="Few-shot evaluates at most this many (the most frequent) concepts.")
@click.option("--skip", default=None, **_listed("medembed.evaluate.metrics:optional_sections"),
              help="Comma-separated sections to skip: {}.")
@click.option("--detectors", **_cfg("medembed.evaluate.detection:DetectionConfig.predictors", ",".join),
              help="Concept detection predictors, comma-separated: knn (concepts propagated from the most similar "
                   "train images) and logreg (one-vs-rest logistic regression, slower); with both, concept_f1 is "
                   "the one that scores better on valid.")
@click.option("--no-closed-form", is_flag=True, help="Leave out the closed-form baseline column.")
@click.option("--examples", **_cfg("medembed.evaluate.plan:EvalOptions.examples"), type=click.IntRange(min=0),
              help="Example grids per direction (0: none).")
@click.option("--max-memory-gb", **_cfg("medembed.evaluate.plan:EvalOptions.max_memory_gb"),
              type=click.FloatRange(min=0, min_open=True),
              help="Memory the evaluation may take (GiB, the whole process), planned from the cache headers: an "
                   "evaluation that does not fit is refused before anything is read, saying what would.")
def eval_cmd(run_dirs, data, features_root, split, ks, out, overwrite, cross, modality_concepts, min_positives,
             fewshot_seeds, fewshot_concepts, skip, detectors, no_closed_form, examples, max_memory_gb) -> None:
    """Retrieval, concept zero-/few-shot and ImageCLEF F1 for runs beside their baselines."""
    from medembed.common.modalities import DEFAULT_MODALITIES
    from medembed.evaluate import metrics as registry
    from medembed.evaluate.detection import PREDICTORS, DetectionConfig
    from medembed.evaluate.fewshot import FewShotConfig
    from medembed.evaluate.pipeline import EvalOptions, run_eval
    from medembed.evaluate.report import format_summary
    from medembed.evaluate.zeroshot import ZeroShotConfig, parse_modality_concepts

    skipped = {s.strip() for s in (skip or "").split(",") if s.strip()}
    optional = registry.optional_sections()
    unknown = skipped - set(optional)
    if unknown:
        raise BadOption(f"--skip: unknown sections {', '.join(sorted(unknown))} ({', '.join(optional)})")
    predictors = tuple(dict.fromkeys(p.strip() for p in detectors.split(",") if p.strip()))
    if not predictors or set(predictors) - set(PREDICTORS):
        raise BadOption(f"--detectors: expected some of {', '.join(PREDICTORS)}, got {detectors!r}")
    options = EvalOptions(
        zeroshot=ZeroShotConfig(min_positives=min_positives, modalities=parse_modality_concepts(modality_concepts)
                                if modality_concepts else DEFAULT_MODALITIES),
        fewshot=FewShotConfig(seeds=fewshot_seeds, max_concepts=fewshot_concepts),
        detection=DetectionConfig(predictors=predictors),
        closed_form=not no_closed_form,
        sections=tuple(s for s in registry.sections() if s not in skipped),
        examples=examples,
        data=data,
        features_root=features_root,
        cross=cross,
        overwrite=overwrite,
        max_memory_gb=max_memory_gb,
    )
    result = run_eval(list(run_dirs), split=split, ks=ks, out_dir=out, options=options)
    click.echo(format_summary(result))


QUERY_RUNTIME_HELP = ("What encodes queries on the CPU: PyTorch, ONNX Runtime (the run's towers exported once into the "
                      "features folder's graphs/; a text query in half the time, an image query in a fifth), or auto "
                      "(onnx when onnxruntime is installed).")


def _query_options(f):
    """--features-root, --runtime and --max-memory-gb of the commands that answer queries (search, serve)."""
    f = click.option("--max-memory-gb", **_cfg("medembed.serve.search:SearchOptions.max_memory_gb"), type=click.FloatRange(min=0, min_open=True),
                     help="Memory this may take (GiB, the whole process): the pool's embeddings are held when they "
                          "fit, else every exact scan streams the pool from disk; a budget nothing fits is refused.")(f)
    f = click.option("--runtime", type=_RegistryChoice(_RUNTIMES), **_cfg("medembed.serve.search:SearchOptions.runtime"), help=QUERY_RUNTIME_HELP)(f)
    return click.option("--features-root", **_cfg("medembed.serve.search:SearchOptions.features_root"), type=click.Path(file_okay=False),
                        help="Where --data's encoding is cached.")(f)


@main.command()
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True),
              help="Run folder, unfreezing run folder or its finetuned.safetensors.")
@click.option("--text", default=None, help="A caption: find the images it describes.")
@click.option("--image", default=None, type=click.Path(exists=True, dir_okay=False), help="An image: find its captions.")
@click.option("-k", "--k", "k", **_cfg("medembed.serve.search:SearchOptions.k"), type=click.IntRange(min=1),
              help="How many results (capped at the pool, with a note).")
@click.option("--split", default=None, help="Search one split's pool only [default: every split of the run's features].")
@click.option("--exact", is_flag=True, help="Scan the whole pool even when the run has a FAISS index.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Also draw the results into this PNG (a new file unless --overwrite).")
@click.option("--overwrite", is_flag=True, help="Let --out replace an existing file.")
@click.option("--explain", "explain_maps", is_flag=True,
              help="With --text and --out: draw over each image a heat map of the regions that drive its score.")
@click.option("--data", default=None, type=click.Path(exists=True, file_okay=False),
              help="Search this dataset's raw images and captions (encoded once by the run's backbone) instead of "
                   "the run's cache.")
@_query_options
@_reading_options
def search(run_dir, text, image, k, split, exact, out, overwrite, explain_maps, data, features_root, runtime,
           max_memory_gb, follow_links, readable_paths) -> None:
    """Top-k of the cached pool for a new caption or image, through a run's heads."""
    from medembed.serve.search import format_results
    from medembed.serve.search import search as run_search

    if (text is None) == (image is None):
        raise click.UsageError("give exactly one of --text or --image")
    reading = _data_reading(data, follow_links, readable_paths)
    if out and os.path.exists(out) and not overwrite:
        raise click.ClickException(f"{out}: exists; choose another --out or pass --overwrite to replace it")
    results = run_search(run_dir, text=text, image=image, k=k, out=out, split=split, data=data,
                         features_root=features_root, use_index=not exact, explain_maps=explain_maps,
                         runtime=runtime, max_memory_gb=max_memory_gb, **reading)
    click.echo(format_results(results))
    if out:
        click.echo(f"grid: {out}")


@main.command()
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True),
              help="Run folder, or a finetuned.safetensors.")
@click.option("--index/--exact", "use_index", **_cfg("medembed.serve.search:SearchOptions.use_index"),
              help="Answer text queries through the run's FAISS index when `cli.py index` built one, or always "
                   "scan exactly.")
@click.option("--host", **_cfg("medembed.serve.page:ServeOptions.host"),
              help="Address to listen on; only this machine can reach the page unless you change it.")
@click.option("--port", **_cfg("medembed.serve.page:ServeOptions.port"), type=click.IntRange(1, 65535),
              help="Port to listen on.")
@click.option("--split", default=None, help="Serve one split's pool only [default: every split of the run's features].")
@click.option("--data", default=None, type=click.Path(exists=True, file_okay=False),
              help="Serve this dataset's images (an image-only folder too), encoded once by the run's backbone, "
                   "instead of the run's cache.")
@_query_options
@_reading_options
def serve(run_dir, use_index, host, port, split, data, features_root, runtime, max_memory_gb, follow_links,
          readable_paths) -> None:
    """A local search page and JSON API over a run's pool (text -> images, image -> captions and images)."""
    from medembed.serve.page import listen
    from medembed.serve.page import serve as run_server
    from medembed.serve.search import Searcher

    reading = _data_reading(data, follow_links, readable_paths)
    sock = listen(host, port)  # first: a busy port is refused at once, not after the model has loaded
    with sock:
        searcher = Searcher(run_dir, split, data, features_root, use_index=use_index, runtime=runtime,
                            max_memory_gb=max_memory_gb, **reading)
        searcher.warm()  # load the model and project a held pool before answering
        for note in searcher.notes:
            click.echo(f"note: {note}", err=True)
        index = f"{searcher.index[1].kind} index" if searcher.index is not None else "exact scan"
        click.echo(f"serving {searcher.pool.n_images} images of {run_dir} ({index}; {searcher.memory.describe()}) "
                   f"on http://{host}:{port}/")
        run_server(searcher, host=host, port=port, sock=sock)


@main.command()
@click.argument("folder", cls=_ConfigArgument, config="medembed.evaluate.listing:ListingOptions.folder",
                type=click.Path(file_okay=False))
@click.option("--sort", "sort_key", **_cfg("medembed.evaluate.listing:ListingOptions.sort"),
              type=_RegistryChoice("medembed.evaluate.listing:SORT_KEYS"),
              help="Order of the rows (valid: best valid mean recall first, ranked as eval ranks each run: with "
                   "its query bank when it has one; runs whose valid numbers are not held out come last, unranked; "
                   "test_*: latest test R@10 first).")
def runs(folder, sort_key) -> None:
    """Every run under FOLDER: backbone, dataset, model, best valid recall (as ranked and with plain cosine,
    and which heads it comes from), latest test evaluation, when made, size on disk."""
    from medembed.evaluate.listing import find_runs, format_runs, sort_runs, sweep_boards

    rows = sort_runs(find_runs(folder), sort_key)
    click.echo(format_runs(rows) if rows else f"no runs under {folder}")
    for where, board in sweep_boards(folder):
        click.echo(f"\nsweep {where}:\n{board}")


@main.command()
@click.option("--features", "features_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="The cache every cell trains on.")
@click.option("--set", "sets", multiple=True, metavar="KEY=V1,V2",
              help="One swept setting and its values (repeat for a grid), e.g. --set head=mlp,linear --set lr=1e-3,3e-3.")
@click.option("--grid", "grid_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="A JSON or YAML file {setting: [values]} (merged with --set).")
@click.option("--seeds", **_cfg("medembed.evaluate.sweep:SweepOptions.seeds"), type=click.IntRange(min=1),
              help="Runs per cell (seeds 0..N-1).")
@click.option("--fixed", "fixed_sets", multiple=True, metavar="KEY=V",
              help="A setting held fixed for every cell, e.g. --fixed epochs=10.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Sweep folder: OUT/CELL/seed-S runs, OUT/leaderboard.md and .json.")
def sweep(features_dir, sets, grid_file, seeds, fixed_sets, out) -> None:
    """A grid of adapter settings over one cache, several seeds per cell, and a leaderboard."""
    from medembed.evaluate.sweep import format_leaderboard, parse_fixed, parse_grid, run_sweep

    grid = parse_grid(list(sets), grid_file)
    fixed = parse_fixed(list(fixed_sets))
    board = run_sweep(features_dir, grid, seeds, out, fixed, log=click.echo)
    click.echo("\n" + format_leaderboard(board, seeds) + f"\nwritten: {Path(out) / 'leaderboard.md'}")


# --- index / export --------------------------------------------------------------------------

@main.command()
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True, file_okay=False), help="Run folder, e.g. runs/NAME.")
@click.option("--split", **_cfg("medembed.serve.index:IndexOptions.split"), help="Split to index (test, train, ...), or all of them.")
@click.option("--kind", type=_RegistryChoice("medembed.serve.index_plan:KIND_CHOICES"), **_cfg("medembed.serve.index:IndexOptions.kind"),
              help="auto: picked from the collection size and --max-memory-gb; flat: exact; ivf / hnsw: approximate, "
                   "full vectors; ivfpq: 8-64 bytes per image, candidates re-scored exactly (tens of millions of images).")
@click.option("--max-memory-gb", **_cfg("medembed.serve.index:IndexOptions.max_memory_gb"), type=click.FloatRange(min=0, min_open=True),
              help="GiB the index and its build may take; an index that needs more is refused before building.")
@click.option("--nlist", **_cfg("medembed.serve.index:IndexOptions.nlist"), type=click.IntRange(min=0), help="ivf/ivfpq cells; 0: from N.")
@click.option("--nprobe", **_cfg("medembed.serve.index:IndexOptions.nprobe"), type=click.IntRange(min=0), help="ivf/ivfpq cells searched per query; 0: ivf nlist/16 (at least 16), ivfpq 128.")
@click.option("--m", **_cfg("medembed.serve.index:IndexOptions.m"), type=click.IntRange(min=2), help="hnsw links per vector.")
@click.option("--pq-bytes", **_cfg("medembed.serve.index:IndexOptions.pq_bytes"), type=click.IntRange(min=0),
              help="ivfpq code bytes per image: 8, 16, 32 or 64; 0: the largest the budget holds.")
@click.option("--rerank", **_cfg("medembed.serve.index:IndexOptions.rerank"), type=click.IntRange(min=1),
              help="ivfpq candidates re-scored exactly per query.")
@click.option("--data", default=None, type=click.Path(exists=True, file_okay=False),
              help="Index this dataset's images (an image-only folder too), encoded once by the run's backbone, "
                   "instead of the run's cache; `search`/`serve --data` on the same folder use it.")
@click.option("--features-root", **_cfg("medembed.serve.index:IndexOptions.features_root"),
              type=click.Path(file_okay=False), help="Where --data's encoding is cached.")
@click.option("--engine", type=_RegistryChoice("medembed.serve.index:INDEX_ENGINES"),
              **_cfg("medembed.serve.index:IndexOptions.engine"),
              help="ray: train the index here, fill it in parts on Ray workers (one block of the pool's rows each), "
                   "merge the parts; ivf and ivfpq only.")
@click.option("--address", default=None, help="Ray cluster address with --engine ray (default: start a local one).")
@click.option("--parts", **_cfg("medembed.serve.index:IndexOptions.parts"), type=click.IntRange(min=0),
              help="Ray tasks with --engine ray; 0: one per CPU of the cluster.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier index of the same split and kind (swapped in whole "
                                                 "once the new one is built).")
@_reading_options
def index(run_dir, split, kind, max_memory_gb, nlist, nprobe, m, pq_bytes, rerank, data, features_root, engine, address,
          parts, overwrite, follow_links, readable_paths) -> None:
    """Build a FAISS index of the run's adapted image embeddings (used by search and serve)."""
    from medembed.serve.index import IndexOptions, build_index, format_index_summary

    path, meta = build_index(run_dir, IndexOptions(split=split, kind=kind, nlist=nlist, nprobe=nprobe, m=m, data=data,
                                                   pq_bytes=pq_bytes, rerank=rerank, max_memory_gb=max_memory_gb,
                                                   features_root=features_root, engine=engine, address=address,
                                                   parts=parts, overwrite=overwrite,
                                                   **_data_reading(data, follow_links, readable_paths)))
    click.echo(format_index_summary(path, meta))


@main.command("export-model")
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True),
              help="Run folder, unfreezing run folder or its finetuned.safetensors.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write (new, or an earlier export "
              "with --overwrite).")
@click.option("--overwrite", is_flag=True, help="Replace an earlier model export in --out (swapped in whole once written).")
def export_model_cmd(run_dir, out, overwrite) -> None:
    """The run as a self-contained model folder: image and text encoders as ONNX graphs (backbone, heads,
    ensemble and normalisation inside), tokenizer, preprocessing, query bank, metrics and a model card.
    Runs with onnxruntime, numpy, Pillow and tokenizers; medembed is not needed (README)."""
    from medembed.serve.model_export import export_model

    summary = export_model(run_dir, out, overwrite=overwrite)
    test = summary.test
    scored = (f"; test R@10 {test[recall_key('t2i', 10)]:.1f} text->image, {test[recall_key('i2t', 10)]:.1f} image->text "
              f"(pool {int(test['pool_images'])})" if test else "")
    click.echo(f"exported a {summary.dim}-d model to {summary.out}{scored}")
    for name in summary.files:
        click.echo(f"  {name}")


@main.command()
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True, file_okay=False), help="Run folder, e.g. runs/NAME.")
@click.option("--split", default=None, help="Split to export, or all [default: the pool's only split, else test].")
@click.option("--format", "fmt", type=_RegistryChoice("medembed.serve.export:EXPORT_FORMATS"),
              **_cfg("medembed.serve.export:ExportOptions.format"),
              help="npy: img_emb/*.npy + metadata/*.parquet; parquet: an `embedding` column in img_emb/*.parquet.")
@click.option("--rows", type=_RegistryChoice("medembed.serve.export:ROW_KINDS"),
              **_cfg("medembed.serve.export:ExportOptions.rows"),
              help="One row per image (with its first caption) or one per caption.")
@click.option("--dtype", type=_RegistryChoice("medembed.serve.export:EXPORT_DTYPES"),
              **_cfg("medembed.serve.export:ExportOptions.dtype"),
              help="Dtype of the npy embeddings.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Output folder [RUN/export/SPLIT-FORMAT].")
@click.option("--overwrite", is_flag=True, help="Replace an earlier export in the output folder (swapped in whole once "
                                                 "the new one is complete).")
@click.option("--data", default=None, type=click.Path(exists=True, file_okay=False),
              help="Export this dataset's embeddings (an image-only folder too), encoded once by the run's backbone, "
                   "instead of the run's cache [--out default: RUN/export/DATASET-SPLIT-FORMAT].")
@click.option("--features-root", **_cfg("medembed.serve.export:ExportOptions.features_root"),
              type=click.Path(file_okay=False), help="Where --data's encoding is cached.")
@_reading_options
def export(run_dir, split, fmt, rows, dtype, out, overwrite, data, features_root, follow_links, readable_paths) -> None:
    """Write embeddings + metadata in the clip-retrieval / autofaiss / embedding-reader layout."""
    from medembed.serve.export import ExportOptions, export_embeddings, format_export_summary

    summary = export_embeddings(run_dir, ExportOptions(format=fmt, split=split, out=out, dtype=dtype, rows=rows,
                                                       overwrite=overwrite, data=data, features_root=features_root,
                                                       **_data_reading(data, follow_links, readable_paths)))
    click.echo(format_export_summary(summary))


if __name__ == "__main__":
    sys.exit(main())

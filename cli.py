"""medembed command line: extract -> adapt -> eval (and search).

A thin layer: each command parses its options, calls one function, prints the result.
"""
from __future__ import annotations

import os
import sys

import click

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Embedding-first CLIP toolkit for medical image-text retrieval."""


# --- extract ---------------------------------------------------------------------------------


def _print_extract_summary(summary) -> None:
    tag = " (SYNTHETIC embedded default)" if summary.synthetic else ""
    click.echo(f"\ndataset {summary.dataset}{tag} | backbone {summary.backbone} | device {summary.device}")
    click.echo(f"{'split':<8}{'records':>9}{'images':>9}{'captions':>10}{'skipped':>9}{'img/s':>9}  status")
    for s in summary.splits:
        rate = f"{s.images_per_s:.1f}" if s.images_per_s else "-"
        click.echo(f"{s.split:<8}{s.records:>9}{s.images:>9}{s.captions:>10}{len(s.skipped):>9}{rate:>9}  {s.status}")
    for s in summary.splits:
        for image_id, location, reason in s.skipped[:20]:
            click.echo(f"  skipped [{s.split}] {image_id}: {reason} ({location})")
        if len(s.skipped) > 20:
            click.echo(f"  ... and {len(s.skipped) - 20} more skipped in {s.split} (listed in the cache: skipped/)")
    click.echo("outputs:")
    for s in summary.splits:
        click.echo(f"  {s.path}")


@main.command()
@click.option("--data", type=click.Path(exists=True, file_okay=True), default=None,
              help="Dataset folder or annotations file (layout auto-detected). Default: the embedded synthetic set.")
@click.option("--backbone", default="effnet-lite0+minilm", show_default=True,
              help="Backbone name: effnet-lite0+minilm, tiny-clip, an open_clip ARCH[@TAG], hf-hub:ORG/REPO or local-dir:PATH.")
@click.option("--splits", default=None, help="Comma-separated splits (default: all the dataset has).")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=0), help="Image-decoding worker processes.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--out", default="features", show_default=True, type=click.Path(file_okay=False),
              help="Output folder; files go to OUT/DATASET/BACKBONE/SPLIT.h5.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--views", default=0, show_default=True, type=click.IntRange(min=0),
              help="Also store features of N randomly augmented views of each image.")
@click.option("--strict", is_flag=True, help="Stop at the first unreadable image instead of skipping it.")
def extract(data, backbone, splits, batch_size, workers, device, out, dtype, views, strict) -> None:
    """Run a frozen backbone over a dataset once and cache its features in HDF5."""
    from extract.pipeline import ExtractConfig
    from extract.pipeline import extract as run_extract

    cfg = ExtractConfig(
        data=data, backbone=backbone, splits=splits.split(",") if splits else None, batch_size=batch_size,
        workers=workers, device=device, out=out, dtype=dtype, views=views, strict=strict,
    )
    try:
        summary = run_extract(cfg)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    _print_extract_summary(summary)

# --- adapt -----------------------------------------------------------------------------------

# --- eval / search ---------------------------------------------------------------------------


if __name__ == "__main__":
    sys.exit(main())

"""What an extraction will hold in memory, decided before an image is read.

Extraction streams images through the backbone a batch at a time and keeps every finished batch on
disk, so what grows with the collection is the assembly of a split file: its images' features (and
views), its captions' features, and the records and strings of the images it holds. A split of more
images than fit is written as consecutive part files joined without copying
(`extraction.extract_split_in_parts`), each assembled alone: `plan_extract_memory` sizes those parts
to `--max-memory-gb` (the whole process, imports included), or refuses in one line when not even
one batch fits. The plan depends only on the settings, the backbone and the split's size, never on
what the process happens to measure, so a re-run after a crash plans the same parts and continues.

The decoding workers are processes of their own; their queues of decoded batches are counted too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from medembed.common.memory import GB, format_bytes
from medembed.common.planning import MemoryBudgetError, MemoryPlan, gib_up, largest_parts

# extraction counts its own process (not common.planning's): python with torch, torchvision, h5py, pyarrow,
# the tokenizers and these modules
EXTRACT_PROCESS_BYTES = 900 << 20
EXTRACT_SLACK_BYTES = 256 << 20  # HDF5's chunk caches, the allocator's free lists, a batch's strings and results
RECORD_BYTES = 1024  # a record of the part held as Python objects while assembling (id, captions, location)
CAPTION_BYTES = 256  # a caption's text as a Python string, held with the part
ROW_BOOKKEEPING_BYTES = 64  # per record of the whole dataset: split views and the overlap check's hashes
# no-grad inference keeps a few feature maps alive at once; this many times the input's bytes per image
# covers EfficientNet-Lite0 and the ViTs measured (see BENCHMARKS.md, "Extract within --max-memory-gb")
ACTIVATION_FACTOR = 24
PREFETCH = 4  # batches each decoding worker keeps ready (extraction's DataLoader prefetch_factor)
# ONNX Runtime beside PyTorch: its library and session arena, and the first time a backbone is run
# there, the graph's export (torch.onnx imports and traces): measured up to 0.3 GiB above the rest
RUNTIME_BYTES = 512 << 20


@dataclass(frozen=True)
class ExtractPlan(MemoryPlan):
    """The parts a split is assembled in; its one phase is the largest file this split assembles."""

    per_record: int = 0  # bytes one more record of a part adds while it is assembled
    records_per_file: int = 0  # the part size: what fits, at most the configured size (a multiple of the batch size)
    fits: int = 0  # the most records one file (a part or a --shard) may assemble within the budget

    def describe(self) -> str:
        return f"memory: parts of up to {self.records_per_file:,} images; {super().describe()}"


def weight_bytes(bb, other_runtime: bool = False) -> int:
    """The backbone's parameters and buffers (twice for the image tower when another runtime, such as
    ONNX Runtime on the CPU, may hold its own copy of the graph)."""
    def size(module) -> int:
        if not isinstance(module, torch.nn.Module):
            return 0
        return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))

    image = size(bb.image_model)
    return image * (2 if other_runtime or bb.image_runtime is not None else 1) + size(bb.text_model) + sum(map(size, bb.extra_modules))


def pixel_bytes(bb) -> int:
    """Bytes of one preprocessed image (float32), from the backbone's own preprocessing of a blank image."""
    shape = bb.preprocess(Image.new("RGB", (256, 256))).shape
    return 4 * math.prod(shape)


def plan_extract_memory(bb, *, budget_gb: float, n_dataset_records: int, captions_per_image: float,
                        batch_size: int, workers: int, views: int, dtype: str, records_per_file: int,
                        other_runtime: bool = True, split_records: int | None = None) -> ExtractPlan:
    """Parts of at most `records_per_file` images, fewer when the budget asks; MemoryBudgetError (one
    line) when not even one batch fits. With `split_records` (the records one file of this split
    holds: the split, or its --shard), the planned peak is that file's, not a whole part's."""
    budget = int(budget_gb * GB)
    item = np.dtype(dtype).itemsize
    pixels = pixel_bytes(bb)
    micro = bb.cpu_micro_batch if bb.cpu_micro_batch and bb.device.type == "cpu" else batch_size
    held = {
        "process": EXTRACT_PROCESS_BYTES,
        "backbone": weight_bytes(bb, other_runtime),
        "image runtime": RUNTIME_BYTES if other_runtime else 0,
        "records": ROW_BOOKKEEPING_BYTES * n_dataset_records,
        "decoded batches": max(1, workers) * PREFETCH * batch_size * (1 + views) * pixels if workers else
        batch_size * (1 + views) * pixels,
        "inference": min(micro, batch_size) * ACTIVATION_FACTOR * pixels,
        "slack": EXTRACT_SLACK_BYTES,
    }
    # a part's images: the batches read back and joined (twice, as stored), float32 once for writing;
    # its captions likewise; and the records and caption strings
    image_bytes = bb.image_dim * (1 + views) * (2 * item + 4)
    caption_bytes = captions_per_image * (bb.text_dim * (2 * item + 4) + CAPTION_BYTES)
    per_record = int(math.ceil(image_bytes + caption_bytes + RECORD_BYTES))
    room = budget - sum(held.values())
    fits = (room // per_record) // batch_size * batch_size if room > 0 else 0
    if fits < batch_size:
        need = sum(held.values()) + per_record * batch_size
        raise MemoryBudgetError(
            f"extract needs {format_bytes(need)} for one batch of {batch_size} images "
            f"({largest_parts(held, {})}), above --max-memory-gb {budget_gb:g}; "
            f"use --max-memory-gb {gib_up(need)} or more, or a smaller --batch-size / --workers")
    rows = int(min(records_per_file, fits))
    largest = min(rows, split_records) if split_records else rows  # records of the largest file this split assembles
    return ExtractPlan(budget, held, {"part": per_record * largest}, per_record=per_record, records_per_file=rows,
                       fits=int(fits))

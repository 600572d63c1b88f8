"""What a cache file is: its format version and the datasets that hold numbers.

Format 2 stores every numeric dataset with HDF5's Fletcher-32 checksum filter (HDF5 checks each
chunk on read, so a flipped byte is refused instead of trained on) and never holds a non-finite
feature. Format 1 files (no checksums) are still read; a newer format than this toolkit knows is
refused with what to do.
"""
from __future__ import annotations

import re

FORMAT = "medembed-cache/2"
READABLE_FORMATS = ("medembed-cache/1", FORMAT)

# The files of a features folder ({out}/{dataset}/{backbone}/): one finished file per split, and while
# a split is extracted in shards (or in parts), one file per shard beside it, plus its parts folder and
# completion marker under the same stem.
FILE_SUFFIX = ".h5"
FILE_GLOB = f"*{FILE_SUFFIX}"  # every cache file of a folder: split files and shard files
SHARD_MARK = ".shard-"  # what names a shard file (and nothing else) of a features folder
# a shard's file, parts folder or marker: SPLIT.shard-I-of-N.{h5,parts,done}
SHARD_RE = re.compile(r"^(?P<split>.+)\.shard-(?P<i>\d+)-of-(?P<n>\d+)\.(?P<ext>h5|parts|done)$")
SHARD_NAMING = f"SPLIT{SHARD_MARK}I-of-N{FILE_SUFFIX}"  # how shard files are named, in words (for messages)


def split_file(split: str) -> str:
    """The name of a split's finished file, e.g. `test.h5`."""
    return f"{split}{FILE_SUFFIX}"


def shard_file(split: str, index: int, count: int) -> str:
    """The name of shard `index` of `count` of a split, e.g. `train.shard-0001-of-0004.h5`; the numbers are
    zero-padded so the shards of a split sort in order."""
    return f"{split}{SHARD_MARK}{index:04d}-of-{count:04d}{FILE_SUFFIX}"


def shard_glob(split: str) -> str:
    """A glob for every shard file of a split, whatever their count."""
    return f"{split}{SHARD_MARK}*-of-*{FILE_SUFFIX}"


def is_shard_file(name: str) -> bool:
    """Whether a file name of a features folder is a shard's (not a finished split file)."""
    return SHARD_MARK in name


# The datasets of a cache file (one file per dataset x split x backbone):
IMAGE_IDS = "images/ids"  # [N] str: image ids, dataset order, skipped images left out
IMAGE_LOCATIONS = "images/locations"  # [N] str: where each image was read from (relative to the data root)
IMAGE_FEATURES = "images/features"  # [N, Di]: raw pooled image features (not L2-normalised)
VIEW_FEATURES = "images/view_features"  # [N, V, Di], optional: features of V augmented views of each image
CAPTION_TEXT = "captions/text"  # [M] str
CAPTION_IMAGE_ROW = "captions/image_row"  # [M] int: row in images/ of each caption's image
CAPTION_FEATURES = "captions/features"  # [M, Dt]: raw caption features
CONCEPT_IDS = "concepts/ids"  # [C] str: concept vocabulary (shared by all splits of a dataset)
CONCEPT_NAMES = "concepts/names"  # [C] str: canonical name, "" when the dataset gives none
CONCEPT_INDPTR = "concepts/indptr"  # [N+1] } multi-hot labels as CSR rows
CONCEPT_INDICES = "concepts/indices"  # [nnz] }
CONCEPT_TEMPLATES = "concepts/templates"  # [T] str: prompt templates, e.g. "a radiology image showing {name}"
CONCEPT_TEXT_FEATURES = "concepts/text_features"  # [C, T, Dt]: every (named concept, template); unnamed: zeros
SKIPPED_IDS = "skipped/ids"  # [S] str } images that could not be read, and why
SKIPPED_LOCATIONS = "skipped/locations"  # [S] str }
SKIPPED_REASONS = "skipped/reasons"  # [S] str }

# an image location inside an archive: "ARCHIVE.zip::member/inside.jpg" (relative to the data root)
ZIP_SEP = "::"
# the location of an image whose path identifies a patient: only its (hashed) id, "private:ID"; the path
# is found again by reading the data folder, so it never enters a cache, export or page
PRIVATE_LOCATION = "private:"

# The attributes of a cache file (its provenance and bookkeeping). Written by the extractor
# (`extract.extraction.split_provenance` and the backbone's own provenance) and `writer`:
# - what the file is
FORMAT_ATTR = "format"  # FORMAT of the toolkit that wrote it (checked on open)
COMPLETE = "complete"  # True once every dataset is written (set last)
DTYPE = "dtype"  # storage dtype of the features ("float16" or "float32")
N_IMAGES = "n_images"  # rows of images/ (counts set by the writer)
N_CAPTIONS = "n_captions"  # rows of captions/
N_SKIPPED = "n_skipped"  # rows of skipped/
# file attribute of a split joined from shard files (`cache merge`): its feature datasets are HDF5 virtual
# datasets reading the shard files beside it, which must stay there
FEATURES_IN_SHARDS = "features_in_shards"
# - what fixes the feature space (heads trained on one cannot read features from another)
BACKBONE = "backbone"  # the backbone's registry name
WEIGHTS_SHA256 = "weights_sha256"  # hash of the backbone's weights
PREPROCESS = "preprocess"  # image preprocessing, as JSON
IMAGE_LAYER = "image_layer"  # which layer the image features are read from
IMAGE_POOLING = "image_pooling"  # and how they are pooled
TEXT_LAYER = "text_layer"  # which layer the caption features are read from
TEXT_POOLING = "text_pooling"  # and how they are pooled
IMAGE_RUNTIME = "image_runtime"  # the image tower's runtime when not PyTorch (e.g. ONNX Runtime)
IMAGE_DIM = "image_dim"  # width of images/features
TEXT_DIM = "text_dim"  # width of captions/features
# - what identifies the data the features describe
DATASET = "dataset"  # the dataset's name
DATASET_LAYOUT = "dataset_layout"  # the layout its reader detected
DATASET_FINGERPRINT = "dataset_fingerprint"  # hash of the dataset's records
SYNTHETIC = "synthetic"  # True for generated data (tests, benchmarks)
SPLIT = "split"  # the split's name (the file's stem when absent)
IMAGE_DECODING = "image_decoding"  # window / frames used to decode images, when not the defaults
DATA_ACCESS = "data_access"  # links followed out of the data folder, when they were
IMAGE_ID_SCHEME = "image_ids"  # records named by a keyed hash of their path (and which key), when they are
DATA_ROOT = "data_root"  # the data folder, absolute, as extracted (image locations are relative to it)
DATA_ROOT_RELATIVE = "data_root_relative"  # the data folder relative to the cache root (the two may move together)
# - how it was made
VIEWS = "views"  # augmented views per image (images/view_features), 0 for none
TEMPLATES = "templates"  # concept prompt templates, joined by newlines
TOOLKIT_VERSION = "toolkit_version"  # medembed's version
CREATED = "created"  # when the file was written (UTC, ISO 8601)
N_RECORDS = "n_records"  # records of the split (or shard) read, skipped ones included
EXTRACT_BATCH_SIZE = "extract_batch_size"  # --batch-size of the extraction (a shard's rows follow it)
SHARD = "shard"  # "I/N" of a shard file, "" for a whole split
SHARD_ROWS = "shard_rows"  # "LO:HI", the split's records a shard file holds
SPLIT_RECORDS = "split_records"  # records of the whole split a shard file is part of
MERGED_FROM_SHARDS = "merged_from_shards"  # how many shard files a joined split file reads
REFRESHED = "refreshed"  # which features a tuned backbone re-encoded in place (the others are the extraction's)
# attributes of the feature datasets (images/features, captions/features, ...): which layer and pooling made them
FEATURE_LAYER = "layer"
FEATURE_POOLING = "pooling"

# float datasets: checked for NaN/Inf when written and when read
FEATURE_DATASETS = (IMAGE_FEATURES, VIEW_FEATURES, CAPTION_FEATURES, CONCEPT_TEXT_FEATURES)
REBUILD = "delete it and run `cli.py extract` again to rebuild it"

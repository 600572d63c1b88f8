"""What a cache file is: its format version and the datasets that hold numbers.

Format 2 stores every numeric dataset with HDF5's Fletcher-32 checksum filter (HDF5 checks each
chunk on read, so a flipped byte is refused instead of trained on) and never holds a non-finite
feature. Format 1 files (no checksums) are still read; a newer format than this toolkit knows is
refused with what to do.
"""
from __future__ import annotations

FORMAT = "medembed-cache/2"
READABLE_FORMATS = ("medembed-cache/1", FORMAT)

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

# file attribute of a split joined from shard files (`cache merge`): its feature datasets are HDF5 virtual
# datasets reading the shard files beside it, which must stay there
FEATURES_IN_SHARDS = "features_in_shards"

# float datasets: checked for NaN/Inf when written and when read
FEATURE_DATASETS = (IMAGE_FEATURES, VIEW_FEATURES, CAPTION_FEATURES, CONCEPT_TEXT_FEATURES)
REBUILD = "delete it and run `cli.py extract` again to rebuild it"

"""UCI Multiple Features (handwritten digits), the embedded default dataset."""

from __future__ import annotations

import importlib.resources
import pathlib
import zipfile
from typing import Mapping, Sequence

import numpy as np

from bmnas_jax.data.source import ArraySplit, Dataset
from bmnas_jax.errors import DataError

RESOURCE = "resources/mfeat.npz"
NUM_SAMPLES = 2000
NUM_CLASSES = 10
SAMPLES_PER_CLASS = 200
CLASS_NAMES = tuple(str(d) for d in range(10))

# Stored views: name -> (feature count, dtype, description).
VIEWS = {
    "pix": (240, np.uint8, "2x3-window pixel averages, 0..6: a 16-high x 15-wide image"),
    "fou": (76, np.float32, "Fourier coefficients of the character shapes"),
    "zer": (47, np.float32, "Zernike moments"),
    "mor": (6, np.float32, "morphological features"),
}
SHAPE_VIEWS = ("fou", "zer", "mor")
IMAGE_SHAPE = (1, 16, 15)
SHAPE_DIM = sum(VIEWS[v][0] for v in SHAPE_VIEWS)  # 129

# The two modalities the fusion network sees, built from the stored views.
MODALITIES = {
    "Image": "pix view as a one-channel image, float32 [n, 1, 16, 15] in [0, 1] (pix_images)",
    "Shape": "fou, zer, mor concatenated and standardized with train statistics, "
             "float32 [n, 129] (shape_descriptors)",
}


def resource_path() -> pathlib.Path:
  """Path of the packaged `mfeat.npz` (inside `bmnas_jax/data/resources/`)."""
  return pathlib.Path(str(importlib.resources.files("bmnas_jax.data").joinpath(RESOURCE)))


def load_raw(path: str | pathlib.Path | None = None) -> dict[str, np.ndarray]:
  """Loads the stored views and labels, checking names, shapes and values.

  Row i of every array is the same sample; rows are ordered by class, 200 per
  class (the label of row i is i // 200), as in the original UCI files.

  Args:
    path: the `.npz` to read; default: the packaged resource.

  Returns:
    `pix` uint8 [2000, 240] (values 0..6), `fou` float32 [2000, 76], `zer`
    float32 [2000, 47], `mor` float32 [2000, 6], `labels` int32 [2000] (0..9).

  Raises:
    ValueError: the file is missing, unreadable, or holds wrong arrays; the
      message names the file.
  """
  path = resource_path() if path is None else pathlib.Path(path)
  if not path.is_file():
    raise DataError(f"{path}: mfeat resource not found; regenerate it with "
                    f"experiments/make_mfeat.py")
  try:
    with np.load(path, allow_pickle=False) as npz:
      raw = {name: np.asarray(npz[name]) for name in npz.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
    raise DataError(f"{path}: cannot read the mfeat resource ({err})") from err
  want = {name: ((NUM_SAMPLES, dim), dtype) for name, (dim, dtype, _) in VIEWS.items()}
  want["labels"] = ((NUM_SAMPLES,), np.int32)
  missing = sorted(set(want) - set(raw))
  if missing:
    raise DataError(f"{path}: mfeat resource lacks arrays {missing}; has {sorted(raw)}")
  for name, (shape, dtype) in want.items():
    arr = raw[name]
    if arr.shape != shape or arr.dtype != dtype:
      raise DataError(f"{path}: array {name!r} is {arr.dtype} {arr.shape}, expected "
                      f"{np.dtype(dtype)} {shape}")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
      raise DataError(f"{path}: array {name!r} contains NaN/inf")
  if raw["pix"].max() > 6:
    raise DataError(f"{path}: array 'pix' has values above 6 (max {raw['pix'].max()})")
  labels = raw["labels"]
  if labels.min() < 0 or labels.max() >= NUM_CLASSES:
    raise DataError(f"{path}: labels outside [0, {NUM_CLASSES})")
  counts = np.bincount(labels, minlength=NUM_CLASSES)
  if not np.all(counts == SAMPLES_PER_CLASS):
    raise DataError(f"{path}: expected {SAMPLES_PER_CLASS} samples per class, got "
                    f"{counts.tolist()}")
  return {name: raw[name] for name in want}


def pix_images(raw: Mapping[str, np.ndarray]) -> np.ndarray:
  """The `pix` view as images.

  Each `pix` row is a 15-wide x 16-high image stored row by row, top row
  first (row-major, C order), so `reshape(16, 15)` gives [height, width] with
  the digit upright and not mirrored. Values 0..6 (ink counted over 2x3
  windows) are scaled to [0, 1] by / 6.

  Args:
    raw: `load_raw()` output (only `pix` uint8 [n, 240] is used).

  Returns:
    float32 [n, 1, 16, 15] (NCHW, one channel).
  """
  pix = np.asarray(raw["pix"])
  if pix.ndim != 2 or pix.shape[1] != VIEWS["pix"][0]:
    raise ValueError(f"pix: expected [n, 240], got {pix.shape}")
  return (pix.reshape(-1, *IMAGE_SHAPE).astype(np.float32) / np.float32(6.0))


def split_indices(labels: np.ndarray, seed: int = 0,
                  fractions: Sequence[float] = (0.6, 0.2, 0.2)) -> dict[str, np.ndarray]:
  """Fixed, seeded, stratified train/val/test split.

  Classes are visited in increasing order; the indices of each class are
  permuted with one `np.random.default_rng(seed)` and cut into
  round(f_train * n_c) train, round(f_val * n_c) val and the rest test
  samples. For mfeat (200 per class) and the default fractions this gives
  120/40/40 per class, 1200/400/400 in all. The same labels and seed always
  give the same split.

  Note: the data hold 6 pairs of identical samples (same class, identical in
  every view), e.g. rows 605 and 774; a split may place the two of a pair in
  different splits.

  Args:
    labels: int [n] class ids.
    seed: seed of the per-class permutations.
    fractions: (train, val, test) fractions, non-negative, summing to 1.

  Returns:
    `train`, `val`, `test` -> int64 [n_split] row indices, sorted increasingly;
    disjoint, and together every row once.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be int [n], got {labels.dtype} {labels.shape}")
  fractions = tuple(float(f) for f in fractions)
  if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-9:
    raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {fractions}")
  rng = np.random.default_rng(seed)
  parts = {"train": [], "val": [], "test": []}
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    n_train = int(round(fractions[0] * idx.size))
    n_val = min(int(round(fractions[1] * idx.size)), idx.size - n_train)
    parts["train"].append(idx[:n_train])
    parts["val"].append(idx[n_train:n_train + n_val])
    parts["test"].append(idx[n_train + n_val:])
  return {name: np.sort(np.concatenate(p)).astype(np.int64) for name, p in parts.items()}


def shape_descriptors(raw: Mapping[str, np.ndarray], train_indices: np.ndarray) -> np.ndarray:
  """The shape views `fou`, `zer`, `mor` concatenated and standardized.

  Each of the 129 columns is shifted by its mean and divided by its standard
  deviation (population, ddof=0), both computed on the rows `train_indices`
  only (constant columns are divided by 1), so no statistic comes from the
  val or test rows.

  Args:
    raw: `load_raw()` output (`fou` [n, 76], `zer` [n, 47], `mor` [n, 6]).
    train_indices: int [n_train] rows of the train split.

  Returns:
    float32 [n, 129]: columns 0-75 fou, 76-122 zer, 123-128 mor.
  """
  x = np.concatenate([np.asarray(raw[v], np.float64) for v in SHAPE_VIEWS], axis=1)
  if x.shape[1] != SHAPE_DIM:
    raise ValueError(f"shape views give {x.shape[1]} columns, expected {SHAPE_DIM}")
  train_indices = np.asarray(train_indices)
  if train_indices.ndim != 1 or train_indices.size == 0:
    raise ValueError(f"train_indices must be a non-empty int [n_train], got "
                     f"{train_indices.shape}")
  train = x[train_indices]
  mean = train.mean(axis=0)
  std = train.std(axis=0)
  std = np.where(std > 0, std, 1.0)
  return ((x - mean) / std).astype(np.float32)


def get_dataset(config) -> Dataset:
  """The embedded default as a dataset function (`config.data.source='mfeat'`).

  Modalities `Image` (`pix_images`) and `Shape` (`shape_descriptors`, standardized
  with train statistics); split `split_indices(labels, seed=config.data.split_seed)`
  (seed 0 when the key is absent): 1200/400/400.
  """
  raw = load_raw()
  split = split_indices(raw["labels"], seed=int(config.data.get("split_seed", 0)))
  inputs = {"Image": pix_images(raw), "Shape": shape_descriptors(raw, split["train"])}
  splits = {name: ArraySplit({m: v[idx] for m, v in inputs.items()},
                             raw["labels"][idx].astype(np.int32))
            for name, idx in split.items()}
  return Dataset(splits, NUM_CLASSES, "single", CLASS_NAMES,
                 description="UCI Multiple Features (mfeat)")

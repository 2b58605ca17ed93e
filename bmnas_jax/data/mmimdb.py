"""MM-IMDB from its original file `multimodal_imdb.hdf5` (and `mmimdb_split.json` if given).

The GMU release's hdf5 holds, row by row: `images` int `[N, 3, 256, 160]` (the poster
cropped to the aspect, resized to 160 wide x 256 high, BGR with the Caffe means
103.939 / 116.779 / 123.68 subtracted, stored as integers), `features` float32
`[N, 300]` (the mean word2vec vector of the plot), `genres` int `[N, 23]` (multi-hot)
and `imdb_ids` bytes `[N]`. Rows are ordered train, dev, test (15,552 / 2,608 / 7,799).
The original release optionally reassigns rows with a split file `{"train": [ids],
"dev": [ids], "test": [ids]}` (an id in neither train nor dev is test), ordering each
split as the file lists it. Examples are read from the file one at a time; the file is
never loaded whole.
"""

from __future__ import annotations

import json
import os
import pathlib
import threading
from typing import Any, Sequence

import numpy as np

from bmnas_jax.data.source import Dataset, Example
from bmnas_jax.errors import ConfigError, DataError

HDF5_FILENAME = "multimodal_imdb.hdf5"
SPLIT_FILENAME = "mmimdb_split.json"
RELEASE_SPLIT_COUNTS = (15552, 2608, 7799)
NUM_CLASSES = 23
IMAGE_KEY, TEXT_KEY, LABEL_KEY, ID_KEY = "images", "features", "genres", "imdb_ids"
IMAGE_LAYOUTS = ("auto", "chw", "release")


def _open(path: pathlib.Path):
  import h5py                                  # only the MM-IMDB reader needs it
  try:
    return h5py.File(path, "r")
  except OSError as e:
    raise DataError(f"{path}: cannot open as HDF5 ({e})") from e


class H5Split:
  """One split: rows of the hdf5, read one example at a time (a lock serializes h5py).

  `Image` is the poster `[3, 256, 160]` as stored (int), `Text` the word2vec mean
  `[300]` float32; labels are `[23]` float32 multi-hot.
  """

  def __init__(self, path: pathlib.Path, rows: np.ndarray, layout: str):
    self.path, self.rows, self.layout = path, np.asarray(rows, np.int64), layout
    self._file = None
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return int(self.rows.size)

  def file(self, i: int) -> str:
    return f"{self.path} (row {int(self.rows[i])})"

  def example(self, i: int, modalities: Sequence[str] = ("Image", "Text")) -> Example:
    row = int(self.rows[i])
    with self._lock:
      if self._file is None:
        self._file = _open(self.path)
      f = self._file
      inputs = {}
      if "Image" in modalities:
        image = np.asarray(f[IMAGE_KEY][row])
        # The release swaps the first and last axes of every image (collate_imdb's
        # transpose(1, 3)); files whose images are [3, H, W] are read as they are.
        inputs["Image"] = np.swapaxes(image, 0, 2) if self.layout == "release" else image
      if "Text" in modalities:
        inputs["Text"] = np.asarray(f[TEXT_KEY][row], np.float32)
      label = np.asarray(f[LABEL_KEY][row]).astype(np.float32)
    return Example(inputs, label)

  def __getitem__(self, i: int) -> Example:
    return self.example(i)


def _layout(shape: tuple[int, ...], want: str, path: pathlib.Path) -> str:
  """`chw` for images `[N, 3, H, W]`, `release` for `[N, W, H, 3]` (see `H5Split`)."""
  if want not in IMAGE_LAYOUTS:
    raise ConfigError(f"config.data.image_layout={want!r}; valid: {', '.join(IMAGE_LAYOUTS)}")
  if len(shape) != 4 or 3 not in (shape[1], shape[3]):
    raise DataError(f"{path}: key {IMAGE_KEY!r} has shape {list(shape)}, expected [N, 3, 256, "
                    f"160] (or the release's [N, 160, 256, 3])")
  if want == "auto":
    return "chw" if shape[1] == 3 else "release"
  return want


def _split_rows(ids: list[str] | None, n: int, split_path: pathlib.Path | None,
                counts: Sequence[int], path: pathlib.Path) -> dict[str, np.ndarray]:
  """Rows per split: from the split file (in its order) or the row order and `counts`."""
  if split_path is None:
    counts = [int(c) for c in counts]
    if sum(counts) != n:
      raise DataError(f"{path}: {n} rows, but config.data.split_counts={tuple(counts)} sums "
                      f"to {sum(counts)}; give {SPLIT_FILENAME} in config.data.root or the "
                      f"counts of the file's train, dev and test rows")
    ends = np.cumsum(counts)
    return {"train": np.arange(0, ends[0]), "val": np.arange(ends[0], ends[1]),
            "test": np.arange(ends[1], ends[2])}
  try:
    spec = json.loads(split_path.read_text())
  except (OSError, ValueError) as e:
    raise DataError(f"{split_path}: unreadable ({e})") from e
  if not isinstance(spec, dict) or not all(isinstance(spec.get(k), list)
                                           for k in ("train", "dev")):
    raise DataError(f"{split_path}: expected {{'train': [ids], 'dev': [ids], 'test': [ids]}}")
  row_of = {imdb_id: r for r, imdb_id in enumerate(ids)}
  out, taken = {}, set()
  for name, key in (("train", "train"), ("val", "dev")):
    missing = [i for i in spec[key] if i not in row_of]
    if missing:
      raise DataError(f"{split_path}: {len(missing)} {key!r} id(s) are not in {path} key "
                      f"{ID_KEY!r}, e.g. {missing[:3]}")
    out[name] = np.asarray([row_of[i] for i in spec[key]], np.int64)
    taken.update(spec[key])
  listed = [row_of[i] for i in spec.get("test", []) if i in row_of and i not in taken]
  rest = sorted(set(range(len(ids))) - set(listed) - {row_of[i] for i in taken})
  out["test"] = np.asarray(listed + rest, np.int64)
  return out


def _stat(path: pathlib.Path) -> dict[str, Any]:
  st = path.stat()
  return {"path": os.fspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def get_dataset(config) -> Dataset:
  """MM-IMDB from `config.data.root` (`config.data.source='mmimdb'`).

  Keys: `config.data.root` (the folder with `multimodal_imdb.hdf5` and, if present,
  `mmimdb_split.json`), `config.data.split_counts` (train/dev/test row counts when
  there is no split file; default the release's), `config.data.image_layout`
  (`auto`, `chw` or `release`).

  Returns:
    Modalities `Image` (int `[3, 256, 160]`) and `Text` (float32 `[300]`), 23 genres
    as multi-hot labels; splits `train`, `val` (the file's dev) and `test`.
  """
  root = str(config.data.get("root", "") or "")
  if not root:
    raise ConfigError(f"config.data.root is empty: set it to the folder holding "
                      f"{HDF5_FILENAME}")
  path = pathlib.Path(root).expanduser().absolute() / HDF5_FILENAME
  if not path.is_file():
    raise DataError(f"{path}: not found (config.data.root={root!r} must hold {HDF5_FILENAME})")
  split_path = path.parent / SPLIT_FILENAME
  split_path = split_path if split_path.is_file() else None
  with _open(path) as f:
    missing = [k for k in (IMAGE_KEY, TEXT_KEY, LABEL_KEY) + ((ID_KEY,) if split_path else ())
               if k not in f]
    if missing:
      raise DataError(f"{path}: lacks key(s) {missing}; has {sorted(f.keys())}")
    n = f[TEXT_KEY].shape[0]
    for key in (IMAGE_KEY, LABEL_KEY) + ((ID_KEY,) if split_path else ()):
      if f[key].shape[0] != n:
        raise DataError(f"{path}: key {key!r} has {f[key].shape[0]} rows, {TEXT_KEY!r} has {n}")
    if f[LABEL_KEY].ndim != 2 or f[LABEL_KEY].shape[1] != NUM_CLASSES:
      raise DataError(f"{path}: key {LABEL_KEY!r} has shape {list(f[LABEL_KEY].shape)}, "
                      f"expected [N, {NUM_CLASSES}]")
    if f[TEXT_KEY].ndim != 2 or f[TEXT_KEY].dtype.kind != "f":
      raise DataError(f"{path}: key {TEXT_KEY!r} is {f[TEXT_KEY].dtype} "
                      f"{list(f[TEXT_KEY].shape)}, expected float [N, 300]")
    layout = _layout(tuple(f[IMAGE_KEY].shape), str(config.data.get("image_layout", "auto")),
                     path)
    ids = ([b.decode() if isinstance(b, bytes) else str(b) for b in f[ID_KEY][()]]
           if split_path else None)
    names = f[LABEL_KEY].attrs.get("target_names")    # the GMU file stores them as JSON
    class_names = tuple(json.loads(names)) if names is not None else ()
  counts = tuple(config.data.get("split_counts", RELEASE_SPLIT_COUNTS))
  rows = _split_rows(ids, n, split_path, counts, path)
  fingerprint = {"hdf5": _stat(path), "split": _stat(split_path) if split_path else counts,
                 "layout": layout}
  return Dataset({name: H5Split(path, r, layout) for name, r in rows.items()}, NUM_CLASSES,
                 "multi", class_names if len(class_names) == NUM_CLASSES else (),
                 fingerprint=json.dumps(fingerprint, sort_keys=True),
                 description=f"MM-IMDB ({HDF5_FILENAME})")

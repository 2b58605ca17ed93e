"""The raw-dataset interface a dataset module implements, and how `config.data.source` resolves.

A dataset is one function `get_dataset(config) -> Dataset`, registered by name in
`bmnas_jax.data.datasets` or given as an import path `package.module:function`.
It returns the splits `train`, `val` and `test`; each split is a random-access
source of examples: `len(split)` and `split[i] -> Example` (the raw input of every
modality and the label). `ArraySplit` serves arrays held in memory; a dataset
too large for memory implements the same two methods over its files (and raises
`BadExample` naming the file for an example it cannot read).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import importlib
import inspect
import json
import re
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import numpy as np

from bmnas_jax.data.feature_set import LABEL_KINDS, SPLITS
from bmnas_jax.errors import ConfigError, DataError


class BadExample(DataError):
  """An example that cannot be read or is malformed.

  Attributes:
    file: the file it comes from ('' when it has none).
    reason: what is wrong.
  """

  def __init__(self, file: str, reason: str):
    self.file, self.reason = str(file), str(reason)
    super().__init__(f"{self.file}: {self.reason}" if self.file else self.reason)


@dataclasses.dataclass(frozen=True)
class Example:
  """One example: `inputs[modality]` is that modality's raw input (any shape and dtype
  the modality's backbone takes, e.g. uint8 `[T, H, W, 3]`); `label` is an int class
  id (single-label) or a `[K]` multi-hot vector (multi-label)."""
  inputs: Mapping[str, np.ndarray]
  label: Any


class SplitSource(Protocol):
  """What a split must offer: its length and random access to examples.

  A split may also offer `example(index, modalities, view=0) -> Example` with only
  the named modalities' inputs, so that reading one modality (e.g. to train its
  backbone) does not decode the others; a train split that takes `view` makes
  training-time augmented views (`view >= 1`, reproducible per index and view) for
  `config.data.train_views`.
  """

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> Example:
    ...


class ArraySplit:
  """A split held in memory: `inputs[modality]` `[n, ...]`, labels `[n]` or `[n, K]`."""

  def __init__(self, inputs: Mapping[str, np.ndarray], labels: np.ndarray,
               files: Sequence[str] | None = None):
    self.inputs = {m: np.asarray(v) for m, v in inputs.items()}
    self.labels = np.asarray(labels)
    sizes = {m: v.shape[0] for m, v in self.inputs.items()}
    if any(s != self.labels.shape[0] for s in sizes.values()):
      raise DataError(f"ArraySplit: inputs have {sizes} rows but there are "
                      f"{self.labels.shape[0]} labels")
    self.files = list(files) if files is not None else None

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  def __getitem__(self, index: int) -> Example:
    label = self.labels[index]
    return Example({m: v[index] for m, v in self.inputs.items()},
                   int(label) if label.ndim == 0 else label)

  def batch(self, indices: Sequence[int]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Inputs `{modality: [b, ...]}` and labels `[b]`/`[b, K]` of rows `indices`."""
    idx = np.asarray(indices, np.int64)
    return {m: v[idx] for m, v in self.inputs.items()}, self.labels[idx]

  def fingerprint(self) -> str:
    """sha256 over every array's dtype, shape and bytes."""
    h = hashlib.sha256()
    for name, arr in sorted({**self.inputs, "__labels__": self.labels}.items()):
      arr = np.ascontiguousarray(arr)
      h.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
      h.update(arr.tobytes())
    return h.hexdigest()


@dataclasses.dataclass
class Dataset:
  """What a dataset function returns.

  Attributes:
    splits: `train`, `val`, `test` -> a split source (`ArraySplit` or any object
      with `__len__` and `__getitem__(i) -> Example`); further snake_case splits are
      stored too, e.g. extra training data named in `config.evaluate.train_splits`.
    num_classes: K.
    label_kind: `single` (int class ids) or `multi` (`[K]` multi-hot).
    class_names: the K class names (optional).
    fingerprint: a string that changes whenever the raw data change (e.g. the
      files' sizes and modification times, or a content hash). Computed from
      the arrays when every split is an `ArraySplit`; required otherwise, so that
      `prepare` knows when to extract again.
    description: one line for reports.
  """
  splits: Mapping[str, SplitSource]      # train, val, test (+ extra training splits)
  num_classes: int
  label_kind: str = "single"
  class_names: tuple[str, ...] = ()
  fingerprint: str | None = None
  description: str = ""

  def data_fingerprint(self) -> str:
    if self.fingerprint:
      return str(self.fingerprint)
    if all(isinstance(s, ArraySplit) for s in self.splits.values()):
      return "sha256:" + hashlib.sha256("|".join(
          f"{k}:{self.splits[k].fingerprint()}" for k in sorted(self.splits)).encode()).hexdigest()
    raise ConfigError("the dataset function returned splits that are not ArraySplits and no "
                      "Dataset.fingerprint: give one that changes when the data change")


# ------------------------------------------------------------------ resolving

def resolve(spec: str, registry: Mapping[str, Any], key: str) -> Any:
  """The object a registry name or an import path `package.module:attribute` names.

  Args:
    spec: a key of `registry`, or `package.module:attribute`.
    registry: name -> the object, or its import path `package.module:attribute`.
    key: the config key `spec` came from (named in errors).

  Raises:
    ConfigError: unknown name, a module that cannot be found, a missing attribute.
  """
  if not isinstance(spec, str) or not spec:
    raise ConfigError(f"{key}={spec!r}: give a registered name ({', '.join(registry)}) or an "
                      f"import path 'package.module:name'")
  path = registry.get(spec, spec)
  if not isinstance(path, str):
    return path
  if ":" not in path:
    raise ConfigError(f"{key}={spec!r} is neither a registered name ({', '.join(registry)}) "
                      f"nor an import path 'package.module:name'")
  module_name, _, attr = path.partition(":")
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
      raise ConfigError(f"{key}={spec!r}: no module named {e.name!r} (is its folder on the "
                        f"Python path, e.g. the current directory?)") from e
    raise
  obj = module
  for part in attr.split("."):
    if not hasattr(obj, part):
      raise ConfigError(f"{key}={spec!r}: module {module_name!r} has no attribute {attr!r}")
    obj = getattr(obj, part)
  return obj


# ------------------------------------------------------------------ checking

@dataclasses.dataclass(frozen=True)
class InputSpec:
  """Shape and dtype (numpy name, e.g. `float32`) of one modality's raw input, without
  the batch axis."""
  shape: tuple[int, ...]
  dtype: str

  @classmethod
  def of(cls, arr: np.ndarray) -> "InputSpec":
    return cls(tuple(int(d) for d in arr.shape), np.dtype(arr.dtype).name)

  def __str__(self) -> str:
    return f"{self.dtype} {list(self.shape)}"

  def to_json(self) -> dict:
    return {"shape": list(self.shape), "dtype": self.dtype}


def check_example(ex: Any, modalities: Sequence[str], specs: Mapping[str, InputSpec] | None,
                  label_kind: str, num_classes: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """The example's inputs (for `modalities`) and label as arrays, or `BadExample`.

  Args:
    ex: what the split returned.
    specs: modality -> the expected input spec (the first example's); None to skip.
  Returns:
    `({modality: array}, label)`: label int64 `[]` or float32 `[K]`.
  """
  if not isinstance(ex, Example):
    raise BadExample("", f"expected a bmnas_jax.data.source.Example, got {type(ex).__name__}")
  inputs = {}
  for m in modalities:
    if m not in ex.inputs:
      raise BadExample("", f"no input for modality {m!r} (has {sorted(ex.inputs)})")
    arr = np.asarray(ex.inputs[m])
    if arr.dtype.kind not in "biuf":
      raise BadExample("", f"modality {m!r}: input dtype {arr.dtype} is not numeric")
    if specs is not None and InputSpec.of(arr) != specs[m]:
      raise BadExample("", f"modality {m!r}: input is {InputSpec.of(arr)}, the first "
                           f"example's is {specs[m]}")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
      raise BadExample("", f"modality {m!r}: input contains NaN/inf")
    inputs[m] = arr
  label = np.asarray(ex.label)
  if label_kind == "single":
    if label.ndim != 0 or label.dtype.kind not in "iub" or not 0 <= int(label) < num_classes:
      raise BadExample("", f"label {ex.label!r} is not a class id in [0, {num_classes})")
    return inputs, np.int64(label)
  if label.shape != (num_classes,) or not np.all((label == 0) | (label == 1)):
    raise BadExample("", f"label of shape {list(label.shape)} is not a multi-hot [{num_classes}] "
                         f"0/1 vector")
  return inputs, label.astype(np.float32)


def example_file(split: Any, index: int) -> str:
  """The file an example comes from, when the split says (`split.files[i]` or
  `split.file(i)`), else ''."""
  if callable(getattr(split, "file", None)):
    try:
      return str(split.file(index))
    except Exception:  # a split that cannot name its file still reports the reason
      return ""
  files = getattr(split, "files", None)
  if files is not None and 0 <= index < len(files):
    return str(files[index])
  return ""


def read_examples(split: Any, indices: Sequence[int], modalities: Sequence[str],
                  specs: Mapping[str, InputSpec] | None, label_kind: str, num_classes: int,
                  workers: int = 1, view: int = 0
                  ) -> Iterator[tuple[int, dict[str, np.ndarray] | None, Any]]:
  """Yields `(index, inputs, label)` for good examples and `(index, None, BadExample)`
  for bad ones (unreadable or malformed), in the order of `indices`.

  With `workers > 1` the examples are read by that many threads (decoders of
  images and videos release the GIL), still yielded in order. `view > 0` reads
  augmented view `view` of each example (`split.example(i, modalities, view)`).
  """
  partial = getattr(split, "example", None)
  if view and (partial is None or "view" not in inspect.signature(partial).parameters):
    raise ConfigError("config.data.train_views > 1, but the dataset's train split makes no "
                      "augmented views (it has no example(index, modalities, view))")

  def one(i: int):
    try:
      if view:
        ex = partial(int(i), tuple(modalities), view=view)
      else:
        ex = partial(int(i), tuple(modalities)) if partial else split[int(i)]
      inputs, label = check_example(ex, modalities, specs, label_kind, num_classes)
    except BadExample as e:
      return int(i), None, BadExample(e.file or example_file(split, int(i)), e.reason)
    return int(i), inputs, label

  if workers <= 1:
    yield from map(one, indices)
    return
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    yield from pool.map(one, indices)


def input_specs(ds: "Dataset", modalities: Sequence[str], scan: int = 64
                ) -> dict[str, InputSpec]:
  """Each modality's input spec, from the first good one of the first `scan` train examples.

  Raises:
    DataError: none of them is readable (the message gives the last reason).
  """
  split = ds.splits["train"]
  label = None
  for _, inputs, label in read_examples(split, range(min(len(split), scan)), modalities, None,
                                        ds.label_kind, ds.num_classes):
    if inputs is not None:
      return {m: InputSpec.of(inputs[m]) for m in modalities}
  raise DataError(f"none of the first {min(len(split), scan)} train examples is readable "
                  f"(the last: {label})")


def check_dataset(ds: Any, config, where: str) -> Dataset:
  """Checks what a dataset function returned against `config`; errors name the key."""
  if not isinstance(ds, Dataset):
    raise ConfigError(f"{where} returned {type(ds).__name__}, expected "
                      f"bmnas_jax.data.source.Dataset")
  missing = [s for s in SPLITS if s not in ds.splits]
  if missing:
    raise ConfigError(f"{where} returned no split(s) {missing}; it must return {list(SPLITS)}")
  bad = [s for s in ds.splits if not re.fullmatch(r"[a-z][a-z0-9_]*", str(s))]
  if bad:
    raise ConfigError(f"{where}: split names {bad} must be snake_case")
  for name, split in ds.splits.items():
    if not (hasattr(split, "__len__") and hasattr(split, "__getitem__")):
      raise ConfigError(f"{where}: split {name!r} ({type(split).__name__}) has no __len__ and "
                        f"__getitem__")
    if len(split) == 0:
      raise ConfigError(f"{where}: split {name!r} is empty")
  if ds.label_kind not in LABEL_KINDS:
    raise ConfigError(f"{where}: label_kind {ds.label_kind!r} is not one of {LABEL_KINDS}")
  if ds.label_kind != config.data.label_kind:
    raise ConfigError(f"config.data.label_kind={config.data.label_kind!r} but {where} gives "
                      f"{ds.label_kind!r} labels")
  if int(ds.num_classes) != int(config.model.num_classes):
    raise ConfigError(f"config.model.num_classes={config.model.num_classes} but {where} has "
                      f"{ds.num_classes} classes")
  if ds.class_names and len(ds.class_names) != ds.num_classes:
    raise ConfigError(f"{where}: {len(ds.class_names)} class_names for {ds.num_classes} classes")
  return ds


def fingerprint_json(obj: Any) -> str:
  """sha256 of a JSON-serializable object (keys sorted)."""
  return "sha256:" + hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def load_dataset(config, registry: Mapping[str, Any]) -> Dataset:
  """Calls the dataset function `config.data.source` names and checks what it returns."""
  fn: Callable = resolve(config.data.get("source", ""), registry, "config.data.source")
  if not callable(fn):
    raise ConfigError(f"config.data.source={config.data.source!r} is not a function")
  return check_dataset(fn(config), config, f"config.data.source={config.data.source!r}")

"""Feature sets stored as TFDS array_record shards and read back without TensorFlow."""

from __future__ import annotations

import functools
import json
import os
import pathlib
import re
import shutil
import tempfile
import types
from typing import Any, Callable, Iterator, Mapping, Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from google.protobuf import json_format
from tensorflow_datasets.core import read_only_builder
from tensorflow_datasets.core.proto import dataset_info_pb2, feature_pb2

from bmnas_jax.checkpoint import swap_dir_into_place
from bmnas_jax.data.feature_set import FeatureSet, NodeSpec, Split, split_order
from bmnas_jax.errors import DataError

FORMAT_NAME = "bmnas_jax.feature_set"
FORMAT_VERSION = 1
LABEL_KEY = "label"
INDEX_KEY = "index"
METADATA_FILENAME = "metadata.json"      # written by tfds.core.MetadataDict
DATASET_INFO_FILENAME = "dataset_info.json"
FEATURES_FILENAME = "features.json"

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_VERSION_RE = re.compile(r"^[0-9]+\.[0-9]+\.[0-9]+$")
_RESERVED_KEYS = (LABEL_KEY, INDEX_KEY)
_READ_CHUNK_BYTES = 64 << 20
_METADATA_KEYS = ("format", "format_version", "nodes", "label_kind", "num_classes",
                  "class_names", "label_dtype", "split_sizes", "user_metadata")


def _class_name(cls: type) -> str:
  return f"{cls.__module__}.{cls.__name__}"


# TFDS imports the module of any feature class named in a stored spec that it does not
# know yet, so the stored specs are checked against what the writer stores before TFDS
# sees them: a FeaturesDict of Tensors, written by this module.
_FEATURES_DICT_CLASS = _class_name(tfds.features.FeaturesDict)
_TENSOR_CLASS = _class_name(tfds.features.Tensor)
ALLOWED_FEATURE_CLASSES = (_FEATURES_DICT_CLASS, _TENSOR_CLASS)
_CLASS_KEY = "pythonClassName"
_DOC_KEYS = ("description", "valueRange")    # documentation strings, nothing is imported
_TENSOR_KEYS = ("shape", "dtype", "encoding", "minimum", "maximum", "optional")
_INFO_KEYS = ("name", "version", "splits")


class ShardError(DataError):
  """A stored feature set (or one about to be stored) is missing, corrupt or inconsistent."""


# ----------------------------------------------------------------------------
# The builder.
# ----------------------------------------------------------------------------


class _FeatureSetBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes one stored feature set; the features depend on it, so one subclass per name.

  Subclasses are made by `_builder_class`, which sets `name` and `VERSION`. They are
  never registered with TFDS: reading goes through the files (`dataset_info.json`,
  `features.json`), so no builder code is needed to read a dataset back.
  Examples come from `examples[split]()`, an iterator of `{node: float32 [C_in, L_in],
  'label': ...}` in split order, so a split never has to be in memory.
  """

  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, stored_metadata: dict[str, Any],
               examples: Mapping[str, Callable[[], Iterator[dict[str, Any]]]], **kwargs: Any):
    # `DatasetBuilder.__init__` calls `_info`, so the attributes come first.
    self._stored_metadata = stored_metadata
    self._examples = examples
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    meta = self._stored_metadata
    features = {node.name: tfds.features.Tensor(shape=(node.channels, node.length),
                                                 dtype=np.float32)
                for node in _nodes_from_metadata(meta)}
    features[LABEL_KEY] = _label_feature(meta["label_kind"], meta["num_classes"])
    features[INDEX_KEY] = tfds.features.Tensor(shape=(), dtype=np.int64)
    return tfds.core.DatasetInfo(
        builder=self,
        description="BM-NAS feature set: pooled backbone features per input node.",
        features=tfds.features.FeaturesDict(features),
        metadata=tfds.core.MetadataDict(meta),
        # Records are written in key (= index) order, not hashed order.
        disable_shuffling=True,
    )

  def _log_download_done(self) -> None:
    """Silent: TFDS would print "downloaded and prepared" (nothing is downloaded)."""

  def _log_download_bytes(self) -> None:
    """Silent: nothing is downloaded."""

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    # TFDS refuses to write an empty split; empty splits live in the metadata only.
    return {name: self._generate_examples(name)
            for name, n in self._stored_metadata["split_sizes"].items() if n}

  def _generate_examples(self, split_name: str) -> Iterator[tuple[int, dict[str, Any]]]:
    want = self._stored_metadata["split_sizes"][split_name]
    label_kind = self._stored_metadata["label_kind"]
    i = -1
    for i, example in enumerate(self._examples[split_name]()):
      if i >= want:
        break
      record = {k: np.asarray(v, np.float32) for k, v in example.items() if k != LABEL_KEY}
      label = example[LABEL_KEY]
      record[LABEL_KEY] = (np.int64(label) if label_kind == "single"
                           else np.asarray(label, np.float32))
      record[INDEX_KEY] = np.int64(i)
      yield i, record
    if i + 1 != want:
      raise ShardError(f"split {split_name!r}: the examples gave {i + 1} records, expected "
                       f"{want}")


def _label_feature(label_kind: str, num_classes: int) -> tfds.features.Tensor:
  if label_kind == "single":
    return tfds.features.Tensor(shape=(), dtype=np.int64)
  return tfds.features.Tensor(shape=(num_classes,), dtype=np.float32)


def _builder_class(name: str, version: str) -> type[_FeatureSetBuilder]:
  """Returns an unregistered builder class whose TFDS name is `name`."""
  class_name = "".join(part.capitalize() for part in name.split("_") if part) or "Dataset"

  def body(ns: dict[str, Any]) -> None:
    ns["name"] = name
    ns["VERSION"] = tfds.core.Version(version)
    # Keeps `code_path` inside this package (resolved with importlib_resources).
    ns["__module__"] = __name__
    ns["__qualname__"] = class_name

  return types.new_class(class_name, (_FeatureSetBuilder,), {"skip_registration": True},
                         body)


# ----------------------------------------------------------------------------
# Writing.
# ----------------------------------------------------------------------------


def _check_name_version(name: str, version: str) -> None:
  if not isinstance(name, str) or not _NAME_RE.match(name):
    raise ShardError(f"dataset name {name!r} must be snake_case ([a-z][a-z0-9_]*)")
  if not isinstance(version, str) or not _VERSION_RE.match(version):
    raise ShardError(f"dataset version {version!r} must look like 'X.Y.Z'")


def stored_metadata(nodes: Sequence[NodeSpec], label_kind: str, num_classes: int,
                    class_names: Sequence[str], label_dtype: str, split_sizes: Mapping[str, int],
                    metadata: Mapping[str, Any] | None = None,
                    views: Mapping[str, int] | None = None) -> dict[str, Any]:
  """Checks and returns the JSON metadata stored next to the shards.

  Args:
    nodes: the input nodes, in order.
    label_kind: `single` or `multi`.
    num_classes: K.
    class_names: the K class names, or empty.
    label_dtype: the dtype labels are given back in (e.g. `int32`).
    split_sizes: split -> examples.
    metadata: the caller's JSON-serializable dict (`user_metadata`).
    views: split -> records per example (augmented training views, example-major);
      a split's size must be a multiple of it.
  """
  unknown = sorted(s for s in split_sizes if not _NAME_RE.match(str(s)))
  if unknown:
    raise ShardError(f"feature set to write: split names {unknown} must be snake_case")
  if not any(split_sizes.values()):
    raise ShardError("feature set to write: every split is empty")
  names = [n.name for n in nodes]
  if len(set(names)) != len(names):
    raise ShardError(f"feature set to write: node names are not unique: {names}")
  for reserved in _RESERVED_KEYS:
    if reserved in names:
      raise ShardError(f"feature set to write: node name {reserved!r} is reserved")
  if class_names and len(class_names) != num_classes:
    raise ShardError(f"feature set to write: {len(class_names)} class_names for "
                     f"num_classes {num_classes}")
  views = {str(k): int(v) for k, v in (views or {}).items() if int(v) != 1}
  for split, k in views.items():
    if k < 1 or split_sizes.get(split, 0) % k:
      raise ShardError(f"feature set to write: split {split!r} has {split_sizes.get(split)} "
                       f"records, not a multiple of its {k} views")
  user = dict(metadata or {})
  try:
    json.dumps(user, allow_nan=False)
  except (TypeError, ValueError) as e:
    bad = [k for k, v in user.items() if not _json_ok(v)]
    raise ShardError(f"metadata keys {bad or list(user)} are not JSON-serializable: {e}") from e
  return {
      "format": FORMAT_NAME,
      "format_version": FORMAT_VERSION,
      "nodes": [{"name": n.name, "modality": n.modality, "channels": int(n.channels),
                 "length": int(n.length)} for n in nodes],
      "label_kind": label_kind,
      "num_classes": int(num_classes),
      "class_names": [str(c) for c in class_names],
      "label_dtype": str(label_dtype),
      "split_sizes": {name: int(n) for name, n in split_sizes.items()},
      "views": views,
      "user_metadata": user,
  }


def _json_ok(value: Any) -> bool:
  try:
    json.dumps(value, allow_nan=False)
    return True
  except (TypeError, ValueError):
    return False


def write_examples(stored: Mapping[str, Any],
                   examples: Mapping[str, Callable[[], Iterator[dict[str, Any]]]],
                   data_dir: str | os.PathLike, name: str, version: str = "1.0.0",
                   num_shards: int | None = None) -> pathlib.Path:
  """Writes examples as TFDS array_record shards at `data_dir/name/version`.

  Per example: each node's feature as float32 `[C_in, L_in]`, `label` (int64 `[]`
  class id for `single`, float32 `[K]` multi-hot for `multi`) and int64 `index`
  (the position in its split). `stored` (from `stored_metadata`) goes to
  `metadata.json` through `tfds.core.MetadataDict`. Splits are streamed from
  `examples[split]()` (an iterator of `{node: [C_in, L_in], 'label': ...}` in
  split order), so no split has to be in memory. The same examples give the
  same bytes.

  The dataset is built in a temporary directory under `data_dir` and renamed into
  place; a failure before that leaves an earlier dataset at the same path
  untouched. `data_dir` must be a local filesystem path (the swap uses renames).

  Returns:
    The dataset directory `data_dir/name/version`.

  Raises:
    ShardError: a bad name, version or shard count; a split whose iterator
      gives another number of examples than `stored['split_sizes']`.
  """
  _check_name_version(name, version)
  if num_shards is not None and (int(num_shards) != num_shards or num_shards < 1):
    raise ShardError(f"num_shards must be a positive int, got {num_shards!r}")
  data_dir = pathlib.Path(data_dir).absolute()
  data_dir.mkdir(parents=True, exist_ok=True)
  target = data_dir / name / version
  tmp_root = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}-{version}.tmp-", dir=data_dir))
  tfds.disable_progress_bar()           # the prepare stage shows its own
  try:
    builder = _builder_class(name, version)(
        stored_metadata=dict(stored), examples=examples, data_dir=os.fspath(tmp_root),
        file_format="array_record")
    builder.download_and_prepare(
        download_dir=os.fspath(tmp_root / "downloads"),
        download_config=tfds.download.DownloadConfig(
            try_download_gcs=False, num_shards=num_shards))
    built = tmp_root / name / version
    for filename in (DATASET_INFO_FILENAME, FEATURES_FILENAME, METADATA_FILENAME):
      if not (built / filename).is_file():
        raise ShardError(f"writing {target}: TFDS did not produce {filename}")
    swap_dir_into_place(built, target)
  finally:
    shutil.rmtree(tmp_root, ignore_errors=True)
  return target


def write_shards(feature_set: FeatureSet, data_dir: str | os.PathLike, name: str,
                 metadata: Mapping[str, Any] | None = None, version: str = "1.0.0",
                 num_shards: int | None = None) -> pathlib.Path:
  """Writes a whole in-memory `feature_set` with `write_examples` (see there).

  Args:
    feature_set: the feature set; validated first, nothing is written if invalid.
    data_dir: TFDS data directory.
    name: dataset name, snake_case.
    metadata: JSON-serializable dict stored with the dataset (e.g. backbone
      checkpoint ids); returned by `read_metadata(...)['user_metadata']`.
    version: dataset version `X.Y.Z`.
    num_shards: shards per split; None lets TFDS choose by size.

  Raises:
    ShardError: invalid feature set, name, version or metadata.
  """
  fs = feature_set
  try:
    fs.validate(where="feature set to write")
  except ValueError as e:
    raise ShardError(str(e)) from e
  label_dtypes = {str(s.labels.dtype) for s in fs.splits.values() if len(s)}
  if len(label_dtypes) > 1:
    raise ShardError(f"feature set to write: label dtypes differ across splits: "
                     f"{sorted(label_dtypes)}")
  stored = stored_metadata(fs.nodes, fs.label_kind, fs.num_classes, fs.class_names,
                           label_dtypes.pop() if label_dtypes else "int64",
                           {k: len(v) for k, v in fs.splits.items()}, metadata, fs.views)

  def rows(split: Split) -> Iterator[dict[str, Any]]:
    for i in range(len(split)):
      yield {**{k: v[i] for k, v in split.features.items()}, LABEL_KEY: split.labels[i]}

  examples = {k: functools.partial(rows, v) for k, v in fs.splits.items()}
  return write_examples(stored, examples, data_dir, name, version, num_shards)


# ----------------------------------------------------------------------------
# Reading.
# ----------------------------------------------------------------------------


def _dataset_dir(data_dir: str | os.PathLike, name: str,
                 version: str | None) -> tuple[pathlib.Path, str]:
  """Returns (directory, version) of an existing dataset; the newest if no version."""
  if not isinstance(name, str) or not _NAME_RE.match(name):
    raise ShardError(f"dataset name {name!r} must be snake_case ([a-z][a-z0-9_]*)")
  root = pathlib.Path(data_dir).absolute() / name
  if not root.is_dir():
    raise ShardError(f"dataset directory {root} does not exist")
  if version is None:
    found = [p.name for p in root.iterdir()
             if _VERSION_RE.match(p.name) and (p / DATASET_INFO_FILENAME).is_file()]
    if not found:
      raise ShardError(f"dataset directory {root} holds no version with "
                       f"{DATASET_INFO_FILENAME}")
    version = max(found, key=lambda v: tuple(int(x) for x in v.split(".")))
  elif not _VERSION_RE.match(str(version)):
    raise ShardError(f"dataset version {version!r} must look like 'X.Y.Z'")
  path = root / str(version)
  if not path.is_dir():
    raise ShardError(f"dataset directory {path} does not exist")
  for filename in (DATASET_INFO_FILENAME, FEATURES_FILENAME, METADATA_FILENAME):
    if not (path / filename).is_file():
      raise ShardError(f"dataset file {path / filename} is missing")
  return path, str(version)


def _load_metadata(path: pathlib.Path) -> dict[str, Any]:
  """Reads and checks `metadata.json` of the dataset at `path`."""
  meta_path = path / METADATA_FILENAME
  try:
    meta = json.loads(meta_path.read_text())
  except (OSError, ValueError) as e:
    raise ShardError(f"metadata file {meta_path} is unreadable: {e}") from e
  if not isinstance(meta, dict):
    raise ShardError(f"metadata file {meta_path} does not hold a JSON object")
  missing = [k for k in _METADATA_KEYS if k not in meta]
  if missing:
    raise ShardError(f"metadata file {meta_path} lacks keys {missing}")
  if meta["format"] != FORMAT_NAME or meta["format_version"] != FORMAT_VERSION:
    raise ShardError(f"metadata file {meta_path}: format {meta['format']!r} version "
                     f"{meta['format_version']!r}, expected {FORMAT_NAME!r} "
                     f"version {FORMAT_VERSION}")
  try:
    _nodes_from_metadata(meta)
  except (KeyError, TypeError, ValueError) as e:
    raise ShardError(f"metadata file {meta_path}: key 'nodes' is malformed: {e!r}") from e
  return meta


def _nodes_from_metadata(meta: Mapping[str, Any]) -> tuple[NodeSpec, ...]:
  return tuple(NodeSpec(str(n["name"]), str(n["modality"]), int(n["channels"]),
                        int(n["length"])) for n in meta["nodes"])


def read_metadata(data_dir: str | os.PathLike, name: str,
                  version: str | None = None) -> dict[str, Any]:
  """Returns the metadata stored with a dataset.

  Args:
    data_dir: TFDS data directory.
    name: dataset name.
    version: dataset version; the newest on disk if None.

  Returns:
    A dict with `nodes` (list of {name, modality, channels, length}), `label_kind`,
    `num_classes`, `class_names`, `label_dtype`, `split_sizes`, `format`,
    `format_version` and `user_metadata` (the dict given to `write_shards`).

  Raises:
    ShardError: the dataset or its metadata is missing or malformed.
  """
  path, _ = _dataset_dir(data_dir, name, version)
  return _load_metadata(path)


def _check_expected_nodes(nodes: Sequence[NodeSpec], expect_nodes: Sequence[NodeSpec],
                          where: pathlib.Path) -> None:
  stored = {n.name: n for n in nodes}
  for want in expect_nodes:
    have = stored.get(want.name)
    if have is None:
      raise ShardError(f"{where / METADATA_FILENAME}: expected node {want.name!r} is "
                       f"not stored; stored nodes {[n.name for n in nodes]}")
    if (have.channels, have.length) != (want.channels, want.length):
      raise ShardError(f"{where / METADATA_FILENAME}: node {want.name!r} has stored shape "
                       f"{(have.channels, have.length)}, expected "
                       f"{(want.channels, want.length)} [C_in, L_in]")
    if have.modality != want.modality:
      raise ShardError(f"{where / METADATA_FILENAME}: node {want.name!r} has stored "
                       f"modality {have.modality!r}, expected {want.modality!r}")
  want_names = [n.name for n in expect_nodes]
  if want_names != [n.name for n in nodes]:
    raise ShardError(f"{where / METADATA_FILENAME}: stored node order "
                     f"{[n.name for n in nodes]} differs from expected {want_names}")


def _check_shard_files(path: pathlib.Path, info: tfds.core.DatasetInfo) -> None:
  """Checks that every shard file exists and holds the number of records TFDS recorded."""
  for split_name, split_info in info.splits.items():
    for filename, expected in zip(split_info.filenames, split_info.shard_lengths):
      shard = path / filename
      if not shard.is_file():
        raise ShardError(f"split {split_name!r}: shard file {shard} is missing")
      try:
        # Reads the footer only. A bad file raises here or (deferred) on close.
        reader = array_record_module.ArrayRecordReader(os.fspath(shard))
        ok, count = reader.ok(), reader.num_records()
        reader.close()
      except RuntimeError as e:
        raise ShardError(f"split {split_name!r}: shard file {shard} is corrupt or "
                         f"truncated: {e}") from e
      if not ok or count != expected:
        raise ShardError(f"split {split_name!r}: shard file {shard} is corrupt or "
                         f"truncated: {count} readable records, expected {expected}")


def _check_features(path: pathlib.Path, info: tfds.core.DatasetInfo,
                    nodes: Sequence[NodeSpec], meta: Mapping[str, Any]) -> None:
  """Checks that `features.json` agrees with the node list in the metadata."""
  features = info.features
  feats_path = path / FEATURES_FILENAME
  want = {n.name: ((n.channels, n.length), np.float32) for n in nodes}
  want[LABEL_KEY] = ((), np.int64) if meta["label_kind"] == "single" else (
      (int(meta["num_classes"]),), np.float32)
  want[INDEX_KEY] = ((), np.int64)
  if set(features.keys()) != set(want):
    raise ShardError(f"{feats_path}: feature keys {sorted(features.keys())} differ from "
                     f"the metadata's {sorted(want)}")
  for key, (shape, dtype) in want.items():
    feature = features[key]
    if tuple(feature.shape) != shape or np.dtype(feature.np_dtype) != np.dtype(dtype):
      raise ShardError(f"{feats_path}: feature {key!r} is {np.dtype(feature.np_dtype)} "
                       f"{tuple(feature.shape)}, metadata says {np.dtype(dtype)} {shape}")


def _read_json(path: pathlib.Path) -> Any:
  try:
    text = path.read_text()
  except OSError as e:
    raise ShardError(f"dataset file {path} is unreadable: {e}") from e
  try:
    return json.loads(text)
  except (ValueError, RecursionError) as e:
    raise ShardError(f"dataset file {path} is not valid JSON: {e}") from e


def _shown(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 120 else text[:117] + "..."


def _spec_content(node: Any, where: str, want_class: str, content_key: str) -> dict[str, Any]:
  """Checks one feature of a stored spec: its class is `want_class`, its keys are known.

  Returns:
    The feature's `content_key` object (`featuresDict` or `tensor`).
  """
  if not isinstance(node, dict):
    raise ShardError(f"{where} is {type(node).__name__}, not a JSON object")
  if _CLASS_KEY not in node:
    # TFDS also takes a class from a legacy `type` key or the snake_case field name.
    named = {k: node[k] for k in ("type", "python_class_name", "proto_cls") if k in node}
    raise ShardError(f"{where} lacks key {_CLASS_KEY!r}"
                     + (f" (names {_shown(named)} instead)" if named else ""))
  name = node[_CLASS_KEY]
  if name != want_class:
    raise ShardError(f"{where} names feature class {_shown(name)}, expected {want_class} "
                     f"(a feature set holds a FeaturesDict of Tensors; no other class "
                     f"is imported)")
  extra = {k: v for k, v in node.items() if k not in (_CLASS_KEY, content_key, *_DOC_KEYS)}
  if extra:
    raise ShardError(f"{where} has unexpected keys {_shown(extra)}")
  if not isinstance(node.get(content_key), dict):
    raise ShardError(f"{where} lacks the JSON object {content_key!r}")
  return node[content_key]


def _check_feature_spec(spec: Any, where: str) -> None:
  """Checks a stored feature spec (`features.json`) is a FeaturesDict of Tensors.

  Nothing else passes: TFDS would import the module of another class name.

  Raises:
    ShardError: naming `where` and the offending class or key.
  """
  content = _spec_content(spec, where, _FEATURES_DICT_CLASS, "featuresDict")
  if set(content) != {"features"} or not isinstance(content["features"], dict):
    raise ShardError(f"{where}: 'featuresDict' must hold exactly the JSON object "
                     f"'features', has keys {sorted(content)}")
  if not content["features"]:
    raise ShardError(f"{where}: 'featuresDict' lists no features")
  for key, feature in content["features"].items():
    tensor = _spec_content(feature, f"{where}: feature {key!r}", _TENSOR_CLASS, "tensor")
    extra = sorted(set(tensor) - set(_TENSOR_KEYS))
    if extra:
      raise ShardError(f"{where}: feature {key!r} has unexpected 'tensor' keys {extra}")


def _checked_info_proto(path: pathlib.Path) -> dataset_info_pb2.DatasetInfo:
  """Reads `dataset_info.json` and `features.json` of the dataset at `path` and checks
  that they name only the classes and module the writer stores.

  Returns:
    The DatasetInfo proto with the checked features in it, so that TFDS builds the
    features from these checked contents and never parses a stored spec itself.

  Raises:
    ShardError: a file is not valid JSON, lacks keys, or names another class or module.
  """
  info_path = path / DATASET_INFO_FILENAME
  info = _read_json(info_path)
  if not isinstance(info, dict):
    raise ShardError(f"{info_path} does not hold a JSON object")
  missing = [k for k in _INFO_KEYS if k not in info]
  if missing:
    raise ShardError(f"{info_path} lacks keys {missing}")
  for key in ("moduleName", "module_name"):
    if key in info and info[key] != __name__:
      raise ShardError(f"{info_path}: key {key!r} names module {_shown(info[key])}; "
                       f"feature sets are written by {__name__}")
  if "features" in info:
    _check_feature_spec(info["features"], f"{info_path} key 'features'")
  feats_path = path / FEATURES_FILENAME
  features = _read_json(feats_path)
  _check_feature_spec(features, os.fspath(feats_path))
  try:
    proto = json_format.ParseDict(info, dataset_info_pb2.DatasetInfo())
  except (json_format.ParseError, TypeError, ValueError) as e:
    raise ShardError(f"{info_path} is not a TFDS dataset info: {e}") from e
  try:
    proto.features.CopyFrom(json_format.ParseDict(features, feature_pb2.Feature()))
  except (json_format.ParseError, TypeError, ValueError) as e:
    raise ShardError(f"{feats_path} is not a TFDS feature spec: {e}") from e
  return proto


class ShardSource:
  """An opened dataset: directory, metadata, nodes and one TFDS data source per split.

  Random access without loading a split: `read(split, keys)` returns a batch of
  records. Attributes: `path`, `version`, `meta`, `nodes` (NodeSpec tuple),
  `split_sizes` (split -> examples), `label_kind`, `num_classes`, `class_names`.
  """

  def __init__(self, data_dir: str | os.PathLike, name: str, version: str | None,
               expect_nodes: Sequence[NodeSpec] | None = None):
    self.path, self.version = _dataset_dir(data_dir, name, version)
    self.meta = _load_metadata(self.path)
    self.nodes = _nodes_from_metadata(self.meta)
    if expect_nodes is not None:
      _check_expected_nodes(self.nodes, expect_nodes, self.path)
    info_proto = _checked_info_proto(self.path)
    try:
      # The read-only builder `tfds.data_source` makes for an unregistered name, given
      # the checked spec: TFDS then parses no stored feature spec (and imports nothing
      # a stored file names). Only reads, nothing is downloaded.
      builder = read_only_builder.ReadOnlyBuilder(builder_dir=os.fspath(self.path),
                                                  info_proto=info_proto)
      sources = builder.as_data_source()
    except Exception as e:  # TFDS raises many types for a bad dataset_info.json.
      raise ShardError(f"dataset {self.path}: TFDS cannot open it "
                       f"({DATASET_INFO_FILENAME}/{FEATURES_FILENAME}): {e}") from e
    self.sources = {str(k): v for k, v in sources.items()}
    if not self.sources:
      raise ShardError(f"{self.path / DATASET_INFO_FILENAME} lists no splits")
    self.info = next(iter(self.sources.values())).dataset_info
    _check_features(self.path, self.info, self.nodes, self.meta)
    sizes = {str(k): int(v) for k, v in self.meta["split_sizes"].items()}
    for split_name, n in sizes.items():
      have = len(self.sources[split_name]) if split_name in self.sources else 0
      if have != n:
        raise ShardError(f"{self.path / DATASET_INFO_FILENAME}: split {split_name!r} has "
                         f"{have} examples, {METADATA_FILENAME} key 'split_sizes' says {n}")
    extra = sorted(set(self.sources) - set(sizes))
    if extra:
      raise ShardError(f"{self.path / METADATA_FILENAME}: key 'split_sizes' lacks "
                       f"splits {extra}")
    self.split_sizes = sizes
    _check_shard_files(self.path, self.info)

  @property
  def label_kind(self) -> str:
    return self.meta["label_kind"]

  @property
  def num_classes(self) -> int:
    return int(self.meta["num_classes"])

  @property
  def class_names(self) -> tuple[str, ...]:
    return tuple(self.meta["class_names"])

  @property
  def views(self) -> dict[str, int]:
    """Split -> records per example (see `FeatureSet.views`)."""
    return {str(k): int(v) for k, v in (self.meta.get("views") or {}).items()}

  @property
  def node_names(self) -> tuple[str, ...]:
    return tuple(n.name for n in self.nodes)

  def empty_batch(self, n: int) -> dict[str, np.ndarray]:
    out = {node.name: np.empty((n, node.channels, node.length), np.float32)
           for node in self.nodes}
    if self.label_kind == "single":
      out[LABEL_KEY] = np.empty((n,), np.int64)
    else:
      out[LABEL_KEY] = np.empty((n, self.num_classes), np.float32)
    out[INDEX_KEY] = np.empty((n,), np.int64)
    return out

  def read(self, split_name: str, keys: Sequence[int]) -> dict[str, np.ndarray]:
    """Reads records `keys` of a split with one batched data-source call.

    Returns:
      `{node: float32 [b, C_in, L_in], 'label': int64 [b] or float32 [b, K],
      'index': int64 [b]}`, in the order of `keys`.
    """
    source = self.sources[split_name]
    keys = [int(k) for k in keys]
    try:
      records = source.__getitems__(keys)
    except Exception as e:  # array_record raises RuntimeError/TypeError on bad bytes.
      files = [os.fspath(self.path / f) for f in self.info.splits[split_name].filenames]
      raise ShardError(f"split {split_name!r}: reading records failed ({e}); shard files "
                       f"{files}") from e
    out = self.empty_batch(len(keys))
    for j, record in enumerate(records):
      for key, array in out.items():
        array[j] = record[key]
    return out


def _split_to_array(opened: ShardSource, split_name: str) -> Split:
  n = opened.split_sizes[split_name]
  whole = opened.empty_batch(n)
  seen = np.zeros((n,), bool)
  per_example = sum(4 * node.channels * node.length for node in opened.nodes) + 16
  chunk = max(1, _READ_CHUNK_BYTES // per_example)
  for start in range(0, n, chunk):
    part = opened.read(split_name, range(start, min(n, start + chunk)))
    idx = part.pop(INDEX_KEY)
    if idx.size and (idx.min() < 0 or idx.max() >= n or seen[idx].any()
                     or np.unique(idx).size != idx.size):
      raise ShardError(f"split {split_name!r} of {opened.path}: feature 'index' is not a "
                       f"permutation of 0..{n - 1}")
    seen[idx] = True
    for key, array in part.items():
      whole[key][idx] = array
  if not seen.all():
    raise ShardError(f"split {split_name!r} of {opened.path}: feature 'index' misses "
                     f"{int((~seen).sum())} positions")
  labels = whole[LABEL_KEY].astype(np.dtype(opened.meta["label_dtype"]), copy=False)
  features = {node.name: whole[node.name] for node in opened.nodes}
  return Split(features=features, labels=labels)


def open_shards(data_dir: str | os.PathLike, name: str, version: str | None = None, *,
                expect_nodes: Sequence[NodeSpec] | None = None) -> ShardSource:
  """Opens a dataset written by `write_shards` for random access (nothing is loaded).

  Opening imports and runs nothing a dataset directory names: `features.json` (and
  `dataset_info.json`'s `features`, if any) must be a `FeaturesDict` of `Tensor`s
  (`ALLOWED_FEATURE_CLASSES`) and `moduleName` this module, checked before TFDS reads
  them; TFDS then builds the features from the checked contents.

  Raises:
    ShardError: missing/corrupt files, a spec naming another class or module,
      inconsistent metadata, unexpected nodes.
  """
  return ShardSource(data_dir, name, version, expect_nodes)


def read_feature_set(data_dir: str | os.PathLike, name: str, version: str | None = None,
                     *, expect_nodes: Sequence[NodeSpec] | None = None) -> FeatureSet:
  """Reads a whole dataset written by `write_shards` into numpy arrays.

  Reads through TFDS's read-only builder (what `tfds.data_source(name, data_dir=...,
  download=False)` opens; no TensorFlow), in batches, and puts every example back at
  its `index`. The stored feature spec is checked first (see `open_shards`).

  Args:
    data_dir: TFDS data directory.
    name: dataset name.
    version: dataset version; the newest on disk if None.
    expect_nodes: if given, the stored nodes must be exactly these (names, order,
      modality and `[C_in, L_in]` shapes).

  Returns:
    The FeatureSet, splits in their original order: features float32
    `[n, C_in, L_in]`, labels `[n]` ints (dtype as written) or `[n, K]` multi-hot.

  Raises:
    ShardError: missing/corrupt files, inconsistent metadata, unexpected nodes,
      invalid values (labels out of range, NaN/inf features).
  """
  opened = open_shards(data_dir, name, version, expect_nodes=expect_nodes)
  splits = {split_name: _split_to_array(opened, split_name)
            for split_name in split_order(opened.split_sizes)}
  fs = FeatureSet(nodes=opened.nodes, splits=splits, label_kind=opened.label_kind,
                  num_classes=opened.num_classes, class_names=opened.class_names,
                  views=opened.views)
  try:
    fs.validate(where=f"dataset {opened.path}")
  except ValueError as e:
    raise ShardError(str(e)) from e
  return fs


# ----------------------------------------------------------------------------
# Streaming.
# ----------------------------------------------------------------------------


class _ReadBatch:
  """grain map: a batch of record indices -> a dict of numpy batches."""

  def __init__(self, opened: ShardSource, split_name: str):
    self._opened = opened
    self._split = split_name

  def __call__(self, keys: np.ndarray) -> dict[str, np.ndarray]:
    return self._opened.read(self._split, np.atleast_1d(keys).tolist())


def stream(data_dir: str | os.PathLike, name: str, split: str, batch_size: int,
           seed: int, shuffle: bool = True, num_epochs: int | None = 1, *,
           drop_remainder: bool = False, read_options: grain.ReadOptions | None = None,
           version: str | None = None) -> grain.IterDataset:
  """A grain pipeline over one split, for data that does not fit in device memory.

  The pipeline shuffles record indices (`grain.MapDataset.range(n).shuffle`),
  batches them, and reads each batch with one `__getitems__` call on the TFDS
  data source. Each epoch is batched separately and shuffled with a different
  (seed-determined) order. Iterating yields
  `{node: float32 [b, C_in, L_in], 'label': int64 [b] or float32 [b, K],
  'index': int64 [b]}`; `index` is the position of each example in its split.
  Iterators of the returned dataset support `get_state`/`set_state`.

  Args:
    data_dir: TFDS data directory.
    name: dataset name.
    split: `train`, `val` or `test`.
    batch_size: examples per batch; the last batch of an epoch may be smaller.
    seed: shuffle seed, in [0, 2**32).
    shuffle: shuffle each epoch; otherwise split order.
    num_epochs: epochs; None repeats forever.
    drop_remainder: drop the smaller last batch of each epoch.
    read_options: grain threading/prefetch; default 2 threads, 4 batches ahead.
    version: dataset version; the newest on disk if None.

  Returns:
    A `grain.IterDataset`.

  Raises:
    ShardError: bad arguments, or the dataset is missing/corrupt/inconsistent.
  """
  if int(batch_size) != batch_size or batch_size < 1:
    raise ShardError(f"batch_size must be a positive int, got {batch_size!r}")
  if num_epochs is not None and (int(num_epochs) != num_epochs or num_epochs < 1):
    raise ShardError(f"num_epochs must be a positive int or None, got {num_epochs!r}")
  if shuffle and not 0 <= int(seed) < 2**32:
    raise ShardError(f"seed must lie in [0, 2**32), got {seed!r}")
  opened = ShardSource(data_dir, name, version)
  if split not in opened.split_sizes:
    raise ShardError(f"dataset {opened.path} has no split {split!r}; stored splits "
                     f"{sorted(opened.split_sizes)} ({METADATA_FILENAME} key 'split_sizes')")
  n = opened.split_sizes[split]
  if n == 0:
    raise ShardError(f"split {split!r} of {opened.path} is empty")
  ds = grain.MapDataset.range(n)
  if shuffle:
    ds = ds.shuffle(seed=int(seed))
  ds = ds.batch(int(batch_size), drop_remainder=drop_remainder)
  ds = ds.map(_ReadBatch(opened, split))
  if num_epochs != 1:
    # `repeat` reseeds the upstream shuffle per epoch; batches never straddle epochs.
    ds = ds.repeat(num_epochs)
  if read_options is None:
    read_options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
  return ds.to_iter_dataset(read_options)

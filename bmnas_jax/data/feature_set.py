"""The feature-set object: per split, one array per tapped feature plus labels."""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from bmnas_jax.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")     # every feature set has these; it may have more
HELD_OUT = ("val", "test")            # never trained on augmented views


def split_order(names) -> list[str]:
  """`train`, `val`, `test`, then any further splits (e.g. extra training data for the
  evaluation stage) in sorted order."""
  names = list(names)
  return [s for s in SPLITS if s in names] + sorted(s for s in names if s not in SPLITS)
LABEL_KINDS = ("single", "multi")


@dataclasses.dataclass(frozen=True)
class NodeSpec:
  """One input node of the fusion network: a pooled backbone feature.

  Attributes:
    name: node name, `<Modality>_<k>` with k counted from 1 (e.g. `Video_2`).
    modality: the modality the feature comes from (e.g. `Video`).
    channels: C_in, the feature's channel count.
    length: L_in, the feature's (pooled) sequence length.
  """
  name: str
  modality: str
  channels: int
  length: int


@dataclasses.dataclass
class Split:
  """One split: `features[name]` is float32 `[n, C_in, L_in]`; labels `[n]` int
  class ids (single-label) or `[n, K]` float32 multi-hot (multi-label)."""
  features: dict[str, np.ndarray]
  labels: np.ndarray

  def __len__(self) -> int:
    return int(self.labels.shape[0])


@dataclasses.dataclass
class FeatureSet:
  """Everything the trainers need: nodes (in order), splits, label kind.

  Attributes:
    nodes: the input nodes, in the order of the upper-level node list S.
    splits: split name (`train`, `val`, `test`) -> Split.
    label_kind: `single` (softmax cross-entropy) or `multi` (sigmoid BCE).
    num_classes: K.
    class_names: optional names of the K classes.
    views: split -> records per example (augmented views of a training example,
      stored example-major: record `i * K + v` is view v of example i); 1 if absent.
  """
  nodes: tuple[NodeSpec, ...]
  splits: dict[str, Split]
  label_kind: str
  num_classes: int
  class_names: tuple[str, ...] = ()
  views: dict[str, int] = dataclasses.field(default_factory=dict)

  @property
  def node_names(self) -> tuple[str, ...]:
    return tuple(n.name for n in self.nodes)

  def validate(self, where: str = "feature set") -> None:
    """Raises ValueError naming the split/node/field that is inconsistent."""
    if self.label_kind not in LABEL_KINDS:
      raise DataError(f"{where}: label_kind {self.label_kind!r} is not one of {LABEL_KINDS}")
    for split_name, split in self.splits.items():
      n = len(split)
      for node in self.nodes:
        if node.name not in split.features:
          raise DataError(f"{where}: split {split_name!r} has no feature {node.name!r}")
        arr = split.features[node.name]
        want = (n, node.channels, node.length)
        if tuple(arr.shape) != want:
          raise DataError(f"{where}: split {split_name!r} feature {node.name!r} has shape "
                          f"{tuple(arr.shape)}, expected {want} [n, C_in, L_in]")
        if not np.all(np.isfinite(arr)):
          raise DataError(f"{where}: split {split_name!r} feature {node.name!r} contains NaN/inf")
      labels = split.labels
      if self.label_kind == "single":
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
          raise DataError(f"{where}: split {split_name!r} labels must be int [n], got "
                          f"{labels.dtype} {labels.shape}")
        if n and (labels.min() < 0 or labels.max() >= self.num_classes):
          raise DataError(f"{where}: split {split_name!r} labels out of range "
                          f"[0, {self.num_classes}): min {labels.min()}, max {labels.max()}")
      else:
        if labels.shape != (n, self.num_classes):
          raise DataError(f"{where}: split {split_name!r} multi-hot labels have shape "
                          f"{labels.shape}, expected {(n, self.num_classes)}")
        if not np.all((labels == 0) | (labels == 1)):
          raise DataError(f"{where}: split {split_name!r} multi-hot labels must be 0/1")


def node_specs(modalities: Sequence[str], channels: Mapping[str, Sequence[int]],
               lengths: Mapping[str, Sequence[int]] | int) -> tuple[NodeSpec, ...]:
  """Builds the ordered node list S = [A_1..A_NA, B_1..B_NB, ...].

  Args:
    modalities: modality names in order.
    channels: modality -> C_in of each tapped feature.
    lengths: modality -> L_in of each tapped feature, or one L_in for all.
  """
  nodes = []
  for mod in modalities:
    if mod not in channels:
      raise KeyError(f"no channel list for modality {mod!r}; have {sorted(channels)}")
    for k, c_in in enumerate(channels[mod]):
      l_in = lengths if isinstance(lengths, int) else lengths[mod][k]
      nodes.append(NodeSpec(f"{mod}_{k + 1}", mod, int(c_in), int(l_in)))
  return tuple(nodes)


def nodes_from_config(data_cfg) -> tuple[NodeSpec, ...]:
  """Node list from `config.data`: `modalities`, `channels`, `length` (L_in of
  every node) and optional `lengths` (modality -> per-node L_in overrides)."""
  for key in ("modalities", "channels", "length"):
    if key not in data_cfg:
      raise ConfigError(f"config.data.{key} is missing")
  overrides = data_cfg.get("lengths") or {}
  lengths = {m: overrides[m] if m in overrides else (data_cfg.length,) * len(data_cfg.channels[m])
             for m in data_cfg.modalities if m in data_cfg.channels}
  try:
    return node_specs(tuple(data_cfg.modalities), data_cfg.channels, lengths)
  except (KeyError, IndexError, TypeError) as e:
    raise ConfigError(f"config.data.channels/lengths do not describe every modality in "
                      f"config.data.modalities={tuple(data_cfg.modalities)}: {e}") from e

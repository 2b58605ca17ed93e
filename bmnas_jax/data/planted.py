"""A planted synthetic feature set: the label depends on one cross-modal feature pair only."""

from __future__ import annotations

import numpy as np

from bmnas_jax.data.feature_set import FeatureSet, Split, node_specs
from bmnas_jax.data.source import ArraySplit, Dataset
from bmnas_jax.errors import ConfigError


def make_planted(seed: int = 0, sizes=(1024, 512, 512), modalities=("A", "B"),
                 features_per_modality: int = 3, channels: int = 8, length: int = 4,
                 planted=("A_2", "B_3"), snr: float = 3.0) -> FeatureSet:
  """Gaussian features `[n, channels, length]`; 4 classes from two bits.

  Bit 1 is the sign of a fixed projection of feature `planted[0]`, bit 2 of
  `planted[1]`; label = 2 * bit1 + bit2. Every other feature is pure noise, so
  only a Cell fusing the planted pair can predict the label fully. The projected
  direction carries signal of strength `snr` (in noise standard deviations).
  """
  rng = np.random.default_rng(seed)
  chans = {m: (channels,) * features_per_modality for m in modalities}
  nodes = node_specs(modalities, chans, length)
  names = [n.name for n in nodes]
  for p in planted:
    if p not in names:
      raise ConfigError(f"planted feature {p!r} is not one of {names}")
  dirs = {p: rng.standard_normal((channels, length)) for p in planted}
  dirs = {p: d / np.linalg.norm(d) for p, d in dirs.items()}
  splits = {}
  for split, n in zip(("train", "val", "test"), sizes):
    bits = rng.integers(0, 2, size=(n, len(planted)))
    feats = {}
    for name in names:
      x = rng.standard_normal((n, channels, length)).astype(np.float32)
      if name in planted:
        b = bits[:, planted.index(name)]
        x += (snr * (2 * b - 1))[:, None, None] * dirs[name][None].astype(np.float32)
      feats[name] = x.astype(np.float32)
    labels = (2 * bits[:, 0] + bits[:, 1]).astype(np.int32)
    splits[split] = Split(feats, labels)
  return FeatureSet(nodes, splits, "single", 4, ("00", "01", "10", "11"))


def planted_features(config) -> FeatureSet:
  """`make_planted` with the settings in `config.data` (`planted_seed`, `sizes`,
  `modalities`, `channels`, `length`, `planted`, `snr`)."""
  d = config.data
  modalities = tuple(d.modalities)
  return make_planted(seed=d.planted_seed, sizes=tuple(d.sizes), modalities=modalities,
                      features_per_modality=len(d.channels[modalities[0]]),
                      channels=d.channels[modalities[0]][0], length=d.length,
                      planted=tuple(d.planted), snr=d.snr)


def get_dataset(config) -> Dataset:
  """The planted task as a dataset function (`config.data.source='planted'`).

  Each modality's raw input stacks its ready-made features, float32 `[n, F, L, C]`
  (F features of `[C, L]`, channels last), for the `stacked_features` backbone:
  the prepare stage stores exactly the arrays `make_planted` gives.
  """
  modalities = tuple(config.data.modalities)
  fs = planted_features(config)
  splits = {}
  for name, split in fs.splits.items():
    inputs = {m: np.stack([split.features[n.name] for n in fs.nodes if n.modality == m],
                          axis=1).transpose(0, 1, 3, 2) for m in modalities}
    splits[name] = ArraySplit(inputs, split.labels)
  return Dataset(splits, fs.num_classes, "single", fs.class_names,
                 description="planted synthetic task")

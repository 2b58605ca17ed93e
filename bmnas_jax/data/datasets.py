"""Dataset registry: `config.data.source` -> a function building the FeatureSet."""

from __future__ import annotations

from typing import Callable

from bmnas_jax.data.feature_set import FeatureSet
from bmnas_jax.data.planted import make_planted


def _planted(config, workdir: str) -> FeatureSet:
  del workdir
  d = config.data
  return make_planted(seed=d.planted_seed, sizes=tuple(d.sizes), modalities=tuple(d.modalities),
                      features_per_modality=len(d.channels[d.modalities[0]]),
                      channels=d.channels[d.modalities[0]][0], length=d.length,
                      planted=tuple(d.planted), snr=d.snr)


def _mfeat(config, workdir: str) -> FeatureSet:
  """`mfeat_pipeline.prepare_mfeat`, imported on first use (it pulls in TFDS and orbax)."""
  from bmnas_jax.data.mfeat_pipeline import prepare_mfeat
  return prepare_mfeat(config, workdir)


DATASETS: dict[str, Callable[..., FeatureSet]] = {
    "planted": _planted,
    "mfeat": _mfeat,
}


def load_features(config, workdir: str) -> FeatureSet:
  """The feature set `config.data.source` names; unknown names list the valid ones."""
  source = config.data.get("source", None)
  if source not in DATASETS:
    raise ValueError(f"config.data.source={source!r}; valid: {', '.join(DATASETS)}")
  return DATASETS[source](config, workdir)

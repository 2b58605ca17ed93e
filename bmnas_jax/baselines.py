"""Trained baselines for the results table, retrained like the searched network.

Every baseline is trained by the evaluation trainer (`evaluate.run_evaluate`): the same
training splits, epochs, optimizer, batch size and seeds (under `vmap`) as the
searched genotype, so a row differs from BM-NAS only in its network. Names
(`config.evaluate.baselines`):

- `unimodal`: each modality alone: its last stored feature, reshaped to `[C, L]`,
  flattened, Linear -> ReLU -> BatchNorm -> Linear (one row per modality).
- `concat_mlp`: every stored feature flattened as pooled (no reshape layer),
  concatenated, Linear -> ReLU -> BatchNorm -> Linear.
- `late_fusion_release`: the last feature of each modality reshaped to `[C, L]`,
  flattened, concatenated, Linear -> ReLU -> BatchNorm -> Linear (late fusion as the
  original release builds its baselines).
- `late_fusion`: the paper's Table 6 row: ConcatFC Cells on the last feature of each
  modality, with the searched network's reshape layers and head
  (`genotype.late_fusion`).

The MLPs' hidden width is `config.model.C`. The untrained ensemble of the backbones'
probabilities is computed by the prepare stage (`features/prepare.json`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bmnas_jax import genotype as genotype_lib
from bmnas_jax import layers
from bmnas_jax.errors import ConfigError
from bmnas_jax.evaluate import Job, run_retrainings
from bmnas_jax.reshape import ReshapeInput

if TYPE_CHECKING:
  from bmnas_jax.data.feature_set import FeatureSet
  from bmnas_jax.data.shards import ShardSource

BASELINES = ("unimodal", "concat_mlp", "late_fusion_release", "late_fusion")
STAGE_DIR = "baselines"


class MLPBaseline(nn.Module):
  """Chosen features (each reshaped to `[C, L]` or as pooled), flattened and
  concatenated, then Linear(hidden) -> ReLU -> BatchNorm -> Dropout -> Linear.

  Args (call): features: node name -> `[N, C_in, L_in]`. Returns logits `[N, K]`.
  """
  nodes: tuple[str, ...]
  reshape: bool
  C: int
  L: int
  hidden: int
  num_classes: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, features: Mapping[str, jax.Array], train: bool = False) -> jax.Array:
    flat = []
    for name in self.nodes:
      x = features[name]
      if self.reshape:
        x = layers.flatten_cl(
            ReshapeInput(self.C, self.L, self.dropout, name=f"reshape_{name}")(x, train))
      flat.append(x.reshape(x.shape[0], -1))
    h = layers.Linear(self.hidden, name="fc1")(jnp.concatenate(flat, axis=-1))
    h = layers.batch_norm(train, name="bn")(nn.relu(h))
    h = layers.Dropout(self.dropout, deterministic=not train)(h)
    return layers.Linear(self.num_classes, name="fc2")(h)


def last_nodes(node_names: Sequence[str]) -> dict[str, str]:
  """Modality -> its last feature node (`Video_4` of Video_1..4), in modality order."""
  last: dict[str, str] = {}
  for name in node_names:
    last[genotype_lib.modality_of(name)] = name
  return last


def check_names(names: Sequence[str]) -> tuple[str, ...]:
  unknown = [n for n in names if n not in BASELINES]
  if unknown:
    raise ConfigError(f"config.evaluate.baselines: unknown baseline(s) {unknown}; valid: "
                      f"{', '.join(BASELINES)}")
  return tuple(names)


def baseline_specs(config, node_names: Sequence[str]) -> list[dict]:
  """The configured baselines as `{name, label, modality, model | genotype}` dicts."""
  m, dropout = config.model, config.evaluate.dropout
  mlp = lambda nodes, reshape: MLPBaseline(tuple(nodes), reshape, m.C, m.L, m.C,
                                           m.num_classes, dropout)
  last = last_nodes(node_names)
  specs = []
  for name in check_names(config.evaluate.get("baselines", ())):
    if name == "unimodal":
      specs += [{"name": f"unimodal_{mod}", "label": f"{mod} alone (last feature, MLP)",
                 "modality": mod, "model": mlp([node], True)} for mod, node in last.items()]
    elif name == "concat_mlp":
      specs.append({"name": name, "label": "All features concatenated, MLP",
                    "modality": " + ".join(last), "model": mlp(node_names, False)})
    elif name == "late_fusion_release":
      specs.append({"name": name, "label": "Late fusion (release: concat + MLP)",
                    "modality": " + ".join(last), "model": mlp(last.values(), True)})
    else:
      specs.append({"name": name, "label": "Late fusion (Table 6: ConcatFC Cell)",
                    "modality": " + ".join(last),
                    "genotype": genotype_lib.late_fusion(node_names)})
  return specs


def stage_of(name: str) -> str:
  """The stage folder of a baseline, relative to the workdir."""
  return os.path.join(STAGE_DIR, name)


def run_baselines(config, fs: FeatureSet | ShardSource, workdir: str) -> dict[str, dict]:
  """Retrains every configured baseline (each resumable in `baselines/<name>/`).

  Returns name -> the evaluation result, with the row's `label` and `modality`.
  """
  specs = baseline_specs(config, fs.node_names)
  results = run_retrainings(config, fs, workdir, [
      Job(spec.get("genotype"), stage_of(spec["name"]), spec.get("model")) for spec in specs])
  return {spec["name"]: {**res, "label": spec["label"], "modality": spec["modality"]}
          for spec, res in zip(specs, results)}

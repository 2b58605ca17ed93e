"""Parameter counts per part and arch shapes of a search hypernet or a fixed network."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bmnas_jax.data.feature_set import NodeSpec, nodes_from_config
from bmnas_jax.fixed_net import fixed_net_from_config
from bmnas_jax.genotype import Genotype
from bmnas_jax.search_space import hypernet_from_config

PARTS = ("reshape", "fusion", "head")
# top-level modules counted as the head: the fusion head, the baselines' MLP layers
HEAD_MODULES = ("head", "fc1", "bn", "fc2")


def part_of(top_level_name: str) -> str:
  """Which part a top-level module belongs to: `reshape_*`, `cell_*`, `head`."""
  if top_level_name.startswith("reshape_"):
    return "reshape"
  if top_level_name.startswith("cell_"):
    return "fusion"
  if top_level_name in HEAD_MODULES:
    return "head"
  raise ValueError(f"unexpected top-level module {top_level_name!r}")


def count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def param_counts(params) -> dict[str, int]:
  """Counts of `params` per part (BatchNorm running stats are not parameters)."""
  out = {p: 0 for p in PARTS}
  for name, sub in params.items():
    out[part_of(name)] += count(sub)
  return out


def dummy_features(nodes, batch: int = 2) -> dict[str, jax.Array]:
  return {n.name: jnp.zeros((batch, n.channels, n.length), jnp.float32) for n in nodes}


def describe(config, nodes: tuple[NodeSpec, ...] | None = None,
             genotype: Genotype | None = None, model: nn.Module | None = None
             ) -> dict[str, Any]:
  """Shapes only (no compute): total/part parameter counts and every arch entry's shape,
  of the search hypernet, a genotype's fixed network, or `model` (e.g. a baseline)."""
  nodes = nodes or nodes_from_config(config.data)
  if model is not None:
    kind = type(model).__name__
  elif genotype is None:
    model, kind = hypernet_from_config(config, nodes), "hypernet"
  else:
    model, kind = fixed_net_from_config(config, nodes, genotype), "fixed"
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy_features(nodes)))
  parts = param_counts(shapes["params"])
  arch = {"/".join(str(getattr(k, "key", k)) for k in path): list(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(shapes.get("arch", {}))}
  return {
      "config": config.name,
      "model": kind,
      "fidelity": config.fidelity,
      "params_total": sum(parts.values()),
      "params_per_part": parts,
      "batch_stats_total": count(shapes.get("batch_stats", {})),
      "arch_total": count(shapes.get("arch", {})),
      "arch_shapes": arch,
      "nodes": (list(genotype.used_nodes()) if genotype is not None
                else list(getattr(model, "nodes", None) or [n.name for n in nodes])),
  }

"""The fixed fusion network a genotype describes."""

from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bmnas_jax import layers, ops, release_fusion
from bmnas_jax.data.feature_set import NodeSpec
from bmnas_jax.errors import ConfigError
from bmnas_jax.genotype import CellGene, Genotype, GenotypeError, validate
from bmnas_jax.reshape import ReshapeInput


class FixedCell(nn.Module):
  """A Cell with one op per step, as the genotype says.

  Args (call): x, y `[N, L, C]`. Returns `[N, L, C]`.
  """
  gene: CellGene
  fidelity: str = "paper"
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array, train: bool = False) -> jax.Array:
    states = [x, y]
    for i, step in enumerate(self.gene.steps):
      op = ops.make_op(step.op, self.fidelity, self.dropout, name=f"step{i}_{step.op}")
      states.append(op(states[step.inputs[0]], states[step.inputs[1]], train))
    return layers.CellTail(self.dropout, self.fidelity, name="tail")(
        [states[j] for j in self.gene.concat], x, train)


class FixedNet(nn.Module):
  """Reshape layers for the used features, the genotype's Cells, the head.

  `fusion_cells` (a `release_fusion.RELEASE_FUSIONS` name, `reference` fidelity
  only) replaces every Cell, inner steps and tail, by that whole-Cell fusion of the
  original release (its Table 7 ablation); the Cells' inputs, the reshape layers
  and the head stay as the genotype says. Empty: the genotype's Cells.

  `dynamic_inputs`: every feature is reshaped, and the Cells read their inputs from
  the `arch` collection's `inputs` (int32 `[num_cells, 2]`, the genotype's at init):
  networks that differ only in their Cells' inputs are one program (trained together
  under vmap, `evaluate.Job.group`). The same values as the static network: unused
  reshape layers are extra parameters the output does not depend on.

  Args (call): features: node name -> `[N, C_in, L_in]`. Returns logits `[N, K]`.
  """
  nodes: tuple[NodeSpec, ...]
  genotype: Genotype
  C: int
  L: int
  num_classes: int
  fidelity: str = "paper"
  dropout: float = 0.0
  fusion_cells: str = ""
  dynamic_inputs: bool = False

  @nn.compact
  def __call__(self, features: Mapping[str, jax.Array], train: bool = False) -> jax.Array:
    g = self.genotype
    if self.fusion_cells and self.fidelity != "reference":
      raise ConfigError(f"fusion_cells={self.fusion_cells!r} builds the original release's "
                        f"whole-Cell fusions: it needs fidelity 'reference', not "
                        f"{self.fidelity!r}")
    used = set(n.name for n in self.nodes) if self.dynamic_inputs else set(g.used_nodes())
    states = [ReshapeInput(self.C, self.L, self.dropout, self.fidelity,
                           name=f"reshape_{n.name}")(features[n.name], train)
              if n.name in used else None for n in self.nodes]
    if self.dynamic_inputs:
      chosen = self.variable("arch", "inputs", lambda: jnp.asarray(
          [c.inputs for c in g.cells], jnp.int32)).value
    for k, gene in enumerate(g.cells):
      if self.dynamic_inputs:
        candidates = jnp.stack(states)
        x, y = (jnp.take(candidates, chosen[k, j], axis=0) for j in (0, 1))
      else:
        x, y = states[gene.inputs[0]], states[gene.inputs[1]]
      if self.fusion_cells:
        cell = release_fusion.make_fusion(self.fusion_cells, self.dropout, name=f"cell_{k}")
      else:
        cell = FixedCell(gene, self.fidelity, self.dropout, name=f"cell_{k}")
      states.append(cell(x, y, train))
    return layers.FusionHead(self.num_classes, name="head")([states[u] for u in g.concat])


def check_genotype_nodes(genotype: Genotype, nodes: Sequence[NodeSpec]) -> None:
  """The genotype's node list must equal the feature set's (names and order)."""
  names = tuple(n.name for n in nodes)
  if tuple(genotype.nodes) != names:
    raise GenotypeError(f"nodes: genotype has {list(genotype.nodes)}, but the data/config "
                        f"has {list(names)}")


def fixed_net_from_config(config, nodes: Sequence[NodeSpec], genotype: Genotype,
                          dropout: float | None = None, fusion_cells: str = "",
                          dynamic_inputs: bool = False) -> FixedNet:
  """Builds the fixed network for `genotype` with `config.model` shapes.

  `fusion_cells`: a release whole-Cell fusion replacing every Cell (see `FixedNet`);
  needs `config.fidelity='reference'`.
  """
  validate(genotype)
  check_genotype_nodes(genotype, nodes)
  if fusion_cells:
    if fusion_cells not in release_fusion.RELEASE_FUSIONS:
      raise ConfigError(f"fusion_cells={fusion_cells!r}; valid: "
                        f"{', '.join(release_fusion.RELEASE_FUSIONS)}")
    if config.fidelity != "reference":
      raise ConfigError(f"fusion_cells={fusion_cells!r} builds the original release's "
                        f"whole-Cell fusions: it needs config.fidelity='reference', not "
                        f"{config.fidelity!r}")
  m = config.model
  return FixedNet(tuple(nodes), genotype, m.C, m.L, m.num_classes, config.fidelity,
                  m.dropout if dropout is None else dropout, fusion_cells, dynamic_inputs)

"""The search hypernet: mixed upper edges (alpha), mixed inner steps (beta, gamma).

Variables: weights in `params`, architecture weights in `arch`, BatchNorm
statistics in `batch_stats`. The arch tree is, per Cell k (P = inputs + k
predecessors, E = sum over steps i of (2 + i) inner edges, F = the op pool):

  arch['cell_k'] = {'alpha': [P, 2], 'beta': [E, 2], 'gamma': [steps, F]}

with edge ops ordered ('Zero', 'Identity'). With `two_slot=True` alpha and beta
get a leading slot axis of 2 (x-slot weights, y-slot weights).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bmnas_jax import layers, ops
from bmnas_jax.data.feature_set import NodeSpec
from bmnas_jax.reshape import ReshapeInput
from bmnas_jax.errors import ConfigError

ARCH_INIT_SCALE = 1e-3


def num_inner_edges(steps: int) -> int:
  """E: inner edges of a Cell with `steps` steps (step i reads 2 + i nodes)."""
  return sum(2 + i for i in range(steps))


def _arch_variable(module: nn.Module, name: str, shape: tuple[int, ...]):
  """An `arch` variable initialised to 1e-3 * N(0, 1) (the release's init)."""
  return module.variable(
      "arch", name,
      lambda: ARCH_INIT_SCALE * jax.random.normal(module.make_rng("params"), shape))


def edge_weights(logits: jax.Array) -> jax.Array:
  """Identity weight of mixed edges: softmax over ('Zero', 'Identity'), `[..., 2] -> [...]`."""
  return jax.nn.softmax(logits, axis=-1)[..., ops.IDENTITY]


def _weighted_sum(weights: jax.Array, states) -> jax.Array:
  """`sum_p weights[p] * states[p]`, written out as products and sums of the `[N, L, C]`
  states (no stacked `[P, N, L, C]` copy: on CPU the stacked contraction and its
  gradient cost about a fifth of a search step pair at the MM-IMDB shape)."""
  out = weights[0] * states[0]
  for p in range(1, len(states)):
    out = out + weights[p] * states[p]
  return out


def _mix(weights: jax.Array, states, two_slot: bool):
  """Weighted sums of P states `[N, L, C]`; returns (x, y) each `[N, L, C]`."""
  if two_slot:
    return _weighted_sum(weights[0], states), _weighted_sum(weights[1], states)
  mixed = _weighted_sum(weights, states)
  return mixed, mixed


def _materialized(x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(x, y) with their gradients written once (`layers.materialize_grad`); one array
  passed twice stays one array (the ops then see `x is y`, see `layers.PointwiseConv`)."""
  if x is y:
    x = layers.materialize_grad(x)
    return x, x
  return layers.materialize_grad(x), layers.materialize_grad(y)


class SearchCell(nn.Module):
  """A searchable Cell: mixes its predecessors (alpha, Eq. 1-2), then runs
  `steps` inner steps, each a softmax(gamma)-weighted op pool (Eq. 10) over a
  softmax(beta)-weighted mix of the earlier inner nodes.

  Args (call): preds: the P predecessors, each `[N, L, C]` (a list, or an array
  `[P, N, L, C]`). Returns `[N, L, C]`.
  """
  steps: int
  node_multiplier: int
  fidelity: str = "paper"
  dropout: float = 0.0
  two_slot: bool = False

  @nn.compact
  def __call__(self, preds: Sequence[jax.Array] | jax.Array, train: bool = False
               ) -> jax.Array:
    slots = (2,) if self.two_slot else ()
    pool = ops.step_op_pool(self.fidelity)
    alpha = _arch_variable(self, "alpha", slots + (len(preds), 2)).value
    beta = _arch_variable(self, "beta", slots + (num_inner_edges(self.steps), 2)).value
    gamma = _arch_variable(self, "gamma", (self.steps, len(pool))).value

    x, y = _materialized(*_mix(edge_weights(alpha), preds, self.two_slot))
    states = [x, y]
    beta_w = edge_weights(beta)
    gamma_w = jax.nn.softmax(gamma, axis=-1)
    offset = 0
    for i in range(self.steps):
      n_in = len(states)
      w = beta_w[..., offset:offset + n_in]
      sx, sy = _materialized(*_mix(w, states, self.two_slot))
      out = 0.0
      for f, op_name in enumerate(pool):
        if op_name == "Zero":          # contributes 0; its weight only dilutes the others
          continue
        op = ops.make_op(op_name, self.fidelity, self.dropout, name=f"step{i}_{op_name}")
        out = out + gamma_w[i, f] * op(sx, sy, train)
      states.append(layers.materialize_grad(out))
      offset += n_in
    return layers.CellTail(self.dropout, self.fidelity, name="tail")(
        states[-self.node_multiplier:], x, train)


class Hypernet(nn.Module):
  """The BM-NAS search model over S = [features..., Cell_1..Cell_n].

  Args (call): features: node name -> `[N, C_in, L_in]`. Returns logits `[N, K]`.
  """
  nodes: tuple[NodeSpec, ...]
  C: int
  L: int
  num_cells: int
  multiplier: int
  steps: int
  node_multiplier: int
  num_classes: int
  fidelity: str = "paper"
  dropout: float = 0.0
  two_slot: bool = False

  @nn.compact
  def __call__(self, features: Mapping[str, jax.Array], train: bool = False) -> jax.Array:
    states = [ReshapeInput(self.C, self.L, self.dropout, self.fidelity,
                           name=f"reshape_{n.name}")(features[n.name], train)
              for n in self.nodes]
    for k in range(self.num_cells):
      cell = SearchCell(self.steps, self.node_multiplier, self.fidelity, self.dropout,
                        self.two_slot, name=f"cell_{k}")
      states.append(cell(states, train))
    return layers.FusionHead(self.num_classes, name="head")(states[-self.multiplier:])


def check_model_config(config, nodes: Sequence[NodeSpec]) -> None:
  """Raises ValueError naming the `config.model` key that is out of range."""
  model_cfg = config.model
  if config.get("fidelity") not in ops.FIDELITIES:
    raise ConfigError(f"config.fidelity={config.get('fidelity')!r}: must be one of "
                      f"{', '.join(ops.FIDELITIES)}")

  def need(key, ok, what):
    if not ok:
      raise ConfigError(f"config.model.{key}={model_cfg.get(key)!r}: {what}")
  for key in ("C", "L", "num_cells", "multiplier", "steps", "node_multiplier", "num_classes"):
    need(key, isinstance(model_cfg.get(key), int) and model_cfg.get(key) > 0,
         "must be a positive int")
  need("multiplier", model_cfg.multiplier <= model_cfg.num_cells, "must be <= num_cells")
  need("node_multiplier", model_cfg.node_multiplier <= model_cfg.steps, "must be <= steps")
  need("dropout", 0.0 <= model_cfg.dropout < 1.0, "must be in [0, 1)")
  need("two_slot", isinstance(model_cfg.get("two_slot"), bool), "must be a bool")
  if len(nodes) < 2:
    raise ValueError(f"need at least two input nodes, got {[n.name for n in nodes]}")


def hypernet_from_config(config, nodes: Sequence[NodeSpec]) -> Hypernet:
  """Builds the search hypernet from `config.model`, `config.fidelity` and the nodes."""
  check_model_config(config, nodes)
  m = config.model
  return Hypernet(tuple(nodes), m.C, m.L, m.num_cells, m.multiplier, m.steps,
                  m.node_multiplier, m.num_classes, config.fidelity, m.dropout, m.two_slot)

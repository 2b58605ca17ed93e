"""Pure training and evaluation steps: weight_step, arch_step, eval_step.

A batch is `{'x': {node: [B, C_in, L_in]}, 'y': [B] int or [B, K] multi-hot,
'mask': [B] bool}` (the mask is only read by eval_step; training batches are
never padded). The state is a `TrainState`; `arch` is `{}` for a fixed network.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from bmnas_jax import metrics
from bmnas_jax.errors import ConfigError

METRICS = ("accuracy", "f1_weighted", "f1_macro", "f1_micro")

# Codes of the first non-finite quantity of a step (0: all finite).
NONFINITE = {1: "loss", 2: "gradient of params", 3: "gradient of arch", 4: "updated params",
             5: "updated arch"}


@flax.struct.dataclass
class TrainState:
  """Everything a trainer carries between steps (one seed; vmapped for many).

  Attributes:
    params, arch, batch_stats: the model's collections (`arch` is `{}` when fixed).
    w_opt, a_opt: optimizer states of the weight and arch transforms.
    key: uint32 `[2]` base PRNG key of the seed (epoch keys fold in the epoch).
  """
  params: Any
  arch: Any
  batch_stats: Any
  w_opt: Any
  a_opt: Any
  key: jax.Array


def _variables(params, arch, batch_stats):
  v = {"params": params, "batch_stats": batch_stats}
  if arch:
    v["arch"] = arch
  return v


def loss_fn(label_kind: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Mean cross-entropy (`single`) or mean sigmoid BCE over classes (`multi`)."""
  if label_kind == "single":
    return lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  if label_kind == "multi":
    return lambda logits, y: optax.sigmoid_binary_cross_entropy(logits, y).mean()
  raise ValueError(f"label_kind={label_kind!r}; valid: 'single', 'multi'")


def _all_finite(tree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.array(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _code(*checks) -> jax.Array:
  """First failing check's code (1-based), 0 when all pass."""
  code = jnp.int32(0)
  for c, (ok, value) in reversed(list(enumerate(checks))):
    code = jnp.where(ok, code, value)
  return code


def mean_entropy_ratio(arch) -> jax.Array:
  """Mean over every softmax row of the arch logits (last axis) of `H / log(size)`:
  1 for uniform weights, 0 for one-hot. Args: the `arch` collection. Returns a scalar."""
  ratios = []
  for logits in jax.tree.leaves(arch):
    logp = jax.nn.log_softmax(logits, axis=-1)
    h = -(jnp.exp(logp) * logp).sum(-1)
    ratios.append((h / jnp.log(logits.shape[-1])).ravel())
  return jnp.concatenate(ratios).mean()


class Steps:
  """The pure step functions of one model, loss and pair of optimizers.

  Args:
    model: a Flax module called as `model.apply(variables, x, train)`.
    label_kind: `single` or `multi`.
    w_tx, a_tx: optax transforms for params and arch (a_tx unused when fixed).
    metric, threshold: the evaluation metric and the multi-label decision threshold.
    zero_division: F1 of a class with no true and no predicted positives (scikit-learn's
      convention; 1.0 is the original release's `zero_division=1`).
    arch_updates_batch_stats: whether `arch_step` keeps the BatchNorm running
      statistics its training-mode forward pass updates from the val batch (the
      original release, whose model is in train mode during the architecture step),
      or discards them (default).
    arch_entropy: weight of the mean normalized entropy of the architecture softmaxes
      added to the arch step's loss (beyond the paper: > 0 pushes each softmax to
      commit, `mean_entropy_ratio`); the reported loss is the task loss alone.
  """

  def __init__(self, model: nn.Module, label_kind: str, w_tx: optax.GradientTransformation,
               a_tx: optax.GradientTransformation | None = None, metric: str = "accuracy",
               threshold: float = 0.3, zero_division: float = 0.0,
               arch_updates_batch_stats: bool = False, arch_entropy: float = 0.0):
    if metric not in METRICS:
      raise ConfigError(f"config.metric.name={metric!r}; valid: {', '.join(METRICS)}")
    if label_kind == "single" and metric != "accuracy":
      raise ConfigError(f"config.metric.name={metric!r} needs multi-label data; use 'accuracy'")
    if label_kind == "multi" and metric == "accuracy":
      raise ConfigError("config.metric.name='accuracy' needs single-label data; use f1_*")
    self.model, self.label_kind = model, label_kind
    self.loss = loss_fn(label_kind)
    self.w_tx, self.a_tx = w_tx, a_tx
    self.metric, self.threshold, self.zero_division = metric, threshold, zero_division
    self.arch_updates_batch_stats = arch_updates_batch_stats
    self.arch_entropy = float(arch_entropy)

  @classmethod
  def from_config(cls, model: nn.Module, label_kind: str, w_tx: optax.GradientTransformation,
                  a_tx: optax.GradientTransformation | None, config) -> "Steps":
    """The steps with `config.metric` (name, threshold). Under
    `config.fidelity='reference'` the release's behaviour: F1 with `zero_division=1`
    and val batches folded into the BatchNorm running statistics by the arch step;
    otherwise scikit-learn's default 0 and running statistics from train batches only."""
    reference = config.fidelity == "reference"
    arch_entropy = config.get("search", {}).get("arch_entropy", 0.0)
    if isinstance(arch_entropy, bool) or not isinstance(arch_entropy, (int, float)):
      raise ConfigError(f"config.search.arch_entropy={arch_entropy!r} must be a number")
    return cls(model, label_kind, w_tx, a_tx, config.metric.name, config.metric.threshold,
               1.0 if reference else 0.0, arch_updates_batch_stats=reference,
               arch_entropy=arch_entropy)

  def init_state(self, key: jax.Array, sample_x) -> TrainState:
    """A fresh state for one seed: model variables from `key` (params and dropout
    streams split from it), both optimizer states, and `key` as the seed's base key.

    Args: key: uint32 `[2]`; sample_x: node -> `[b, C_in, L_in]` (shapes only matter).
    """
    k_params, k_drop = jax.random.split(key)
    v = self.model.init({"params": k_params, "dropout": k_drop}, sample_x, False)
    arch = v.get("arch", {})
    return TrainState(v["params"], arch, v.get("batch_stats", {}), self.w_tx.init(v["params"]),
                      self.a_tx.init(arch) if self.a_tx is not None else (), key)

  def _forward_train(self, params, arch, batch_stats, x, key):
    logits, upd = self.model.apply(_variables(params, arch, batch_stats), x, True,
                                   rngs={"dropout": key}, mutable=["batch_stats"])
    return logits, upd["batch_stats"]

  def weight_step(self, state: TrainState, batch, key: jax.Array):
    """One optimizer step on params (train batch); arch untouched.

    Returns (new state, {'loss': scalar, 'bad': int32 code of the first non-finite quantity}).
    """
    def objective(params):
      logits, bs = self._forward_train(params, state.arch, state.batch_stats, batch["x"], key)
      return self.loss(logits, batch["y"]), bs

    (loss, bs), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    updates, w_opt = self.w_tx.update(grads, state.w_opt, state.params)
    params = optax.apply_updates(state.params, updates)
    bad = _code((jnp.isfinite(loss), 1), (_all_finite(grads), 2), (_all_finite(params), 4))
    return state.replace(params=params, batch_stats=bs, w_opt=w_opt), {"loss": loss, "bad": bad}

  def arch_step(self, state: TrainState, batch, key: jax.Array):
    """One first-order step on arch (val batch); params untouched.

    BatchNorm runs in training mode (batch statistics), as in the original
    release. The running statistics the forward pass updates from the val batch
    are kept with `arch_updates_batch_stats` (the release) and discarded
    otherwise (batch_stats untouched).
    """
    def objective(arch):
      logits, bs = self._forward_train(state.params, arch, state.batch_stats, batch["x"], key)
      task = self.loss(logits, batch["y"])
      total = task + self.arch_entropy * mean_entropy_ratio(arch) if self.arch_entropy else task
      return total, (task, bs)

    (_, (loss, bs)), grads = jax.value_and_grad(objective, has_aux=True)(state.arch)
    updates, a_opt = self.a_tx.update(grads, state.a_opt, state.arch)
    arch = optax.apply_updates(state.arch, updates)
    bad = _code((jnp.isfinite(loss), 1), (_all_finite(grads), 3), (_all_finite(arch), 5))
    new = state.replace(arch=arch, a_opt=a_opt)
    if self.arch_updates_batch_stats:
      new = new.replace(batch_stats=bs)
    return new, {"loss": loss, "bad": bad}

  def eval_step(self, state: TrainState, batch):
    """Loss sum and metric counts over the unmasked rows (BatchNorm in eval mode)."""
    logits = self.model.apply(_variables(state.params, state.arch, state.batch_stats),
                              batch["x"], False)
    mask = batch["mask"]
    if self.label_kind == "single":
      per_row = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
      counts = metrics.accuracy_counts(logits, batch["y"], mask)
    else:
      per_row = optax.sigmoid_binary_cross_entropy(logits, batch["y"]).mean(axis=-1)
      counts = metrics.multilabel_counts(logits, batch["y"], self.threshold, mask)
    return {"loss_sum": jnp.sum(jnp.where(mask, per_row, 0.0)),
            "n": jnp.sum(mask.astype(jnp.int32)), "counts": counts}

  def finish_eval(self, sums) -> dict[str, jax.Array]:
    """{'loss', 'metric'} from summed eval_step outputs."""
    counts = sums["counts"]
    if self.metric == "accuracy":
      value = metrics.accuracy_from_counts(counts)
    else:
      value = metrics.f1_from_counts(counts, self.metric.split("_", 1)[1], self.zero_division)
    return {"loss": sums["loss_sum"] / jnp.maximum(sums["n"], 1), "metric": value}

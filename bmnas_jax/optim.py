"""Optax transforms for the weights and the architecture, and the per-batch cosine schedule."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bmnas_jax.errors import ConfigError

# The release restarts a cycle once the rate is within this of eta_min.
RESTART_TOLERANCE = 1e-10

WEIGHT_DEFAULTS = {"b1": 0.9, "b2": 0.999}
ARCH_DEFAULTS = {"lr": 3e-4, "b1": 0.5, "b2": 0.999, "weight_decay": 1e-3, "lr_for_steps": 0,
                 "warmup_epochs": 0}


def cosine_warm_restarts_table(eta_max: float, eta_min: float, t_i: float, t_mult: float,
                               batches_per_epoch: float, total_steps: int) -> np.ndarray:
  """The learning rate of each of the first `total_steps` batch updates.

  Follows the original BM-NAS release's per-batch cosine annealing with warm
  restarts. Before every weight update the release advances a counter of
  batches since the last restart, `k` (0 for the first batch of a cycle), and
  uses

    t = k / batches_per_epoch                      (epochs into the cycle)
    eta = eta_min + 0.5 (eta_max - eta_min) (1 + cos(pi t / T))

  where `T` starts at `t_i`. When `eta <= eta_min + 1e-10`, that batch still
  uses `eta`, and then `T *= t_mult` and `k` restarts at 0. A cycle therefore
  spans `T * batches_per_epoch + 1` batches when that product is an integer.
  `batches_per_epoch` is `dataset_size / batch_size`, a float. The floor is
  reached only when `t / T` lands on an odd integer to within about
  `sqrt(4e-10 / (eta_max - eta_min)) / pi` (2e-4 for `eta_max` 1e-3). When
  `T * batches_per_epoch` is not an integer, `t` steps over `T` without a
  restart and the rate climbs back along the cosine (period `2 T` epochs); a
  restart may then come at `t = 3 T, 5 T, ...` (e.g. 16000 / 96 batches per
  epoch, `T` 1: after 3 epochs) or never (14416 / 96, `T` 5). This is kept
  as the release behaves.

  Args:
    eta_max: the rate at the start of each cycle.
    eta_min: the floor of the cosine.
    t_i: length of the first cycle, in epochs.
    t_mult: factor applied to the cycle length at each restart.
    batches_per_epoch: `dataset_size / batch_size` (need not be an integer).
    total_steps: number of updates to tabulate.

  Returns:
    float64 `[total_steps]`; entry `c` is the rate of the `(c + 1)`-th update.
  """
  lrs = np.empty((total_steps,), dtype=np.float64)
  amplitude = 0.5 * (eta_max - eta_min)
  floor = eta_min + RESTART_TOLERANCE
  period = t_i
  since_restart = 0.0
  for step in range(total_steps):
    epochs_in = since_restart / batches_per_epoch
    since_restart += 1.0
    lr = eta_min + amplitude * (1 + np.cos(np.pi * epochs_in / period))
    lrs[step] = lr
    if lr <= floor:
      period = period * t_mult
      since_restart = 0.0
  return lrs


def cosine_warm_restarts(eta_max: float, eta_min: float, t_i: float, t_mult: float,
                         batches_per_epoch: float, total_steps: int,
                         steps_per_epoch: int | None = None) -> optax.Schedule:
  """Per-batch cosine annealing with warm restarts, as in the BM-NAS release.

  The release calls its scheduler's `step()` (and copies the new rate into the
  optimizer) before `optimizer.step()` on every training batch, so the first
  update already uses the first computed rate, `eta_max`. Hence the schedule's
  value at optax count `c` (the number of updates applied so far) is the rate
  the release uses for the `(c + 1)`-th batch update. The rule is simulated in
  float64 for `total_steps` updates (see `cosine_warm_restarts_table`, which
  also describes the release's quirk with a non-integer `batches_per_epoch`)
  and the schedule looks the count up in that table; counts past the end
  keep the last value.

  Args:
    eta_max: the rate at the start of each cycle.
    eta_min: the floor of the cosine.
    t_i: length of the first cycle, in epochs.
    t_mult: factor applied to the cycle length at each restart.
    batches_per_epoch: `dataset_size / batch_size` (need not be an integer).
    total_steps: number of updates the run makes (the table's length).
    steps_per_epoch: with the release's epoch accounting: the updates a run here
      makes per epoch (full batches only). The release also trains on the last,
      partial batch, so its scheduler advances `ceil(batches_per_epoch)` times per
      epoch; update `s` of epoch `e` then takes the release's rate for batch
      `e * ceil(batches_per_epoch) + s`. None: the table is read by update count.

  Returns:
    An `optax.Schedule`: int count (scalar) -> float32 rate (scalar).
  """
  _check_positive_int("total_steps", total_steps)
  if not batches_per_epoch > 0:
    raise ValueError(f"batches_per_epoch must be > 0, got {batches_per_epoch!r}")
  release_per_epoch = math.ceil(batches_per_epoch - 1e-9)
  if steps_per_epoch is not None and steps_per_epoch != release_per_epoch:
    _check_positive_int("steps_per_epoch", steps_per_epoch)
    epochs = -(-int(total_steps) // int(steps_per_epoch))
    length = epochs * release_per_epoch
    index = lambda count: ((count // steps_per_epoch) * release_per_epoch
                           + count % steps_per_epoch)
  else:
    length, index = int(total_steps), lambda count: count
  table_np = cosine_warm_restarts_table(float(eta_max), float(eta_min), t_i, t_mult,
                                        float(batches_per_epoch), length)
  table = jnp.asarray(table_np, dtype=jnp.float32)
  last = length - 1

  def schedule(count: jax.typing.ArrayLike) -> jax.Array:
    return table[jnp.clip(index(count), 0, last)]

  return schedule


def torch_adam_l2(learning_rate: Union[float, optax.Schedule], b1: float = 0.9,
                  b2: float = 0.999, weight_decay: float = 0.0,
                  eps: float = 1e-8) -> optax.GradientTransformation:
  """PyTorch's `Adam(lr, betas=(b1, b2), eps, weight_decay)`.

  PyTorch adds `weight_decay * param` to the gradient before the moment
  estimates (L2 regularisation, not AdamW's decoupled decay).

  Args:
    learning_rate: a float or an `optax.Schedule` of the update count.
    b1: decay of the first moment.
    b2: decay of the second moment.
    weight_decay: L2 coefficient added to the gradient.
    eps: added to the square root of the second moment.

  Returns:
    The `optax.GradientTransformation`.
  """
  return optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
      optax.scale_by_learning_rate(learning_rate),
  )


# ----------------------------------------------------------------------------
# Construction from configs, with errors naming the key.


def _check_positive_int(key: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ConfigError(f"{key} must be an int >= 1, got {value!r}")
  return int(value)


def _number(opt_cfg: Any, key: str, where: str, defaults: dict[str, float]) -> float:
  """Reads `opt_cfg[key]` as a finite float, falling back to `defaults`."""
  if key in opt_cfg and opt_cfg[key] is not None:
    value = opt_cfg[key]
  elif key in defaults:
    value = defaults[key]
  else:
    raise ConfigError(f"{where}: config key '{key}' is missing")
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise ConfigError(f"{where}: config key '{key}' must be a number, got {value!r}")
  value = float(value)
  if not math.isfinite(value):
    raise ConfigError(f"{where}: config key '{key}' must be finite, got {value!r}")
  return value


def _require(ok: bool, where: str, key: str, rule: str, value: float) -> None:
  if not ok:
    raise ConfigError(f"{where}: config key '{key}' must be {rule}, got {value!r}")


def _betas(opt_cfg: Any, where: str, defaults: dict[str, float]) -> tuple[float, float]:
  b1 = _number(opt_cfg, "b1", where, defaults)
  b2 = _number(opt_cfg, "b2", where, defaults)
  _require(0.0 <= b1 < 1.0, where, "b1", "in [0, 1)", b1)
  _require(0.0 <= b2 < 1.0, where, "b2", "in [0, 1)", b2)
  return b1, b2


def weight_schedule(opt_cfg: Any, batches_per_epoch: float, total_steps: int,
                    steps_per_epoch: int | None = None) -> optax.Schedule:
  """The weight optimizer's learning-rate schedule from its config.

  Args:
    opt_cfg: `ml_collections.ConfigDict` (or dict) with `lr_max`, `lr_min`,
      `t_i`, `t_mult`; see `weight_optimizer`.
    batches_per_epoch: `dataset_size / batch_size` of the split trained on.
    total_steps: number of weight updates in the run.
    steps_per_epoch: see `cosine_warm_restarts` (the release's epoch accounting).

  Returns:
    The `optax.Schedule` (see `cosine_warm_restarts`).

  Raises:
    ValueError: naming the key that is missing or invalid.
  """
  where = "weight optimizer"
  lr_max = _number(opt_cfg, "lr_max", where, {})
  lr_min = _number(opt_cfg, "lr_min", where, {})
  t_i = _number(opt_cfg, "t_i", where, {})
  t_mult = _number(opt_cfg, "t_mult", where, {})
  _require(lr_max > 0.0, where, "lr_max", "> 0", lr_max)
  _require(0.0 <= lr_min <= lr_max, where, "lr_min", "in [0, lr_max]", lr_min)
  _require(t_i > 0.0, where, "t_i", "> 0", t_i)
  _require(t_mult >= 1.0, where, "t_mult", ">= 1", t_mult)
  numeric = (int, float, np.integer, np.floating)
  if isinstance(batches_per_epoch, bool) or not (
      isinstance(batches_per_epoch, numeric) and batches_per_epoch > 0):
    raise ValueError(f"{where}: batches_per_epoch must be > 0, got {batches_per_epoch!r}")
  _check_positive_int("total_steps", total_steps)
  return cosine_warm_restarts(lr_max, lr_min, t_i, t_mult, batches_per_epoch, total_steps,
                              steps_per_epoch)


def weight_optimizer(opt_cfg: Any, batches_per_epoch: float, total_steps: int,
                     steps_per_epoch: int | None = None) -> optax.GradientTransformation:
  """PyTorch-style Adam with L2 decay and the release's cosine schedule.

  Args:
    opt_cfg: `ml_collections.ConfigDict` (or dict) with keys `lr_max`,
      `lr_min`, `weight_decay`, `t_i` (epochs), `t_mult`, and optionally `b1`
      (default 0.9) and `b2` (default 0.999).
    batches_per_epoch: `dataset_size / batch_size` of the split trained on
      (a float, as in the release).
    total_steps: number of weight updates in the run.
    steps_per_epoch: the release's epoch accounting (`cosine_warm_restarts`); None
      reads the schedule by update count.

  Returns:
    The `optax.GradientTransformation`.

  Raises:
    ValueError: naming the key that is missing or invalid.
  """
  where = "weight optimizer"
  schedule = weight_schedule(opt_cfg, batches_per_epoch, total_steps, steps_per_epoch)
  weight_decay = _number(opt_cfg, "weight_decay", where, {})
  _require(weight_decay >= 0.0, where, "weight_decay", ">= 0", weight_decay)
  b1, b2 = _betas(opt_cfg, where, WEIGHT_DEFAULTS)
  return torch_adam_l2(schedule, b1=b1, b2=b2, weight_decay=weight_decay)


def arch_optimizer(opt_cfg: Optional[Any] = None, steps_per_epoch: int | None = None
                   ) -> optax.GradientTransformation:
  """PyTorch-style Adam with L2 decay and a constant rate, for arch weights.

  Args:
    opt_cfg: `ml_collections.ConfigDict` (or dict) with optional keys `lr`
      (default 3e-4), `b1` (0.5), `b2` (0.999), `weight_decay` (1e-3) and
      `lr_for_steps` (0); None takes all defaults. `lr_for_steps` > 0 (beyond the
      paper) says `lr` is meant for that many arch steps an epoch: the rate used is
      `lr * lr_for_steps / steps_per_epoch`, so a search with few validation batches
      moves its architecture weights as far per epoch as one with many.
      `warmup_epochs` (0; beyond the paper): the rate is 0 for that many epochs of arch
      steps, so the architecture starts moving once the weights have trained.
    steps_per_epoch: arch steps an epoch (needed when `lr_for_steps` or
      `warmup_epochs` > 0).

  Returns:
    The `optax.GradientTransformation`.

  Raises:
    ValueError: naming the key that is invalid.
  """
  where = "arch optimizer"
  opt_cfg = {} if opt_cfg is None else opt_cfg
  lr = _number(opt_cfg, "lr", where, ARCH_DEFAULTS)
  weight_decay = _number(opt_cfg, "weight_decay", where, ARCH_DEFAULTS)
  _require(lr > 0.0, where, "lr", "> 0", lr)
  lr_for_steps = _number(opt_cfg, "lr_for_steps", where, ARCH_DEFAULTS)
  _require(lr_for_steps >= 0.0, where, "lr_for_steps", ">= 0", lr_for_steps)
  if lr_for_steps > 0:
    lr *= lr_for_steps / steps_per_epoch
  warmup = _number(opt_cfg, "warmup_epochs", where, ARCH_DEFAULTS)
  _require(warmup >= 0.0 and warmup == int(warmup), where, "warmup_epochs", "an int >= 0",
           warmup)
  if warmup > 0:
    start, rate = int(warmup) * steps_per_epoch, lr
    lr = lambda count: jnp.where(count < start, 0.0, rate)
  _require(weight_decay >= 0.0, where, "weight_decay", ">= 0", weight_decay)
  b1, b2 = _betas(opt_cfg, where, ARCH_DEFAULTS)
  return torch_adam_l2(lr, b1=b1, b2=b2, weight_decay=weight_decay)


def weight_optimizer_from_config(config, opt_cfg: Any, n_train: int, batch_size: int,
                                 epochs: int) -> optax.GradientTransformation:
  """`weight_optimizer` for a trainer: `n_train / batch_size` batches per epoch as the
  release counts them, `epochs * (n_train // batch_size)` updates (full batches), and
  the release's epoch accounting under `config.fidelity='reference'`."""
  steps_per_epoch = n_train // batch_size
  return weight_optimizer(opt_cfg, n_train / batch_size, epochs * steps_per_epoch,
                          steps_per_epoch if config.fidelity == "reference" else None)


def freeze(tx: optax.GradientTransformation,
           frozen: Callable[[tuple[str, ...]], bool]) -> optax.GradientTransformation:
  """`tx` for every parameter but those whose path (tuple of dict keys) `frozen`
  selects: their updates are zero (no weight decay either), so they keep their init."""
  def labels(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if frozen(tuple(str(getattr(k, "key", k)) for k in path))
        else "train", params)

  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)

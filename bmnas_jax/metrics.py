"""Accuracy and multi-label F1 as pure, jit/vmap-able count-and-reduce functions."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

AVERAGES = ("weighted", "macro", "micro")
ZERO_DIVISIONS = (0.0, 1.0)

Counts = dict[str, jax.Array]


def _row_mask(mask: Optional[jax.typing.ArrayLike], n: int) -> jax.Array:
  """Returns a bool `[n]` mask (all True when `mask` is None)."""
  if mask is None:
    return jnp.ones((n,), dtype=bool)
  mask = jnp.asarray(mask)
  if mask.shape != (n,):
    raise ValueError(f"mask must have shape [n] = {(n,)}, got {mask.shape}")
  return mask.astype(bool)


def _check_average(average: str) -> None:
  if average not in AVERAGES:
    raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")


def _check_zero_division(zero_division: float) -> float:
  if isinstance(zero_division, bool) or zero_division not in ZERO_DIVISIONS:
    raise ValueError(f"zero_division must be one of {ZERO_DIVISIONS}, got {zero_division!r}")
  return float(zero_division)


def add_counts(a: Counts, b: Counts) -> Counts:
  """Adds two count dicts leaf by leaf (the carry update inside `lax.scan`)."""
  return jax.tree_util.tree_map(jnp.add, a, b)


# ----------------------------------------------------------------------------
# Single-label accuracy.


def accuracy_counts(logits: jax.Array, labels: jax.Array,
                    mask: Optional[jax.Array] = None) -> Counts:
  """Counts correct top-1 predictions.

  Args:
    logits: `[n, K]` class scores.
    labels: `[n]` int class ids.
    mask: optional bool `[n]`; False rows (padding) are not counted.

  Returns:
    dict with int32 scalars `correct` and `total` (number of unmasked rows).
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(f"expected logits [n, K] and labels [n], got {logits.shape} and "
                     f"{labels.shape}")
  m = _row_mask(mask, logits.shape[0])
  hit = (jnp.argmax(logits, axis=-1) == labels) & m
  return {"correct": jnp.sum(hit, dtype=jnp.int32), "total": jnp.sum(m, dtype=jnp.int32)}


def accuracy_from_counts(counts: Counts) -> jax.Array:
  """Returns `correct / total` as a float32 scalar (0 when `total` is 0)."""
  total = counts["total"]
  return jnp.where(total > 0, counts["correct"] / jnp.maximum(total, 1), 0.0).astype(jnp.float32)


def accuracy(logits: jax.Array, labels: jax.Array,
             mask: Optional[jax.Array] = None) -> jax.Array:
  """Top-1 accuracy, as `sklearn.metrics.accuracy_score` on the unmasked rows.

  Args:
    logits: `[n, K]` class scores.
    labels: `[n]` int class ids.
    mask: optional bool `[n]`; False rows (padding) are ignored.

  Returns:
    float32 scalar in [0, 1]; 0 when no row is counted.
  """
  return accuracy_from_counts(accuracy_counts(logits, labels, mask))


# ----------------------------------------------------------------------------
# Multi-label F1 at a threshold.


def multilabel_counts(logits: jax.Array, labels: jax.Array, threshold: float = 0.3,
                      mask: Optional[jax.Array] = None) -> Counts:
  """Per-class confusion counts of thresholded multi-label predictions.

  A class is predicted positive iff `sigmoid(logit) > threshold`.

  Args:
    logits: `[n, K]` per-class scores (before the sigmoid).
    labels: `[n, K]` multi-hot targets (any dtype; nonzero means positive).
    threshold: probability threshold (0.3 for MM-IMDB).
    mask: optional bool `[n]`; False rows (padding) are not counted.

  Returns:
    dict of int32 `[K]` arrays: `tp`, `fp`, `fn` and `support` (= tp + fn,
    the number of true positives per class).
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  if logits.ndim != 2 or labels.shape != logits.shape:
    raise ValueError(f"expected logits and labels both [n, K], got {logits.shape} and "
                     f"{labels.shape}")
  m = _row_mask(mask, logits.shape[0])[:, None]
  pred = (jax.nn.sigmoid(logits) > threshold) & m
  true = (labels != 0) & m
  tp = jnp.sum(pred & true, axis=0, dtype=jnp.int32)
  fp = jnp.sum(pred & ~true, axis=0, dtype=jnp.int32)
  fn = jnp.sum(~pred & true, axis=0, dtype=jnp.int32)
  return {"tp": tp, "fp": fp, "fn": fn, "support": tp + fn}


def f1_per_class(counts: Counts, zero_division: float = 0.0) -> jax.Array:
  """Per-class F1 `2 tp / (2 tp + fp + fn)`.

  Args:
    counts: dict with int `[K]` arrays `tp`, `fp`, `fn`.
    zero_division: the value for a class with no true and no predicted
      positives (0 is scikit-learn's default).

  Returns:
    float32 `[K]`.
  """
  zd = _check_zero_division(zero_division)
  num = 2.0 * counts["tp"].astype(jnp.float32)
  den = num + counts["fp"].astype(jnp.float32) + counts["fn"].astype(jnp.float32)
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), zd)


def f1_from_counts(counts: Counts, average: str = "weighted",
                   zero_division: float = 0.0) -> jax.Array:
  """Averaged F1 from counts, with scikit-learn's conventions.

  Matches `sklearn.metrics.f1_score(y_true, y_pred, average=average,
  zero_division=zero_division)` (scikit-learn's default `"warn"` behaves as
  0): a class whose F1 is undefined (no true and no predicted positives)
  scores `zero_division`; `weighted` weights classes by support, so classes
  without true positives add nothing, and falls back to the unweighted mean
  when the total support is 0 (which gives 0 for `zero_division=0`); `micro`
  pools the counts of all classes first.

  Args:
    counts: dict with int `[K]` arrays `tp`, `fp`, `fn`, `support`, e.g. the
      sum of `multilabel_counts` over the batches of a split.
    average: `weighted`, `macro` or `micro` (static).
    zero_division: 0.0 or 1.0 (static).

  Returns:
    float32 scalar.
  """
  _check_average(average)
  if average == "micro":
    pooled = {k: jnp.sum(counts[k], keepdims=True) for k in ("tp", "fp", "fn")}
    return f1_per_class(pooled, zero_division)[0]
  f1 = f1_per_class(counts, zero_division)
  macro = jnp.mean(f1)
  if average == "macro":
    return macro
  support = counts["support"].astype(jnp.float32)
  total = jnp.sum(support)
  weighted = jnp.sum(f1 * support) / jnp.where(total > 0, total, 1.0)
  return jnp.where(total > 0, weighted, macro)


def f1_score(logits: jax.Array, labels: jax.Array, threshold: float = 0.3,
             average: str = "weighted", mask: Optional[jax.Array] = None,
             zero_division: float = 0.0) -> jax.Array:
  """Multi-label F1 of `sigmoid(logits) > threshold` against `labels`.

  Args:
    logits: `[n, K]` per-class scores (before the sigmoid).
    labels: `[n, K]` multi-hot targets.
    threshold: probability threshold (0.3 for MM-IMDB).
    average: `weighted`, `macro` or `micro` (static).
    mask: optional bool `[n]`; False rows (padding) are ignored.
    zero_division: 0.0 or 1.0 (static); see `f1_from_counts`.

  Returns:
    float32 scalar.
  """
  _check_average(average)
  _check_zero_division(zero_division)
  return f1_from_counts(multilabel_counts(logits, labels, threshold, mask), average, zero_division)


def score(logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike, metric: str,
          threshold: float = 0.3, zero_division: float = 0.0) -> float:
  """A whole split's `metric` (`accuracy`, or `f1_weighted` / `f1_macro` / `f1_micro` of
  `sigmoid(logits) > threshold`) from logits `[n, K]` and labels `[n]` / `[n, K]`."""
  if metric == "accuracy":
    return float(accuracy(logits, labels))
  if not metric.startswith("f1_"):
    raise ValueError(f"metric {metric!r}: 'accuracy' or 'f1_<average>'")
  return float(f1_score(logits, labels, threshold, metric[3:], zero_division=zero_division))

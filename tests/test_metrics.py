"""Tests for bmnas_jax.metrics against scikit-learn."""

import functools
import warnings

import hypothesis
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sklearn.metrics

from bmnas_jax import metrics

N, K = 24, 6  # fixed shapes: one compilation per jitted function
THRESHOLD = 0.3
AVERAGES = ("weighted", "macro", "micro")

f1_jit = jax.jit(metrics.f1_score, static_argnames=("average", "zero_division"))
f1_counts_jit = jax.jit(metrics.f1_from_counts, static_argnames=("average", "zero_division"))
counts_jit = jax.jit(metrics.multilabel_counts)
acc_jit = jax.jit(metrics.accuracy)
acc_counts_jit = jax.jit(metrics.accuracy_counts)


def sk_f1(y_true, y_pred, average, zero_division=0.0):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return sklearn.metrics.f1_score(y_true, y_pred, average=average, zero_division=zero_division)


def sigmoid64(x):
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def logits_for(pred_bits):
  """Logits far from the threshold whose thresholded sigmoid is `pred_bits`."""
  return np.where(pred_bits, 2.0, -3.0).astype(np.float32)


@pytest.fixture(scope="module")
def rng():
  return np.random.default_rng(0)


# ----------------------------------------------------------------------------
# Accuracy.


def test_accuracy_matches_sklearn(rng):
  logits = rng.normal(size=(N, K)).astype(np.float32)
  labels = rng.integers(0, K, size=N)
  want = sklearn.metrics.accuracy_score(labels, logits.argmax(-1))
  np.testing.assert_allclose(acc_jit(logits, labels), want, rtol=1e-6)


def test_accuracy_mask_ignores_padded_rows(rng):
  logits = rng.normal(size=(N, K)).astype(np.float32)
  labels = rng.integers(0, K, size=N)
  mask = np.arange(N) < 17
  got = acc_jit(logits, labels, mask)
  want = sklearn.metrics.accuracy_score(labels[:17], logits[:17].argmax(-1))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  counts = acc_counts_jit(logits, labels, mask)
  assert int(counts["total"]) == 17
  empty = acc_jit(logits, labels, np.zeros(N, bool))
  assert float(empty) == 0.0


def test_accuracy_counts_accumulate_under_scan(rng):
  batches, b = 4, 8
  logits = rng.normal(size=(batches * b, K)).astype(np.float32)
  labels = rng.integers(0, K, size=batches * b)
  n_real = 29  # the last batch is padded
  mask = np.arange(batches * b) < n_real

  def body(carry, batch):
    return metrics.add_counts(carry, metrics.accuracy_counts(*batch)), None

  init = {"correct": jnp.int32(0), "total": jnp.int32(0)}
  xs = (logits.reshape(batches, b, K), labels.reshape(batches, b), mask.reshape(batches, b))
  total, _ = jax.jit(lambda xs: jax.lax.scan(body, init, xs))(xs)
  want = sklearn.metrics.accuracy_score(labels[:n_real], logits[:n_real].argmax(-1))
  np.testing.assert_allclose(metrics.accuracy_from_counts(total), want, rtol=1e-6)
  assert int(total["total"]) == n_real


# ----------------------------------------------------------------------------
# Multi-label F1.


@pytest.mark.parametrize("average", AVERAGES)
def test_f1_matches_sklearn_random(rng, average):
  logits = rng.normal(scale=2.0, size=(N, K)).astype(np.float32)
  labels = (rng.random((N, K)) < 0.3).astype(np.float32)
  y_pred = (sigmoid64(logits) > THRESHOLD).astype(int)
  got = f1_jit(logits, labels, THRESHOLD, average)
  np.testing.assert_allclose(got, sk_f1(labels.astype(int), y_pred, average), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("zero_division", (0.0, 1.0))
@pytest.mark.parametrize("average", AVERAGES)
def test_f1_zero_support_and_zero_prediction_classes(rng, average, zero_division):
  labels = (rng.random((N, K)) < 0.4).astype(int)
  preds = (rng.random((N, K)) < 0.4).astype(int)
  labels[:, 0] = 0  # no true positives, some predictions
  labels[:, 1] = 0  # no true and no predicted positives
  preds[:, 1] = 0
  preds[:, 2] = 0  # true positives, never predicted
  preds[0, 0] = 1
  got = f1_jit(logits_for(preds), labels, THRESHOLD, average, zero_division=zero_division)
  want = sk_f1(labels, preds, average, zero_division)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("zero_division", (0.0, 1.0))
@pytest.mark.parametrize("average", AVERAGES)
def test_f1_degenerate_splits(average, zero_division):
  none = np.zeros((N, K), int)
  some = none.copy()
  some[3, 2] = 1
  for labels, preds in ((none, none), (none, some), (some, none)):
    got = f1_jit(logits_for(preds), labels, THRESHOLD, average, zero_division=zero_division)
    want = sk_f1(labels, preds, average, zero_division)
    np.testing.assert_allclose(got, want, atol=1e-7, err_msg=f"{labels.sum()=}, {preds.sum()=}")


@pytest.mark.parametrize("average", AVERAGES)
def test_f1_mask_ignores_padded_rows(rng, average):
  logits = rng.normal(scale=2.0, size=(N, K)).astype(np.float32)
  labels = (rng.random((N, K)) < 0.3).astype(np.float32)
  mask = np.arange(N) < 15
  labels[15:] = 1.0  # padding content must not matter
  logits[15:] = 5.0
  got = f1_jit(logits, labels, THRESHOLD, average, mask)
  y_pred = (sigmoid64(logits[:15]) > THRESHOLD).astype(int)
  np.testing.assert_allclose(got, sk_f1(labels[:15].astype(int), y_pred, average),
                             rtol=1e-6, atol=1e-7)


def test_counts_accumulated_over_batches_equal_one_shot(rng):
  batches, b = 5, 8
  n_real = 37
  logits = rng.normal(scale=2.0, size=(batches * b, K)).astype(np.float32)
  labels = (rng.random((batches * b, K)) < 0.3).astype(np.float32)
  mask = np.arange(batches * b) < n_real

  def body(carry, batch):
    logits_b, labels_b, mask_b = batch
    counts = metrics.multilabel_counts(logits_b, labels_b, THRESHOLD, mask_b)
    return metrics.add_counts(carry, counts), None

  init = {k: jnp.zeros((K,), jnp.int32) for k in ("tp", "fp", "fn", "support")}
  xs = (logits.reshape(batches, b, K), labels.reshape(batches, b, K), mask.reshape(batches, b))
  acc, _ = jax.jit(lambda xs: jax.lax.scan(body, init, xs))(xs)
  one_shot = counts_jit(logits[:n_real], labels[:n_real], THRESHOLD)
  for key in init:
    np.testing.assert_array_equal(acc[key], one_shot[key], err_msg=key)
  y_pred = (sigmoid64(logits[:n_real]) > THRESHOLD).astype(int)
  for average in AVERAGES:
    np.testing.assert_allclose(f1_counts_jit(acc, average),
                               sk_f1(labels[:n_real].astype(int), y_pred, average),
                               rtol=1e-6, atol=1e-7)


def test_f1_under_vmap(rng):
  seeds = 3
  logits = rng.normal(scale=2.0, size=(seeds, N, K)).astype(np.float32)
  labels = (rng.random((seeds, N, K)) < 0.3).astype(np.float32)
  f1 = functools.partial(metrics.f1_score, threshold=THRESHOLD, average="weighted")
  fn = jax.jit(jax.vmap(f1))
  got = fn(logits, labels)
  assert got.shape == (seeds,)
  for s in range(seeds):
    y_pred = (sigmoid64(logits[s]) > THRESHOLD).astype(int)
    np.testing.assert_allclose(got[s], sk_f1(labels[s].astype(int), y_pred, "weighted"),
                               rtol=1e-6, atol=1e-7)
  acc = jax.jit(jax.vmap(metrics.accuracy))(logits, labels.argmax(-1))
  assert acc.shape == (seeds,)


def test_bad_arguments_raise():
  logits = np.zeros((N, K), np.float32)
  with pytest.raises(ValueError, match="average"):
    metrics.f1_score(logits, logits, average="samples")
  with pytest.raises(ValueError, match="zero_division"):
    metrics.f1_score(logits, logits, zero_division=0.5)
  with pytest.raises(ValueError, match="mask"):
    metrics.f1_score(logits, logits, mask=np.ones(N + 1, bool))
  with pytest.raises(ValueError, match=r"\[n, K\]"):
    metrics.multilabel_counts(logits, logits[:, :2])


# ----------------------------------------------------------------------------
# Property tests: fixed shapes, so every example reuses the compiled function.

bits = hnp.arrays(np.int8, (N, K), elements=hypothesis.strategies.integers(0, 1))


@hypothesis.settings(max_examples=30, deadline=None, derandomize=True)
@hypothesis.given(y_true=bits, y_pred=bits, n_real=hypothesis.strategies.integers(0, N))
def test_f1_property_matches_sklearn(y_true, y_pred, n_real):
  mask = np.arange(N) < n_real
  for average in AVERAGES:
    got = f1_jit(logits_for(y_pred), y_true, THRESHOLD, average, mask)
    want = sk_f1(y_true[:n_real], y_pred[:n_real], average) if n_real else 0.0
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=average)


@hypothesis.settings(max_examples=20, deadline=None, derandomize=True)
@hypothesis.given(y_true=bits, y_pred=bits, split=hypothesis.strategies.integers(0, N))
def test_counts_are_additive(y_true, y_pred, split):
  logits = logits_for(y_pred)
  first = np.arange(N) < split
  a = counts_jit(logits, y_true, THRESHOLD, first)
  b = counts_jit(logits, y_true, THRESHOLD, ~first)
  whole = counts_jit(logits, y_true, THRESHOLD)
  summed = metrics.add_counts(a, b)
  for key in whole:
    np.testing.assert_array_equal(summed[key], whole[key], err_msg=key)
  np.testing.assert_array_equal(whole["support"], y_true.sum(0))


def test_reference_fidelity_scores_f1_with_zero_division_one():
  """The release calls scikit-learn with zero_division=1: classes without true and
  predicted positives score 1 (it moves macro F1, not weighted)."""
  import ml_collections
  import optax
  from bmnas_jax.steps import Steps
  y = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0]], np.float32)   # classes 2, 3: none
  logits = np.array([[2., -2, -2, -2], [-2, 2, -2, -2], [2, -2, -2, -2]], np.float32)
  counts = metrics.multilabel_counts(jnp.asarray(logits), jnp.asarray(y), 0.3)
  sums = {"loss_sum": jnp.float32(0), "n": jnp.int32(3), "counts": counts}
  pred = (1 / (1 + np.exp(-logits)) > 0.3).astype(int)
  for fidelity, zd in (("paper", 0), ("reference", 1)):
    c = ml_collections.ConfigDict({"fidelity": fidelity,
                                   "metric": {"name": "f1_macro", "threshold": 0.3}})
    steps = Steps.from_config(None, "multi", optax.sgd(1.0), None, c)
    want = sklearn.metrics.f1_score(y, pred, average="macro", zero_division=zd)
    assert float(steps.finish_eval(sums)["metric"]) == pytest.approx(want, abs=1e-6)

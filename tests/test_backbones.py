"""Backbones: the registry and import paths, training, orbax export/restore, pooling of taps."""

import hashlib
import json
import math
import os
import pathlib
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bmnas_jax.data import backbones as bb
from bmnas_jax.data import pooling
from bmnas_jax.data.source import InputSpec
from bmnas_jax.errors import ConfigError

VEC = InputSpec((7,), "float32")


class BNNet(nn.Module):
  """A test backbone with BatchNorm and dropout (batch_stats and a dropout rng)."""
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.relu(nn.Dense(6)(x))
    h = nn.BatchNorm(use_running_average=not train, momentum=0.9)(h)
    h = nn.Dropout(0.3, deterministic=not train)(h)
    return nn.Dense(self.num_classes)(h), {"hidden": h}


def tree_digest(root: pathlib.Path) -> dict[str, str]:
  return {os.fspath(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def data(n, seed=0, classes=3, multi=False):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, classes, n)
  x = rng.normal(0, 1, (n, 7)).astype(np.float32)
  x[:, 0] += 2.0 * y
  return x, (np.eye(classes, dtype=np.float32)[y] if multi else y.astype(np.int32))


def test_registry_import_paths_and_kwargs():
  assert isinstance(bb.make_backbone("digit_cnn", {"num_classes": 4}), bb.DigitCNN)
  assert isinstance(bb.make_backbone("tests.test_backbones:BNNet"), BNNet)
  with pytest.raises(ConfigError, match=r"config.backbones.name='resnet'.*digit_cnn"):
    bb.make_backbone("resnet")
  with pytest.raises(ConfigError, match=r"kwargs: 'shape_mlp' has no field\(s\) \['depth'\]"):
    bb.make_backbone("shape_mlp", {"depth": 3})
  with pytest.raises(ConfigError, match="not a flax.linen.Module"):
    bb.make_backbone("tests.test_backbones:data")
  logits, taps = bb.output_shapes(bb.make_backbone("digit_cnn"), InputSpec((1, 16, 15), "uint8"))
  assert logits == [10] and taps == {"conv1": [8, 7, 16], "conv2": [4, 3, 32]}
  assert bb.output_shapes(bb.StackedFeatures(), InputSpec((3, 4, 8), "float32")) == (
      None, {"f1": [4, 8], "f2": [4, 8], "f3": [4, 8]})


def test_training_equals_a_plain_step_loop_and_selects_by_val():
  """The chunked, unrolled epochs (masked surplus steps) are exactly plain Adam steps."""
  module = bb.make_backbone("shape_mlp", {"num_classes": 3, "hidden": (8, 4)})
  x, y = data(70)                 # batch 10: 7 steps per epoch, not a multiple of 4
  xv, yv = data(30, seed=1)
  got, metrics = bb.train_backbone(module, VEC, (x, y), (xv, yv), seed=5, epochs=3,
                                   batch_size=10, lr=1e-2)
  tx = optax.adam(1e-2)
  key_init, key_shuffle = jax.random.split(jax.random.key(5))
  params = module.init({"params": key_init, "dropout": key_init}, x[:1])["params"]
  opt = tx.init(params)
  grad = jax.jit(jax.grad(lambda p, xb, yb: optax.softmax_cross_entropy_with_integer_labels(
      module.apply({"params": p}, xb)[0], yb).mean()))
  update = jax.jit(tx.update)
  history = []
  for e in range(3):
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(key_shuffle, e), 70))
    for s in range(7):
      idx = perm[10 * s:10 * (s + 1)]
      updates, opt = update(grad(params, x[idx], y[idx]), opt, params)
      params = optax.apply_updates(params, updates)
    acc = float(np.mean(np.argmax(module.apply({"params": params}, xv)[0], -1) == yv))
    history.append((acc, jax.device_get(params)))
  assert [h["val_metric"] for h in metrics["history"]] == pytest.approx([a for a, _ in history])
  best = int(np.argmax([a for a, _ in history]))
  assert metrics["best_epoch"] == best and metrics["metric"] == "accuracy"
  for a, b in zip(jax.tree.leaves(got["params"]), jax.tree.leaves(history[best][1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_batch_stats_dropout_and_multilabel_training(tmp_path):
  module = BNNet()
  x, y = data(60, multi=True)
  xv, yv = data(20, seed=1, multi=True)
  variables, metrics = bb.train_backbone(module, VEC, (x, y), (xv, yv), label_kind="multi",
                                         seed=0, epochs=2, batch_size=20, lr=1e-2)
  assert metrics["metric"] == "f1_weighted"
  init = bb.init_variables(module, VEC)
  assert not np.allclose(variables["batch_stats"]["BatchNorm_0"]["mean"],
                         init["batch_stats"]["BatchNorm_0"]["mean"])
  again, _ = bb.train_backbone(module, VEC, (x, y), (xv, yv), label_kind="multi", seed=0,
                               epochs=2, batch_size=20, lr=1e-2)
  assert bb.content_id(again) == bb.content_id(variables)          # deterministic
  meta = bb.export_backbone(tmp_path / "bn", "tests.test_backbones:BNNet", {}, module, VEC,
                            variables, {"note": "x"})
  restored, restored_meta = bb.restore_backbone(tmp_path / "bn", module, VEC)
  assert restored_meta == meta == json.loads((tmp_path / "bn" / bb.META_FILENAME).read_text())
  assert meta["taps"] == {"hidden": [6]} and meta["logits"] == [3]
  assert jax.tree.structure(restored) == jax.tree.structure(variables)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(a, b)


def test_bad_training_settings_name_the_key():
  module = bb.make_backbone("shape_mlp", {"num_classes": 3})
  x, y = data(20)
  with pytest.raises(ConfigError, match=r"config.backbones.A.batch_size=50.*20 examples"):
    bb.train_backbone(module, VEC, (x, y), (x, y), batch_size=50, where="config.backbones.A")
  with pytest.raises(ConfigError, match="epochs=0"):
    bb.train_backbone(module, VEC, (x, y), (x, y), epochs=0)


def test_corrupt_export_raises_and_good_export_survives(tmp_path):
  module = bb.make_backbone("shape_mlp", {"num_classes": 3})
  variables = bb.init_variables(module, VEC, seed=1)
  good = tmp_path / "good"
  bb.export_backbone(good, "shape_mlp", {"num_classes": 3}, module, VEC, variables,
                     {"val_accuracy": 0.5})
  before = tree_digest(good)
  bad = tmp_path / "bad_vars"
  shutil.copytree(good, bad)
  for f in (bad / bb.VARIABLES_DIRNAME).rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(b"\x00garbage" * 8)
  with pytest.raises(bb.BackboneError, match=str(bad)):
    bb.restore_backbone(bad, module, VEC)
  bad_meta = tmp_path / "bad_meta"
  shutil.copytree(good, bad_meta)
  (bad_meta / bb.META_FILENAME).write_text("{not json")
  with pytest.raises(bb.BackboneError, match=str(bad_meta)):
    bb.restore_backbone(bad_meta, module, VEC)
  no_vars = tmp_path / "no_vars"
  shutil.copytree(good, no_vars)
  shutil.rmtree(no_vars / bb.VARIABLES_DIRNAME)
  with pytest.raises(bb.BackboneError, match=str(no_vars / bb.VARIABLES_DIRNAME)):
    bb.restore_backbone(no_vars, module, VEC)
  with pytest.raises(bb.BackboneError, match="exported for input"):
    bb.restore_backbone(good, module, InputSpec((8,), "float32"))
  with pytest.raises(bb.BackboneError, match=str(tmp_path / "absent")):
    bb.restore_backbone(tmp_path / "absent", module, VEC)

  wrong = jax.tree.map(lambda a: a[..., :1], variables)
  with pytest.raises(bb.BackboneError, match="do not fit"):
    bb.export_backbone(good, "shape_mlp", {}, module, VEC, wrong)
  with pytest.raises(bb.BackboneError, match="JSON"):
    bb.export_backbone(good, "shape_mlp", {}, module, VEC, variables, {"when": object()})

  def failing_save(self, *args, **kwargs):
    raise OSError("disk full")

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(bb.ocp.StandardCheckpointer, "save", failing_save)
    with pytest.raises(bb.BackboneError, match="disk full"):
      bb.export_backbone(good, "shape_mlp", {}, module, VEC, variables)
  assert tree_digest(good) == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["bad_meta", "bad_vars", "good",
                                                        "no_vars"]
  assert bb.restore_backbone(good, module, VEC)[1]["val_accuracy"] == 0.5


# ------------------------------------------------------------------ pooling

def torch_rule_max_pool(x: np.ndarray, out: tuple[int, ...]) -> np.ndarray:
  """Reference: PyTorch's adaptive max pooling over the leading axes of `x` [*S, C]."""
  result = np.empty((*out, x.shape[-1]), x.dtype)
  for pos in np.ndindex(*out):
    sl = tuple(slice(math.floor(i * s / o), math.ceil((i + 1) * s / o))
               for i, s, o in zip(pos, x.shape[:-1], out))
    result[pos] = x[sl].reshape(-1, x.shape[-1]).max(axis=0)
  return result


@pytest.mark.parametrize("shape,length", [((2, 5), 1), ((2, 5), 3), ((2, 8, 5), 8),
                                          ((2, 7, 5), 3), ((2, 3, 5), 8), ((2, 8, 7, 3), 4),
                                          ((1, 8, 4, 4, 6), 3), ((2, 6, 5, 3, 2), 8)])
def test_first_pooling_matches_the_release(shape, length):
  """`first`: view as [C, T, rest] and AdaptiveMaxPool2d((L, 1)) (ReshapeInputLayer)."""
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  got = np.asarray(pooling.pool_tap(x, length, "first"))
  assert got.shape == (shape[0], shape[-1], length)
  for i in range(shape[0]):
    xi = x[i] if x.ndim > 2 else x[i][None]
    flat = xi.reshape(xi.shape[0], -1, xi.shape[-1])               # [T, rest, C]
    want = torch_rule_max_pool(flat, (length, 1))[:, 0]            # [L, C]
    np.testing.assert_array_equal(got[i], want.T)


@pytest.mark.parametrize("shape,length", [((2, 8, 7, 3), 4), ((2, 4, 3, 5), 4),
                                          ((3, 7, 5, 2), 9), ((2, 32, 20, 4), 16),
                                          ((2, 6), 4)])
def test_grid_pooling_matches_the_release(shape, length):
  """`grid`: AdaptiveMaxPool2d((g, g)) flattened row-major (ReshapeInputLayer_MMIMDB)."""
  x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
  got = np.asarray(pooling.pool_tap(x, length, "grid"))
  g = math.isqrt(length)
  assert got.shape == (shape[0], shape[-1], length)
  for i in range(shape[0]):
    xi = x[i] if x.ndim == 4 else x[i][None, None]
    want = torch_rule_max_pool(xi, (g, g)).reshape(g * g, -1)
    np.testing.assert_array_equal(got[i], want.T)


def test_pooling_rejects_what_it_cannot_pool():
  assert pooling.adaptive_bins(3, 2) == [(0, 2), (1, 3)]
  assert pooling.adaptive_bins(2, 4) == [(0, 1), (0, 1), (1, 2), (1, 2)]
  with pytest.raises(ValueError, match="square"):
    pooling.check_tap([4, 4, 8], 8, "grid")
  with pytest.raises(ValueError, match="first"):
    pooling.check_tap([8, 4, 4, 8], 4, "grid")
  with pytest.raises(ValueError, match="pool mode"):
    pooling.check_tap([8], 1, "mean")
  assert pooling.check_tap([8, 4, 4, 16], 8, "first") == (16, 8)
  assert jnp.asarray(pooling.pool_tap(np.ones((1, 3), np.float16), 1, "first")).dtype == jnp.float32

"""Unimodal backbones: Flax models with tapped layers, their training, orbax export and restore."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import time
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from bmnas_jax.checkpoint import swap_dir_into_place

FORMAT = "bmnas-backbone/1"
PARAMS_DIRNAME = "params"
META_FILENAME = "meta.json"
# Backbones with `unroll_epochs = True` (convolutional ones) unroll the scan over an
# epoch's batches when it has at most this many: XLA:CPU runs convolutions inside a
# loop body several times slower than unrolled (about 4x at the default optimization
# level, 30-60x at level 0). Dense-only backbones keep the loop (it compiles faster).
UNROLL_MAX_BATCHES = 32
_META_KEYS = ("format", "name", "config", "input_shape", "num_classes", "taps", "content_id")


class BackboneError(ValueError):
  """A backbone export is missing, unreadable or inconsistent (the message names the path)."""


class DigitCNN(nn.Module):
  """A small CNN for one-channel digit images.

  conv 3x3 (`features[0]`) -> ReLU -> max-pool 2 -> conv 3x3 (`features[1]`) ->
  ReLU -> max-pool 2 -> flatten -> dense to classes. Convs use SAME
  padding, pools VALID (a 16x15 image gives 8x7, then 4x3).

  Taps: `conv1`, `conv2`, the outputs of the two conv blocks (after pooling),
  float32 `[n, H, W, C]`.
  """
  num_classes: int = 10
  features: tuple[int, ...] = (16, 32)
  input_shape: tuple[int, ...] = (1, 16, 15)
  unroll_epochs = True              # see UNROLL_MAX_BATCHES (a class attribute, not a field)

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Args: x: float32 `[n, C_img, H, W]` (NCHW). Returns: logits `[n, classes]`, taps."""
    if x.shape[1:] != tuple(self.input_shape):
      raise ValueError(f"digit_cnn: input has shape {x.shape}, expected [n, "
                       f"{', '.join(map(str, self.input_shape))}]")
    h = jnp.transpose(x, (0, 2, 3, 1))
    taps = {}
    for k, width in enumerate(self.features):
      h = nn.Conv(width, (3, 3), padding="SAME", name=f"conv{k + 1}")(h)
      h = nn.max_pool(nn.relu(h), (2, 2), strides=(2, 2), padding="VALID")
      taps[f"conv{k + 1}"] = h
    logits = nn.Dense(self.num_classes, name="head")(h.reshape(h.shape[0], -1))
    return logits, taps


class ShapeMLP(nn.Module):
  """An MLP for a vector of shape descriptors.

  dense (`hidden[0]`) -> ReLU -> dense (`hidden[1]`) -> ReLU -> dense to classes.

  Taps: `hidden1`, `hidden2`, the hidden layers after ReLU, float32 `[n, C]`.
  """
  num_classes: int = 10
  hidden: tuple[int, ...] = (128, 64)
  input_shape: tuple[int, ...] = (129,)
  unroll_epochs = False

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Args: x: float32 `[n, D]`. Returns: logits `[n, classes]`, taps."""
    if x.shape[1:] != tuple(self.input_shape):
      raise ValueError(f"shape_mlp: input has shape {x.shape}, expected [n, "
                       f"{', '.join(map(str, self.input_shape))}]")
    h = x
    taps = {}
    for k, width in enumerate(self.hidden):
      h = nn.relu(nn.Dense(width, name=f"hidden{k + 1}")(h))
      taps[f"hidden{k + 1}"] = h
    return nn.Dense(self.num_classes, name="head")(h), taps


BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "digit_cnn": DigitCNN,
    "shape_mlp": ShapeMLP,
}


def make_backbone(name: str, **config: Any) -> nn.Module:
  """The backbone `name` built with `config` (constructor fields; lists become tuples)."""
  if name not in BACKBONES:
    raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)}")
  cls = BACKBONES[name]
  fields = backbone_config(cls())
  unknown = sorted(set(config) - set(fields))
  if unknown:
    raise ValueError(f"backbone {name!r} has no fields {unknown}; fields: {sorted(fields)}")
  config = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in config.items()}
  return cls(**config)


def backbone_config(module: nn.Module) -> dict[str, Any]:
  """The constructor fields of a backbone, as JSON-ready values (tuples -> lists)."""
  out = {}
  for field in dataclasses.fields(module):
    if field.name in ("parent", "name"):
      continue
    value = getattr(module, field.name)
    out[field.name] = list(value) if isinstance(value, tuple) else value
  return out


def backbone_name(module: nn.Module) -> str:
  """The `BACKBONES` key of a backbone instance."""
  for name, cls in BACKBONES.items():
    if type(module) is cls:
      return name
  raise ValueError(f"{type(module).__name__} is not a registered backbone; valid: "
                   f"{', '.join(BACKBONES)}")


def init_params(module: nn.Module, seed: int = 0):
  """Initial `params` of `module` (one compiled program)."""
  x = jnp.zeros((1, *module.input_shape), jnp.float32)
  return jax.jit(lambda k: module.init(k, x)["params"])(jax.random.key(seed))


def tap_shapes(module: nn.Module) -> dict[str, list[int]]:
  """Tap name -> per-example shape (without the batch axis), in tap order."""
  x = jax.ShapeDtypeStruct((1, *module.input_shape), jnp.float32)
  variables = jax.eval_shape(module.init, jax.random.key(0), x)
  _, taps = jax.eval_shape(module.apply, variables, x)
  return {k: list(v.shape[1:]) for k, v in taps.items()}


# ------------------------------------------------------------------ training

def _num_correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.sum(jnp.argmax(logits, -1) == labels)


@functools.lru_cache(maxsize=16)
def _epoch_fn(module: nn.Module, batch_size: int, lr: float, unroll: bool) -> Callable:
  """One compiled epoch: shuffled batches under `lax.scan`, then correct val predictions."""
  tx = optax.adam(lr)

  def loss_fn(params, x, y):
    logits, _ = module.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(carry, idx):
    params, opt_state, x_all, y_all = carry
    loss, grads = jax.value_and_grad(loss_fn)(params, x_all[idx], y_all[idx])
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state, x_all, y_all), loss

  @jax.jit
  def epoch(params, opt_state, key, x_tr, y_tr, x_val, y_val):
    n = y_tr.shape[0]
    nb = n // batch_size
    perm = jax.random.permutation(key, n)[:nb * batch_size].reshape(nb, batch_size)
    (params, opt_state, _, _), losses = jax.lax.scan(
        step, (params, opt_state, x_tr, y_tr), perm, unroll=unroll)
    logits, _ = module.apply({"params": params}, x_val)
    return params, opt_state, losses.mean(), _num_correct(logits, y_val)

  return tx, epoch


def train_backbone(name: str, inputs_train: np.ndarray, labels_train: np.ndarray,
                   inputs_val: np.ndarray, labels_val: np.ndarray, seed: int = 0,
                   epochs: int = 20, batch_size: int = 64, lr: float = 1e-3,
                   config: Mapping[str, Any] | None = None, progress: bool = False):
  """Trains a backbone with Adam and keeps the epoch with the best val accuracy.

  The train split sits on the device; each epoch is one compiled call that
  permutes it with a key folded from `seed` and the epoch, scans over the full
  batches (the remainder is dropped; see `UNROLL_MAX_BATCHES` for when the scan
  is unrolled) and scores the whole val split. The test split is never seen.
  The same seed gives the same params on CPU.

  Args:
    name: a key of `BACKBONES`.
    inputs_train: float32 `[n_train, *input_shape]`.
    labels_train: int `[n_train]` class ids.
    inputs_val: float32 `[n_val, *input_shape]`.
    labels_val: int `[n_val]`.
    seed: seeds the initialization and the shuffling.
    epochs: training epochs.
    batch_size: examples per step.
    lr: Adam learning rate.
    config: backbone constructor fields (e.g. `num_classes`).
    progress: show a tqdm bar over epochs.

  Returns:
    `(params, metrics)`: the params of the selected epoch, and `val_accuracy`,
    `best_epoch` (from 0), `epochs`, `seconds` and `history` (per epoch
    `train_loss`, `val_accuracy`).
  """
  module = make_backbone(name, **dict(config or {}))
  if not isinstance(epochs, int) or epochs < 1:
    raise ValueError(f"train_backbone({name!r}): epochs={epochs!r} must be a positive int")
  n = int(np.shape(labels_train)[0])
  if not 1 <= batch_size <= n:
    raise ValueError(f"train_backbone({name!r}): batch_size={batch_size} must lie in [1, {n}]")
  start = time.perf_counter()
  unroll = module.unroll_epochs and n // batch_size <= UNROLL_MAX_BATCHES
  tx, epoch_fn = _epoch_fn(module, int(batch_size), float(lr), unroll)
  x_tr, y_tr, x_val, y_val = jax.device_put((
      np.asarray(inputs_train, np.float32), np.asarray(labels_train, np.int32),
      np.asarray(inputs_val, np.float32), np.asarray(labels_val, np.int32)))
  key_init, key_shuffle = jax.random.split(jax.random.key(seed))
  params = jax.jit(lambda k: module.init(k, x_tr[:1])["params"])(key_init)
  opt_state = tx.init(params)
  best_params, best_acc, best_epoch, history = params, -1.0, -1, []
  epochs_iter = range(epochs)
  if progress:
    import tqdm
    epochs_iter = tqdm.tqdm(epochs_iter, desc=f"train {name}", leave=False)
  for e in epochs_iter:
    params, opt_state, loss, correct = epoch_fn(
        params, opt_state, jax.random.fold_in(key_shuffle, e), x_tr, y_tr, x_val, y_val)
    loss, acc = float(loss), int(correct) / y_val.shape[0]
    if not np.isfinite(loss):
      raise FloatingPointError(f"train_backbone({name!r}): train loss is {loss} at epoch {e}")
    history.append({"epoch": e, "train_loss": loss, "val_accuracy": acc})
    if acc > best_acc:
      best_params, best_acc, best_epoch = params, acc, e
  best_params = jax.device_get(best_params)
  metrics = {"val_accuracy": best_acc, "best_epoch": best_epoch, "epochs": epochs,
             "seconds": time.perf_counter() - start, "history": history}
  return best_params, metrics


def predict(module: nn.Module, params, inputs: np.ndarray, batch_size: int = 500) -> np.ndarray:
  """Logits float32 `[n, classes]`, in fixed-size (zero-padded) batches."""
  fn = _apply_fn(module)
  inputs = np.asarray(inputs, np.float32)
  out = [np.asarray(fn(params, batch)[0][:size])
         for batch, size in fixed_batches(inputs, batch_size)]
  return np.concatenate(out)


def accuracy(module: nn.Module, params, inputs: np.ndarray, labels: np.ndarray) -> float:
  """Fraction of `inputs` `[n, ...]` whose argmax logit is `labels` `[n]`."""
  logits = predict(module, params, inputs)
  return float(np.mean(np.argmax(logits, -1) == np.asarray(labels)))


@functools.lru_cache(maxsize=16)
def _apply_fn(module: nn.Module) -> Callable:
  return jax.jit(lambda params, x: module.apply({"params": params}, x))


def fixed_batches(inputs: np.ndarray, batch_size: int):
  """Yields `(batch [batch_size, ...], real rows)`; the last batch is zero-padded."""
  n = inputs.shape[0]
  batch_size = max(1, min(int(batch_size), n))
  for start in range(0, n, batch_size):
    batch = inputs[start:start + batch_size]
    size = batch.shape[0]
    if size < batch_size:
      pad = np.zeros((batch_size - size, *inputs.shape[1:]), inputs.dtype)
      batch = np.concatenate([batch, pad])
    yield batch, size


# ------------------------------------------------------------ export / restore

def content_id(params) -> str:
  """`sha256:<hex>` over every leaf's path, dtype, shape and bytes (the checkpoint id)."""
  digest = hashlib.sha256()
  leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    arr = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{jax.tree_util.keystr(path)}|{arr.dtype.str}|{arr.shape}|".encode())
    digest.update(arr.tobytes())
  return "sha256:" + digest.hexdigest()


def _check_params(module: nn.Module, params, where: str) -> None:
  """`params` must have the module's tree structure, shapes, float32 and finite values."""
  want = jax.eval_shape(lambda: init_params(module))
  want_paths = {jax.tree_util.keystr(p): tuple(v.shape)
                for p, v in jax.tree_util.tree_flatten_with_path(want)[0]}
  have_paths = {jax.tree_util.keystr(p): tuple(np.shape(v))
                for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  if want_paths != have_paths:
    raise BackboneError(f"{where}: params do not fit the backbone: expected {want_paths}, "
                        f"got {have_paths}")
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    arr = np.asarray(leaf)
    if arr.dtype != np.float32 or not np.all(np.isfinite(arr)):
      raise BackboneError(f"{where}: param {jax.tree_util.keystr(path)} must be finite "
                          f"float32, got {arr.dtype}")


def export_backbone(directory: str | os.PathLike, name: str, params,
                    meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Saves a trained backbone as an orbax checkpoint plus `meta.json`.

  Layout: `directory/params/` (orbax `StandardCheckpointer`) and
  `directory/meta.json`. Everything is written into a temporary folder next to
  `directory` and renamed into place only once complete, so a failure leaves an
  earlier export at `directory` as it was.

  Args:
    directory: the export folder (created or replaced).
    name: a key of `BACKBONES`.
    params: the backbone's `params` tree.
    meta: extra JSON fields (e.g. `val_accuracy`, `test_accuracy`, `modality`);
      `meta['config']`, if present, holds the constructor fields.

  Returns:
    The stored meta: `format`, `name`, `config`, `input_shape`, `num_classes`,
    `taps` (name -> per-example shape, in tap order), `content_id` (the
    backbone checkpoint id, see `content_id`) and the given fields.

  Raises:
    BackboneError: params that do not fit the backbone, meta that is not JSON,
      or a failed save; the message names `directory`.
  """
  directory = pathlib.Path(directory).absolute()
  extra = dict(meta or {})
  try:
    module = make_backbone(name, **dict(extra.pop("config", None) or {}))
  except ValueError as e:
    raise BackboneError(f"exporting to {directory}: {e}") from e
  params = jax.device_get(params)
  _check_params(module, params, f"exporting to {directory}")
  stored = {"format": FORMAT, "name": name, "config": backbone_config(module),
            "input_shape": list(module.input_shape), "num_classes": module.num_classes,
            "taps": tap_shapes(module), "content_id": content_id(params)}
  clash = sorted(set(extra) & set(stored))
  if clash:
    raise BackboneError(f"exporting to {directory}: meta keys {clash} are reserved")
  stored.update(extra)
  try:
    text = json.dumps(stored, indent=1, allow_nan=False) + "\n"
  except (TypeError, ValueError) as e:
    raise BackboneError(f"exporting to {directory}: meta is not JSON-serializable: {e}") from e
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
  try:
    tmp.chmod(0o755)                  # mkdtemp makes it private; exports are shared folders
    checkpointer = ocp.StandardCheckpointer()
    try:
      checkpointer.save(tmp / PARAMS_DIRNAME, params)
      checkpointer.wait_until_finished()
    finally:
      checkpointer.close()
    (tmp / META_FILENAME).write_text(text)
    swap_dir_into_place(tmp, directory)
  except BackboneError:
    raise
  except Exception as e:  # orbax and the filesystem raise many types.
    raise BackboneError(f"exporting to {directory}: saving failed: {e!r}") from e
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return stored


def read_backbone_meta(directory: str | os.PathLike) -> dict[str, Any]:
  """The checked `meta.json` of an export (no params are read)."""
  directory = pathlib.Path(directory).absolute()
  path = directory / META_FILENAME
  if not directory.is_dir():
    raise BackboneError(f"backbone export {directory} does not exist")
  try:
    meta = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise BackboneError(f"backbone export {directory}: {path} is missing or unreadable: "
                        f"{e}") from e
  if not isinstance(meta, dict):
    raise BackboneError(f"backbone export {directory}: {path} does not hold a JSON object")
  missing = [k for k in _META_KEYS if k not in meta]
  if missing:
    raise BackboneError(f"backbone export {directory}: {path} lacks keys {missing}")
  if meta["format"] != FORMAT:
    raise BackboneError(f"backbone export {directory}: {path} has format {meta['format']!r}, "
                        f"expected {FORMAT!r}")
  return meta


def restore_backbone(directory: str | os.PathLike):
  """Restores an export written by `export_backbone` from disk.

  Returns:
    `(module, params, meta)`; params are numpy arrays whose `content_id` is
    checked against the meta.

  Raises:
    BackboneError: the export is missing, unreadable, of an unknown backbone,
      does not fit its backbone, or its params differ from its content id; the
      message names the path.
  """
  directory = pathlib.Path(directory).absolute()
  meta = read_backbone_meta(directory)
  try:
    module = make_backbone(meta["name"], **dict(meta["config"]))
  except (ValueError, TypeError) as e:
    raise BackboneError(f"backbone export {directory}: {e}") from e
  params_dir = directory / PARAMS_DIRNAME
  if not params_dir.is_dir():
    raise BackboneError(f"backbone export {directory}: checkpoint {params_dir} is missing")
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          jax.eval_shape(lambda: init_params(module)))
  checkpointer = ocp.StandardCheckpointer()
  try:
    params = checkpointer.restore(params_dir, abstract)
  except Exception as e:  # orbax/tensorstore raise many types for bad files.
    raise BackboneError(f"backbone export {directory}: cannot restore checkpoint "
                        f"{params_dir}: {e!r}") from e
  finally:
    checkpointer.close()
  params = jax.device_get(params)
  _check_params(module, params, f"backbone export {directory}")
  got = content_id(params)
  if got != meta["content_id"]:
    raise BackboneError(f"backbone export {directory}: restored params have content id {got}, "
                        f"{META_FILENAME} says {meta['content_id']} (corrupt checkpoint)")
  if tap_shapes(module) != meta["taps"]:
    raise BackboneError(f"backbone export {directory}: {META_FILENAME} taps {meta['taps']} "
                        f"differ from the backbone's {tap_shapes(module)}")
  return module, params, meta

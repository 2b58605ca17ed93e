"""Unimodal backbones: the registry, training on the train split, orbax export and restore.

A backbone is a Flax module called as `module.apply(variables, x, train=False)`
that returns `(logits [n, K] or None, {tap name: [n, ..., C]})`: its own
prediction (None for a backbone without a classifier) and the named
intermediate outputs, channels last, that the prepare stage pools into input
nodes. `config.backbones.<Modality>.name` is a key of `BACKBONES` or an import
path `package.module:Class`; its constructor takes `config.backbones.<Modality>.kwargs`.
"""

from __future__ import annotations

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

from bmnas_jax import metrics as metrics_lib
from bmnas_jax.checkpoint import swap_dir_into_place
from bmnas_jax.data.nets.hcn import HCN
from bmnas_jax.data.nets.maxout import MaxoutMLP
from bmnas_jax.data.nets.resnet3d import InflatedResNet50
from bmnas_jax.data.nets.resnext3d import ResNeXt3D
from bmnas_jax.data.nets.vgg import VGG19
from bmnas_jax.data.source import InputSpec, resolve
from bmnas_jax.errors import ConfigError, DataError
from bmnas_jax.steps import loss_fn

FORMAT = "bmnas-backbone/2"
VARIABLES_DIRNAME = "variables"
META_FILENAME = "meta.json"
# Training steps per compiled call. XLA:CPU runs convolution gradients inside a
# while loop (`lax.scan`) many times slower than the same steps unrolled, so an
# epoch is a host loop over calls of this many unrolled steps (the last call's
# surplus steps are masked no-ops): one compiled shape whatever the epoch length.
STEPS_PER_CALL = 4
_META_KEYS = ("format", "backbone", "kwargs", "input", "taps", "content_id")


class BackboneError(DataError):
  """A backbone export is missing, unreadable or inconsistent (the message names the path)."""


# ------------------------------------------------------------------ modules

class DigitCNN(nn.Module):
  """A small CNN for one-channel images.

  conv 3x3 (`features[0]`) -> ReLU -> max-pool 2 -> conv 3x3 (`features[1]`) ->
  ReLU -> max-pool 2 -> flatten -> dense to classes. Convs use SAME padding,
  pools VALID (a 16x15 image gives 8x7, then 4x3).

  Taps: `conv1`, `conv2`, the outputs of the two conv blocks (after pooling),
  float32 `[n, H, W, C]`.
  """
  num_classes: int = 10
  features: tuple[int, ...] = (16, 32)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    """Args: x: `[n, C_img, H, W]` (NCHW). Returns: logits `[n, classes]`, taps."""
    del train
    h = jnp.transpose(jnp.asarray(x, jnp.float32), (0, 2, 3, 1))
    taps = {}
    for k, width in enumerate(self.features):
      h = nn.Conv(width, (3, 3), padding="SAME", name=f"conv{k + 1}")(h)
      h = nn.max_pool(nn.relu(h), (2, 2), strides=(2, 2), padding="VALID")
      taps[f"conv{k + 1}"] = h
    logits = nn.Dense(self.num_classes, name="head")(h.reshape(h.shape[0], -1))
    return logits, taps


class ShapeMLP(nn.Module):
  """An MLP for a feature vector.

  dense (`hidden[0]`) -> ReLU -> dense (`hidden[1]`) -> ReLU -> dense to classes.

  Taps: `hidden1`, `hidden2`, the hidden layers after ReLU, float32 `[n, C]`.
  """
  num_classes: int = 10
  hidden: tuple[int, ...] = (128, 64)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    """Args: x: `[n, D]`. Returns: logits `[n, classes]`, taps."""
    del train
    h = jnp.asarray(x, jnp.float32)
    taps = {}
    for k, width in enumerate(self.hidden):
      h = nn.relu(nn.Dense(width, name=f"hidden{k + 1}")(h))
      taps[f"hidden{k + 1}"] = h
    return nn.Dense(self.num_classes, name="head")(h), taps


class StackedFeatures(nn.Module):
  """No weights: an input `[F, L, C]` of F ready-made features; tap `f<k>` is feature k
  `[L, C]` (k from 1). For data whose modalities already are features (no classifier:
  logits are None)."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    del train
    x = jnp.asarray(x, jnp.float32)
    return None, {f"f{k + 1}": x[:, k] for k in range(x.shape[1])}


BACKBONES: dict[str, type[nn.Module]] = {
    "digit_cnn": DigitCNN,
    "shape_mlp": ShapeMLP,
    "stacked_features": StackedFeatures,
    "vgg19": VGG19,
    "maxout_mlp": MaxoutMLP,
    "inflated_resnet50": InflatedResNet50,
    "hcn": HCN,
    "resnext3d": ResNeXt3D,
}


def make_backbone(name: str, kwargs: Mapping[str, Any] | None = None,
                  key: str = "config.backbones") -> nn.Module:
  """The backbone `name` (a `BACKBONES` key or `package.module:Class`) built with `kwargs`.

  Lists in `kwargs` become tuples. Errors name `key` (the config entry).
  """
  cls = resolve(name, BACKBONES, f"{key}.name")
  if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
    raise ConfigError(f"{key}.name={name!r} is not a flax.linen.Module class")
  kwargs = {k: tuple(v) if isinstance(v, (list, tuple)) else v
            for k, v in dict(kwargs or {}).items()}
  fields = [f for f in cls.__dataclass_fields__ if f not in ("parent", "name")]
  unknown = sorted(set(kwargs) - set(fields))
  if unknown:
    raise ConfigError(f"{key}.kwargs: {name!r} has no field(s) {unknown}; fields: {fields}")
  return cls(**kwargs)


def _sample(spec: InputSpec, n: int = 1) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((n, *spec.shape), np.dtype(spec.dtype))


def abstract_variables(module: nn.Module, spec: InputSpec):
  """The variables' shapes and dtypes (`{'params': ..., ['batch_stats': ...]}`)."""
  return jax.eval_shape(lambda k, x: module.init(k, x, train=False), jax.random.key(0),
                        _sample(spec))


def output_shapes(module: nn.Module, spec: InputSpec) -> tuple[list[int] | None,
                                                               dict[str, list[int]]]:
  """`(logits shape or None, {tap: per-example shape})`, without computing anything."""
  variables = abstract_variables(module, spec)
  logits, taps = jax.eval_shape(lambda v, x: module.apply(v, x, train=False), variables,
                                _sample(spec))
  return (None if logits is None else list(logits.shape[1:]),
          {k: list(v.shape[1:]) for k, v in taps.items()})


def init_variables(module: nn.Module, spec: InputSpec, seed: int = 0):
  """Initial variables of `module` for inputs like `spec` (one compiled program)."""
  x = jnp.zeros((1, *spec.shape), np.dtype(spec.dtype))
  init = jax.jit(lambda k: module.init({"params": k, "dropout": k}, x, train=False))
  return jax.device_get(init(jax.random.key(seed)))


# ------------------------------------------------------------------ training

@functools.lru_cache(maxsize=16)
def apply_fn(module: nn.Module) -> Callable:
  """Compiled `(variables, x [b, ...]) -> (logits, taps)` in inference mode."""
  return jax.jit(lambda variables, x: module.apply(variables, x, train=False))


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


def predict(module: nn.Module, variables, inputs: np.ndarray,
            batch_size: int = 256) -> np.ndarray | None:
  """Logits float32 `[n, K]` (None for a backbone without a classifier)."""
  fn = apply_fn(module)
  out = []
  for batch, size in fixed_batches(np.asarray(inputs), batch_size):
    logits, _ = fn(variables, batch)
    if logits is None:
      return None
    out.append(np.asarray(logits[:size]))
  return np.concatenate(out)


def score(logits: np.ndarray, labels: np.ndarray, label_kind: str,
          threshold: float = 0.3) -> tuple[str, float]:
  """`('accuracy', value)` for single-label data, `('f1_weighted', value)` at
  `threshold` for multi-label data."""
  metric = "accuracy" if label_kind == "single" else "f1_weighted"
  return metric, metrics_lib.score(logits, labels, metric, threshold)


@functools.lru_cache(maxsize=16)
def _train_call(module: nn.Module, label_kind: str, lr: float, steps: int) -> tuple[Any, Callable]:
  """`(tx, call)`: `call(variables, opt_state, x, y, idx [steps, B], valid [steps], key,
  offset) -> (variables, opt_state, loss sum)`, `steps` unrolled training steps."""
  tx = optax.adam(lr)
  loss = loss_fn(label_kind)

  def one_step(variables, opt_state, x, y, key):
    rest = {k: v for k, v in variables.items() if k != "params"}

    def objective(params):
      out, updated = module.apply({"params": params, **rest}, x, train=True,
                                  rngs={"dropout": key}, mutable=list(rest))
      return loss(out[0], y), updated

    (value, updated), grads = jax.value_and_grad(objective, has_aux=True)(variables["params"])
    updates, opt_state = tx.update(grads, opt_state, variables["params"])
    return {**variables, **updated,
            "params": optax.apply_updates(variables["params"], updates)}, opt_state, value

  @jax.jit
  def call(variables, opt_state, x, y, idx, valid, key, offset):
    total = jnp.float32(0)
    for s in range(steps):
      new_vars, new_opt, value = one_step(variables, opt_state, x[idx[s]], y[idx[s]],
                                          jax.random.fold_in(key, offset + s))
      keep = lambda new, old, s=s: jax.tree.map(lambda a, b: jnp.where(valid[s], a, b), new, old)
      variables, opt_state = keep(new_vars, variables), keep(new_opt, opt_state)
      total = total + jnp.where(valid[s], value, 0.0)
    return variables, opt_state, total

  return tx, call


def train_backbone(module: nn.Module, spec: InputSpec, train: tuple[np.ndarray, np.ndarray],
                   val: tuple[np.ndarray, np.ndarray], *, label_kind: str = "single",
                   threshold: float = 0.3, seed: int = 0, epochs: int = 20,
                   batch_size: int = 64, lr: float = 1e-3, where: str = "backbone",
                   progress: bool = False):
  """Trains a backbone with Adam and keeps the epoch with the best val metric.

  The train split sits on the device; each epoch permutes it with a key folded
  from `seed` and the epoch and runs its full batches (the remainder is
  dropped) in calls of `STEPS_PER_CALL` compiled steps; the val split is then
  scored (accuracy, or weighted F1 at `threshold` for multi-label data). The
  test split is never seen. The same seed gives the same variables on CPU.

  Args:
    module: the backbone.
    spec: its input spec.
    train, val: `(inputs [n, *spec.shape], labels [n] or [n, K])`.
    label_kind: `single` (softmax cross-entropy) or `multi` (sigmoid BCE).
    where: the config key named in errors.

  Returns:
    `(variables, metrics)`: the variables of the selected epoch, and
    `val_metric`, `metric`, `best_epoch` (from 0), `epochs`, `seconds`, `history`
    (per epoch `train_loss`, `val_metric`).
  """
  x_tr, y_tr = train
  n = int(np.shape(y_tr)[0])
  if not isinstance(epochs, int) or epochs < 1:
    raise ConfigError(f"{where}.epochs={epochs!r} must be a positive int")
  if not isinstance(batch_size, int) or not 1 <= batch_size <= n:
    raise ConfigError(f"{where}.batch_size={batch_size!r} must be an int in [1, {n}] (the "
                      f"train split has {n} examples)")
  start = time.perf_counter()
  tx, call = _train_call(module, label_kind, float(lr), STEPS_PER_CALL)
  y_dtype = np.int32 if label_kind == "single" else np.float32
  x_dev, y_dev = jax.device_put((np.asarray(x_tr), np.asarray(y_tr, y_dtype)))
  key_init, key_shuffle = jax.random.split(jax.random.key(seed))
  variables = jax.jit(lambda k: module.init({"params": k, "dropout": k}, x_dev[:1],
                                            train=False))(key_init)
  opt_state = tx.init(variables["params"])
  nb = n // batch_size
  calls = -(-nb // STEPS_PER_CALL)
  valid = (np.arange(calls * STEPS_PER_CALL) < nb).reshape(calls, STEPS_PER_CALL)
  perm_fn = jax.jit(lambda k: jnp.pad(
      jax.random.permutation(k, n)[:nb * batch_size].reshape(nb, batch_size),
      ((0, calls * STEPS_PER_CALL - nb), (0, 0))).reshape(calls, STEPS_PER_CALL, batch_size))
  best, best_value, best_epoch, history, metric = variables, -1.0, -1, [], ""
  epoch_iter = range(epochs)
  if progress:
    import tqdm
    epoch_iter = tqdm.tqdm(epoch_iter, desc=f"train {where}", leave=False)
  for e in epoch_iter:
    key = jax.random.fold_in(key_shuffle, e)
    idx = perm_fn(key)
    total = 0.0
    for c in range(calls):
      variables, opt_state, part = call(variables, opt_state, x_dev, y_dev, idx[c], valid[c],
                                        key, c * STEPS_PER_CALL)
      total += part
    loss = float(total) / nb
    if not np.isfinite(loss):
      raise FloatingPointError(f"{where}: backbone train loss is {loss} at epoch {e}")
    metric, value = score(predict(module, variables, val[0]), val[1], label_kind, threshold)
    history.append({"epoch": e, "train_loss": loss, "val_metric": value})
    if value > best_value:
      best, best_value, best_epoch = variables, value, e
  return jax.device_get(best), {"val_metric": best_value, "metric": metric,
                                "best_epoch": best_epoch, "epochs": epochs,
                                "seconds": time.perf_counter() - start, "history": history}


# ------------------------------------------------------------ export / restore

def content_id(variables) -> str:
  """`sha256:<hex>` over every leaf's path, dtype, shape and bytes (the checkpoint id)."""
  digest = hashlib.sha256()
  leaves, _ = jax.tree_util.tree_flatten_with_path(variables)
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    arr = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{jax.tree_util.keystr(path)}|{arr.dtype.str}|{arr.shape}|".encode())
    digest.update(arr.tobytes())
  return "sha256:" + digest.hexdigest()


def check_variables(module: nn.Module, spec: InputSpec, variables, where: str) -> None:
  """`variables` must have the module's tree, shapes, dtypes and finite values."""
  want = {jax.tree_util.keystr(p): (tuple(v.shape), np.dtype(v.dtype))
          for p, v in jax.tree_util.tree_flatten_with_path(abstract_variables(module, spec))[0]}
  have = {jax.tree_util.keystr(p): (tuple(np.shape(v)), np.asarray(v).dtype)
          for p, v in jax.tree_util.tree_flatten_with_path(variables)[0]}
  if want.keys() != have.keys():
    raise BackboneError(f"{where}: variables do not fit the backbone: missing "
                        f"{sorted(want.keys() - have.keys())}, unexpected "
                        f"{sorted(have.keys() - want.keys())}")
  bad = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
  if bad:
    raise BackboneError(f"{where}: variables do not fit the backbone: (have, want) {bad}")
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    arr = np.asarray(leaf)
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
      raise BackboneError(f"{where}: variable {jax.tree_util.keystr(path)} has NaN/inf")


def export_backbone(directory: str | os.PathLike, name: str, kwargs: Mapping[str, Any],
                    module: nn.Module, spec: InputSpec, variables,
                    meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Saves a backbone's variables as an orbax checkpoint plus `meta.json`.

  Layout: `directory/variables/` (orbax `StandardCheckpointer`) and
  `directory/meta.json`. Everything is written into a temporary folder next to
  `directory` and renamed into place only once complete, so a failure leaves an
  earlier export at `directory` as it was.

  Args:
    directory: the export folder (created or replaced).
    name, kwargs: the backbone's config name and constructor kwargs (recorded).
    module, spec: the backbone and its input spec.
    variables: `{'params': ..., ['batch_stats': ...]}`.
    meta: extra JSON fields (e.g. accuracies, training settings).

  Returns:
    The stored meta: `format`, `backbone`, `kwargs`, `input`, `logits`, `taps`
    (name -> per-example shape, in tap order), `content_id` and the given fields.

  Raises:
    BackboneError: variables that do not fit the backbone, meta that is not
      JSON, or a failed save; the message names `directory`.
  """
  directory = pathlib.Path(directory).absolute()
  variables = jax.device_get(variables)
  check_variables(module, spec, variables, f"exporting to {directory}")
  logits, taps = output_shapes(module, spec)
  stored = {"format": FORMAT, "backbone": name, "kwargs": dict(kwargs), "input": spec.to_json(),
            "logits": logits, "taps": taps, "content_id": content_id(variables)}
  extra = dict(meta or {})
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
    if jax.tree.leaves(variables):    # orbax refuses an empty tree (a backbone without weights)
      checkpointer = ocp.StandardCheckpointer()
      try:
        checkpointer.save(tmp / VARIABLES_DIRNAME, variables)
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
  """The checked `meta.json` of an export (no variables are read)."""
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


def restore_variables(checkpoint: str | os.PathLike, module: nn.Module, spec: InputSpec,
                      where: str):
  """Restores a variables tree saved with orbax's `StandardCheckpointer` at `checkpoint`,
  shaped like the module's variables for inputs like `spec`; errors name `where`."""
  checkpoint = pathlib.Path(checkpoint).absolute()
  abstract = abstract_variables(module, spec)
  if not jax.tree.leaves(abstract):
    return abstract                   # a backbone without weights has nothing to restore
  if not checkpoint.is_dir():
    raise BackboneError(f"{where}: checkpoint {checkpoint} is missing")
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          abstract)
  checkpointer = ocp.StandardCheckpointer()
  try:
    variables = checkpointer.restore(checkpoint, abstract)
  except Exception as e:  # orbax/tensorstore raise many types for bad files.
    raise BackboneError(f"{where}: cannot restore checkpoint {checkpoint}: {e!r}") from e
  finally:
    checkpointer.close()
  variables = jax.device_get(variables)
  check_variables(module, spec, variables, where)
  return variables


def restore_backbone(directory: str | os.PathLike, module: nn.Module, spec: InputSpec):
  """Restores an export written by `export_backbone` for `module` (the caller's module:
  nothing in the export decides which code runs).

  Returns:
    `(variables, meta)`; the variables' content id is checked against the meta.

  Raises:
    BackboneError: the export is missing, unreadable, does not fit `module`, or
      its variables differ from its content id; the message names the path.
  """
  directory = pathlib.Path(directory).absolute()
  meta = read_backbone_meta(directory)
  where = f"backbone export {directory}"
  if meta["input"] != spec.to_json():
    raise BackboneError(f"{where}: exported for input {meta['input']}, the data give "
                        f"{spec.to_json()}")
  variables = restore_variables(directory / VARIABLES_DIRNAME, module, spec, where)
  got = content_id(variables)
  if got != meta["content_id"]:
    raise BackboneError(f"{where}: restored variables have content id {got}, "
                        f"{META_FILENAME} says {meta['content_id']} (corrupt checkpoint)")
  return variables, meta

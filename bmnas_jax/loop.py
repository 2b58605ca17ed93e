"""Device-resident splits, the device mesh, and whole epochs as scanned programs.

Every epoch is one compiled call: the split sits on the device, a per-epoch
permutation from the seed's key orders it, `lax.scan` runs the steps, and the
only host sync is the epoch's summary. Seeds ride a leading axis under `vmap`.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from bmnas_jax.checkpoint import Checkpointer
from bmnas_jax.data.feature_set import FeatureSet, Split
from bmnas_jax.steps import NONFINITE, Steps, TrainState

DATA, SEED = "data", "seed"


# ------------------------------------------------------------------ devices

def maybe_initialize_distributed(config) -> None:
  """`jax.distributed.initialize()` when `config.distributed` or the environment asks."""
  wanted = bool(config.get("distributed", False)) or os.environ.get("BMNAS_DISTRIBUTED") == "1"
  if wanted and jax.process_count() == 1:
    jax.distributed.initialize()


def make_mesh(num_devices: int | None = None, seed_shards: int = 1) -> Mesh:
  """A (`seed`, `data`) mesh over the first `num_devices` devices (all by default)."""
  devices = jax.devices()
  n = len(devices) if not num_devices else num_devices
  if n > len(devices):
    raise ValueError(f"config.devices={n} but only {len(devices)} devices are visible")
  if n % seed_shards:
    raise ValueError(f"config.seed_shards={seed_shards} does not divide {n} devices")
  return Mesh(np.asarray(devices[:n]).reshape(seed_shards, n // seed_shards), (SEED, DATA))


def mesh_from_config(config) -> Mesh:
  return make_mesh(config.get("devices", 0) or None, config.get("seed_shards", 1))


def replicate(tree, mesh: Mesh):
  return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_seeds(tree, mesh: Mesh):
  """Leading (seed) axis along the mesh's `seed` axis, the rest replicated."""
  return jax.device_put(tree, NamedSharding(mesh, P(SEED)))


# --------------------------------------------------------------------- data

def device_split(split: Split, mesh: Mesh) -> dict[str, Any]:
  """A split on the devices: `{'x': {node: [n, C_in, L_in]}, 'y': labels}` (replicated)."""
  return replicate({"x": {k: np.asarray(v, np.float32) for k, v in split.features.items()},
                    "y": np.asarray(split.labels)}, mesh)


def concat_splits(fs: FeatureSet, names) -> Split:
  """Concatenation of named splits (e.g. train+val for retraining)."""
  for n in names:
    if n not in fs.splits:
      raise ValueError(f"no split {n!r} in the features (config.evaluate.train_splits?); "
                       f"have {sorted(fs.splits)}")
  parts = [fs.splits[n] for n in names]
  return Split({k: np.concatenate([p.features[k] for p in parts]) for k in parts[0].features},
               np.concatenate([p.labels for p in parts]))


def num_batches(n: int, batch_size: int, key: str) -> int:
  """Full batches per epoch (training drops the remainder); errors name the config key."""
  if batch_size < 1:
    raise ValueError(f"{key}={batch_size} must be >= 1")
  if n < batch_size:
    raise ValueError(f"{key}={batch_size} is larger than the split ({n} samples)")
  return n // batch_size


def check_batch_divides(batch_size: int, mesh: Mesh, key: str) -> None:
  d = mesh.shape[DATA]
  if batch_size % d:
    raise ValueError(f"{key}={batch_size} must be divisible by the {d} devices of the "
                     f"mesh's data axis")


def take_batch(data, idx: jax.Array, mesh: Mesh):
  """Rows `idx` `[B]` of a device split, the batch axis sharded along `data`."""
  batch = jax.tree.map(lambda a: jnp.take(a, idx, axis=0), data)
  return jax.tree.map(
      lambda a: jax.lax.with_sharding_constraint(
          a, NamedSharding(mesh, P(DATA, *([None] * (a.ndim - 1))))), batch)


def shuffled_batches(key: jax.Array, n: int, batch_size: int, nb: int) -> jax.Array:
  """`[nb, batch_size]` row indices of a fresh permutation (remainder dropped)."""
  return jax.random.permutation(key, n)[:nb * batch_size].reshape(nb, batch_size)


# ------------------------------------------------------------------- epochs

def first_bad(bad: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(index of the first step with a non-finite quantity or -1, its code)."""
  hit = bad > 0
  idx = jnp.where(jnp.any(hit), jnp.argmax(hit), -1)
  return idx, jnp.where(idx >= 0, bad[jnp.maximum(idx, 0)], 0)


def scan_steps(step: Callable, state: TrainState, data, idx: jax.Array, key: jax.Array,
               mesh: Mesh):
  """Runs `step(state, batch, key)` over the rows `idx` `[nb, B]` with `lax.scan`.

  Returns (state, {'loss': mean loss, 'bad_step', 'bad_code'}).
  """
  def body(st, i):
    st, out = step(st, take_batch(data, idx[i], mesh), jax.random.fold_in(key, i))
    return st, out

  state, outs = jax.lax.scan(body, state, jnp.arange(idx.shape[0]))
  bad_step, bad_code = first_bad(outs["bad"])
  return state, {"loss": outs["loss"].mean(), "bad_step": bad_step, "bad_code": bad_code}


def evaluate_splits(steps: Steps, state: TrainState, data, sizes: tuple[int, ...],
                    batch_size: int, mesh: Mesh) -> list[dict[str, jax.Array]]:
  """{'loss', 'metric'} of each split, in order, from one scan over their batches.

  Args:
    data: the splits concatenated along the sample axis (`concat_splits`).
    sizes: the samples of each split, in that order; each split's last batch is
      padded (repeating its last row) and masked.
  Returns:
    One {'loss', 'metric'} per split. One scan body serves every split, so the
    evaluation is compiled once however many splits it covers.
  """
  rows, masks, sids, offset = [], [], [], 0
  for sid, n in enumerate(sizes):
    nb = -(-n // batch_size)
    r = np.arange(nb * batch_size).reshape(nb, batch_size)
    rows.append(offset + np.minimum(r, n - 1))
    masks.append(r < n)
    sids += [sid] * nb
    offset += n
  rows, masks = jnp.asarray(np.concatenate(rows)), jnp.asarray(np.concatenate(masks))
  sids = jnp.asarray(np.asarray(sids, np.int32))

  def out_of(i):
    return steps.eval_step(state, {**take_batch(data, rows[i], mesh), "mask": masks[i]})

  def body(sums, i):
    return jax.tree.map(lambda acc, o: acc.at[sids[i]].add(o), sums, out_of(i)), None

  zero = jax.tree.map(lambda a: jnp.zeros((len(sizes),) + a.shape, a.dtype),
                      jax.eval_shape(out_of, 0))
  sums, _ = jax.lax.scan(body, zero, jnp.arange(rows.shape[0]))
  return [steps.finish_eval(jax.tree.map(lambda a, k=k: a[k], sums)) for k in range(len(sizes))]


def describe_bad(phase: str, epoch: int, seeds: list[int], bad_step: np.ndarray,
                 bad_code: np.ndarray) -> None:
  """Raises FloatingPointError naming epoch, step, seed and quantity if any step diverged."""
  bad_step = np.atleast_1d(bad_step)
  for s, (st, code) in enumerate(zip(bad_step, np.atleast_1d(bad_code))):
    if st >= 0:
      raise FloatingPointError(
          f"divergence in {phase} at epoch {epoch}, step {int(st)} (seed {seeds[s]}): "
          f"non-finite {NONFINITE.get(int(code), 'value')}")


# ------------------------------------------------------- checkpointed loop

def run_epochs(stage_dir: str, fingerprint: dict, states: TrainState, epoch_fn: Callable,
               num_epochs: int, on_epoch: Callable, write_outputs: Callable,
               desc: str, extra0: dict) -> tuple[TrainState, list[dict], dict]:
  """The host loop over epochs, with an orbax checkpoint after each.

  Args:
    stage_dir: folder of the stage (checkpoints go to `stage_dir/checkpoints`).
    fingerprint: the config parts that must match to resume.
    states: freshly initialised (seed-batched) states; replaced by the checkpoint
      when one exists.
    epoch_fn: `(states, epoch) -> (states, device metrics)`, one compiled call.
    on_epoch: `(epoch, states, host metrics, seconds, extra) -> record` (may update extra).
    write_outputs: `(history, extra) -> None`, writes the stage's files (atomically);
      also called after a resume, so the files always match the checkpoint.
  Returns:
    (states, history of records, extra).
  """
  ckpt = Checkpointer(os.path.join(stage_dir, "checkpoints"))
  history, extra, start = [], dict(extra0), 0
  try:
    latest = ckpt.latest()
    if latest is not None:
      meta = ckpt.restore_meta(latest)
      if meta["fingerprint"] != fingerprint:
        changed = sorted(k for k in set(fingerprint) | set(meta["fingerprint"])
                         if fingerprint.get(k) != meta["fingerprint"].get(k))
        raise ValueError(f"{stage_dir} holds a checkpoint of a different config (keys "
                         f"{changed} differ); use a new --workdir or the same config")
      states = ckpt.restore_state(latest, states)
      history, extra, start = meta["history"], meta["extra"], latest + 1
      write_outputs(history, extra)
    bar = tqdm(range(start, num_epochs), desc=desc, initial=start, total=num_epochs,
               leave=False, disable=None)
    for epoch in bar:
      t0 = time.perf_counter()
      states, dev_metrics = epoch_fn(states, jnp.int32(epoch))
      host = jax.device_get(dev_metrics)
      record = on_epoch(epoch, states, host, time.perf_counter() - t0, extra)
      history.append(record)
      ckpt.save(epoch, states, {"fingerprint": fingerprint, "history": history, "extra": extra})
      write_outputs(history, extra)
  finally:
    ckpt.close()
  return states, history, extra

"""Device splits or streamed shard blocks, the device mesh, and epochs as scanned programs.

In memory, every epoch is one compiled call: the split sits on the device, a
per-epoch permutation from the seed's key orders it, a compiled loop runs the
steps, and the only host sync is the epoch's summary. Streamed (the data do not
fit in device memory), the same permutations order the batches, the host reads
blocks of K batches from the shards, and each block is one compiled call with
the same step loop. Seeds ride a leading axis under `vmap`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import os
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from absl import logging
from tqdm import tqdm

from bmnas_jax import hosts
from bmnas_jax.checkpoint import Checkpointer, latest_finalized
from bmnas_jax.data.feature_set import FeatureSet, Split
from bmnas_jax.steps import NONFINITE, Steps, TrainState
from bmnas_jax.errors import ConfigError, DataError

DATA, SEED = "data", "seed"


# ------------------------------------------------------------------ devices

def maybe_initialize_distributed(config) -> None:
  """`jax.distributed.initialize()` when `config.distributed` or the environment
  (`BMNAS_DISTRIBUTED=1`) asks; `config.coordinator_address`, `num_processes` and
  `process_id` where JAX does not detect the cluster. On CPUs the processes' collectives
  go over gloo. Must run before anything starts the JAX backend."""
  wanted = bool(config.get("distributed", False)) or os.environ.get("BMNAS_DISTRIBUTED") == "1"
  if not wanted or jax.distributed.is_initialized():
    return
  given = {"coordinator_address": config.get("coordinator_address", "") or None,
           "num_processes": config.get("num_processes", 0) or None,
           "process_id": None if config.get("process_id", -1) < 0 else config.process_id}
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None})
  except (ValueError, RuntimeError) as e:
    raise ConfigError(f"config.distributed: jax.distributed.initialize failed ({e}); set "
                      f"config.coordinator_address, config.num_processes and "
                      f"config.process_id where the cluster is not detected") from e


def default_compile_cache() -> str:
  """`$XDG_CACHE_HOME/bmnas-jax/xla` (`~/.cache/bmnas-jax/xla` when unset)."""
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "bmnas-jax", "xla")


def configure_compile_cache(config) -> str:
  """Turns on JAX's persistent compilation cache at `config.compile_cache` ('' turns it
  off; 'default' is `default_compile_cache()`), unless `JAX_COMPILATION_CACHE_DIR` in
  the environment already chose a folder. Programs that took at least a second to
  compile are kept, so a re-run (or another run with the same shapes) loads them
  instead of compiling. Returns the folder in use ('' when off)."""
  env = os.environ.get("JAX_COMPILATION_CACHE_DIR")
  if env:
    return env
  path = config.get("compile_cache", "default")
  if not path:
    return ""
  if path == "default":
    path = default_compile_cache()
  path = os.path.abspath(os.path.expanduser(path))
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"config.compile_cache={config.get('compile_cache')!r}: cannot create "
                      f"{path}: {e.strerror}") from None
  jax.config.update("jax_compilation_cache_dir", path)
  return path


def make_mesh(num_devices: int | None = None, seed_shards: int = 1) -> Mesh:
  """A (`seed`, `data`) mesh over the first `num_devices` devices (all by default)."""
  devices = jax.devices()
  n = len(devices) if not num_devices else num_devices
  if n > len(devices):
    raise ConfigError(f"config.devices={n} but only {len(devices)} devices are visible")
  if n % seed_shards:
    raise ConfigError(f"config.seed_shards={seed_shards} does not divide {n} devices")
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


def split_key(names) -> str:
  """The name of a concatenation of splits (`train+val`)."""
  return "+".join(names)


def concat_splits(fs: FeatureSet, names) -> Split:
  """Concatenation of named splits (e.g. train+val for retraining)."""
  for n in names:
    if n not in fs.splits:
      raise ConfigError(f"no split {n!r} in the features (config.evaluate.train_splits?); "
                        f"have {sorted(fs.splits)}")
  parts = [fs.splits[n] for n in names]
  if len(parts) == 1:
    return parts[0]
  return Split({k: np.concatenate([p.features[k] for p in parts]) for k in parts[0].features},
               np.concatenate([p.labels for p in parts]))


def check_data(data) -> None:
  """A FeatureSet is validated; a ShardSource was checked when it was opened."""
  if isinstance(data, FeatureSet):
    data.validate("features")
  elif not (hasattr(data, "read") and hasattr(data, "split_sizes")):
    raise TypeError(f"the trainers take a FeatureSet or a shards.ShardSource, not "
                    f"{type(data).__name__}")


def split_sizes(data) -> dict[str, int]:
  """Split name -> records, of a FeatureSet or a ShardSource."""
  if isinstance(data, FeatureSet):
    return {k: len(v) for k, v in data.splits.items()}
  return dict(data.split_sizes)


def rows_of(data, names, what: str) -> int:
  """Records in the concatenation of splits `names`; a missing split names `what` needs it."""
  sizes = split_sizes(data)
  missing = [n for n in names if n not in sizes]
  if missing:
    raise DataError(f"{what} needs split(s) {missing}; the features have {sorted(sizes)}")
  return sum(sizes[n] for n in names)


class ViewRows:
  """Examples of splits concatenated in order -> their records.

  A split stored with K augmented views of each training example holds K records per
  example (example-major, `FeatureSet.views`); every epoch takes one view of each
  example, drawn from the epoch's key. With one view everywhere the map is the identity.

  Attributes:
    examples: examples in the concatenation (the size of an epoch's permutation).
  """

  def __init__(self, data, names: tuple[str, ...], what: str):
    sizes = split_sizes(data)
    rows_of(data, names, what)
    views = dict(getattr(data, "views", {}) or {})
    self.views = [int(views.get(n, 1)) for n in names]
    counts = [sizes[n] // k for n, k in zip(names, self.views)]
    self.examples = sum(counts)
    self._example_start = np.cumsum([0] + counts)[:-1]
    self._record_start = np.cumsum([0] + [sizes[n] for n in names])[:-1]

  def __call__(self, idx: jax.Array, key: jax.Array) -> jax.Array:
    """Record rows of the example indices `idx` (int `[...]`), one random view each."""
    if all(k == 1 for k in self.views):
      return idx
    starts = jnp.asarray(self._example_start)
    part = jnp.searchsorted(starts, idx, side="right") - 1
    k = jnp.asarray(self.views)[part]
    view = jax.random.randint(key, idx.shape, 0, 1 << 30) % k
    return (jnp.asarray(self._record_start)[part] + (idx - starts[part]) * k
            + view).astype(idx.dtype)


def stream_block(config) -> int:
  """`config.data.stream_block`: batches per streamed block (default 16)."""
  k = config.data.get("stream_block", 16)
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ConfigError(f"config.data.stream_block={k!r} must be a positive int")
  return k


def num_batches(n: int, batch_size: int, key: str) -> int:
  """Full batches per epoch (training drops the remainder); errors name the config key."""
  if batch_size < 1:
    raise ConfigError(f"{key}={batch_size} must be >= 1")
  if n < batch_size:
    raise ConfigError(f"{key}={batch_size} is larger than the split ({n} samples)")
  return n // batch_size


def check_batch_divides(batch_size: int, mesh: Mesh, key: str) -> None:
  d = mesh.shape[DATA]
  if batch_size % d:
    raise ConfigError(f"{key}={batch_size} must be divisible by the {d} devices of the "
                      f"mesh's data axis")


def shard_batch(batch, mesh: Mesh):
  """A batch (leaves `[B, ...]`) with its batch axis sharded along `data`."""
  return jax.tree.map(
      lambda a: jax.lax.with_sharding_constraint(
          a, NamedSharding(mesh, P(DATA, *([None] * (a.ndim - 1))))), batch)


def take_batch(data, idx: jax.Array, mesh: Mesh):
  """Rows `idx` `[B]` of a device split, the batch axis sharded along `data`."""
  return shard_batch(jax.tree.map(lambda a: jnp.take(a, idx, axis=0), data), mesh)


def shuffled_batches(key: jax.Array, n: int, batch_size: int, nb: int) -> jax.Array:
  """`[nb, batch_size]` row indices of a fresh permutation (remainder dropped)."""
  return jax.random.permutation(key, n)[:nb * batch_size].reshape(nb, batch_size)


# ------------------------------------------------------------------- epochs

@dataclasses.dataclass(frozen=True)
class Phase:
  """One loop of training steps in an epoch.

  Attributes:
    step: `(state, batch, key) -> (state, {group: {'loss': [], 'bad': []}})`, where
      `batch` maps each source to `{'x': {node: [B, C_in, L_in]}, 'y': [B] or [B, K]}`.
    sources: source name -> the splits its rows index, concatenated in this order.
    num_steps: steps per epoch.
    groups: the groups the step reports (e.g. `w`, `a`); unique across phases.
  """
  step: Callable
  sources: dict[str, tuple[str, ...]]
  num_steps: int
  groups: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class EpochSpec:
  """A trainer's epoch: its phases in order, then one evaluation of held-out splits.

  Attributes:
    phases: the training phases.
    plan: `(seed key uint32 [2], epoch) -> ((rows, key), ...)`, a pair per phase:
      `rows` maps each source to int32 `[num_steps, B]` row indices (rows of the
      concatenated splits) and step i of the phase gets `fold_in(key, i)`. Both
      data paths order their batches with this one function.
    eval_splits: the splits evaluated after the phases (`eval_batches`).
    eval_batch: their batch size.
  """
  phases: tuple[Phase, ...]
  plan: Callable
  eval_splits: tuple[str, ...]
  eval_batch: int


def grouped(group: str, step: Callable, source: str) -> Callable:
  """A `Steps` method as a phase step: it reads `batch[source]` and reports `{group: out}`."""
  def phase_step(state, batch, key):
    state, out = step(state, batch[source], key)
    return state, {group: out}
  return phase_step


def zero_acc(groups) -> dict[str, dict[str, jax.Array]]:
  """Per group `{'loss_sum': 0., 'bad_step': -1, 'bad_code': 0}` (scalars, one seed)."""
  return {g: {"loss_sum": jnp.float32(0), "bad_step": jnp.int32(-1), "bad_code": jnp.int32(0)}
          for g in groups}


def add_step(acc, out, i: jax.Array):
  """Folds the outputs `{group: {'loss': [], 'bad': []}}` of step `i` into `acc`
  (`zero_acc`): losses are summed, the first non-finite step is kept."""
  new = {}
  for g, a in acc.items():
    hit = (a["bad_step"] < 0) & (out[g]["bad"] > 0)
    new[g] = {"loss_sum": a["loss_sum"] + out[g]["loss"],
              "bad_step": jnp.where(hit, i, a["bad_step"]).astype(jnp.int32),
              "bad_code": jnp.where(hit, out[g]["bad"], a["bad_code"]).astype(jnp.int32)}
  return new


def loop_batches(body: Callable, carry, n: int, n_valid: jax.typing.ArrayLike | None = None):
  """`carry = body(j, carry)` for j < n, compiled: a `lax.scan` when n_valid is None,
  else a loop over the first `n_valid` (a traced scalar) of n positions (a block's
  padding positions are not run). The one loop of both data paths."""
  return jax.lax.fori_loop(0, n if n_valid is None else n_valid, body, carry)


def fold_steps(step: Callable, state: TrainState, acc, fetch: Callable, n: int, key: jax.Array,
               start: jax.typing.ArrayLike = 0, n_valid: jax.typing.ArrayLike | None = None):
  """Runs `step(state, fetch(j), fold_in(key, start + j))` for j < n (or n_valid).

  The one step body of both data paths: `fetch(j)` gathers batch j from a device
  split, or slices it out of a streamed block `[K, B, ...]`.

  Args:
    step: a phase step, `(state, batch, key) -> (state, {group: {'loss', 'bad'}})`.
    acc: the phase's accumulator (`zero_acc`), its outputs are folded into.
    fetch: `j -> batch` of position j.
    n: positions.
    key: the phase key; `start + j` is the step's index within the phase.
    start: the phase index of position 0 (a streamed block starts mid-phase).
    n_valid: steps to run (the rest of a phase's last block is padding); None: n.
  Returns:
    (state, acc).
  """
  def body(j, carry):
    state, acc = carry
    i = start + j
    state, out = step(state, fetch(j), jax.random.fold_in(key, i))
    return state, add_step(acc, out, i)

  return loop_batches(body, (state, acc), n, n_valid)


def eval_batches(sizes: tuple[int, ...], batch_size: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The evaluation batches of splits concatenated in order (host arrays).

  Each split's last batch is padded (repeating its last row) and masked.
  Returns:
    rows int32 `[nb, B]` (rows of the concatenation), masks bool `[nb, B]`, and
    sids int32 `[nb]` (the split of each batch, an index into `sizes`).
  """
  rows, masks, sids, offset = [], [], [], 0
  for sid, n in enumerate(sizes):
    nb = -(-n // batch_size)
    r = np.arange(nb * batch_size).reshape(nb, batch_size)
    rows.append(offset + np.minimum(r, n - 1))
    masks.append(r < n)
    sids += [sid] * nb
    offset += n
  return (np.concatenate(rows).astype(np.int32), np.concatenate(masks),
          np.asarray(sids, np.int32))


def eval_zero(steps: Steps, state: TrainState, batch, num_splits: int):
  """Zero sums of `eval_step` outputs, `[num_splits, ...]` (batch: arrays or shape structs)."""
  shapes = jax.eval_shape(steps.eval_step, state, batch)
  return jax.tree.map(lambda s: jnp.zeros((num_splits,) + s.shape, s.dtype), shapes)


def fold_eval(steps: Steps, state: TrainState, sums, fetch: Callable, n: int,
              n_valid: jax.typing.ArrayLike | None = None):
  """Adds `eval_step` of n (or n_valid) batches into `sums` (`eval_zero`), each to its
  split's row; `fetch(j)` returns batch j with `'mask'` bool `[B]` and `'sid'` int32 `[]`.

  One loop body serves every split, so the evaluation is compiled once however
  many splits it covers.
  """
  def body(j, sums):
    batch = fetch(j)
    out = steps.eval_step(state, batch)
    return jax.tree.map(lambda a, o: a.at[batch["sid"]].add(o), sums, out)

  return loop_batches(body, sums, n, n_valid)


def finish_epoch(spec: EpochSpec, steps: Steps, acc, sums) -> dict[str, Any]:
  """An epoch's metrics (one seed) from its accumulators.

  Returns:
    `{group: {'loss': mean over the phase's steps, 'bad_step': first non-finite
    step or -1, 'bad_code'}, 'eval': [{'loss', 'metric'} per eval split]}`.
  """
  num_steps = {g: ph.num_steps for ph in spec.phases for g in ph.groups}
  out = {g: {"loss": a["loss_sum"] / num_steps[g], "bad_step": a["bad_step"],
             "bad_code": a["bad_code"]} for g, a in acc.items()}
  out["eval"] = [steps.finish_eval(jax.tree.map(lambda a, k=k: a[k], sums))
                 for k in range(len(spec.eval_splits))]
  return out


class InMemoryEpochs:
  """Every epoch one compiled call: the splits sit on the devices, batches are gathered there.

  Calling it runs epoch `epoch` for all seeds: `(states, epoch) -> (states, metrics)`
  (`finish_epoch`'s dict, every leaf with a leading seed axis `[S]`).

  Attributes:
    sample_x: node -> `[2, C_in, L_in]`, rows of the first phase's first source.
    traces: times the epoch program was traced (1: no recompiles).
  """

  def __init__(self, spec: EpochSpec, steps: Steps, fs: FeatureSet, mesh: Mesh,
               placed: dict | None = None):
    self.spec, self.steps, self.mesh, self.traces = spec, steps, mesh, 0
    used = [s for ph in spec.phases for s in ph.sources.values()] + [spec.eval_splits]
    placed = {} if placed is None else placed       # trainers of one data and mesh share it
    for s in used:
      if split_key(s) not in placed:
        placed[split_key(s)] = device_split(concat_splits(fs, s), mesh)
    self.data = {split_key(s): placed[split_key(s)] for s in used}
    first = split_key(next(iter(spec.phases[0].sources.values())))
    self.sample_x = jax.tree.map(lambda a: a[:2], self.data[first]["x"])
    self.eval_plan = eval_batches(tuple(len(fs.splits[s]) for s in spec.eval_splits),
                                  spec.eval_batch)
    self._jit = self._fn = jax.jit(jax.vmap(self._epoch, in_axes=(0, None, None),
                                            spmd_axis_name=SEED))

  def _epoch(self, state: TrainState, data, epoch):
    self.traces += 1
    spec, mesh, acc = self.spec, self.mesh, {}
    for ph, (rows, key) in zip(spec.phases, spec.plan(state.key, epoch)):
      def fetch(j, ph=ph, rows=rows):
        return {src: take_batch(data[split_key(s)], rows[src][j], mesh)
                for src, s in ph.sources.items()}
      state, ph_acc = fold_steps(ph.step, state, zero_acc(ph.groups), fetch, ph.num_steps, key)
      acc.update(ph_acc)
    held_out = data[split_key(spec.eval_splits)]
    rows, masks, sids = (jnp.asarray(a) for a in self.eval_plan)

    def fetch_eval(j):
      return {**take_batch(held_out, rows[j], mesh), "mask": masks[j], "sid": sids[j]}
    zero = eval_zero(self.steps, state, jax.eval_shape(fetch_eval, 0), len(spec.eval_splits))
    sums = fold_eval(self.steps, state, zero, fetch_eval, rows.shape[0])
    return state, finish_epoch(spec, self.steps, acc, sums)

  def programs(self, like: TrainState) -> list[Program]:
    """The epoch program, to compile ahead of time for states laid out as `like`."""
    def install(compiled):
      self._fn = compiled
    return [Program(lambda: self._jit.lower(like, self.data,
                                            jax.ShapeDtypeStruct((), jnp.int32)),
                    install, self.mesh)]

  def __call__(self, states: TrainState, epoch) -> tuple[TrainState, dict[str, Any]]:
    return self._fn(states, self.data, epoch)


class RowReader:
  """Rows of splits concatenated in order, read on the host from a ShardSource."""

  def __init__(self, source, splits: tuple[str, ...]):
    self.source, self.splits = source, tuple(splits)
    self.offsets = np.cumsum([0] + [source.split_sizes[s] for s in self.splits])
    self.label_dtype = np.dtype(source.meta["label_dtype"])
    self.names = tuple(source.node_names)

  def __call__(self, rows: np.ndarray) -> dict[str, Any]:
    """`{'x': {node: float32 [*rows.shape, C_in, L_in]}, 'y': [*rows.shape] or
    [*rows.shape, K]}` (labels in the dtype they were written with); one
    `ShardSource.read` per split the rows fall in."""
    rows = np.asarray(rows)
    flat = rows.reshape(-1)
    part = np.searchsorted(self.offsets, flat, side="right") - 1
    out = {}
    for p, split in enumerate(self.splits):
      pos = np.flatnonzero(part == p)
      if not pos.size:
        continue
      keys = flat[pos] - self.offsets[p]
      got = self.source.read(split, keys)
      if not np.array_equal(got["index"], keys):
        raise DataError(f"split {split!r} of {getattr(self.source, 'path', self.source)}: "
                        f"records do not hold their own position in field 'index'")
      for name in self.names + ("label",):
        if name not in out:
          out[name] = np.empty((flat.size,) + got[name].shape[1:], got[name].dtype)
        out[name][pos] = got[name]
    shaped = {k: v.reshape(rows.shape + v.shape[1:]) for k, v in out.items()}
    return {"x": {n: shaped[n] for n in self.names},
            "y": shaped["label"].astype(self.label_dtype, copy=False)}


def pad_axis(tree, size: int, axis: int):
  """Every leaf zero-padded along `axis` to `size` (padding of a phase's last block)."""
  def pad(a):
    missing = size - a.shape[axis]
    if not missing:
      return a
    shape = a.shape[:axis] + (missing,) + a.shape[axis + 1:]
    return np.concatenate([a, np.zeros(shape, a.dtype)], axis=axis)
  return jax.tree.map(pad, tree)


def place_rows(read: Callable, rows: np.ndarray, sharding: NamedSharding):
  """The records of int `rows` (`read(rows)` -> leaves `[*rows.shape, ...]`) as arrays
  laid out by `sharding` over their leading `rows.ndim` axes: each process reads only
  the rows of its own devices' parts, each distinct part once."""
  parts, order = {}, []
  for device, idx in sharding.addressable_devices_indices_map(rows.shape).items():
    key = tuple((i.start, i.stop) for i in idx)
    if key not in parts:
      parts[key] = read(rows[idx])
    order.append((device, key))
  first = parts[order[0][1]]

  def assemble(path, _):
    leaves = [(d, functools.reduce(lambda t, k: t[k.key], path, parts[key])) for d, key in order]
    shape = rows.shape + leaves[0][1].shape[rows.ndim:]
    return jax.make_array_from_single_device_arrays(
        shape, sharding, [jax.device_put(a, d) for d, a in leaves])

  return jax.tree_util.tree_map_with_path(assemble, first)


def prefetch(load: Callable, items: list, depth: int = 2) -> Iterator:
  """`load(item)` of each item in order, computed up to `depth` items ahead on a thread."""
  pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bmnas-prefetch")
  pending, submitted = collections.deque(), 0
  try:
    for _ in items:
      while submitted < len(items) and len(pending) <= depth:
        pending.append(pool.submit(load, items[submitted]))
        submitted += 1
      yield pending.popleft().result()
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


class StreamedEpochs:
  """Every epoch a host loop over blocks of K batches read from shards; a compiled call per block.

  The epoch's plan (the same `spec.plan` as in memory) gives each seed's batch
  rows; the host reads a block of K consecutive batches of every seed
  (`[S, K, B, ...]`, a thread reading ahead while the device computes), and the
  phase's block program runs the steps under vmap (`fold_steps`, the one step
  loop of both paths). A phase's last block is zero-padded to K and only its
  first `n_valid` steps run (a loop bound passed as an argument), so every block
  of a phase has one shape: each program is traced and compiled once. Evaluation
  streams its padded, masked batches the same way (`[K, B, ...]`, shared by the
  seeds). Only blocks in flight sit on the devices, `2 * depth + 1` at most: the
  one being dispatched, up to `depth` read ahead, and up to `depth` dispatched
  earlier but not finished.

  Calling it runs epoch `epoch` for all seeds: `(states, epoch) -> (states, metrics)`
  (`finish_epoch`'s dict, every leaf `[S]`). Host syncs: the plan's rows at the
  start, one wait per block on the block `depth` earlier (bounding the blocks in
  flight), and the metrics at the end.

  Attributes:
    sample_x: node -> `[2, C_in, L_in]`, rows of the first phase's first source.
    traces: times the most traced of its programs was traced (1: no recompiles).
  """

  def __init__(self, spec: EpochSpec, steps: Steps, source, mesh: Mesh, block: int,
               depth: int = 2):
    self.spec, self.steps, self.mesh, self.depth = spec, steps, mesh, depth
    used = [s for ph in spec.phases for s in ph.sources.values()] + [spec.eval_splits]
    self.readers = {split_key(s): RowReader(source, s) for s in used}
    self.blocks = tuple(min(block, ph.num_steps) for ph in spec.phases)
    self.eval_plan = eval_batches(tuple(source.split_sizes[s] for s in spec.eval_splits),
                                  spec.eval_batch)
    self.eval_block = min(block, self.eval_plan[0].shape[0])
    first = split_key(next(iter(spec.phases[0].sources.values())))
    sample = self.readers[first](np.arange(min(2, self.readers[first].offsets[-1])))
    self.sample_x = sample["x"]
    eval_sample = {**sample, "mask": np.ones(sample["y"].shape[:1], bool)}
    self._traces = collections.Counter()
    vmap = functools.partial(jax.vmap, spmd_axis_name=SEED)

    def start(state):
      return ([zero_acc(ph.groups) for ph in spec.phases],
              eval_zero(steps, state, eval_sample, len(spec.eval_splits)))

    def finish(acc, sums):
      return finish_epoch(spec, steps, {g: a for d in acc for g, a in d.items()}, sums)

    self._plan = jax.jit(vmap(self._counted("plan", spec.plan), in_axes=(0, None)))
    self._start = jax.jit(vmap(self._counted("start", start)))
    self._phase = [jax.jit(vmap(self._counted(f"phase_{p}",
                                              functools.partial(self._phase_block, p)),
                                in_axes=(0, 0, 0, 0, None, None)))
                   for p in range(len(spec.phases))]
    self._eval = jax.jit(vmap(self._counted("eval", self._eval_block), in_axes=(0, 0, None, None)))
    self._finish = jax.jit(vmap(self._counted("finish", finish)))

  @property
  def traces(self) -> int:
    return max(self._traces.values(), default=0)

  def _counted(self, name: str, fn: Callable) -> Callable:
    def traced(*args):
      self._traces[name] += 1
      return fn(*args)
    traced.__name__ = traced.__qualname__ = name        # names the program in compile logs
    return traced

  def _phase_block(self, p: int, state: TrainState, acc, block, key, start, n_valid):
    """K steps of phase p from `block` (source -> `{'x', 'y'}` `[K, B, ...]`, one seed)."""
    ph = self.spec.phases[p]

    def fetch(j):
      return {src: shard_batch(jax.tree.map(lambda a: a[j], block[src]), self.mesh)
              for src in ph.sources}
    return fold_steps(ph.step, state, acc, fetch, self.blocks[p], key, start, n_valid)

  def _eval_block(self, state: TrainState, sums, block, n_valid):
    """Evaluation of K batches (`{'x', 'y', 'mask'}` `[K, B, ...]`, `'sid'` `[K]`)."""
    def fetch(j):
      b = jax.tree.map(lambda a: a[j], block)
      return {**shard_batch({"x": b["x"], "y": b["y"]}, self.mesh), "mask": b["mask"],
              "sid": b["sid"]}
    return fold_eval(self.steps, state, sums, fetch, self.eval_block, n_valid)

  def _load(self, rows, item):
    """The device block of `item` = (phase or None for evaluation, first batch). A
    phase's last block is padded with row 0 (those steps are not run)."""
    p, first = item
    if p is None:
      k = self.eval_block
      r, masks, sids = (pad_axis(a[first:first + k], k, 0) for a in self.eval_plan)
      sharding = NamedSharding(self.mesh, P(None, DATA))
      return {**place_rows(self.readers[split_key(self.spec.eval_splits)], r, sharding),
              "mask": hosts.place(masks, sharding),
              "sid": hosts.place(sids, NamedSharding(self.mesh, P()))}
    ph, k = self.spec.phases[p], self.blocks[p]
    sharding = NamedSharding(self.mesh, P(SEED, None, DATA))
    return {src: place_rows(self.readers[split_key(s)],
                            pad_axis(rows[p][src][:, first:first + k], k, 1), sharding)
            for src, s in ph.sources.items()}

  def __call__(self, states: TrainState, epoch) -> tuple[TrainState, dict[str, Any]]:
    spec = self.spec
    plans = self._plan(states.key, epoch)
    rows = hosts.to_host([r for r, _ in plans])                # per phase: source -> [S, n, B]
    acc, sums = self._start(states)
    nb_eval = self.eval_plan[0].shape[0]
    items = [(p, i) for p, ph in enumerate(spec.phases)
             for i in range(0, ph.num_steps, self.blocks[p])]
    items += [(None, i) for i in range(0, nb_eval, self.eval_block)]
    in_flight = collections.deque()
    with contextlib.closing(prefetch(functools.partial(self._load, rows), items,
                                     self.depth)) as blocks:
      for (p, i), block in zip(items, blocks):
        if p is None:
          sums = self._eval(states, sums, block, np.int32(min(self.eval_block, nb_eval - i)))
          in_flight.append(sums)
        else:
          n_valid = np.int32(min(self.blocks[p], spec.phases[p].num_steps - i))
          states, acc[p] = self._phase[p](states, acc[p], block, plans[p][1], np.int32(i),
                                          n_valid)
          in_flight.append(acc[p])
        if len(in_flight) > self.depth:
          jax.block_until_ready(in_flight.popleft())
    return states, self._finish(acc, sums)


def make_epochs(spec: EpochSpec, steps: Steps, data, mesh: Mesh, stream_block: int,
                placed: dict | None = None) -> InMemoryEpochs | StreamedEpochs:
  """The epoch runner of `data`: in memory for a FeatureSet (its splits placed on the
  devices once per `placed` dict, shared by the trainers given the same one), streamed
  for a ShardSource."""
  if isinstance(data, FeatureSet):
    return InMemoryEpochs(spec, steps, data, mesh, placed)
  return StreamedEpochs(spec, steps, data, mesh, stream_block)


def describe_bad(phase: str, epoch: int, seeds: list[int], bad_step: np.ndarray,
                 bad_code: np.ndarray) -> None:
  """Raises FloatingPointError naming epoch, step, seed and quantity if any step diverged."""
  bad_step = np.atleast_1d(bad_step)
  for s, (st, code) in enumerate(zip(bad_step, np.atleast_1d(bad_code))):
    if st >= 0:
      raise FloatingPointError(
          f"divergence in {phase} at epoch {epoch}, step {int(st)} (seed {seeds[s]}): "
          f"non-finite {NONFINITE.get(int(code), 'value')}")


# ------------------------------------------------------- compiling ahead

@dataclasses.dataclass(frozen=True)
class Program:
  """A program to compile ahead of time: `lower()` traces it (Python), `install(compiled)`
  hands the executable to its owner, which then calls it instead of tracing again."""
  lower: Callable[[], Any]
  install: Callable[[Any], None]
  mesh: Mesh


class CompileAhead:
  """Compiles `programs` on a pool of threads while the caller goes on: each is traced
  and compiled on a thread (XLA compiles outside the Python lock), in order, so the
  programs of a stage (the seeds' init and the epoch) or of several (the ablation's
  rows) compile side by side on the cores, and a later row compiles while an earlier
  one trains. `install(programs)` waits for those and hands them to their owners."""

  def __init__(self, programs: list[Program], threads: int | None = None):
    self._pool = concurrent.futures.ThreadPoolExecutor(
        threads or min(8, os.cpu_count() or 1), thread_name_prefix="bmnas-compile")
    self._futures = [(p, self._pool.submit(self._compile, p)) for p in programs]
    self._pool.shutdown(wait=False)           # the queued programs still compile

  @staticmethod
  def _compile(p: Program):
    with jax.set_mesh(p.mesh):
      return p.lower().compile()

  def install(self, programs: list[Program] | None = None) -> None:
    """Waits for `programs` (all when None) and installs them (a compile error is raised)."""
    want = None if programs is None else {id(p) for p in programs}
    for p, future in self._futures:
      if want is None or id(p) in want:
        p.install(future.result())

  def cancel(self) -> None:
    """Drops the programs not yet started (after an error)."""
    for _, future in self._futures:
      future.cancel()


class SeedInit:
  """The seeds' fresh states, `init_one(*per_seed)` of every seed (`args`: arrays with a
  leading seed axis `[S, ...]`, e.g. the keys uint32 `[S, 2]`, sharded along `seed`) as
  one program, its outputs sharded along `seed`.

  `abstract()` gives their shapes and layout without compiling anything (what a
  checkpoint is restored into); calling it computes them (compiled on first use, unless
  `programs()` was compiled ahead)."""

  def __init__(self, init_one: Callable, args: tuple, mesh: Mesh):
    """`init_one(key, ...) -> state` of one seed (e.g. `steps.init_state(key, sample_x)`)."""
    self.args, self.mesh = tuple(args), mesh
    self._sharding = NamedSharding(mesh, P(SEED))
    self._jit = self._fn = jax.jit(jax.vmap(init_one), out_shardings=self._sharding)

  def abstract(self) -> TrainState:
    shapes = jax.eval_shape(self._jit, *self.args)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                       sharding=self._sharding), shapes)

  def programs(self) -> list[Program]:
    def install(compiled):
      self._fn = compiled
    return [Program(lambda: self._jit.lower(*self.args), install, self.mesh)]

  def __call__(self) -> TrainState:
    return self._fn(*self.args)


def checkpoints_of(stage_dir: str) -> str:
  """The checkpoint folder of a stage."""
  return os.path.join(stage_dir, "checkpoints")


def stage_programs(init: SeedInit, epochs, stage_dir: str, num_epochs: int) -> list[Program]:
  """The programs of a trainer's stage to compile ahead: the init, and the epoch
  program in memory (a streamed epoch's block programs compile on first use); none
  when the stage's checkpoint already holds all `num_epochs` (it is only restored)."""
  if latest_finalized(checkpoints_of(stage_dir)) == num_epochs - 1:
    return []
  progs = init.programs()
  if isinstance(epochs, InMemoryEpochs):
    progs += epochs.programs(init.abstract())
  return progs


# ------------------------------------------------------- checkpointed loop

def run_epochs(stage_dir: str, fingerprint: dict, init: SeedInit, epoch_fn: Callable,
               num_epochs: int, on_epoch: Callable, write_outputs: Callable,
               desc: str, extra0: dict, epochs_key: str = "the epoch count"
               ) -> tuple[TrainState, list[dict], dict]:
  """The host loop over epochs, with an orbax checkpoint after each.

  Args:
    stage_dir: folder of the stage (checkpoints go to `stage_dir/checkpoints`).
    fingerprint: the config parts that must match to resume.
    init: the seeds' fresh states (computed only when there is no checkpoint; else the
      checkpoint is restored into `init.abstract()`).
    epoch_fn: `(states, epoch) -> (states, device metrics)` (`make_epochs`): one
      compiled call in memory, a compiled call per block when streamed.
    on_epoch: `(epoch, states, host metrics, seconds, extra) -> record` (may update extra).
    write_outputs: `(history, extra) -> None`, writes the stage's files (atomically);
      called only once the checkpoint of the same epochs is finalized, and after a
      resume, so the files never run ahead of the newest complete checkpoint; on
      process 0 only under `jax.distributed` (every process gets the same history).
    epochs_key: the config key of `num_epochs`, for errors.
  Returns:
    (states, history of records, extra).
  Raises:
    ConfigError: the checkpoint is of a different config, or holds more finished
      epochs than `num_epochs` (fewer are resumed: the run is extended).
    DataError: the newest finalized checkpoint is damaged (the message names its folder;
      an unfinished newer folder is removed with a warning instead, see `Checkpointer`).
  """
  ckpt = Checkpointer(checkpoints_of(stage_dir))
  history, extra, start, states = [], dict(extra0), 0, None

  def write(history, extra):
    if hosts.is_primary():               # one writer; every process computes the same
      write_outputs(history, extra)

  where = f"{os.path.basename(os.path.normpath(stage_dir))}/"
  try:
    latest = ckpt.latest()
    if latest is not None:
      if latest + 1 > num_epochs:
        raise ConfigError(f"{where} holds {latest + 1} finished epochs, {epochs_key}="
                          f"{num_epochs} asks for fewer; use a new --workdir or the same "
                          f"epochs")
      meta = ckpt.restore_meta(latest)
      if meta["fingerprint"] != fingerprint:
        changed = sorted(k for k in set(fingerprint) | set(meta["fingerprint"])
                         if fingerprint.get(k) != meta["fingerprint"].get(k))
        raise ConfigError(f"{stage_dir} holds a checkpoint of a different config (keys "
                          f"{changed} differ); use a new --workdir or the same config")
      states = ckpt.restore_state(latest, init.abstract())
      history, extra, start = meta["history"], meta["extra"], latest + 1
      write(history, extra)
      if start < num_epochs:
        logging.warning("%s resuming at epoch %d of %d: the checkpoint holds %d finished "
                        "epochs of the same config (%s is not part of the config check, "
                        "so a run can be extended)", where, start, num_epochs, start,
                        epochs_key)
      else:
        logging.info("%s all %d epochs are in the checkpoint; reusing them", where, start)
    else:
      states = init()
    bar = tqdm(range(start, num_epochs), desc=desc, initial=start, total=num_epochs,
               leave=False, disable=None)
    saved = False
    for epoch in bar:
      t0 = time.perf_counter()
      states, dev_metrics = epoch_fn(states, jnp.int32(epoch))
      host = hosts.to_host(dev_metrics)    # the previous save overlapped with this epoch
      if saved:                            # its files, once its checkpoint is complete
        ckpt.wait()
        write(history, extra)
      record = on_epoch(epoch, states, host, time.perf_counter() - t0, extra)
      history.append(record)
      ckpt.save(epoch, states, {"fingerprint": fingerprint, "history": history, "extra": extra})
      saved = True
    if saved:
      ckpt.wait()
      write(history, extra)
  finally:
    ckpt.close()
  return states, history, extra

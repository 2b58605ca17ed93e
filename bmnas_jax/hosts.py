"""The processes of a multi-host run: who writes, waiting for each other, arrays to hosts.

Under `jax.distributed` every process runs the same program on its own devices. Process
0 alone writes files (checkpoints, metrics, genotypes, shards, the report); the others
compute the same host values (metrics are gathered to every process), wait for process 0
where they would read what it wrote (`barrier`), and receive what it read (`share`).
With one process every function here is the plain single-process operation.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np


def _jax():
  return sys.modules.get("jax")


def is_multi() -> bool:
  """True in a `jax.distributed` run of more than one process (the backend is not
  started here when it is not yet)."""
  jax = _jax()
  return jax is not None and jax.distributed.is_initialized() and jax.process_count() > 1


def is_primary() -> bool:
  """False only on processes other than 0 of a `jax.distributed` run: the one writer."""
  jax = _jax()
  if jax is None or not jax.distributed.is_initialized():
    return True
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (a no-op with one process)."""
  if is_multi():
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def to_host(tree):
  """Every leaf as a numpy array on this host: arrays that span other processes'
  devices are gathered (every process must call this with the same tree)."""
  import jax
  if not is_multi() or all(getattr(a, "is_fully_addressable", True)
                           for a in jax.tree.leaves(tree)):
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def share(value: Any) -> Any:
  """Process 0's `value` (JSON-serializable) on every process; the others' argument is
  ignored. With one process, `value` itself."""
  if not is_multi():
    return value
  from jax.experimental import multihost_utils
  data = np.frombuffer(json.dumps(value).encode(), np.uint8) if is_primary() else None
  size = int(multihost_utils.broadcast_one_to_all(
      np.int32(0 if data is None else data.size)))
  buf = data if data is not None else np.zeros(size, np.uint8)
  out = np.asarray(multihost_utils.broadcast_one_to_all(buf))
  return json.loads(out.astype(np.uint8).tobytes().decode())


def share_arrays(tree, like):
  """Process 0's host arrays `tree` on every process (the others pass None; `like`
  gives the structure, shapes and dtypes). With one process, `tree` itself."""
  if not is_multi():
    return tree
  import jax
  from jax.experimental import multihost_utils
  if not is_primary():
    tree = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), like)
  return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(tree))


def place(host: np.ndarray, sharding):
  """A host array as a (global) array laid out by `sharding`: each process places only
  the parts its own devices hold (every process passes the same array)."""
  import jax
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def to_devices(host_tree, like):
  """Host arrays laid out as the (global) arrays of `like` (`place` of every leaf)."""
  import jax
  return jax.tree.map(lambda h, a: place(h, a.sharding), host_tree, like)

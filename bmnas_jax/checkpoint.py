"""Orbax checkpoints of trainer state plus JSON metadata, and atomic file writes."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
import uuid
from typing import Any

import jax
import orbax.checkpoint as ocp


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes to a temporary file in the same folder, then renames over `path`."""
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def swap_dir_into_place(built: str | os.PathLike, target: str | os.PathLike) -> None:
  """Renames the finished folder `built` to `target`; an existing `target` is
  replaced only once the new one is in place (and restored if that fails)."""
  built, target = pathlib.Path(built), pathlib.Path(target)
  target.parent.mkdir(parents=True, exist_ok=True)
  if not target.exists():
    os.rename(built, target)
    return
  backup = target.parent / f".{target.name}.old-{uuid.uuid4().hex}"
  os.rename(target, backup)
  try:
    os.rename(built, target)
  except BaseException:
    os.rename(backup, target)
    raise
  shutil.rmtree(backup, ignore_errors=True)


def write_json_atomic(path, obj: Any) -> None:
  write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def write_jsonl_atomic(path, records) -> None:
  write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


class Checkpointer:
  """One orbax CheckpointManager per stage folder; step = epoch index.

  Each checkpoint holds the state pytree (`StandardSave`) and a JSON `meta`
  (history, best-so-far, config fingerprint). Orbax finalizes a checkpoint by
  rename, so a run killed mid-save resumes from the previous epoch.
  """

  def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2):
    self.directory = os.path.abspath(os.fspath(directory))
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                             create=True))

  def latest(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, meta: dict) -> None:
    """Starts an asynchronous save (the next save or `close` waits for it).

    The arrays are copied off the device before this returns, so training goes
    on while the files are written; a run killed mid-write resumes from the
    previous finalized checkpoint, and replays the same epoch.
    """
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)))

  def restore_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]

  def restore_state(self, step: int, like_state):
    """Restores the state; `like_state` gives structure, dtypes and shardings."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
    return self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

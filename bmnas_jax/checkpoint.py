"""Orbax checkpoints of trainer state plus JSON metadata, and atomic file writes."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import shutil
import tempfile
import uuid
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from bmnas_jax import hosts
from bmnas_jax.errors import DISK_ERRNOS, DataError


def file_mode() -> int:
  """The mode `open(path, 'w')` gives a new file: 0o666 less the process umask."""
  mask = os.umask(0)
  os.umask(mask)
  return 0o666 & ~mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes to a temporary file in the same folder, then renames over `path`.

  The file gets the mode a plain `open` would give (mkstemp makes it private)."""
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  with disk_errors(path):
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with disk_errors(path), os.fdopen(fd, "w") as f:
      f.write(text)
    os.chmod(tmp, file_mode())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


# Names of the temporary files and folders the atomic writers leave behind when a run
# dies: write_text_atomic (`.NAME.<8 random characters>.tmp`), genotype.save, chunk npz files,
# export / shard / report staging folders (mkdtemp) and swap_dir_into_place backups.
_MKTEMP = r"[a-z0-9_]{8}"
STALE_FILE = re.compile(rf"\..+\.{_MKTEMP}\.tmp|\.genotype-{_MKTEMP}\.tmp|\..+\.npz\.tmp")
STALE_DIR = re.compile(rf"\.report-(new|old)-{_MKTEMP}|\..+\.tmp-{_MKTEMP}|"
                       rf"\..+\.old-[0-9a-f]{{32}}")


def clean_stale_temps(workdir: str | os.PathLike, depth: int = 2) -> list[str]:
  """Removes what earlier, killed runs left under the project's temporary names in
  `workdir` and its folders down to `depth` levels (hidden folders and orbax's
  checkpoint folders are not entered). Safe only under the workdir lock (no other run
  is writing). Returns the removed paths."""
  removed = []

  def visit(folder: str, level: int) -> None:
    try:
      entries = list(os.scandir(folder))
    except OSError:
      return
    for e in entries:
      is_dir = e.is_dir(follow_symlinks=False)
      if is_dir and STALE_DIR.fullmatch(e.name):
        shutil.rmtree(e.path, ignore_errors=True)
        removed.append(e.path)
      elif not is_dir and e.is_file(follow_symlinks=False) and STALE_FILE.fullmatch(e.name):
        with contextlib.suppress(OSError):
          os.remove(e.path)
          removed.append(e.path)
      elif (is_dir and level < depth and not e.name.startswith(".")
            and e.name != "checkpoints"):
        visit(e.path, level + 1)

  visit(os.fspath(workdir), 0)
  return removed


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


@contextlib.contextmanager
def disk_errors(path: str | os.PathLike):
  """Inside: an OSError of a full disk, a read-only file system or a missing permission
  becomes a DataError naming the file being written (`path` when the error names none);
  so does any other error whose message is one of those (orbax and tensorstore wrap them)."""
  try:
    yield
  except DataError:
    raise
  except OSError as e:
    if e.errno not in DISK_ERRNOS:
      raise
    raise DataError(f"{e.filename or os.fspath(path)}: cannot write: "
                    f"{e.strerror or os.strerror(e.errno)}") from e
  except Exception as e:                # noqa: BLE001 -- re-raised unless a disk error
    reason = next((os.strerror(n) for n in sorted(DISK_ERRNOS) if os.strerror(n) in str(e)),
                  None)
    if reason is None:
      raise
    raise DataError(f"{os.fspath(path)}: cannot write: {reason}") from e


def read_json(path: str | os.PathLike) -> Any:
  """A JSON file this project wrote; unreadable or truncated -> DataError naming it."""
  path = os.fspath(path)
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: cannot read: {e}") from e
  except (ValueError, RecursionError) as e:
    raise DataError(f"{path}: not valid JSON ({e}); the file is damaged or was cut "
                    f"short: re-run the stage that writes it") from e


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  """A JSON-lines file this project wrote; a bad line -> DataError naming file and line."""
  path = os.fspath(path)
  try:
    with open(path) as f:
      lines = f.readlines()
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: cannot read: {e}") from e
  records = []
  for n, line in enumerate(lines, 1):
    if line.strip():
      try:
        records.append(json.loads(line))
      except (ValueError, RecursionError) as e:
        raise DataError(f"{path}, line {n}: not valid JSON ({e}); the file is damaged "
                        f"or was cut short: re-run the stage that writes it") from e
  return records


# Orbax writes this file last when it finalizes a checkpoint folder.
_FINALIZED = "_CHECKPOINT_METADATA"
_DAMAGED_HINT = ("delete that folder to resume from the previous checkpoint, or use a new "
                 "--workdir")


def finalized_steps(directory: str | os.PathLike) -> list[int]:
  """The steps of `directory` whose checkpoint orbax finalized, newest first."""
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    return []
  steps = sorted((int(n) for n in os.listdir(directory) if n.isdigit()), reverse=True)
  return [s for s in steps if os.path.isfile(os.path.join(directory, str(s), _FINALIZED))]


def latest_finalized(directory: str | os.PathLike) -> int | None:
  """The newest finalized step of a checkpoint folder (None: none), read from the
  folder names without opening anything."""
  done = finalized_steps(directory)
  return done[0] if done else None


class Checkpointer:
  """One orbax CheckpointManager per stage folder; step = epoch index.

  Each checkpoint holds the state pytree (`StandardSave`) and a JSON `meta`
  (history, best-so-far, config fingerprint). Orbax finalizes a checkpoint by
  rename, so a run killed mid-save resumes from the previous epoch.

  Under `jax.distributed` (several processes) the state is gathered to every host and
  process 0 alone writes and reads the folder (orbax over that one process); what it
  reads is sent to the others (`hosts.share`), and each process places its devices'
  parts. Every process calls every method in the same order.
  """

  def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2):
    self.directory = os.path.abspath(os.fspath(directory))
    self._pending = self.directory          # the folder of the save in flight (for errors)
    self.multi, self.manager = hosts.is_multi(), None
    if not hosts.is_primary():
      return
    self._drop_unfinished()
    extra = {}
    if self.multi:                          # orbax leaves making the folder to us here
      os.makedirs(self.directory, exist_ok=True)
      extra = {"create": False, "multiprocessing_options": ocp.options.MultiprocessingOptions(
          primary_host=0, active_processes={0})}
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            **{"max_to_keep": max_to_keep, "create": True, **extra}))

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def latest(self) -> int | None:
    return hosts.share(self.manager and self.manager.latest_step())

  def _drop_unfinished(self) -> None:
    """Removes step folders newer than the newest finalized checkpoint that orbax never
    finalized (no `_CHECKPOINT_METADATA`: empty, or cut short by a crash or a copy), with
    one warning, so that the run resumes from the newest complete checkpoint (orbax
    would take the newest folder, and skip saving every step below it)."""
    if not os.path.isdir(self.directory):
      return
    steps = [int(n) for n in os.listdir(self.directory) if n.isdigit()]
    done = finalized_steps(self.directory)
    unfinished = sorted((s for s in steps if s > (done[0] if done else -1)), reverse=True)
    if unfinished:
      logging.warning("%s: checkpoint folder(s) %s incomplete (no %s); removed, resuming "
                      "from %s", self.directory, unfinished, _FINALIZED,
                      f"checkpoint {done[0]}" if done else "the start")
      for s in unfinished:
        shutil.rmtree(self.step_dir(s), ignore_errors=True)   # every host may try

  def save(self, step: int, state, meta: dict) -> None:
    """Starts an asynchronous save (the next save or `close` waits for it).

    The arrays are copied off the device before this returns, so training goes
    on while the files are written; a run killed mid-write resumes from the
    previous finalized checkpoint, and replays the same epoch.
    """
    self._pending = self.step_dir(step)
    if self.multi:
      state = hosts.to_host(state)          # every process takes part in the gather
    if self.manager is None:
      return
    with disk_errors(self._pending):
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)))

  def wait(self) -> None:
    """Blocks until the pending save is finalized (raises if it failed; a full or
    read-only disk as a DataError naming the checkpoint folder)."""
    if self.manager is None:
      return
    with disk_errors(self._pending):
      self.manager.wait_until_finished()

  def restore_meta(self, step: int) -> dict:
    """The JSON meta of checkpoint `step` (DataError naming the folder if damaged)."""
    def read():
      meta = self._restore(step, "meta", ocp.args.JsonRestore())
      if not isinstance(meta, dict) or not {"fingerprint", "history", "extra"} <= set(meta):
        raise DataError(f"{self.step_dir(step)}: damaged checkpoint: its meta is not an "
                        f"object with fingerprint, history and extra; {_DAMAGED_HINT}")
      return meta
    return hosts.share(self._on_primary(read))

  def _on_primary(self, read):
    """`read()` on process 0; a DataError it raises is raised on every process."""
    if not self.multi:
      return read()
    error, out = None, None
    if self.manager is not None:
      try:
        out = read()
      except DataError as e:
        error = str(e)
    error = hosts.share(error)
    if error:
      raise DataError(error)
    return out

  def _restore(self, step: int, item: str, args):
    # Orbax reports a damaged checkpoint as whatever its reader met (KeyError,
    # ValueError, JSONDecodeError, FileNotFoundError, tensorstore errors): all of them
    # mean "this folder cannot be restored", which the user fixes on disk.
    try:
      return self.manager.restore(step, args=ocp.args.Composite(**{item: args}))[item]
    except Exception as e:  # pylint: disable=broad-except
      text = " ".join(str(e).split())
      raise DataError(f"{self.step_dir(step)}: damaged checkpoint: cannot restore "
                      f"{item!r} ({type(e).__name__}: {text}); {_DAMAGED_HINT}") from e

  def restore_state(self, step: int, like_state):
    """Restores the state; `like_state` gives structure, dtypes and shardings."""
    if not self.multi:
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
      return self._restore(step, "state", ocp.args.StandardRestore(abstract))
    like_host = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), like_state)
    host = self._on_primary(
        lambda: self._restore(step, "state", ocp.args.StandardRestore(like_host)))
    return hosts.to_devices(hosts.share_arrays(host, like_host), like_state)

  def close(self) -> None:
    self.wait()
    if self.manager is not None:
      self.manager.close()

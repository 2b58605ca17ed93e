"""One writer per workdir: `WORKDIR/.lock`, held by a run while it writes there."""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import functools
import inspect
import json
import os
import socket
import sys
import time
from typing import Any, Callable, Iterator

from absl import logging

from bmnas_jax.errors import WorkdirInUseError
from bmnas_jax.hosts import is_primary

LOCK_FILE = ".lock"
# flock(2) is not offered by this filesystem (some NFS and Lustre mounts).
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[dict[str, Any] | None]:
  """Holds `workdir/.lock` for the duration of the block; the workdir must exist.

  The lock is an exclusive `flock` on the file, which records the holder as JSON
  (pid, host, start time, command line). The kernel drops the lock when its process
  dies, so a lock file left by a killed run is taken over (logged as a warning).
  The lock file is removed on leaving the block, normally or by an exception.
  Under `jax.distributed`, only process 0 takes the lock (the others yield None).

  Yields:
    What the lock file records about this run (None on processes other than 0).

  Raises:
    WorkdirInUseError: another running process holds the lock; the message names
      the workdir and that process. Nothing in the workdir is created or changed.
  """
  if not is_primary():
    yield None
    return
  workdir = os.path.abspath(workdir)
  path = os.path.join(workdir, LOCK_FILE)
  fd, previous = _acquire(workdir, path)
  try:
    if previous:
      logging.warning("%s: taking over the lock of a run that is no longer running (%s)",
                      workdir, _describe(previous))
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
          "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    os.fsync(fd)
    yield me
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(path)                     # while still locked: a waiter sees a new file
    os.close(fd)


def holds_workdir(fn: Callable) -> Callable:
  """`fn(..., workdir, ...)` run under `workdir_lock(workdir)`, the workdir made first."""

  @functools.wraps(fn)
  def locked(*args, **kwargs):
    workdir = inspect.signature(fn).bind(*args, **kwargs).arguments["workdir"]
    if is_primary():
      os.makedirs(workdir, exist_ok=True)
    with workdir_lock(workdir):
      return fn(*args, **kwargs)

  return locked


def _acquire(workdir: str, path: str) -> tuple[int, dict[str, Any]]:
  """The locked file's descriptor and what it recorded (empty unless a dead run's)."""
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        raise WorkdirInUseError(_busy(workdir, _read(fd, wait=True))) from None
      except OSError as e:
        if e.errno not in _NO_FLOCK:
          raise
        holder = _read(fd)              # no flock here: trust the record if its pid lives
        if holder and _alive(holder):
          raise WorkdirInUseError(f"{_busy(workdir, holder)}; if it is not running, "
                                  f"remove {path}") from None
        return fd, holder
      if _same_file(fd, path):
        return fd, _read(fd)
    except BaseException:
      os.close(fd)
      raise
    os.close(fd)                        # its holder removed that file as we opened it: again


def _same_file(fd: int, path: str) -> bool:
  try:
    st = os.stat(path)
  except FileNotFoundError:
    return False
  own = os.fstat(fd)
  return (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino)


def _read(fd: int, wait: bool = False) -> dict[str, Any]:
  """The lock file's record; with `wait`, up to 0.5 s for a holder that is writing it."""
  for _ in range(10 if wait else 1):
    try:
      size = os.fstat(fd).st_size
      record = json.loads(os.pread(fd, size, 0).decode()) if size else None
    except (OSError, ValueError):
      record = None
    if isinstance(record, dict):
      return record
    if wait:
      time.sleep(0.05)
  return {}


def _alive(holder: dict[str, Any]) -> bool:
  """Whether the holder may still run (a pid on another host cannot be checked)."""
  if holder.get("host") != socket.gethostname():
    return True
  try:
    os.kill(int(holder["pid"]), 0)
  except (KeyError, TypeError, ValueError, ProcessLookupError):
    return False
  except PermissionError:
    return True
  return True


def _describe(holder: dict[str, Any]) -> str:
  if not holder:
    return "a process that has not recorded itself"
  command = " ".join(str(holder.get("command", "?")).split())
  if len(command) > 200:
    command = command[:197] + "..."
  return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
          f"{holder.get('started', '?')}: {command}")


def _busy(workdir: str, holder: dict[str, Any]) -> str:
  return (f"{workdir} is in use by another run ({_describe(holder)}); wait for it to end "
          f"or choose another --workdir")

"""The workdir lock: one writer per workdir, refusals in one line, dead holders taken over."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys

import jax
import pytest

from bmnas_jax import study
from bmnas_jax.errors import InputError, WorkdirInUseError
from bmnas_jax.workdir_lock import LOCK_FILE, holds_workdir, workdir_lock
from tests.conftest import tree_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Takes the lock, says so, holds it until stdin closes (or the process is killed).
HOLD = ("import sys; from bmnas_jax.workdir_lock import workdir_lock\n"
        "with workdir_lock(sys.argv[1]):\n"
        "  print('locked', flush=True); sys.stdin.read()\n")
# Tries the lock once: exit 0 if taken, else the refusal on stderr and exit 3.
TRY = ("import sys; from bmnas_jax.workdir_lock import workdir_lock\n"
       "try:\n"
       "  with workdir_lock(sys.argv[1]): pass\n"
       "except Exception as e:\n"
       "  print(type(e).__name__, e, file=sys.stderr); sys.exit(3)\n")


def _python(code: str, *args: str, **kw) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, text=True, **kw)


@pytest.fixture
def holder(tmp_path):
  """A separate process holding the lock on `tmp_path / 'w'`."""
  workdir = tmp_path / "w"
  workdir.mkdir()
  proc = _python(HOLD, str(workdir), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
  assert proc.stdout.readline().strip() == "locked"
  yield workdir, proc
  if proc.poll() is None:
    proc.kill()
  proc.wait(timeout=10)
  for stream in (proc.stdin, proc.stdout):
    stream.close()


_tree = tree_state


def test_lock_records_holder_refuses_others_and_releases(tmp_path):
  with workdir_lock(str(tmp_path)) as me:
    with open(tmp_path / LOCK_FILE) as f:
      assert json.load(f) == me
    assert me["pid"] == os.getpid() and me["host"] == socket.gethostname()
    other = _python(TRY, str(tmp_path), stderr=subprocess.PIPE)
    _, err = other.communicate(timeout=30)
    assert other.returncode == 3
    assert err.startswith("WorkdirInUseError ") and err.count("\n") == 1
    for part in (str(tmp_path), f"pid {os.getpid()}", f"host {me['host']}", me["started"]):
      assert part in err
    with pytest.raises(WorkdirInUseError, match=f"pid {os.getpid()} "):
      with workdir_lock(str(tmp_path)):       # the same process, a second time
        pass
    assert issubclass(WorkdirInUseError, InputError)
  assert not (tmp_path / LOCK_FILE).exists()
  with pytest.raises(RuntimeError):
    with workdir_lock(str(tmp_path)):
      raise RuntimeError("boom")
  assert not (tmp_path / LOCK_FILE).exists()    # released on an exception too
  with workdir_lock(str(tmp_path)):
    pass


def test_second_run_on_busy_workdir_exits_1_and_touches_nothing(holder):
  workdir, proc = holder
  (workdir / "search").mkdir()
  (workdir / "search" / "metrics.jsonl").write_text('{"epoch": 0}\n')
  before = _tree(workdir)
  run = subprocess.run([sys.executable, "-m", "experiments.main", f"--workdir={workdir}",
                        "--config.stages=prepare"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
  assert run.returncode == 1, run.stderr
  lines = run.stderr.strip().splitlines()
  assert len(lines) == 1, run.stderr
  assert lines[0].startswith("error: WorkdirInUseError: ")
  assert str(workdir) in lines[0] and f"pid {proc.pid} " in lines[0]
  assert _tree(workdir) == before
  proc.stdin.close()                            # the holder ends: the lock is free again
  assert proc.wait(timeout=10) == 0
  assert not (workdir / LOCK_FILE).exists()
  with workdir_lock(str(workdir)):
    pass


def test_lock_of_killed_process_is_taken_over(holder, caplog):
  workdir, proc = holder
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=10)
  assert json.loads((workdir / LOCK_FILE).read_text())["pid"] == proc.pid   # left behind
  with caplog.at_level(logging.WARNING):
    with workdir_lock(str(workdir)) as me:
      assert me["pid"] == os.getpid()
  assert any("taking over" in r.getMessage() and f"pid {proc.pid} " in r.getMessage()
             for r in caplog.records)
  assert not (workdir / LOCK_FILE).exists()


def test_study_and_decorated_functions_hold_the_lock(tmp_path):
  assert study.run_study.__wrapped__ is not None
  workdir = tmp_path / "new"

  @holds_workdir
  def job(config, workdir):
    assert os.path.exists(os.path.join(workdir, LOCK_FILE))
    return config

  assert job(1, workdir=str(workdir)) == 1
  assert workdir.is_dir() and not (workdir / LOCK_FILE).exists()


def test_only_process_0_takes_the_lock(tmp_path, monkeypatch):
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  with workdir_lock(str(tmp_path)) as me:
    assert me is None and not (tmp_path / LOCK_FILE).exists()

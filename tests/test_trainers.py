"""The search and evaluation trainers end to end on the planted task."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from bmnas_jax import pipeline
from bmnas_jax.data.planted import planted_features
from bmnas_jax.search import run_search
from tests.conftest import SMALL_RUN_EPOCHS, planted_config, small_run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


REF_EPOCHS = SMALL_RUN_EPOCHS


@pytest.fixture(scope="module")
def reference(finished_small_run, tmp_path_factory):
  """Two seeds, one device, uninterrupted (the session's finished small run, its results
  read back by re-running a copy): what every variant below must reproduce."""
  c = small_run_config()
  workdir = shutil.copytree(finished_small_run, tmp_path_factory.mktemp("reference") / "run")
  return c, str(workdir), pipeline.run(c, str(workdir))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start_pair(workdir, out: str, overrides: dict) -> list[subprocess.Popen]:
  """The two processes of one jax.distributed run (tests/multiprocess_worker.py)."""
  port = free_port()
  return [subprocess.Popen(
      [sys.executable, "-m", "tests.multiprocess_worker", str(p), str(port), str(workdir),
       f"{out}_{p}.json", json.dumps(overrides)],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for p in (0, 1)]


def wait_all(procs, timeout: float) -> list[str]:
  """Each process's output once all have exited; when one fails (or time runs out) the
  others are killed (they would wait for it)."""
  deadline = time.monotonic() + timeout
  while any(p.poll() is None for p in procs):
    if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
      for p in procs:
        p.kill()
      break
    time.sleep(0.2)
  return [p.communicate()[0] for p in procs]


def test_two_processes_killed_resume_and_agree_with_one_device(reference, tmp_path):
  """Two processes under jax.distributed (gloo), two CPU devices each, four in the mesh,
  the features streamed from the shards. First the seeds are sharded across the
  processes (each trains its own seed), and both get a real SIGKILL once a search
  checkpoint is saved; the same run started again with every batch split over the four
  devices (each process feeds its half) resumes the search from that checkpoint and
  evaluates. The genotypes and metrics equal the one-device run's; process 1 wrote
  nothing under the workdir in either start; no process read a whole batch."""
  c, _, res = reference
  workdir, out = tmp_path / "run", str(tmp_path / "out")
  base = {"devices": 4, "data.in_memory": False}      # on top of small_run_config
  killed = start_pair(workdir, f"{out}_killed", {**base, "seed_shards": 2})
  ckpt = workdir / "search" / "checkpoints"
  deadline = time.monotonic() + 240
  while time.monotonic() < deadline and all(p.poll() is None for p in killed):
    if ckpt.is_dir() and any(d.isdigit() and int(d) >= 1 for d in os.listdir(ckpt)):
      break
    time.sleep(0.02)
  running = [p.poll() is None for p in killed]
  for p in killed:
    p.send_signal(signal.SIGKILL)
  logs = [p.communicate()[0] for p in killed]
  assert all(running), f"a process ended before it could be killed: {logs[0][-2000:]}"
  assert not (workdir / "evaluate").exists()

  procs = start_pair(workdir, out, {**base, "seed_shards": 1})
  for p, log in zip(procs, wait_all(procs, timeout=240)):
    assert p.returncode == 0, log[-3000:]
  one = res["search"]
  for k in (0, 1):                   # every process holds the same results
    with open(f"{out}_{k}.json") as f:
      got = json.load(f)
    assert got["genotypes"] == [g.to_json_dict() for g in one.best_genotypes]
    assert len(got["history"]) == REF_EPOCHS
    for key in ("train_loss", "arch_loss", "val_loss"):
      np.testing.assert_allclose(got["history"][-1][key], one.history[-1][key], rtol=2e-4,
                                 atol=2e-4)
    # accuracy may differ by an example whose logits are within float noise of a tie
    np.testing.assert_allclose(got["history"][-1]["val_metric"],
                               one.history[-1]["val_metric"], atol=1 / c.data.sizes[1] + 1e-6)
    np.testing.assert_allclose(got["final_test"], res["evaluate"]["final_test"]["values"],
                               atol=1 / c.data.sizes[2] + 1e-6)
    blocks = [r for r in got["reads"] if len(r) > 1]   # (the first read is a 2-row sample)
    assert blocks and all(r[-1] < c.search.batch_size for r in blocks), blocks[:4]
  writes = {}
  for start in ("_killed", ""):
    for k in (0, 1):
      with open(f"{out}{start}_{k}.json.writes") as f:
        writes[start, k] = f.read().splitlines()
  assert writes["_killed", 0] and writes["", 0]        # the watch sees process 0's writes
  assert writes["_killed", 1] == writes["", 1] == []   # process 0 alone wrote files
  for f in ("features/prepare.json", "search/best_genotype.json", "evaluate/metrics.json"):
    assert (workdir / f).exists(), f
  assert [r["epoch"] for r in _read_jsonl(workdir / "search" / "metrics.jsonl")] == \
      list(range(REF_EPOCHS))


def test_resume_refuses_a_different_config(reference, tmp_path):
  c, ref_dir, _ = reference
  shutil.copytree(ref_dir, tmp_path / "run")
  c = c.copy_and_resolve_references()
  c.model.C = 16
  with pytest.raises(ValueError, match=r"different config \(keys \['model'\] differ\)"):
    run_search(c, planted_features(c), str(tmp_path / "run"))


def test_config_errors_name_the_key(tmp_path):
  c = planted_config(**{"search.batch_size": 1000})
  with pytest.raises(ValueError, match=r"config.search.batch_size=1000 is larger"):
    pipeline.run(c, str(tmp_path))
  c = planted_config(**{"search.alternation": "bilevel"})
  with pytest.raises(ValueError, match=r"config.search.alternation='bilevel'"):
    pipeline.run(c, str(tmp_path))
  c = planted_config(stages="search,train")
  with pytest.raises(ValueError, match=r"config.stages='search,train'"):
    pipeline.run(c, str(tmp_path))
  c = planted_config(**{"model.num_classes": 5})
  with pytest.raises(ValueError,
                     match=r"config.model.num_classes=5 but config.data.source=.planted. has 4"):
    pipeline.run(c, str(tmp_path))

"""The search and evaluation trainers end to end on the planted task."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from bmnas_jax import pipeline
from bmnas_jax.data.planted import planted_features
from bmnas_jax.search import run_search
from tests.conftest import Killed, planted_config


def _strip_seconds(records):
  return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


REF_EPOCHS = 4


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """Two seeds, one device, uninterrupted: what every variant below must reproduce."""
  c = planted_config(**{"search.epochs": REF_EPOCHS})
  workdir = str(tmp_path_factory.mktemp("reference"))
  return c, workdir, pipeline.run(c, workdir)


def _assert_same_run(ref_dir, other_dir):
  for f in ("search/best_genotype.json", "search/best_genotype_seed_1.json"):
    assert open(os.path.join(ref_dir, f), "rb").read() == \
        open(os.path.join(other_dir, f), "rb").read()
  for f in ("search/metrics.jsonl", "evaluate/metrics.jsonl"):
    assert _strip_seconds(_read_jsonl(os.path.join(ref_dir, f))) == \
        _strip_seconds(_read_jsonl(os.path.join(other_dir, f)))
  a = json.load(open(os.path.join(ref_dir, "evaluate", "metrics.json")))
  b = json.load(open(os.path.join(other_dir, "evaluate", "metrics.json")))
  for key in ("final_test", "final_val", "val_selected", "genotype"):
    assert a[key] == b[key]


def test_stop_and_resume_gives_identical_results(reference, tmp_path, die_after_checkpoint):
  c, ref_dir, _ = reference
  cut_dir = str(tmp_path / "cut")
  die_after_checkpoint(1)
  with pytest.raises(Killed):
    pipeline.run(c, cut_dir)                       # dies after search epoch 1
  die_after_checkpoint(None)
  pipeline.run(c, cut_dir)                         # resumes at epoch 2
  _assert_same_run(ref_dir, cut_dir)


def test_sigkill_and_resume(reference, tmp_path):
  """A real SIGKILL mid-search, then the same command again."""
  _, ref_dir, _ = reference
  args = ["--config=experiments/configs/planted.py", "--config.devices=1", "--config.seeds=2",
          "--config.data.sizes=(256,128,128)", "--config.search.batch_size=32",
          "--config.evaluate.batch_size=32", f"--config.search.epochs={REF_EPOCHS}",
          "--config.evaluate.epochs=2", "--config.evaluate.baselines=()",
          "--config.stages=prepare,search,evaluate"]
  killed = str(tmp_path / "killed")
  cmd = [sys.executable, "-m", "experiments.main", *args, f"--workdir={killed}"]
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt = os.path.join(killed, "search", "checkpoints")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(ckpt) and any(d.isdigit() and int(d) >= 1 for d in os.listdir(ckpt)):
      break
    time.sleep(0.02)
  assert proc.poll() is None, "the run finished before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(killed, "evaluate", "metrics.json"))
  subprocess.run(cmd, check=True, capture_output=True)
  _assert_same_run(ref_dir, killed)


@pytest.mark.parametrize("devices,seed_shards", [(4, 2)])
def test_devices_agree(reference, tmp_path, devices, seed_shards):
  c, _, res = reference
  c = c.copy_and_resolve_references()
  c.devices, c.seed_shards = devices, seed_shards
  one = res["search"]
  many = run_search(c, planted_features(c), str(tmp_path))
  assert [g.to_json() for g in one.best_genotypes] == [g.to_json() for g in many.best_genotypes]
  for key in ("train_loss", "arch_loss", "val_loss"):
    np.testing.assert_allclose(one.history[-1][key], many.history[-1][key], rtol=2e-4,
                               atol=2e-4)
  # accuracy may differ by an example whose logits are within float noise of a tie
  np.testing.assert_allclose(one.history[-1]["val_metric"], many.history[-1]["val_metric"],
                             atol=1.0 / c.data.sizes[1] + 1e-6)
  np.testing.assert_allclose(np.asarray(one.history[-1]["arch_softmax"][1]["cell_0"]["alpha"]),
                             np.asarray(many.history[-1]["arch_softmax"][1]["cell_0"]["alpha"]),
                             atol=1e-5)


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

"""Re-running in a finished workdir: what is reused, what is refused, what is cleaned."""

import json
import logging
import os
import shutil

import pytest

from bmnas_jax import pipeline
from bmnas_jax.errors import ConfigError
from tests.conftest import SMALL_RUN_EPOCHS, small_run_config, tree_state

EPOCHS = SMALL_RUN_EPOCHS


_config = small_run_config


@pytest.fixture
def finished(finished_small_run):
  """A finished planted run: prepare, a 4-epoch search, evaluate (shared, never changed)."""
  return finished_small_run


@pytest.fixture
def workdir(finished, tmp_path):
  """A private copy of the finished run."""
  return shutil.copytree(finished, str(tmp_path / "run"))


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


_tree = tree_state


# ------------------------------------------------------------------- epochs

def test_fewer_search_epochs_than_the_checkpoint_holds_are_refused(workdir):
  before = _tree(workdir)
  with pytest.raises(ConfigError, match=r"search/ holds 4 finished epochs, "
                                        r"config\.search\.epochs=2 asks for fewer"):
    pipeline.run(_config(**{"search.epochs": 2, "stages": "search"}), workdir)
  assert _tree(workdir) == before


def test_fewer_evaluate_epochs_than_the_checkpoint_holds_are_refused(workdir):
  with pytest.raises(ConfigError, match=r"evaluate/ holds 2 finished epochs, "
                                        r"config\.evaluate\.epochs=1"):
    pipeline.run(_config(**{"evaluate.epochs": 1, "stages": "evaluate"}), workdir)


def test_more_search_epochs_resume_and_say_so(workdir, caplog):
  caplog.set_level(logging.INFO)
  pipeline.run(_config(**{"search.epochs": EPOCHS + 1, "stages": "search"}), workdir)
  lines = [r.getMessage() for r in caplog.records if "resuming at epoch" in r.getMessage()]
  assert len(lines) == 1 and "search/ resuming at epoch 4 of 5" in lines[0]
  assert [r["epoch"] for r in _read_jsonl(os.path.join(workdir, "search", "metrics.jsonl"))] \
      == list(range(EPOCHS + 1))


def test_same_epochs_reuse_everything(workdir):
  pipeline.run(_config(**{"stages": "search"}), workdir)
  assert len(_read_jsonl(os.path.join(workdir, "search", "metrics.jsonl"))) == EPOCHS


# ---------------------------------------------------------- failed saves

def test_metrics_wait_for_the_checkpoint(workdir, monkeypatch):
  """A save that fails in the background leaves the per-epoch files at the last
  complete checkpoint."""
  from bmnas_jax import checkpoint
  shutil.rmtree(os.path.join(workdir, "search"))
  real_save, failed = checkpoint.Checkpointer.save, []

  def save(self, step, state, meta):
    if step == 2:                  # as if the asynchronous write failed
      failed.append(step)
      return
    real_save(self, step, state, meta)

  def wait(self):
    self.manager.wait_until_finished()
    if failed:
      raise OSError("disk full")

  monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
  monkeypatch.setattr(checkpoint.Checkpointer, "wait", wait)
  with pytest.raises(OSError, match="disk full"):
    pipeline.run(_config(**{"stages": "search"}), workdir)
  records = _read_jsonl(os.path.join(workdir, "search", "metrics.jsonl"))
  assert [r["epoch"] for r in records] == [0, 1]


# -------------------------------------------------------------------- modes

def test_atomic_writes_honour_the_umask(finished, tmp_path):
  from bmnas_jax import genotype as genotype_lib
  from bmnas_jax.checkpoint import write_json_atomic
  g = genotype_lib.load(os.path.join(finished, "search", "best_genotype.json"))
  old = os.umask(0o027)
  try:
    write_json_atomic(tmp_path / "a.json", {"a": 1})
    genotype_lib.save(g, tmp_path / "g.json")
  finally:
    os.umask(old)
  for name in ("a.json", "g.json"):
    assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~0o027


# ------------------------------------------------------------ another config

def test_another_experiments_workdir_is_refused_before_any_write(workdir):
  from experiments.configs import mfeat
  c = mfeat.get_config()
  c.devices = 1
  before = _tree(workdir)
  with pytest.raises(ConfigError, match=r"config\.name gives 'planted'.*'mfeat'"):
    pipeline.run(c, workdir)
  assert _tree(workdir) == before


# ------------------------------------------------------------ stale temps

def test_stale_temporaries_are_removed_at_the_start(workdir):
  stale = [".report-new-abcd1234", "backbones/.A.tmp-zz_91abc",
           "features/.planted-1.0.0.tmp-q1w2e3r4", "backbones/.A.old-" + "0" * 32]
  for d in stale:
    os.makedirs(os.path.join(workdir, d, "inner"))
  stale_files = ["search/.metrics.jsonl.k2j4h5g6.tmp", "search/.genotype-abcdefgh.tmp"]
  kept = [".keep.tmp", "notes.tmp", "search/.x.tmp-short"]
  for f in stale_files + kept:
    open(os.path.join(workdir, f), "w").close()
  pipeline.run(_config(**{"stages": "search"}), workdir)
  for p in stale + stale_files:
    assert not os.path.exists(os.path.join(workdir, p)), p
  for p in kept:
    assert os.path.exists(os.path.join(workdir, p)), p


# ------------------------------------------------------- damaged backbones

@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_backbone_export_is_noticed(tmp_path, damage):
  from bmnas_jax.data import backbones as bb
  from bmnas_jax.data.source import InputSpec
  from bmnas_jax.errors import DataError
  spec = InputSpec((6,), "float32")
  module = bb.make_backbone("shape_mlp", {"num_classes": 3})
  export = tmp_path / "backbones" / "Shape"
  bb.export_backbone(export, "shape_mlp", {"num_classes": 3}, module, spec,
                     bb.init_variables(module, spec, seed=1))
  files = [p for p in (export / bb.VARIABLES_DIRNAME).rglob("*") if p.is_file()]
  biggest = max(files, key=lambda p: p.stat().st_size)
  data = bytearray(biggest.read_bytes())
  if damage == "truncate":
    data = data[:len(data) // 2]
  else:
    data[len(data) // 2] ^= 0xFF
  biggest.write_bytes(bytes(data))
  with pytest.raises(DataError, match=str(export)):
    bb.restore_backbone(export, module, spec)

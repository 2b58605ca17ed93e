"""The trainers on streamed shards agree with the in-memory trainers on the same data."""

import json
import os

import jax
import numpy as np
import pytest

from bmnas_jax import loop
from bmnas_jax.data import shards
from bmnas_jax.data.planted import planted_features
from bmnas_jax.evaluate import run_evaluate
from bmnas_jax.search import run_search, seed_keys
from tests.conftest import Killed, small_planted_config

NAME = "planted_test"
BLOCK = 3                  # divides none of the batch counts below


def _config(alternation: str = "epoch"):
  """Four nodes (compiles fast); 8 train and 5 val batches (search), 13 train+val and
  5 + 5 evaluation batches (evaluate)."""
  return small_planted_config(**{
      "seeds": 2, "data.sizes": (128, 80, 72), "data.in_memory": False,
      "data.stream_block": BLOCK,
      "search.epochs": 3, "search.batch_size": 16, "search.alternation": alternation,
      "evaluate.epochs": 3, "evaluate.batch_size": 16,
      "model.dropout": 0.1, "evaluate.dropout": 0.2})       # dropout: the step keys matter


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """(the planted FeatureSet, the directory of its shards)."""
  fs = planted_features(_config())
  data_dir = tmp_path_factory.mktemp("shards")
  shards.write_shards(fs, data_dir, NAME)
  return fs, str(data_dir)


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
  """`get(stage, alternation, streamed) -> (workdir, result)`, each run once per module."""
  fs, data_dir = data
  done = {}

  def get(stage, alternation, streamed):
    key = (stage, alternation, streamed)
    if key not in done:
      c = _config(alternation)
      src = shards.open_shards(data_dir, NAME, expect_nodes=fs.nodes) if streamed else fs
      workdir = str(tmp_path_factory.mktemp(f"{stage}_{alternation}_{streamed}"))
      if stage == "search":
        done[key] = workdir, run_search(c, src, workdir)
      else:
        searched = get("search", "epoch", False)[1].genotype
        done[key] = workdir, run_evaluate(c, src, searched, workdir)
    return done[key]
  return get


def _files(stage_dir):
  return sorted(os.path.relpath(os.path.join(d, f), stage_dir)
                for d, _, names in os.walk(stage_dir) if "checkpoints" not in d for f in names)


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _strip_seconds(records):
  return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_block_sizes_leave_a_short_last_block():
  c = _config()
  n_train, n_val, n_test = c.data.sizes
  b = c.search.batch_size
  assert b == c.evaluate.batch_size and c.data.stream_block == BLOCK
  for nb in (n_train // b, n_val // b, (n_train + n_val) // b):   # training phases
    assert nb % BLOCK
  for nb in (-(-n_val // b), -(-n_val // b) - (-n_test // b)):      # evaluation: val; val+test
    assert nb % BLOCK
  assert n_test % b                                                  # a padded, masked batch


def test_search_streamed_equals_in_memory(runs):
  """'epoch' alternation: two phases, each with its own short last block ('step'
  streamed is the multi-process test's, tests/test_trainers.py, against in memory)."""
  mem_dir, mem = runs("search", "epoch", False)
  str_dir, st = runs("search", "epoch", True)
  assert mem.epoch_traces == 1 and st.epoch_traces == 1   # the short last block: no retrace
  assert [g.to_json() for g in st.best_genotypes] == [g.to_json() for g in mem.best_genotypes]
  assert st.genotype.to_json() == mem.genotype.to_json()
  assert st.best_epoch == mem.best_epoch
  np.testing.assert_allclose(st.best_val_metric, mem.best_val_metric, rtol=1e-6)
  assert len(st.history) == len(mem.history) == 3
  for a, b in zip(mem.history, st.history):
    assert a["genotypes"] == b["genotypes"]
    for key in ("train_loss", "arch_loss", "val_loss", "val_metric", "arch_entropy"):
      np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(np.asarray(b["arch_softmax"][1]["cell_0"]["alpha"]),
                               np.asarray(a["arch_softmax"][1]["cell_0"]["alpha"]), atol=2e-6)
  # training moved: the comparison is not of two untouched initialisations
  assert mem.history[0]["train_loss"] != mem.history[-1]["train_loss"]
  assert _files(os.path.join(str_dir, "search")) == _files(os.path.join(mem_dir, "search"))
  for f in ("best_genotype.json", "best_genotype_seed_1.json"):
    assert open(os.path.join(str_dir, "search", f)).read() == \
        open(os.path.join(mem_dir, "search", f)).read()


def test_evaluate_streamed_equals_in_memory(runs):
  mem_dir, mem = runs("evaluate", "epoch", False)
  str_dir, st = runs("evaluate", "epoch", True)
  assert mem["epoch_traces"] == 1 and st["epoch_traces"] == 1
  for key in ("final_test", "final_val"):
    np.testing.assert_allclose(st[key]["values"], mem[key]["values"], rtol=1e-6)
  assert st["val_selected"]["epoch"] == mem["val_selected"]["epoch"]
  np.testing.assert_allclose(st["val_selected"]["test"]["values"],
                             mem["val_selected"]["test"]["values"], rtol=1e-6)
  a = _read_jsonl(os.path.join(mem_dir, "evaluate", "metrics.jsonl"))
  b = _read_jsonl(os.path.join(str_dir, "evaluate", "metrics.jsonl"))
  assert len(a) == len(b) == 3
  for ra, rb in zip(a, b):
    for key in ("train_loss", "val_loss", "val_metric", "test_loss", "test_metric"):
      np.testing.assert_allclose(rb[key], ra[key], rtol=1e-5, atol=1e-6, err_msg=key)
  assert _files(os.path.join(str_dir, "evaluate")) == _files(os.path.join(mem_dir, "evaluate"))


def test_search_stop_and_resume_gives_identical_results(runs, data, tmp_path,
                                                       die_after_checkpoint):
  """In memory: a search that dies right after its epoch-1 checkpoint, run again, ends
  with the uninterrupted run's files (every epoch's metrics and genotypes)."""
  ref_dir, ref = runs("search", "epoch", False)
  fs, _ = data
  cut_dir = str(tmp_path / "cut")
  die_after_checkpoint(1)
  with pytest.raises(Killed):
    run_search(_config(), fs, cut_dir)
  die_after_checkpoint(None)
  resumed = run_search(_config(), fs, cut_dir)
  assert [g.to_json() for g in resumed.best_genotypes] == \
      [g.to_json() for g in ref.best_genotypes]
  assert _strip_seconds(_read_jsonl(os.path.join(cut_dir, "search", "metrics.jsonl"))) == \
      _strip_seconds(_read_jsonl(os.path.join(ref_dir, "search", "metrics.jsonl")))
  assert _files(os.path.join(cut_dir, "search")) == _files(os.path.join(ref_dir, "search"))
  for f in ("arch_history.json", "best_genotype.json", "summary.json"):
    a = json.load(open(os.path.join(ref_dir, "search", f)))
    b = json.load(open(os.path.join(cut_dir, "search", f)))
    if f == "summary.json":
      a.pop("seconds"), b.pop("seconds")
    assert a == b, f


def test_streamed_stop_and_resume_gives_identical_results(runs, data, tmp_path,
                                                          die_after_checkpoint):
  ref_dir, ref = runs("evaluate", "epoch", True)
  genotype = runs("search", "epoch", False)[1].genotype
  _, data_dir = data
  cut_dir = str(tmp_path / "cut")
  c = _config()
  die_after_checkpoint(1)
  with pytest.raises(Killed):
    run_evaluate(c, shards.open_shards(data_dir, NAME), genotype, cut_dir)   # dies after epoch 1
  assert not os.path.exists(os.path.join(cut_dir, "evaluate", "metrics.json"))
  die_after_checkpoint(None)
  resumed = run_evaluate(c, shards.open_shards(data_dir, NAME), genotype, cut_dir)  # epoch 2
  assert _strip_seconds(_read_jsonl(os.path.join(cut_dir, "evaluate", "metrics.jsonl"))) == \
      _strip_seconds(_read_jsonl(os.path.join(ref_dir, "evaluate", "metrics.jsonl")))
  for key in ("final_test", "final_val", "val_selected", "genotype"):
    assert resumed[key] == ref[key]


def test_streamed_divergence_names_the_step(runs, data, tmp_path, monkeypatch):
  """A NaN in a val row (train+val retraining) read in the last, short block of
  the epoch: the error names that step of the phase, the epoch and the seed."""
  runs("evaluate", "epoch", True)                      # compiled (and cached) programs
  genotype = runs("search", "epoch", False)[1].genotype
  _, data_dir = data
  c = _config()
  n_train, n_val = c.data.sizes[:2]
  n, b = n_train + n_val, c.evaluate.batch_size
  nb = n // b
  k_perm = jax.random.split(jax.random.fold_in(seed_keys([c.seed], 1)[0], 0))[0]
  rows = np.asarray(loop.shuffled_batches(k_perm, n, b, nb))          # seed 0, epoch 0
  step = nb - 1                                                        # the last block's step
  val_rows = rows[step][rows[step] >= n_train]
  assert val_rows.size and nb % BLOCK == 1
  bad_key = int(val_rows[0]) - n_train                                 # its position in val
  real_read = shards.ShardSource.read

  def read_with_nan(self, split, keys):
    out = real_read(self, split, keys)
    if split == "val":
      for node in self.node_names:                  # whichever nodes the genotype reads
        out[node][np.asarray(keys) == bad_key] = np.nan
    return out

  monkeypatch.setattr(shards.ShardSource, "read", read_with_nan)
  with pytest.raises(FloatingPointError,
                     match=rf"evaluate weight step at epoch 0, step {step} \(seed {c.seed}\): "
                           r"non-finite loss"):
    run_evaluate(c, shards.open_shards(data_dir, NAME), genotype, str(tmp_path))

"""The embedded default (mfeat) through every stage, with tiny epoch counts."""

import csv
import json
import os

import pytest

from bmnas_jax import pipeline
from experiments.configs import mfeat


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  c = mfeat.get_config()
  assert c.stages == "prepare,search,evaluate,ablate,report"
  c.devices, c.seeds = 1, 2
  for b in (c.backbones.Image, c.backbones.Shape):
    b.epochs = 1
  c.search.epochs, c.evaluate.epochs, c.ablate.random_trials = 1, 1, 2
  c.prepare.probe_examples = 200      # the probes' table, on a sample
  # Table 6's late fusion (the ablation reuses it); the planted test trains the MLP kinds.
  c.evaluate.baselines = ("late_fusion",)
  # One Cell of one step: every stage and table, at a fraction of the compile time.
  c.model.num_cells, c.model.multiplier, c.model.steps, c.model.node_multiplier = 1, 1, 1, 1
  tmp_path = tmp_path_factory.mktemp("mfeat")
  return tmp_path, pipeline.run(c, str(tmp_path))


def test_default_pipeline_tiny(tiny_run):
  tmp_path, out = tiny_run
  assert len(out["evaluate"]["final_test"]["values"]) == 2
  assert 0.1 < out["evaluate"]["final_test"]["mean"] <= 1.0         # ten classes
  report = open(out["report"]).read()
  for title in ("Table 1-3 form", "Table 4 form", "Table 5 form", "Table 6 form",
                "Table 7 form"):
    assert title in report
  assert "_No " not in report                                       # every section filled
  assert "| Image_1 | conv1 | grid | 16 x 4 |" in report             # the linear probes
  for name in ("results", "params", "search_cost", "feature_selection", "fusion"):
    with open(tmp_path / "report" / f"{name}.csv") as f:
      assert len(list(csv.reader(f))) >= 2
  assert os.path.getsize(tmp_path / "report" / "genotype.png") > 10_000
  for f in ("backbones/unimodal.json", "features/prepare.json", "search/best_genotype.json",
            "ablate/results.json"):
    assert (tmp_path / f).exists()


def test_late_fusion_and_ablation_rows(tiny_run):
  tmp_path, out = tiny_run
  # Every baseline trained like the searched network (same seeds, epochs); Table 6's late
  # fusion takes the last feature of each modality, Image_2 and Shape_2.
  base = out["baselines"]
  assert list(base) == ["late_fusion"]
  for name, res in base.items():
    assert res["seeds"] == out["evaluate"]["seeds"] and res["epochs"] == 1, name
    assert (tmp_path / "baselines" / name / "metrics.json").exists()
  assert base["late_fusion"]["genotype"]["cells"][0]["inputs"] == [1, 3]
  report = open(out["report"]).read()
  assert "| Late fusion (Table 6: ConcatFC Cell) | Image + Shape |" in report
  abl = json.loads((tmp_path / "ablate" / "results.json").read_text())
  names = [(r["table"], r["name"]) for r in abl["rows"]]
  assert names[:3] == [("feature_selection", "random"), ("feature_selection", "late_fusion"),
                       ("feature_selection", "searched")]
  assert [n for t, n in names if t == "fusion"] == ["Sum", "ConcatFC", "MHA", "AoA", "searched"]
  for r in abl["rows"]:
    assert 0.0 <= r["test"]["mean"] <= 1.0
  # the random selections trained together (one program, checkpoints in ablate/random/),
  # each with its own files, as if alone
  assert [n for _, n in names if n.startswith("random_")] == ["random_1", "random_2"]
  assert (tmp_path / "ablate" / "random" / "checkpoints").is_dir()
  for k in (1, 2):
    row = json.loads((tmp_path / "ablate" / f"random_{k}" / "metrics.json").read_text())
    assert row["seeds"] == [0, 1] and row["genotype"] == abl["rows"][0]["genotypes"][k - 1]
  mha = [r for r in abl["rows"] if r["name"] == "MHA"][0]["genotypes"][0]
  assert [s["op"] for s in mha["cells"][0]["steps"]] == ["ScaleDotAttn", "ScaleDotAttn"]
  searched = [r for r in abl["rows"] if r["name"] == "searched"][0]
  assert searched["test"] == out["evaluate"]["final_test"]


def _tree_digest(root, skip=("features",)):
  import hashlib
  h = hashlib.sha256()
  for d, dirs, files in os.walk(root):           # prune in place, walk in sorted order
    dirs[:] = sorted(x for x in dirs if os.path.relpath(os.path.join(d, x), root) not in skip)
    for f in sorted(files):
      p = os.path.join(d, f)
      h.update(p.encode())
      h.update(open(p, "rb").read())
  return h.hexdigest()


def test_bad_input_through_the_entry_point(tiny_run):
  """A corrupt shard and a config that disagrees with the features: one error line
  naming the file or key, exit status 1, earlier outputs untouched."""
  import subprocess
  import sys
  tmp_path, _ = tiny_run
  base = [sys.executable, "-m", "experiments.main", f"--workdir={tmp_path}",
          "--config.devices=1", "--config.seeds=2", "--config.stages=search",
          "--config.search.epochs=1", "--config.backbones.Image.epochs=1",
          "--config.backbones.Shape.epochs=1"]
  before = _tree_digest(tmp_path)
  bad = subprocess.run(base + ["--config.data.channels.Image=(16, 33)"], capture_output=True,
                       text=True)
  assert bad.returncode == 1
  assert "error:" in bad.stderr and "Image_2" in bad.stderr
  shard = sorted((tmp_path / "features").rglob("*array_record*"))[0]
  with open(shard, "r+b") as f:
    f.truncate(100)
  bad = subprocess.run(base, capture_output=True, text=True)
  assert bad.returncode == 1 and shard.name in bad.stderr
  assert _tree_digest(tmp_path) == before

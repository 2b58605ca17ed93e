"""The embedded default (mfeat) through every stage, with tiny epoch counts."""

import csv
import os

from bmnas_jax import pipeline
from experiments.configs import mfeat


def test_default_pipeline_tiny(tmp_path):
  c = mfeat.get_config()
  assert c.stages == "search,evaluate,ablate,report"
  c.devices, c.seeds = 1, 2
  for b in (c.backbones.Image, c.backbones.Shape):
    b.epochs = 1
  c.search.epochs, c.evaluate.epochs, c.ablate.random_trials = 1, 1, 1
  out = pipeline.run(c, str(tmp_path))
  assert len(out["evaluate"]["final_test"]["values"]) == 2
  assert 0.1 < out["evaluate"]["final_test"]["mean"] <= 1.0         # ten classes
  report = open(out["report"]).read()
  for title in ("Table 1-3 form", "Table 4 form", "Table 5 form", "Table 6 form",
                "Table 7 form"):
    assert title in report
  assert "_No " not in report                                       # every section filled
  for name in ("results", "params", "search_cost", "feature_selection", "fusion"):
    with open(tmp_path / "report" / f"{name}.csv") as f:
      assert len(list(csv.reader(f))) >= 2
  assert os.path.getsize(tmp_path / "report" / "genotype.png") > 10_000
  for f in ("backbones/unimodal.json", "search/best_genotype.json", "ablate/results.json"):
    assert (tmp_path / f).exists()

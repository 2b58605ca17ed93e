"""The worked example of a user's own dataset (experiments/own_data) end to end, tiny epochs."""

import os

from bmnas_jax import pipeline
from bmnas_jax.data import shards
from experiments.own_data import config as own_config


def test_own_data_example_end_to_end(tmp_path):
  c = own_config.get_config()
  c.devices, c.seeds = 1, 1
  for m in c.data.modalities:
    c.backbones[m].epochs = 1
  c.search.epochs = c.evaluate.epochs = 1
  c.model.num_cells = c.model.multiplier = 1
  c.model.steps = c.model.node_multiplier = 1
  c.prepare.probe_examples = 100
  c.evaluate.baselines = ()
  c.stages = "prepare,search,evaluate"       # the report: tests/test_default_pipeline.py
  out = pipeline.run(c, os.fspath(tmp_path))
  fs = shards.read_feature_set(tmp_path / "features", "own_data")
  assert [(n.name, n.channels, n.length) for n in fs.nodes] == [
      ("Video_1", 8, 4), ("Video_2", 16, 4), ("Video_3", 16, 1), ("Sound_1", 16, 4),
      ("Sound_2", 16, 4), ("Meta_1", 32, 1)]
  assert [len(fs.splits[s]) for s in ("train", "val", "test")] == [600, 200, 200]
  assert len(out["prepare"]["probes"]) == 6
  assert 0 < out["evaluate"]["final_test"]["mean"] <= 1

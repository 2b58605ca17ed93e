"""The planted task searched and evaluated over five seeds, with a third modality of pure
noise: the pair is found, the noise avoided, the baselines trained, files written."""

import json
import os

import numpy as np
import pytest

from bmnas_jax import pipeline
from experiments.configs import common
from tests.conftest import planted_config

PLANTED = ("A_2", "B_3")


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
  """Five seeds searched and evaluated together (the module's reference run); modality N
  is pure noise; the unimodal baselines and the report."""
  c = planted_config(**{"seeds": 5, "search.epochs": 10, "evaluate.epochs": 4,
                        "data.modalities": ("A", "B", "N"),
                        "evaluate.baselines": ("unimodal",),
                        "stages": "prepare,search,evaluate,report"})
  c.data.channels.N = (8, 8, 8)
  c.backbones.N = common.backbone("stacked_features", weights="init")
  workdir = str(tmp_path_factory.mktemp("planted"))
  return c, workdir, pipeline.run(c, workdir)


def test_planted_pair_found_and_beats_chance(planted_run):
  c, workdir, res = planted_run
  search, ev = res["search"], res["evaluate"]
  names = [tuple(g.upper_name(u) for u in g.cells[0].inputs) for g in search.best_genotypes]
  assert sum(sorted(n) == sorted(PLANTED) for n in names) >= 4, names
  assert not [n for n in names if any(x.startswith("N_") for x in n)], names   # noise avoided
  assert search.epoch_traces == 1 and ev["epoch_traces"] == 1       # compiled once each
  assert ev["final_test"]["mean"] > 0.6                             # chance is 0.25
  assert len(ev["final_test"]["values"]) == 5
  assert ev["val_selected"]["val_held_out"] is False                # retrained on train+val


def test_baselines_and_the_winner_line(planted_run):
  """A modality alone reads its last feature: B_3 carries one of the label's two bits
  (about 50 %), A_3 and N_3 are noise (chance, 25 %); the report's first line names the
  row with the best test mean."""
  _, workdir, res = planted_run
  base = res["baselines"]
  assert list(base) == ["unimodal_A", "unimodal_B", "unimodal_N"]
  for m in ("A", "N"):
    assert base[f"unimodal_{m}"]["final_test"]["mean"] < 0.35, m
  assert 0.35 < base["unimodal_B"]["final_test"]["mean"] < 0.65
  rows = {r["label"]: r["final_test"]["mean"] for r in base.values()}
  rows["BM-NAS (searched), final epoch"] = res["evaluate"]["final_test"]["mean"]
  best = max(rows, key=rows.get)
  md = open(res["report"]).read()
  winner = [line for line in md.splitlines() if line.startswith("**Best on test:")][0]
  assert winner.startswith(f"**Best on test: {best}, {100 * rows[best]:.2f}"), (winner, rows)


def test_planted_run_writes_its_files(planted_run):
  _, workdir, res = planted_run
  s = os.path.join(workdir, "search")
  lines = _read_jsonl(os.path.join(s, "metrics.jsonl"))
  assert [r["epoch"] for r in lines] == list(range(10))
  for key in ("train_loss", "arch_loss", "val_loss", "val_metric", "arch_entropy", "seconds"):
    assert key in lines[0]
  assert len(lines[0]["val_metric"]) == 5
  assert os.path.exists(os.path.join(s, "genotypes", "epoch_009_seed_4.json"))
  for k in range(5):
    assert os.path.exists(os.path.join(s, f"best_genotype_seed_{k}.json"))
  summary = json.load(open(os.path.join(s, "summary.json")))
  assert summary["chosen_seed"] == int(np.argmax(summary["best_val_metric"]))
  assert summary["agreement"]["cells"][0]["inputs"]
  hist = json.load(open(os.path.join(s, "arch_history.json")))
  alpha = np.asarray(hist["softmax"][-1][0]["cell_0"]["alpha"])     # epoch, seed
  np.testing.assert_allclose(alpha.sum(-1), 1.0, atol=1e-5)
  ev = json.load(open(os.path.join(workdir, "evaluate", "metrics.json")))
  assert ev["final_test"]["mean"] == pytest.approx(res["evaluate"]["final_test"]["mean"])
  assert len(_read_jsonl(os.path.join(workdir, "evaluate", "metrics.jsonl"))) == 4

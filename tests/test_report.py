"""The report stage on a hand-written run directory: tables, CSVs, PNGs, notes, atomicity."""

import csv
import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from bmnas_jax import genotype as G
from bmnas_jax import ops
from bmnas_jax.report import plots, report, tables
from bmnas_jax.errors import DataError
from bmnas_jax.summary import describe
from experiments.configs import planted

NODES = ["A_1", "A_2", "A_3", "B_1", "B_2", "B_3"]
GENOTYPE = {
    "format": "bmnas-genotype/1", "nodes": NODES,
    "cells": [{"inputs": [1, 5], "steps": [{"op": "LinearGLU", "inputs": [1, 0]},
                                           {"op": "ScaleDotAttn", "inputs": [2, 0]}],
               "concat": [2, 3]},
              {"inputs": [6, 2], "steps": [{"op": "Sum", "inputs": [0, 1]},
                                           {"op": "ConcatFC", "inputs": [2, 2]}],
               "concat": [2, 3]}],
    "concat": [6, 7]}
SEEDS = [0, 1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def config():
  c = planted.get_config()
  c.model.num_cells, c.model.multiplier = 2, 2
  c.model.steps, c.model.node_multiplier = 2, 2
  return c


def summary(mean, std, n=2):
  values = [mean - std, mean + std] if n == 2 else [mean] * n
  return {"mean": mean, "std": std, "values": values}


def write_json(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


def write_jsonl(path, records):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)


def softmax(a):
  e = np.exp(a - a.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def write_required(wd):
  """search/{metrics.jsonl, summary.json, best_genotype.json}, evaluate/metrics.json."""
  rng = np.random.default_rng(0)
  recs = []
  for e in range(4):
    val = [0.5 + 0.03 * e + 0.01 * s for s in SEEDS]
    recs.append({"epoch": e, "seconds": 1.5, "seeds": SEEDS, "metric": "accuracy",
                 "train_loss": list(1.2 - 0.1 * e + rng.uniform(0, .05, 2)),
                 "arch_loss": list(1.3 - 0.1 * e + rng.uniform(0, .05, 2)),
                 "val_loss": list(1.25 - 0.1 * e + rng.uniform(0, .05, 2)),
                 "val_metric": val, "arch_entropy": [0.69 - 0.01 * e] * 2,
                 "best_val_metric": val})
  write_jsonl(os.path.join(wd, "search", "metrics.jsonl"), recs)
  write_json(os.path.join(wd, "search", "summary.json"), {
      "seeds": SEEDS, "metric": "accuracy", "epochs_done": 4,
      "best_val_metric": [0.6123, 0.6456], "best_epoch": [3, 2], "chosen_seed": 1,
      "agreement": {"distinct_genotypes": 1, "most_common_count": 2,
                    "cells": [{"inputs": {"(A_2, B_3)": 2}, "ops": {"LinearGLU/ScaleDotAttn": 2}},
                              {"inputs": {"(Cell_1, A_3)": 2}, "ops": {"Sum/ConcatFC": 2}}]},
      "seconds": 7200.0})
  G.save(G.from_json_dict(GENOTYPE), os.path.join(wd, "search", "best_genotype.json"))
  write_json(os.path.join(wd, "evaluate", "metrics.json"), {
      "stage": "evaluate", "metric": "accuracy", "seeds": SEEDS, "epochs": 3,
      "train_splits": ["train", "val"], "genotype": GENOTYPE,
      "final_test": summary(0.6292, 0.0003), "final_val": summary(0.70, 0.01),
      "val_selected": {"epoch": [2, 1], "val_held_out": False,
                       "test": summary(0.6310, 0.0012)},
      "seconds": 540.0})


def eval_records(base):
  return [{"epoch": e, "seconds": 2.0, "seeds": SEEDS, "metric": "accuracy",
           "train_loss": [1.0 - 0.2 * e] * 2, "val_loss": [1.1 - 0.2 * e, 1.12 - 0.2 * e],
           "val_metric": [base + 0.02 * e, base + 0.021 * e],
           "test_loss": [1.15 - 0.2 * e] * 2,
           "test_metric": [base + 0.015 * e, base + 0.017 * e]} for e in range(3)]


def write_optional(wd):
  """arch history, evaluation curves, late fusion, unimodal backbones, extraction, ablations."""
  rng = np.random.default_rng(1)
  pool = ops.step_op_pool("paper")
  shapes = {"cell_0": {"alpha": (6, 2), "beta": (5, 2), "gamma": (2, len(pool))},
            "cell_1": {"alpha": (7, 2), "beta": (5, 2), "gamma": (2, len(pool))}}
  hist = [[{c: {k: softmax(rng.normal(0, 0.1 * (e + 1), shp)).round(6).tolist()
                for k, shp in d.items()} for c, d in shapes.items()} for _ in SEEDS]
          for e in range(4)]
  write_json(os.path.join(wd, "search", "arch_history.json"),
             {"seeds": SEEDS, "epochs": list(range(4)), "softmax": hist})
  write_jsonl(os.path.join(wd, "evaluate", "metrics.jsonl"), eval_records(0.58))
  late = G.late_fusion(NODES).to_json_dict()
  write_json(os.path.join(wd, "evaluate_finetune", "metrics.json"), {
      "stage": "evaluate_finetune", "metric": "accuracy", "seeds": SEEDS, "epochs": 3,
      "backbone_lr_mult": 0.1, "final_test": summary(0.6200, 0.0100)})
  for name, genotype, test, val, sel, seconds in (
      ("concat_mlp", None, summary(0.6000, 0.0050), 0.64, [1, 2], 20.0),
      ("late_fusion", late, summary(0.6150, 0.0021), 0.66, [2, 2], 300.0)):
    write_json(os.path.join(wd, "baselines", name, "metrics.json"), {
        "stage": f"baselines/{name}", "metric": "accuracy", "seeds": SEEDS, "epochs": 3,
        "train_splits": ["train", "val"], "genotype": genotype, "final_test": test,
        "final_val": summary(val, 0.01),
        "val_selected": {"epoch": sel, "val_held_out": False, "test": test},
        "seconds": seconds})
  write_jsonl(os.path.join(wd, "baselines", "late_fusion", "metrics.jsonl"), eval_records(0.55))
  write_json(os.path.join(wd, "backbones", "unimodal.json"), {
      "A": {"backbone": "mlp_a", "checkpoint_id": "abc", "val_accuracy": 0.55,
            "test_accuracy": 0.5432, "best_epoch": 3, "epochs": 5, "train_seconds": 12.0},
      "B": {"backbone": "cnn_b", "checkpoint_id": "def", "val_accuracy": 0.51,
            "test_accuracy": 0.4987, "best_epoch": 4, "epochs": 5, "train_seconds": 24.0}})
  write_json(os.path.join(wd, "features", "prepare.json"), {
      "extraction_seconds": 36.0,
      "ensemble": {"modalities": ["A", "B"], "metric": "accuracy", "val": 0.61, "test": 0.64},
      "probes": [{"node": "A_1", "modality": "A", "tap": "conv1", "pool": "grid", "C_in": 8,
                  "L_in": 4, "metric": "accuracy", "probe_val": 0.4321, "backbone_val": 0.55,
                  "kept": 0.4321 / 0.55, "train_examples": 100},
                 {"node": "B_3", "modality": "B", "tap": "f3", "pool": "first", "C_in": 8,
                  "L_in": 4, "metric": "accuracy", "probe_val": 0.25, "backbone_val": None,
                  "kept": None, "train_examples": 100}]})
  searched = {"name": "searched", "test": summary(0.6292, 0.0003), "genotypes": [GENOTYPE]}
  trials = [{"table": "feature_selection", "name": f"random_{t + 1}",
             "test": summary(0.57 + 0.005 * t, 0.002), "genotypes": [GENOTYPE]}
            for t in range(5)]
  rows = ([{"table": "feature_selection", "name": "random",
            "test": {"mean": 0.58, "std": 0.0123, "values": [0.57, 0.575, 0.58, 0.585, 0.59]},
            "genotypes": [GENOTYPE] * 5, "note": "mean ± std over the random genotypes"},
           {"table": "feature_selection", "name": "late_fusion",
            "test": summary(0.6150, 0.0021), "genotypes": [late]},
           {"table": "feature_selection", **searched}]
          + [{"table": "fusion", "name": n, "test": summary(m, 0.001), "genotypes": [GENOTYPE]}
             for n, m in (("Sum", 0.6011), ("ConcatFC", 0.6122), ("MHA", 0.6033),
                          ("AoA", 0.6144))]
          + [{"table": "fusion", **searched}] + trials)
  write_json(os.path.join(wd, "ablate", "results.json"),
             {"metric": "accuracy", "seeds": SEEDS, "rows": rows})


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("run"))
  write_required(wd)
  write_optional(wd)
  c = config()
  c.evaluate.baselines = ("concat_mlp", "late_fusion")
  path = report.write_report(c, wd)
  with open(path) as f:
    return wd, path, f.read()


def md_rows_from_csv(path):
  """Markdown row lines rebuilt from a CSV (stat triples back to `m ± s`)."""
  with open(path, newline="") as f:
    rows = list(csv.reader(f))
  header, body = rows[0], rows[1:]
  out = []
  for r in body:
    cells, i = [], 0
    while i < len(header):
      if header[i].endswith(" mean") and i + 2 < len(header) and header[i + 2].endswith(" n"):
        m, s = r[i], r[i + 1]
        cells.append("—" if m == "" else f"{float(m):.2f}" if s == "" else
                     f"{float(m):.2f} ± {float(s):.2f}")
        i += 3
      else:
        cells.append(r[i] if r[i] != "" else "—")
        i += 1
    out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
  return header, body, out


def test_report_tables_filled(full_run):
  wd, path, md = full_run
  assert path == os.path.join(wd, "report.md")
  assert md.startswith("# BM-NAS report: planted (fidelity: paper)")
  for text in (
      # Table 1-3 form: unimodal, late fusion, final epoch, val-selected (not held out)
      "| mlp_a | A | 54.32 |", "| cnn_b | B | 49.87 |", "| Late fusion (Table 6: ConcatFC Cell) | A + B | 61.50 ± 0.21 |",
      "| All features concatenated, MLP | A + B | 60.00 ± 0.50 |",
      "| BM-NAS (searched), backbones fine-tuned (lr x 0.1), final epoch | A + B | 62.00 ± 1.00 |",
      "| Baselines (training) | 320.00 |",
      "| BM-NAS (searched), final epoch | A + B | 62.92 ± 0.03 |",
      "val-selected epoch (val not held out", "63.10 ± 0.12",
      # Table 5 form: search, extraction, evaluation
      "| BM-NAS search | 7200.00 | 2.0000 |", "| Feature extraction (backbones, once) | 36.00 "
      "| 0.0100 |", "| Evaluation (retraining) | 540.00 | 0.1500 |",
      # Table 6 and 7 forms
      "| Random (mean over 5 genotypes) | planted | 58.00 ± 1.23 | 5 |",
      "| Late fusion | planted | 61.50 ± 0.21 | 1 |",
      "| Searched (BM-NAS) | planted | 62.92 ± 0.03 | 1 |",
      "| Sum | DARTS (ICLR19) | planted | 60.11 ± 0.10 |", "| AoA | AoANet (ICCV19) |",
      "| Searched | BM-NAS | planted | 62.92 ± 0.03 |",
      # the winner on top: the ensemble (no seeds) against BM-NAS's 0.03 std
      "**Best on test: Ensemble of the backbones (mean probability, no training), 64.00 % Acc; "
      "1.08 points above BM-NAS (searched), final epoch (62.92 ± 0.03 %), 36.0 seed std.**",
      "| Ensemble of the backbones (mean probability, no training) | A + B | 64.00 |",
      # the search's decisions, with the verdict
      "## Did the search decide?", "| Pair margin |",
      # linear probes: probe, backbone, kept share
      "| A_1 | conv1 | grid | 8 x 4 | 43.21 | 55.00 | 79% |",
      "| B_3 | f3 | first | 8 x 4 | 25.00 |",
      # seeds and agreement
      "| 1 | 64.56 | 2 | yes |", "(A_2, B_3) ×2", "Sum/ConcatFC ×2",
      # genotype as JSON
      '"format": "bmnas-genotype/1"'):
    assert text in md, text
  assert "absent" not in md          # every optional input was given
  block = md.split("```json\n", 1)[1].split("\n```", 1)[0]
  assert G.from_json(block) == G.from_json_dict(GENOTYPE)
  g = G.from_json_dict(GENOTYPE)
  fixed, hyper = describe(config(), genotype=g), describe(config())
  for label, d in (("BM-NAS searched (fixed net)", fixed), ("Search hypernet", hyper)):
    p = d["params_per_part"]
    assert (f"| {label} | planted | {tables.format_params(d['params_total'])} | "
            f"{d['params_total']} | {p['reshape']} | {p['fusion']} | {p['head']} |") in md


def test_csvs_parse_and_match_markdown(full_run):
  wd, _, md = full_run
  names = {"results", "probes", "params", "search_cost", "feature_selection", "fusion",
           "search_seeds", "agreement", "decisions"}
  found = {f[:-4] for f in os.listdir(os.path.join(wd, "report")) if f.endswith(".csv")}
  assert found == names
  for name in names:
    header, body, md_rows = md_rows_from_csv(os.path.join(wd, "report", f"{name}.csv"))
    assert body, name
    for line in md_rows:
      assert line in md, (name, line)
  _, body, _ = md_rows_from_csv(os.path.join(wd, "report", "results.csv"))
  final = [r for r in body if r[0] == "BM-NAS (searched), final epoch"][0]
  assert float(final[2]) == pytest.approx(62.92) and float(final[3]) == pytest.approx(0.03)
  assert final[4] == "2"


def test_pngs_valid_and_embedded(full_run):
  wd, _, md = full_run
  links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
  assert {"report/genotype.png", "report/search_val_metric.png", "report/search_losses.png",
          "report/arch_weights_seed_1.png", "report/evaluate_curves.png",
          "report/late_fusion_curves.png"} <= set(links)
  for link in links:
    assert not os.path.isabs(link)
    path = os.path.join(wd, link)
    with open(path, "rb") as f:
      assert f.read(8) == PNG_MAGIC, link
    assert os.path.getsize(path) > 10_000, link
    with Image.open(path) as im:
      assert min(im.size) > 200, (link, im.size)
  assert not [d for d in os.listdir(wd) if d.startswith(".report-")]


def test_missing_optional_inputs_give_notes(tmp_path):
  wd = str(tmp_path)
  write_required(wd)
  md = open(report.write_report(config(), wd)).read()
  for note in ("backbones/unimodal.json is absent", "baselines/late_fusion/metrics.json is absent",
               "No A alone (last feature, MLP) row (baselines/unimodal_A/metrics.json is absent)",
               "features/prepare.json is absent", "ablate/results.json is absent",
               "search/arch_history.json is absent", "evaluate/metrics.jsonl is absent"):
    assert note in md, note
  assert "| BM-NAS (searched), final epoch | A + B | 62.92 ± 0.03 |" in md
  assert os.path.exists(os.path.join(wd, "report", "genotype.png"))
  assert not os.path.exists(os.path.join(wd, "report", "feature_selection.csv"))
  # a second write replaces the first report
  m = json.load(open(os.path.join(wd, "evaluate", "metrics.json")))
  m["final_test"] = summary(0.7777, 0.0001)
  write_json(os.path.join(wd, "evaluate", "metrics.json"), m)
  md = open(report.write_report(config(), wd)).read()
  assert "| BM-NAS (searched), final epoch | A + B | 77.77 ± 0.01 |" in md
  assert "77.77" in open(os.path.join(wd, "report", "results.csv")).read()
  assert not [d for d in os.listdir(wd) if d.startswith(".report-")]
  os.remove(os.path.join(wd, "evaluate", "metrics.json"))
  with pytest.raises(DataError, match="evaluate/metrics.json"):
    report.write_report(config(), wd)


def test_failed_write_leaves_previous_report(full_run, tmp_path, monkeypatch):
  src, _, _ = full_run
  wd = str(tmp_path / "run")
  shutil.copytree(src, wd)
  before = {}
  for root, _, files in os.walk(wd):
    for f in files:
      if root.startswith(os.path.join(wd, "report")) or f == "report.md":
        p = os.path.join(root, f)
        before[p] = open(p, "rb").read()
  # a change that a successful write would show, then a failure in the last figure
  m = json.load(open(os.path.join(wd, "evaluate", "metrics.json")))
  m["final_test"] = summary(0.7777, 0.0001)
  write_json(os.path.join(wd, "evaluate", "metrics.json"), m)

  def boom(*args, **kwargs):
    raise RuntimeError("plot failed")

  # fails after every table, the genotype drawing and the first curve are staged
  monkeypatch.setattr(plots, "search_loss_curves", boom)
  with pytest.raises(RuntimeError, match="plot failed"):
    report.write_report(config(), wd)
  after = {}
  for root, _, files in os.walk(wd):
    for f in files:
      if root.startswith(os.path.join(wd, "report")) or f == "report.md":
        p = os.path.join(root, f)
        after[p] = open(p, "rb").read()
  assert after == before
  assert not [d for d in os.listdir(wd) if d.startswith(".report-")]

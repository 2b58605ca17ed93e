"""What makes the search decide: one search (and one retraining) per setting, side by side.

For a dataset config, every setting of `settings(config)` overrides a few `config.search`
(or `config.model`) keys; the study prepares the features once, then per setting searches
`config.seeds` seeds together (`study/<setting>/search/`) and retrains the chosen genotype
(`study/<setting>/evaluate/`). Each setting is resumable like the stages it runs. The
result (`study/results.json`, `study/study.md`) gives per setting: how many seeds agree on
each Cell's input pair, the number of distinct genotypes, the share of choices made by a
clear margin and the entropy ratio (`diagnostics`), the best val metric, the retrained test
metric (mean ± std over seeds) and the search's seconds.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from bmnas_jax import diagnostics
from bmnas_jax.checkpoint import write_json_atomic, write_text_atomic
from bmnas_jax.errors import ConfigError
from bmnas_jax.evaluate import run_evaluate
from bmnas_jax.search import run_search
from bmnas_jax.workdir_lock import holds_workdir

STUDY_DIR = "study"


def settings(config) -> dict[str, dict[str, Any]]:
  """Setting name -> `{dotted config key: value}`, relative to `config`'s own values.

  The release's arch optimizer makes one step per validation batch; `lr_for_steps`
  scales its rate to the release's MM-IMDB count (2608 / 8 = 326 arch steps an epoch).
  Entropy, warm-up and `select='last'` are beyond the paper.
  """
  s = config.search
  lr = float(s.arch_opt.lr)
  longer = max(3 * int(s.epochs), 1)
  return {
      "config": {},
      "epochs x3": {"search.epochs": longer},
      "arch lr x10": {"search.arch_opt.lr": 10 * lr},
      "arch lr for 326 steps/epoch": {"search.arch_opt.lr": 3e-4,
                                      "search.arch_opt.lr_for_steps": 326},
      "alternation=step": {"search.alternation": "step"},
      "step, arch lr x10": {"search.alternation": "step", "search.arch_opt.lr": 10 * lr},
      "step, arch lr x10, two_slot": {"search.alternation": "step",
                                      "search.arch_opt.lr": 10 * lr, "model.two_slot": True},
      "step, arch lr x10, epochs x3, select=last": {
          "search.alternation": "step", "search.arch_opt.lr": 10 * lr,
          "search.epochs": longer, "search.select": "last"},
      "step, arch lr x10, entropy 1": {"search.alternation": "step",
                                       "search.arch_opt.lr": 10 * lr,
                                       "search.arch_entropy": 1.0},
      "step, arch lr x10, epochs x3, warm-up 1/3, select=last": {
          "search.alternation": "step", "search.arch_opt.lr": 10 * lr,
          "search.epochs": longer, "search.arch_opt.warmup_epochs": longer // 3,
          "search.select": "last"},
  }


def apply_overrides(config, overrides: Mapping[str, Any]):
  """A copy of `config` with `{dotted key: value}` set; unknown keys raise ConfigError."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for key, value in overrides.items():
      node, *path = [config] + key.split(".")
      *parents, last = path
      for p in parents:
        node = node[p]
      if last not in node:
        raise ConfigError(f"study setting: config.{key} is not a config key")
      node[last] = value
  return config


def _agreement(summary: Mapping[str, Any]) -> list[int]:
  """Per Cell, how many seeds chose its most common input pair."""
  return [max(c["inputs"].values()) for c in summary["agreement"]["cells"]]


def run_setting(config, fs, workdir: str, name: str) -> dict[str, Any]:
  """Searches and retrains one setting; returns its row of the study."""
  stage = os.path.join(STUDY_DIR, name.replace(" ", "_").replace(",", "").replace("/", "-"))
  res = run_search(config, fs, workdir, stage=os.path.join(stage, "search"))
  ev = run_evaluate(config, fs, res.genotype, workdir, stage=os.path.join(stage, "evaluate"))
  with open(os.path.join(workdir, stage, "search", "summary.json")) as f:
    summary = json.load(f)
  with open(os.path.join(workdir, stage, "search", "arch_history.json")) as f:
    history = json.load(f)
  dec = diagnostics.search_decisions(history, summary, fs.node_names, config)
  return {
      "setting": name, "stage": stage,
      "pair_agreement": _agreement(summary), "seeds": len(res.seeds),
      "distinct_genotypes": summary["agreement"]["distinct_genotypes"],
      "decided_share": 1.0 - dec["undecided"] / max(dec["choices"], 1),
      "entropy_ratio": float(np.mean([s["entropy_ratio"] for s in dec["seeds"]])),
      "best_val_metric": float(np.mean(res.best_val_metric)),
      "best_epoch": res.best_epoch,
      "test": ev["final_test"], "search_seconds": round(res.seconds, 2),
      "genotype": res.genotype.to_json_dict(),
  }


def study_markdown(config, rows: list[dict]) -> str:
  """The study's table in markdown."""
  metric = config.metric.name
  lines = [f"# Search study: {config.name} ({len(rows)} settings, {rows[0]['seeds']} seeds "
           f"each)" if rows else f"# Search study: {config.name}", "",
           "| Setting | Seeds agreeing on each Cell's pair | Distinct genotypes | Choices "
           "decided | Entropy / max | Search val (%) | Test (%) | Search s |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    agree = ", ".join(f"{a}/{r['seeds']}" for a in r["pair_agreement"])
    t = r["test"]
    lines.append(f"| {r['setting']} | {agree} | {r['distinct_genotypes']} | "
                 f"{100 * r['decided_share']:.0f} % | {r['entropy_ratio']:.3f} | "
                 f"{100 * r['best_val_metric']:.2f} | {100 * t['mean']:.2f} ± "
                 f"{100 * t['std']:.2f} | {r['search_seconds']:.1f} |")
  lines += ["", f"Pairs agree when a Cell's input pair is the most common one across seeds. "
            f"A choice is decided when its margin passes the report's thresholds (pair "
            f"{diagnostics.PAIR_MARGIN}, op {diagnostics.OP_MARGIN}). Search val: best "
            f"validation {metric}, mean over seeds. Test: the chosen genotype retrained as the "
            f"evaluate stage does, final epoch, mean ± std over seeds."]
  return "\n".join(lines) + "\n"


def pair_genotype(node_names, pair: tuple[int, int]):
  """One Cell fusing `pair` (ConcatFC of the two, then Sum with x; both steps feed the
  tail), read by the head: how good a pair is when nothing else is fused."""
  from bmnas_jax import genotype as genotype_lib
  cell = genotype_lib.CellGene(tuple(pair), (genotype_lib.StepGene("ConcatFC", (0, 1)),
                                             genotype_lib.StepGene("Sum", (2, 0))), (2, 3))
  return genotype_lib.validate(genotype_lib.Genotype(tuple(node_names), (cell,),
                                                     (len(node_names),)))


def run_pairs(config, fs, workdir: str) -> list[dict]:
  """Every pair of features as a one-Cell network (`pair_genotype`), trained on the train
  split only (val held out) as the evaluate stage trains, `config.seeds` seeds: the val
  metric per pair, mean ± std. Pairs whose val metrics are within a seed std of each
  other cannot be told apart by a search that selects on val. Writes
  `study/pairs/<A>+<B>/` and `study/pairs.json`."""
  import itertools
  c = apply_overrides(config, {"evaluate.train_splits": ("train",), "model.num_cells": 1,
                               "model.multiplier": 1})
  names = fs.node_names
  rows = []
  for i, j in itertools.combinations(range(len(names)), 2):
    stage = os.path.join(STUDY_DIR, "pairs", f"{names[i]}+{names[j]}")
    res = run_evaluate(c, fs, pair_genotype(names, (i, j)), workdir, stage=stage)
    rows.append({"pair": [names[i], names[j]], "val": res["final_val"],
                 "test": res["final_test"]})
  write_json_atomic(os.path.join(workdir, STUDY_DIR, "pairs.json"), {"rows": rows})
  return rows


def pairs_markdown(config, rows: list[dict]) -> str:
  lines = [f"## Single-Cell pairs: {config.name}", "",
           f"| Pair | Val {config.metric.name} (%) | Test (%) |", "|---|---|---|"]
  for r in sorted(rows, key=lambda r: -r["val"]["mean"]):
    v, t = r["val"], r["test"]
    lines.append(f"| ({', '.join(r['pair'])}) | {100 * v['mean']:.2f} ± {100 * v['std']:.2f} | "
                 f"{100 * t['mean']:.2f} ± {100 * t['std']:.2f} |")
  return "\n".join(lines) + "\n"


@holds_workdir
def run_study(config, workdir: str, only: tuple[str, ...] = (), pairs: bool = False
              ) -> list[dict]:
  """Prepares the features once, then runs every setting (or those named in `only`);
  with `pairs`, also `run_pairs` (its table is appended to `study/study.md`)."""
  from bmnas_jax.data.prepare import load_features, run_prepare
  table = settings(config)
  unknown = [n for n in only if n not in table]
  if unknown:
    raise ConfigError(f"--settings: unknown {unknown}; valid: {list(table)}")
  configs = {n: apply_overrides(config, o) for n, o in table.items() if not only or n in only}
  workdir = os.path.abspath(workdir)
  run_prepare(config, workdir)
  fs = load_features(config, workdir)
  rows = [run_setting(c, fs, workdir, n) for n, c in configs.items()]
  write_json_atomic(os.path.join(workdir, STUDY_DIR, "results.json"),
                    {"config": config.name, "rows": rows})
  text = study_markdown(config, rows)
  if pairs:
    text += "\n" + pairs_markdown(config, run_pairs(config, fs, workdir))
  write_text_atomic(os.path.join(workdir, STUDY_DIR, "study.md"), text)
  return rows

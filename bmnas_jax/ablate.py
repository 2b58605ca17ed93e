"""Ablations in the form of the paper's Tables 6 and 7, for any dataset."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from bmnas_jax import genotype as genotype_lib
from bmnas_jax import hosts
from bmnas_jax.baselines import stage_of
from bmnas_jax.checkpoint import write_json_atomic
from bmnas_jax.data.feature_set import FeatureSet
from bmnas_jax.evaluate import Job, run_retrainings
from bmnas_jax.fixed_net import fixed_net_from_config

if TYPE_CHECKING:
  from bmnas_jax.data.shards import ShardSource

FUSIONS = ("Sum", "ConcatFC", "MHA", "AoA")


def ablation_genotypes(searched: genotype_lib.Genotype, seed: int,
                       random_trials: int = 5) -> list[tuple[str, str, genotype_lib.Genotype]]:
  """(table, name, genotype) rows.

  Table 6 (feature selection): `random_trials` random selections with the
  searched Cells' insides, late fusion, searched. Table 7 (fusion): the searched
  selection with every Cell replaced by Sum, ConcatFC, MHA, AoA; searched.
  """
  rng = np.random.default_rng(seed)
  rows = [("feature_selection", f"random_{t + 1}", genotype_lib.random_selection(searched, rng))
          for t in range(random_trials)]
  rows.append(("feature_selection", "late_fusion", genotype_lib.late_fusion(searched.nodes)))
  rows += [("fusion", name, genotype_lib.with_fusion_cells(searched, name)) for name in FUSIONS]
  return rows


def release_fusion_model(config, fs: FeatureSet | ShardSource, table: str, name: str,
                         g: genotype_lib.Genotype):
  """The network a Table 7 row retrains under `config.fidelity='reference'`: the
  row's feature selection with every Cell replaced whole (steps and tail) by the
  original release's fusion `name` (`release_fusion`). None for every other row
  and under `paper` fidelity (the row's genotype, Fig. 2 Cells, is retrained)."""
  if table != "fusion" or config.fidelity != "reference":
    return None
  return fixed_net_from_config(config, fs.nodes, g, dropout=config.evaluate.dropout,
                               fusion_cells=name)


def run_ablations(config, fs: FeatureSet | ShardSource, searched: genotype_lib.Genotype,
                  workdir: str, searched_result: dict) -> dict:
  """Retrains every ablation genotype over `config.seeds` seeds (each its own stage
  folder under `ablate/`, resumable) and writes `ablate/results.json`.

  Each row's value is the final-epoch test metric, mean ± std over seeds, the
  same protocol as the searched row (`searched_result`, the evaluate stage's).
  Under `reference` fidelity the Table 7 rows retrain the release's whole-Cell
  fusions (`release_fusion_model`); their genotypes record the feature selection.
  """
  planned = ablation_genotypes(searched, config.seed,
                              config.get("ablate", {}).get("random_trials", 5))
  # late fusion shares its folder with the evaluate stage's baseline (reused if done)
  results = run_retrainings(config, fs, workdir, [
      Job(g, stage_of("late_fusion") if name == "late_fusion" else os.path.join("ablate", name),
          release_fusion_model(config, fs, table, name, g),
          group=os.path.join("ablate", "random") if name.startswith("random_") else "")
      for table, name, g in planned])
  rows = [{"table": table, "name": name, "test": res["final_test"],
           "genotypes": [g.to_json_dict()]} for (table, name, g), res in zip(planned, results)]
  trials = [r for r in rows if r["name"].startswith("random_")]
  random_values = [t["test"]["mean"] for t in trials]
  summary_random = {"table": "feature_selection", "name": "random",
                    "test": {"mean": float(np.mean(random_values)),
                             "std": float(np.std(random_values)),
                             "values": random_values},
                    "genotypes": [t["genotypes"][0] for t in trials],
                    "note": "mean ± std over the random genotypes of their seed means"}
  searched_row = {"name": "searched", "test": searched_result["final_test"],
                  "genotypes": [searched.to_json_dict()]}
  out_rows = ([summary_random] + [r for r in rows if r["name"] == "late_fusion"]
              + [{"table": "feature_selection", **searched_row}]
              + [r for r in rows if r["table"] == "fusion"]
              + [{"table": "fusion", **searched_row}] + trials)
  result = {"metric": config.metric.name, "seeds": searched_result["seeds"], "rows": out_rows}
  if hosts.is_primary():
    write_json_atomic(os.path.join(workdir, "ablate", "results.json"), result)
  return result

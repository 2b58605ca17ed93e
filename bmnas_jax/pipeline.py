"""The stages of an experiment, run in order, each reading what the previous one wrote."""

from __future__ import annotations

import os

from absl import logging

from bmnas_jax import genotype as genotype_lib
from bmnas_jax import hosts
from bmnas_jax.ablate import run_ablations
from bmnas_jax.baselines import run_baselines
from bmnas_jax.checkpoint import clean_stale_temps, read_json
from bmnas_jax.errors import ConfigError, DataError
from bmnas_jax.evaluate import run_evaluate
from bmnas_jax.fixed_net import check_genotype_nodes
from bmnas_jax.search import run_search
from bmnas_jax.workdir_lock import workdir_lock

STAGES = ("prepare", "search", "evaluate", "ablate", "report")


def parse_stages(spec: str) -> tuple[str, ...]:
  stages = tuple(s.strip() for s in spec.split(",") if s.strip())
  unknown = [s for s in stages if s not in STAGES]
  if unknown or not stages:
    raise ConfigError(f"config.stages={spec!r}: unknown stage(s) {unknown}; valid: "
                      f"{', '.join(STAGES)}")
  return stages


def with_fidelity(config):
  """`config` with `config.reference` (a nested dict of keys to replace) applied when
  `config.fidelity == 'reference'`: the original release's hard-coded settings that
  differ from a dataset config's defaults (e.g. NTU's retraining weight decay)."""
  overrides = config.get("reference", None)
  if config.get("fidelity") != "reference" or not overrides:
    return config
  config = config.copy_and_resolve_references()
  with config.unlocked():
    _update(config, overrides, "config")
    del config["reference"]
  return config


def _update(node, overrides, where: str) -> None:
  for key, value in overrides.items():
    if key not in node:
      raise ConfigError(f"config.reference: {where}.{key} is not a config key")
    if hasattr(value, "items"):
      _update(node[key], value, f"{where}.{key}")
    else:
      node[key] = value


def run(config, workdir: str) -> dict:
  """Runs `config.stages` in `workdir`; returns each stage's result."""
  workdir = os.path.abspath(workdir)
  config = with_fidelity(config)
  stages = parse_stages(config.stages)
  if hosts.is_primary():                # under jax.distributed, process 0 writes
    _make_workdir(workdir)
  hosts.barrier("workdir")
  with workdir_lock(workdir):           # one writer per workdir
    if hosts.is_primary():
      for path in clean_stale_temps(workdir):  # left by killed runs; the lock makes it safe
        logging.info("removed %s (left by an earlier run)", path)
    return _run_stages(config, stages, workdir)


def _make_workdir(workdir: str) -> None:
  """The workdir as a folder: one that is a file, or cannot be made, is bad input."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise DataError(f"--workdir={workdir} is a file, not a folder")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise DataError(f"--workdir={workdir} cannot be created: {e.strerror or e}") from e
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise DataError(f"--workdir={workdir} is not writable")


def _run_stages(config, stages: tuple[str, ...], workdir: str) -> dict:
  results = {}
  if "prepare" in stages:
    from bmnas_jax.data.prepare import run_prepare    # TFDS, orbax, scikit-learn: on demand
    if hosts.is_primary():            # on its own devices; the other processes wait
      results["prepare"] = run_prepare(config, workdir)
    hosts.barrier("prepare")
  fs = None
  if set(stages) & {"search", "evaluate", "ablate"}:
    from bmnas_jax.data.prepare import load_features
    fs = load_features(config, workdir)
  if "search" in stages:
    results["search"] = run_search(config, fs, workdir)
    logging.info("search: best genotype %s", results["search"].genotype.to_json())
    hosts.barrier("search")             # its files are written before anyone reads them
  searched_path = config.evaluate.get("genotype") or os.path.join(workdir, "search",
                                                                   "best_genotype.json")
  if "evaluate" in stages or "ablate" in stages:
    if not os.path.exists(searched_path):
      raise DataError(f"{searched_path}: no genotype to evaluate (run the search "
                      f"stage or set config.evaluate.genotype)")
    searched = genotype_lib.load(searched_path)
    try:
      check_genotype_nodes(searched, fs.nodes)
    except genotype_lib.GenotypeError as e:
      raise genotype_lib.GenotypeError(f"{searched_path}: {e}") from e
  if "evaluate" in stages:
    results["evaluate"] = run_evaluate(config, fs, searched, workdir)
    if config.evaluate.get("finetune_backbones", False):
      from bmnas_jax.finetune import run_finetune     # backbones and raw data: on demand
      results["evaluate_finetune"] = run_finetune(config, workdir, searched)
    results["baselines"] = run_baselines(config, fs, workdir)
  if "ablate" in stages:
    hosts.barrier("evaluate")
    ev = results.get("evaluate") or _read_json(os.path.join(workdir, "evaluate", "metrics.json"))
    results["ablate"] = run_ablations(config, fs, searched, workdir, ev)
  if "report" in stages and hosts.is_primary():
    from bmnas_jax.report.report import write_report   # matplotlib: on demand
    results["report"] = write_report(config, workdir)
  hosts.barrier("stages")
  return results


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    raise DataError(f"{path}: missing (run the evaluate stage first)")
  return read_json(path)

"""The bilevel search trainer: weights on train, architecture on val, best genotype by val."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from bmnas_jax import genotype as genotype_lib
from bmnas_jax import hosts, loop, optim
from bmnas_jax.checkpoint import write_json_atomic, write_jsonl_atomic
from bmnas_jax.data.feature_set import FeatureSet, nodes_from_config
from bmnas_jax.search_space import hypernet_from_config
from bmnas_jax.steps import Steps
from bmnas_jax.errors import ConfigError

if TYPE_CHECKING:
  from bmnas_jax.data.shards import ShardSource

ALTERNATIONS = ("epoch", "step")
# Which epoch's genotype a seed keeps (config.search.select): the first epoch with the best
# val metric (the paper); the lowest val loss; the last epoch; or the original release's
# rule: the best val metric, ties to the later epoch for accuracy (its NTU and EgoGesture
# searches compare with >=) and to the earlier for F1 (its MM-IMDB search uses >). The
# release measures that metric in training mode during its arch phase; here it is the
# val split's metric in eval mode after the epoch, as for the other rules. Epochs before
# config.search.arch_opt.warmup_epochs (the arch weights have not moved) are never kept.
SELECTIONS = ("val", "val_loss", "last", "release")
# config.data keys that choose how the data reach the devices, not the results.
DATA_ACCESS_KEYS = ("in_memory", "stream_block")


@dataclasses.dataclass
class SearchResult:
  """Per-seed best genotypes (by val) and the one chosen across seeds (best val)."""
  seeds: list[int]
  best_genotypes: list[genotype_lib.Genotype]
  best_val_metric: list[float]
  best_epoch: list[int]
  genotype: genotype_lib.Genotype
  seconds: float
  history: list[dict]
  epoch_traces: int          # traces of the epoch program (streamed: of the most traced
                             # block program); 1: no recompiles


def check_data_against_config(config, fs: FeatureSet | ShardSource) -> None:
  """The config's node list, shapes and classes must describe the features."""
  want = nodes_from_config(config.data)
  have = fs.nodes
  if tuple(n.name for n in want) != tuple(n.name for n in have):
    raise ConfigError(f"config.data describes nodes {[n.name for n in want]} but the features "
                      f"have {[n.name for n in have]}")
  for w, h in zip(want, have):
    if (w.channels, w.length) != (h.channels, h.length):
      raise ConfigError(f"config.data.channels/length: node {w.name} is "
                        f"[C_in={w.channels}, L_in={w.length}] in the config but "
                        f"[{h.channels}, {h.length}] in the features")
  if config.model.num_classes != fs.num_classes:
    raise ConfigError(f"config.model.num_classes={config.model.num_classes} but the features "
                      f"have {fs.num_classes} classes")
  if config.data.label_kind != fs.label_kind:
    raise ConfigError(f"config.data.label_kind={config.data.label_kind!r} but the features "
                      f"are {fs.label_kind!r}")


def seed_list(config) -> list[int]:
  if not isinstance(config.seeds, int) or config.seeds < 1:
    raise ConfigError(f"config.seeds={config.seeds!r} must be a positive int")
  return [int(config.seed) + i for i in range(config.seeds)]


def seed_keys(seeds: list[int], stream: int) -> jax.Array:
  """uint32 `[S, 2]` base keys; `stream` separates search (0) from evaluation (1)."""
  return jnp.stack([jax.random.fold_in(jax.random.PRNGKey(s), stream) for s in seeds])


def arch_softmax(arch) -> dict[str, Any]:
  """softmax over the last axis of every arch entry, as nested lists."""
  return jax.tree.map(lambda a: np.asarray(jax.nn.softmax(jnp.asarray(a), -1)).round(6).tolist(),
                      arch)


def arch_entropy(arch) -> float:
  """Mean entropy (nats) of all the softmax distributions in arch."""
  ents = [(-(p * np.log(np.maximum(p, 1e-12))).sum(-1)).ravel()
          for p in jax.tree.leaves(jax.tree.map(
              lambda a: np.asarray(jax.nn.softmax(jnp.asarray(a), -1)), arch))]
  return float(np.concatenate(ents).mean())


def agreement(genotypes: list[genotype_lib.Genotype]) -> dict[str, Any]:
  """How much the seeds agree: distinct genotypes, and per Cell the input pairs chosen."""
  counts = collections.Counter(g.to_json() for g in genotypes)
  per_cell = []
  for k in range(len(genotypes[0].cells)):
    pairs = collections.Counter(
        "(" + ", ".join(g.upper_name(u) for u in g.cells[k].inputs) + ")" for g in genotypes)
    ops = collections.Counter(
        "/".join(s.op for s in g.cells[k].steps) for g in genotypes)
    per_cell.append({"inputs": dict(pairs.most_common()), "ops": dict(ops.most_common())})
  return {"distinct_genotypes": len(counts), "most_common_count": counts.most_common(1)[0][1],
          "cells": per_cell}


def fingerprint(config) -> dict:
  """Config parts a resumed search must share with the checkpoint (not the epoch count)."""
  c = config
  parts = {"data": c.data, "model": c.model, "fidelity": c.fidelity, "seed": c.seed,
           "seeds": c.seeds, "search_batch": c.search.batch_size,
           "alternation": c.search.alternation, "weight_opt": c.search.weight_opt,
           "arch_opt": c.search.arch_opt, "metric": c.metric,
           "select": c.search.get("select", "val"),
           "arch_entropy": c.search.get("arch_entropy", 0.0),
           "train_reshape": c.search.get("train_reshape", True)}
  fp = {k: json.loads(v.to_json()) if hasattr(v, "to_json") else v for k, v in parts.items()}
  fp["data"] = {k: v for k, v in fp["data"].items() if k not in DATA_ACCESS_KEYS}
  return fp


def run_search(config, fs: FeatureSet | ShardSource, workdir: str,
               stage: str = "search") -> SearchResult:
  """Searches `config.seeds` seeds together; writes `workdir/search/...`.

  `fs` is a FeatureSet (splits held on the devices) or a `shards.ShardSource`
  (streamed in blocks of `config.data.stream_block` batches); both give the same
  results. Files: `metrics.jsonl` (a line per epoch, per-seed lists),
  `genotypes/epoch_NNN.json` (`epoch_NNN_seed_K.json` with several seeds),
  `best_genotype.json` (best val over seeds; per seed `best_genotype_seed_K.json`
  with several seeds), `arch_history.json` (softmax of alpha/beta/gamma per epoch
  and seed) and `summary.json`.
  """
  loop.check_data(fs)
  check_data_against_config(config, fs)
  sc = config.search
  if sc.alternation not in ALTERNATIONS:
    raise ConfigError(f"config.search.alternation={sc.alternation!r}; valid: "
                      f"{', '.join(ALTERNATIONS)}")
  if not isinstance(sc.epochs, int) or sc.epochs < 1:
    raise ConfigError(f"config.search.epochs={sc.epochs!r} must be a positive int")
  select = sc.get("select", "val")
  if select not in SELECTIONS:
    raise ConfigError(f"config.search.select={select!r}; valid: {', '.join(SELECTIONS)}")
  warmup = sc.arch_opt.get("warmup_epochs", 0)
  if not isinstance(warmup, int) or not 0 <= warmup < sc.epochs:
    raise ConfigError(f"config.search.arch_opt.warmup_epochs={warmup!r} must be an int in "
                      f"[0, config.search.epochs={sc.epochs})")
  seeds = seed_list(config)
  mesh = loop.mesh_from_config(config)
  loop.check_batch_divides(sc.batch_size, mesh, "config.search.batch_size")
  block = loop.stream_block(config)
  nodes = fs.nodes
  names = [n.name for n in nodes]
  model = hypernet_from_config(config, nodes)
  train_rows = loop.ViewRows(fs, ("train",), "the search")
  n_train = train_rows.examples
  n_val = loop.rows_of(fs, ("val",), "the search")
  batch = sc.batch_size
  nb_train = loop.num_batches(n_train, batch, "config.search.batch_size")
  nb_val = loop.num_batches(n_val, batch, "config.search.batch_size")
  w_tx = optim.weight_optimizer_from_config(config, sc.weight_opt, n_train, batch, sc.epochs)
  if not sc.get("train_reshape", True):   # the release's NTU search: reshape layers stay at init
    w_tx = optim.freeze(w_tx, lambda path: path[0].startswith("reshape_"))
  a_tx = optim.arch_optimizer(sc.arch_opt, nb_val if sc.alternation == "epoch" else nb_train)
  steps = Steps.from_config(model, fs.label_kind, w_tx, a_tx, config)

  def plan(key, epoch):
    k_perm_t, k_perm_v, k_w, k_a = jax.random.split(jax.random.fold_in(key, epoch), 4)
    idx_t = train_rows(loop.shuffled_batches(k_perm_t, n_train, batch, nb_train),
                       jax.random.fold_in(k_perm_t, 1))
    idx_v = loop.shuffled_batches(k_perm_v, n_val, batch, nb_val)
    if sc.alternation == "epoch":
      return ({"train": idx_t}, k_w), ({"val": idx_v}, k_a)
    return (({"train": idx_t, "val": idx_v[jnp.arange(nb_train) % nb_val]}, k_w),)

  if sc.alternation == "epoch":       # the release: an epoch of w steps, then of arch steps
    phases = (loop.Phase(loop.grouped("w", steps.weight_step, "train"), {"train": ("train",)},
                         nb_train, ("w",)),
              loop.Phase(loop.grouped("a", steps.arch_step, "val"), {"val": ("val",)},
                         nb_val, ("a",)))
  else:                               # DARTS: alternate every batch
    phases = (loop.Phase(alternation_step(steps), {"train": ("train",), "val": ("val",)},
                         nb_train, ("w", "a")),)
  epochs = loop.make_epochs(loop.EpochSpec(phases, plan, ("val",), batch), steps, fs, mesh,
                            block)

  with jax.set_mesh(mesh):
    keys = loop.shard_seeds(seed_keys(seeds, 0), mesh)
  init = loop.SeedInit(lambda k: steps.init_state(k, epochs.sample_x), (keys,), mesh)
  stage_dir = os.path.join(workdir, stage)
  loop.CompileAhead(loop.stage_programs(init, epochs, stage_dir, sc.epochs)).install()
  with jax.set_mesh(mesh):
    multi = len(seeds) > 1

    def on_epoch(epoch, states, m, seconds, extra):
      loop.describe_bad("search weight step", epoch, seeds, m["w"]["bad_step"],
                        m["w"]["bad_code"])
      loop.describe_bad("search arch step", epoch, seeds, m["a"]["bad_step"], m["a"]["bad_code"])
      (ev,) = m["eval"]
      m = {"train_loss": m["w"]["loss"], "arch_loss": m["a"]["loss"], "val_loss": ev["loss"],
           "val_metric": ev["metric"]}
      for name in ("train_loss", "arch_loss", "val_loss"):
        if not np.all(np.isfinite(m[name])):
          raise FloatingPointError(f"divergence at epoch {epoch}: non-finite {name}")
      arch = hosts.to_host(states.arch)
      per_seed = [jax.tree.map(lambda a, s=s: np.asarray(a[s]), arch) for s in range(len(seeds))]
      genos = [genotype_lib.derive_from_config(a, names, config) for a in per_seed]
      val_metric = [float(v) for v in m["val_metric"]]
      for s in range(len(seeds)):
        if epoch < warmup:              # the arch weights have not moved yet
          continue
        score = selection_score(select, val_metric[s], float(m["val_loss"][s]), epoch)
        if keeps(select, config.metric.name, extra["best_score"][s], score,
                 extra["best_epoch"][s] < 0):
          extra["best_score"][s] = score
          extra["best_val_metric"][s] = val_metric[s]
          extra["best_epoch"][s] = epoch
          extra["best_genotype"][s] = genos[s].to_json_dict()
      return {"epoch": epoch, "seconds": round(seconds, 4), "seeds": seeds,
              "train_loss": [float(v) for v in m["train_loss"]],
              "arch_loss": [float(v) for v in m["arch_loss"]],
              "val_loss": [float(v) for v in m["val_loss"]],
              "val_metric": val_metric, "metric": config.metric.name,
              "arch_entropy": [arch_entropy(a) for a in per_seed],
              "best_val_metric": list(extra["best_val_metric"]),
              "genotypes": [g.to_json_dict() for g in genos],
              "arch_softmax": [arch_softmax(a) for a in per_seed]}

    def write_outputs(history, extra):
      write_jsonl_atomic(os.path.join(stage_dir, "metrics.jsonl"),
                         [{k: v for k, v in r.items() if k not in ("genotypes", "arch_softmax")}
                          for r in history])
      write_json_atomic(os.path.join(stage_dir, "arch_history.json"),
                        {"seeds": seeds, "epochs": [r["epoch"] for r in history],
                         "softmax": [r["arch_softmax"] for r in history]})
      for r in history:
        for s, g in enumerate(r["genotypes"]):
          suffix = f"_seed_{seeds[s]}" if multi else ""
          path = os.path.join(stage_dir, "genotypes", f"epoch_{r['epoch']:03d}{suffix}.json")
          if not os.path.exists(path):
            genotype_lib.save(genotype_lib.from_json_dict(g), path)
      if not history or None in extra["best_genotype"]:     # nothing kept yet (warm-up)
        return
      best = [genotype_lib.from_json_dict(g) for g in extra["best_genotype"]]
      chosen = chosen_seed_index(select, extra)
      genotype_lib.save(best[chosen], os.path.join(stage_dir, "best_genotype.json"))
      if multi:
        for s, g in enumerate(best):
          genotype_lib.save(g, os.path.join(stage_dir, f"best_genotype_seed_{seeds[s]}.json"))
      write_json_atomic(os.path.join(stage_dir, "summary.json"), {
          "seeds": seeds, "metric": config.metric.name, "epochs_done": len(history),
          "best_val_metric": extra["best_val_metric"], "best_epoch": extra["best_epoch"],
          "select": select, "chosen_seed": seeds[chosen], "agreement": agreement(best),
          "seconds": round(sum(r["seconds"] for r in history), 3)})

    extra0 = {"best_score": [-np.inf] * len(seeds),
              "best_val_metric": [-np.inf] * len(seeds), "best_epoch": [-1] * len(seeds),
              "best_genotype": [None] * len(seeds)}
    states, history, extra = loop.run_epochs(
        stage_dir, fingerprint(config), init, epochs, sc.epochs, on_epoch, write_outputs,
        "search", extra0, epochs_key="config.search.epochs")
  best = [genotype_lib.from_json_dict(g) for g in extra["best_genotype"]]
  chosen = chosen_seed_index(select, extra)
  return SearchResult(seeds, best, list(extra["best_val_metric"]), list(extra["best_epoch"]),
                      best[chosen], sum(r["seconds"] for r in history), history, epochs.traces)


def selection_score(select: str, val_metric: float, val_loss: float, epoch: int) -> float:
  """The number `config.search.select` maximizes over a seed's epochs: the val metric,
  minus the val loss, or the epoch."""
  if select == "val_loss":
    return -val_loss
  if select == "last":
    return float(epoch)
  return val_metric


def keeps(select: str, metric: str, best: float, score: float, first: bool) -> bool:
  """Whether an epoch scoring `score` replaces a seed's kept genotype (score `best`):
  a higher score always; an equal one only under `select='release'` with accuracy."""
  return first or score > best or (select == "release" and metric == "accuracy"
                                   and score == best)


def chosen_seed_index(select: str, extra: dict) -> int:
  """The seed whose genotype is `best_genotype.json`: the lowest val loss for
  `select='val_loss'`, else the best val metric at the seeds' kept epochs."""
  return int(np.argmax(extra["best_score" if select == "val_loss" else "best_val_metric"]))


def alternation_step(steps: Steps):
  """The DARTS step pair as one phase step: a weight step on `batch['train']` with
  `key`, then an arch step on `batch['val']` with `fold_in(key, 1)`.

  Returns `(state, batch, key) -> (state, {'w': out, 'a': out})`.
  """
  def step(state, batch, key):
    state, w = steps.weight_step(state, batch["train"], key)
    state, a = steps.arch_step(state, batch["val"], jax.random.fold_in(key, 1))
    return state, {"w": w, "a": a}
  return step

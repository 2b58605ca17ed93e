"""The bilevel search trainer: weights on train, architecture on val, best genotype by val."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bmnas_jax import genotype as genotype_lib
from bmnas_jax import loop, optim
from bmnas_jax.checkpoint import write_json_atomic, write_jsonl_atomic
from bmnas_jax.data.feature_set import FeatureSet, nodes_from_config
from bmnas_jax.search_space import hypernet_from_config
from bmnas_jax.steps import Steps, TrainState

ALTERNATIONS = ("epoch", "step")


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
  epoch_traces: int          # times the epoch program was traced (1: no recompiles)


def check_data_against_config(config, fs: FeatureSet) -> None:
  """The config's node list, shapes and classes must describe the feature set."""
  want = nodes_from_config(config.data)
  have = fs.nodes
  if tuple(n.name for n in want) != tuple(n.name for n in have):
    raise ValueError(f"config.data describes nodes {[n.name for n in want]} but the features "
                     f"have {[n.name for n in have]}")
  for w, h in zip(want, have):
    if (w.channels, w.length) != (h.channels, h.length):
      raise ValueError(f"config.data.channels/length: node {w.name} is "
                       f"[C_in={w.channels}, L_in={w.length}] in the config but "
                       f"[{h.channels}, {h.length}] in the features")
  if config.model.num_classes != fs.num_classes:
    raise ValueError(f"config.model.num_classes={config.model.num_classes} but the features "
                     f"have {fs.num_classes} classes")
  if config.data.label_kind != fs.label_kind:
    raise ValueError(f"config.data.label_kind={config.data.label_kind!r} but the features "
                     f"are {fs.label_kind!r}")


def seed_list(config) -> list[int]:
  if not isinstance(config.seeds, int) or config.seeds < 1:
    raise ValueError(f"config.seeds={config.seeds!r} must be a positive int")
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
           "arch_opt": c.search.arch_opt, "metric": c.metric}
  return {k: json.loads(v.to_json()) if hasattr(v, "to_json") else v for k, v in parts.items()}


def run_search(config, fs: FeatureSet, workdir: str) -> SearchResult:
  """Searches `config.seeds` seeds together; writes `workdir/search/...`.

  Files: `metrics.jsonl` (a line per epoch, per-seed lists), `genotypes/epoch_NNN.json`
  (`epoch_NNN_seed_K.json` with several seeds), `best_genotype.json` (best val over
  seeds; per seed `best_genotype_seed_K.json` with several seeds), `arch_history.json`
  (softmax of alpha/beta/gamma per epoch and seed) and `summary.json`.
  """
  fs.validate("features")
  check_data_against_config(config, fs)
  sc = config.search
  if sc.alternation not in ALTERNATIONS:
    raise ValueError(f"config.search.alternation={sc.alternation!r}; valid: "
                     f"{', '.join(ALTERNATIONS)}")
  if not isinstance(sc.epochs, int) or sc.epochs < 1:
    raise ValueError(f"config.search.epochs={sc.epochs!r} must be a positive int")
  seeds = seed_list(config)
  mesh = loop.mesh_from_config(config)
  loop.check_batch_divides(sc.batch_size, mesh, "config.search.batch_size")
  nodes = fs.nodes
  names = [n.name for n in nodes]
  model = hypernet_from_config(config, nodes)
  n_train, n_val = len(fs.splits["train"]), len(fs.splits["val"])
  batch = sc.batch_size
  nb_train = loop.num_batches(n_train, batch, "config.search.batch_size")
  nb_val = loop.num_batches(n_val, batch, "config.search.batch_size")
  w_tx = optim.weight_optimizer(sc.weight_opt, n_train / batch, sc.epochs * nb_train)
  a_tx = optim.arch_optimizer(sc.arch_opt)
  steps = Steps(model, fs.label_kind, w_tx, a_tx, config.metric.name, config.metric.threshold)
  train = loop.device_split(fs.splits["train"], mesh)
  val = loop.device_split(fs.splits["val"], mesh)
  sample = jax.tree.map(lambda a: a[:2], train["x"])

  traces = [0]

  def epoch_one(state: TrainState, train, val, epoch):
    traces[0] += 1
    k = jax.random.fold_in(state.key, epoch)
    k_perm_t, k_perm_v, k_w, k_a = jax.random.split(k, 4)
    idx_t = loop.shuffled_batches(k_perm_t, n_train, batch, nb_train)
    idx_v = loop.shuffled_batches(k_perm_v, n_val, batch, nb_val)
    if sc.alternation == "epoch":       # the release: an epoch of w steps, then of arch steps
      state, wm = loop.scan_steps(steps.weight_step, state, train, idx_t, k_w, mesh)
      state, am = loop.scan_steps(steps.arch_step, state, val, idx_v, k_a, mesh)
    else:                               # DARTS: alternate every batch
      state, wm, am = alternate_steps(steps, state, {"train": train, "val": val}, idx_t,
                                       idx_v, k_w, mesh)
    (ev,) = loop.evaluate_splits(steps, state, val, (n_val,), batch, mesh)
    return state, {"train_loss": wm["loss"], "arch_loss": am["loss"], "val_loss": ev["loss"],
                   "val_metric": ev["metric"], "w_bad_step": wm["bad_step"],
                   "w_bad_code": wm["bad_code"], "a_bad_step": am["bad_step"],
                   "a_bad_code": am["bad_code"]}

  with jax.set_mesh(mesh):
    keys = loop.shard_seeds(seed_keys(seeds, 0), mesh)
    states = jax.jit(jax.vmap(lambda k: steps.init_state(k, sample)))(keys)
    epoch_vmapped = jax.jit(jax.vmap(epoch_one, in_axes=(0, None, None, None),
                                     spmd_axis_name=loop.SEED))
    stage_dir = os.path.join(workdir, "search")
    multi = len(seeds) > 1

    def on_epoch(epoch, states, m, seconds, extra):
      loop.describe_bad("search weight step", epoch, seeds, m["w_bad_step"], m["w_bad_code"])
      loop.describe_bad("search arch step", epoch, seeds, m["a_bad_step"], m["a_bad_code"])
      for name in ("train_loss", "arch_loss", "val_loss"):
        if not np.all(np.isfinite(m[name])):
          raise FloatingPointError(f"divergence at epoch {epoch}: non-finite {name}")
      arch = jax.device_get(states.arch)
      per_seed = [jax.tree.map(lambda a, s=s: np.asarray(a[s]), arch) for s in range(len(seeds))]
      genos = [genotype_lib.derive_from_config(a, names, config) for a in per_seed]
      val_metric = [float(v) for v in m["val_metric"]]
      for s in range(len(seeds)):
        if extra["best_epoch"][s] < 0 or val_metric[s] > extra["best_val_metric"][s]:
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
      if not history:
        return
      best = [genotype_lib.from_json_dict(g) for g in extra["best_genotype"]]
      chosen = int(np.argmax(extra["best_val_metric"]))
      genotype_lib.save(best[chosen], os.path.join(stage_dir, "best_genotype.json"))
      if multi:
        for s, g in enumerate(best):
          genotype_lib.save(g, os.path.join(stage_dir, f"best_genotype_seed_{seeds[s]}.json"))
      write_json_atomic(os.path.join(stage_dir, "summary.json"), {
          "seeds": seeds, "metric": config.metric.name, "epochs_done": len(history),
          "best_val_metric": extra["best_val_metric"], "best_epoch": extra["best_epoch"],
          "chosen_seed": seeds[chosen], "agreement": agreement(best),
          "seconds": round(sum(r["seconds"] for r in history), 3)})

    extra0 = {"best_val_metric": [-np.inf] * len(seeds), "best_epoch": [-1] * len(seeds),
              "best_genotype": [None] * len(seeds)}
    states, history, extra = loop.run_epochs(
        stage_dir, fingerprint(config), states,
        lambda st, e: epoch_vmapped(st, train, val, e), sc.epochs, on_epoch, write_outputs,
        "search", extra0)
  best = [genotype_lib.from_json_dict(g) for g in extra["best_genotype"]]
  chosen = int(np.argmax(extra["best_val_metric"]))
  return SearchResult(seeds, best, list(extra["best_val_metric"]), list(extra["best_epoch"]),
                      best[chosen], sum(r["seconds"] for r in history), history, traces[0])


def alternate_steps(steps: Steps, state, data, idx_t, idx_v, key, mesh):
  """DARTS alternation: per train batch one weight step, then one arch step on a val batch."""
  nb_train, nb_val = idx_t.shape[0], idx_v.shape[0]

  def body(st, i):
    k = jax.random.fold_in(key, i)
    st, w = steps.weight_step(st, loop.take_batch(data["train"], idx_t[i], mesh), k)
    st, a = steps.arch_step(st, loop.take_batch(data["val"], idx_v[i % nb_val], mesh),
                            jax.random.fold_in(k, 1))
    return st, (w, a)

  state, (w, a) = jax.lax.scan(body, state, jnp.arange(nb_train))
  ws, wc = loop.first_bad(w["bad"])
  as_, ac = loop.first_bad(a["bad"])
  return (state, {"loss": w["loss"].mean(), "bad_step": ws, "bad_code": wc},
          {"loss": a["loss"].mean(), "bad_step": as_, "bad_code": ac})

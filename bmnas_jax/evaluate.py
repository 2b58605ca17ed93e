"""The evaluation trainer: the genotype's fixed network retrained over seeds under vmap."""

from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import numpy as np

from bmnas_jax import genotype as genotype_lib
from bmnas_jax import loop, optim
from bmnas_jax.checkpoint import write_json_atomic, write_jsonl_atomic
from bmnas_jax.data.feature_set import FeatureSet
from bmnas_jax.fixed_net import fixed_net_from_config
from bmnas_jax.search import check_data_against_config, seed_keys, seed_list
from bmnas_jax.steps import Steps
from bmnas_jax.errors import ConfigError

if TYPE_CHECKING:
  from bmnas_jax.data.shards import ShardSource


def mean_std(values) -> dict[str, float]:
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()), "std": float(v.std(ddof=0)), "values": v.tolist()}


def run_evaluate(config, fs: FeatureSet | ShardSource, genotype: genotype_lib.Genotype | None,
                 workdir: str, stage: str = "evaluate", model: nn.Module | None = None) -> dict:
  """Retrains `genotype` on `config.evaluate.train_splits` for `config.seeds` seeds.

  `model` (optional) replaces the genotype's fixed network: any Flax module called
  as `model.apply(variables, features, train)` -> logits `[N, K]` (a baseline, or a
  network built differently from the genotype); `genotype` may then be None.

  Reports the test metric at the final epoch (per seed, mean ± std), and separately
  the test metric at the epoch the validation split selects (best val metric; when
  val is among the training splits it is not held out, and the result says so).
  The test split is never used to select anything. `fs` is a FeatureSet (on the
  devices) or a `shards.ShardSource` (streamed, `config.data.stream_block`), with
  the same results. Writes `workdir/<stage>/metrics.jsonl` (a line per epoch) and
  `metrics.json` (the result).
  """
  loop.check_data(fs)
  check_data_against_config(config, fs)
  ec = check_evaluate_config(config)
  seeds = seed_list(config)
  mesh = loop.mesh_from_config(config)
  loop.check_batch_divides(ec.batch_size, mesh, "config.evaluate.batch_size")
  block = loop.stream_block(config)
  if model is None:
    model = fixed_net_from_config(config, fs.nodes, genotype, dropout=ec.dropout)
  train_splits = tuple(ec.train_splits)
  train_rows = loop.ViewRows(fs, train_splits, "config.evaluate.train_splits")
  n_train = train_rows.examples
  loop.rows_of(fs, ("val", "test"), "the evaluation")
  batch = ec.batch_size
  nb = loop.num_batches(n_train, batch, "config.evaluate.batch_size")
  w_tx = optim.weight_optimizer_from_config(config, ec.weight_opt, n_train, batch, ec.epochs)
  steps = Steps.from_config(model, fs.label_kind, w_tx, None, config)
  val_held_out = "val" not in ec.train_splits
  epochs = loop.make_epochs(retraining_epoch(steps, train_rows, train_splits, batch, nb),
                            steps, fs, mesh, block)

  stage_dir = os.path.join(workdir, stage)
  with jax.set_mesh(mesh):
    keys = loop.shard_seeds(seed_keys(seeds, 1), mesh)
    states = jax.jit(jax.vmap(lambda k: steps.init_state(k, epochs.sample_x)))(keys)

    def on_epoch(epoch, states, m, seconds, extra):
      return epoch_record(stage, epoch, seconds, seeds, config.metric.name, m)

    def write_outputs(history, extra):
      write_jsonl_atomic(os.path.join(stage_dir, "metrics.jsonl"), history)
      if len(history) == ec.epochs:
        write_json_atomic(os.path.join(stage_dir, "metrics.json"),
                          summarize(history, seeds, config, genotype, val_held_out, stage))

    fp = {**retraining_fingerprint(config, genotype), "model_id": model_id(model)}
    _, history, _ = loop.run_epochs(stage_dir, fp, states, epochs, ec.epochs, on_epoch,
                                    write_outputs, stage, {}, epochs_key="config.evaluate.epochs")
  return {**summarize(history, seeds, config, genotype, val_held_out, stage),
          "epoch_traces": epochs.traces}


def check_evaluate_config(config):
  """`config.evaluate`, after checking its epochs and that it never trains on test."""
  ec = config.evaluate
  if not isinstance(ec.epochs, int) or ec.epochs < 1:
    raise ConfigError(f"config.evaluate.epochs={ec.epochs!r} must be a positive int")
  if "test" in ec.train_splits:
    raise ConfigError("config.evaluate.train_splits must not contain 'test'")
  return ec


def retraining_epoch(steps: Steps, train_rows: loop.ViewRows, train_splits: tuple[str, ...],
                     batch: int, nb: int) -> loop.EpochSpec:
  """A retraining epoch: `nb` shuffled batches of the training splits (one view drawn per
  example), a weight step each; then val and test evaluated."""
  def plan(key, epoch):
    k_perm, k_w = jax.random.split(jax.random.fold_in(key, epoch))
    rows = loop.shuffled_batches(k_perm, train_rows.examples, batch, nb)
    return (({"train": train_rows(rows, jax.random.fold_in(k_perm, 1))}, k_w),)

  phases = (loop.Phase(loop.grouped("w", steps.weight_step, "train"), {"train": train_splits},
                       nb, ("w",)),)
  return loop.EpochSpec(phases, plan, ("val", "test"), batch)


def retraining_fingerprint(config, genotype: genotype_lib.Genotype | None) -> dict:
  """Config parts a resumed retraining must share with its checkpoint."""
  return {"genotype": genotype and genotype.to_json_dict(),
          "evaluate": json.loads(config.evaluate.to_json()),
          "model": json.loads(config.model.to_json()), "fidelity": config.fidelity,
          "seed": config.seed, "seeds": config.seeds,
          "metric": json.loads(config.metric.to_json())}


def epoch_record(stage: str, epoch: int, seconds: float, seeds: list[int], metric: str,
                 m) -> dict:
  """A retraining epoch's line of `metrics.jsonl` from the epoch's outputs `m` (weight
  phase `w`, evaluation of val then test); a non-finite value stops the run naming it."""
  loop.describe_bad(f"{stage} weight step", epoch, seeds, m["w"]["bad_step"],
                    m["w"]["bad_code"])
  ev_val, ev_test = m["eval"]
  values = {"train_loss": m["w"]["loss"], "val_loss": ev_val["loss"],
            "val_metric": ev_val["metric"], "test_loss": ev_test["loss"],
            "test_metric": ev_test["metric"]}
  rec = {"epoch": epoch, "seconds": round(seconds, 4), "seeds": seeds, "metric": metric}
  for k, v in values.items():
    rec[k] = [float(x) for x in v]
    if not np.all(np.isfinite(rec[k])):
      raise FloatingPointError(f"divergence in {stage} at epoch {epoch}: non-finite {k}")
  return rec


def model_id(model: nn.Module) -> str:
  """A short id of a module's class and attributes (its repr): part of a stage's fingerprint."""
  return hashlib.sha256(repr(model).encode()).hexdigest()[:16]


def summarize(history, seeds, config, genotype, val_held_out: bool, stage: str) -> dict:
  """Final-epoch test metric and the val-selected epoch's test metric, per seed."""
  val = np.asarray([r["val_metric"] for r in history])          # [epochs, S]
  test = np.asarray([r["test_metric"] for r in history])
  sel = np.argmax(val, axis=0)                                   # first best epoch per seed
  return {
      "stage": stage, "metric": config.metric.name, "seeds": seeds,
      "epochs": len(history), "train_splits": list(config.evaluate.train_splits),
      "genotype": genotype and genotype.to_json_dict(),
      "final_test": mean_std(test[-1]),
      "final_val": mean_std(val[-1]),
      "val_selected": {"epoch": sel.tolist(), "val_held_out": val_held_out,
                       "test": mean_std(test[sel, np.arange(len(seeds))])},
      "seconds": round(sum(r["seconds"] for r in history), 3),
  }

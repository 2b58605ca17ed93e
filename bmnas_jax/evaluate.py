"""The evaluation trainer: the genotype's fixed network retrained over seeds under vmap."""

from __future__ import annotations

import dataclasses
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
  return run_retrainings(config, fs, workdir, [Job(genotype, stage, model)])[0]


@dataclasses.dataclass(frozen=True)
class Job:
  """A retraining: the genotype's fixed network (or `model`) into `workdir/<stage>/`.

  Jobs of one `group` (a folder relative to the workdir, e.g. `ablate/random`) train
  together, as one program under vmap (members x seeds): their genotypes must differ
  only in the Cells' inputs (Table 6's random selections), which the network then reads
  from its `arch` collection. The group's checkpoints live in `<group>/checkpoints`; each
  member's files in its own stage folder, as if it had trained alone."""
  genotype: genotype_lib.Genotype | None
  stage: str
  model: nn.Module | None = None
  group: str = ""


def run_retrainings(config, fs: FeatureSet | ShardSource, workdir: str,
                    jobs: list[Job]) -> list[dict]:
  """`run_evaluate` of every job (the jobs of a group together), in order, their
  programs compiled ahead side by side (a later job compiles while an earlier one
  trains; a job whose checkpoint already holds every epoch compiles nothing); in
  memory, the jobs share one copy of the splits on the devices. Returns each job's
  result, in the order of `jobs`."""
  loop.check_data(fs)
  check_data_against_config(config, fs)
  seed_axis = loop.mesh_from_config(config).shape[loop.SEED]
  groups: dict[str, list[int]] = {}
  for i, job in enumerate(jobs):
    groups.setdefault(job.group or f"\0{i}", []).append(i)
  for name, members in list(groups.items()):     # members x seeds must fill the seed axis
    if len(members) * config.seeds % seed_axis:
      del groups[name]
      groups.update({f"\0{i}": [i] for i in members})
  placed = {}
  trainers = [Retraining(config, fs, [jobs[i] for i in members], workdir, placed)
              for members in groups.values()]
  programs = [t.programs() for t in trainers]
  ahead = loop.CompileAhead([p for progs in programs for p in progs])
  out: list[dict | None] = [None] * len(jobs)
  try:
    for t, progs, members in zip(trainers, programs, groups.values()):
      ahead.install(progs)
      for i, res in zip(members, t.run()):
        out[i] = res
    return out
  finally:
    ahead.cancel()


def same_but_inputs(genotypes: list[genotype_lib.Genotype]) -> bool:
  """Whether the genotypes differ only in their Cells' inputs."""
  def shape(g):
    return dataclasses.replace(g, cells=tuple(dataclasses.replace(c, inputs=(0, 0))
                                              for c in g.cells))
  return all(shape(g) == shape(genotypes[0]) for g in genotypes)


class Retraining:
  """One retraining, or a group of them (`Job.group`), built (network, optimizer, data
  on the devices) but not yet run. The states hold members x seeds, member-major."""

  def __init__(self, config, fs: FeatureSet | ShardSource, jobs: list[Job], workdir: str,
               placed: dict | None = None):
    self.config, self.jobs = config, jobs
    self.ec = ec = check_evaluate_config(config)
    self.seeds = seed_list(config)
    self.mesh = loop.mesh_from_config(config)
    loop.check_batch_divides(ec.batch_size, self.mesh, "config.evaluate.batch_size")
    genotypes = [j.genotype for j in jobs]
    grouped = len(jobs) > 1
    if grouped and (any(j.model is not None or j.genotype is None for j in jobs)
                    or not same_but_inputs(genotypes)):
      raise ValueError(f"the jobs of group {jobs[0].group!r} must be genotypes that differ "
                       f"only in their Cells' inputs")
    model = jobs[0].model or fixed_net_from_config(config, fs.nodes, genotypes[0],
                                                   dropout=ec.dropout, dynamic_inputs=grouped)
    train_splits = tuple(ec.train_splits)
    train_rows = loop.ViewRows(fs, train_splits, "config.evaluate.train_splits")
    n_train = train_rows.examples
    loop.rows_of(fs, ("val", "test"), "the evaluation")
    batch = ec.batch_size
    nb = loop.num_batches(n_train, batch, "config.evaluate.batch_size")
    w_tx = optim.weight_optimizer_from_config(config, ec.weight_opt, n_train, batch, ec.epochs)
    steps = Steps.from_config(model, fs.label_kind, w_tx, None, config)
    self.val_held_out = "val" not in ec.train_splits
    self.epochs = loop.make_epochs(retraining_epoch(steps, train_rows, train_splits, batch, nb),
                                   steps, fs, self.mesh, loop.stream_block(config), placed)
    self.stage_dirs = [os.path.join(workdir, j.stage) for j in jobs]
    self.ckpt_dir = os.path.join(workdir, jobs[0].group if grouped else jobs[0].stage)
    keys = np.tile(np.asarray(seed_keys(self.seeds, 1)), (len(jobs), 1))  # [R * S, 2]
    with jax.set_mesh(self.mesh):
      keys = loop.shard_seeds(keys, self.mesh)
    sample_x = self.epochs.sample_x
    if grouped:                       # each state reads its member's Cell inputs
      inputs = np.repeat(np.asarray([[c.inputs for c in g.cells] for g in genotypes],
                                    np.int32), len(self.seeds), axis=0)      # [R * S, K, 2]
      with jax.set_mesh(self.mesh):
        inputs = loop.shard_seeds(inputs, self.mesh)
      self.init = loop.SeedInit(
          lambda k, inp: steps.init_state(k, sample_x).replace(arch={"inputs": inp}),
          (keys, inputs), self.mesh)
      self.fingerprint = {**retraining_fingerprint(config, None),
                          "genotypes": [g.to_json_dict() for g in genotypes],
                          "model_id": model_id(model)}
    else:
      self.init = loop.SeedInit(lambda k: steps.init_state(k, sample_x), (keys,), self.mesh)
      self.fingerprint = {**retraining_fingerprint(config, genotypes[0]),
                          "model_id": model_id(model)}

  def programs(self) -> list[loop.Program]:
    return loop.stage_programs(self.init, self.epochs, self.ckpt_dir, self.ec.epochs)

  def run(self) -> list[dict]:
    """Trains (or resumes) and returns each member's result."""
    config, ec, seeds, jobs = self.config, self.ec, self.seeds, self.jobs
    S = len(seeds)
    label = jobs[0].group or jobs[0].stage

    def member(history, r):
      """Member r's records: the seeds' slices of every per-state list."""
      return [{k: v[r * S:(r + 1) * S] if isinstance(v, list) else v for k, v in rec.items()}
              for rec in history]

    def result(history, r):
      return summarize(member(history, r), seeds, config, jobs[r].genotype,
                       self.val_held_out, jobs[r].stage)

    def on_epoch(epoch, states, m, seconds, extra):
      return epoch_record(label, epoch, seconds, seeds * len(jobs), config.metric.name, m)

    def write_outputs(history, extra):
      for r, stage_dir in enumerate(self.stage_dirs):
        write_jsonl_atomic(os.path.join(stage_dir, "metrics.jsonl"), member(history, r))
        if len(history) == ec.epochs:
          write_json_atomic(os.path.join(stage_dir, "metrics.json"), result(history, r))

    with jax.set_mesh(self.mesh):
      _, history, _ = loop.run_epochs(self.ckpt_dir, self.fingerprint, self.init, self.epochs,
                                      ec.epochs, on_epoch, write_outputs, label, {},
                                      epochs_key="config.evaluate.epochs")
    return [{**result(history, r), "epoch_traces": self.epochs.traces}
            for r in range(len(jobs))]


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

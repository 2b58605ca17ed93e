"""Evaluation with backbone fine-tuning: backbones and the fixed fusion net trained jointly."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np
import optax

from bmnas_jax import genotype as genotype_lib
from bmnas_jax import hosts, loop, optim
from bmnas_jax.checkpoint import write_json_atomic, write_jsonl_atomic
from bmnas_jax.data import backbones as bb
from bmnas_jax.data import datasets
from bmnas_jax.data.feature_set import Split, nodes_from_config
from bmnas_jax.data.pooling import pool_tap
from bmnas_jax.data.prepare import backbone_dir, plan_modalities
from bmnas_jax.data.source import ArraySplit, Dataset, load_dataset
from bmnas_jax.errors import ConfigError, DataError
from bmnas_jax.evaluate import (check_evaluate_config, epoch_record, retraining_epoch,
                                retraining_fingerprint, summarize)
from bmnas_jax.fixed_net import FixedNet, fixed_net_from_config
from bmnas_jax.search import seed_keys, seed_list
from bmnas_jax.steps import Steps, TrainState

BACKBONES = "backbones"   # top-level params / batch_stats entry of the backbones
FUSION = "fusion"         # top-level entry of the fixed fusion network


# ------------------------------------------------------------------ model

@dataclasses.dataclass(frozen=True)
class TappedBackbone:
  """One modality's backbone and the taps the genotype reads from it.

  Attributes:
    modality: e.g. `Image` (the backbone's variables live under `backbones/<modality>`).
    module: the backbone, `module(x, train) -> (logits or None, {tap: [N, ..., C]})`.
    taps: `(node, tap, L_in, pool mode)` per used node, in node order.
  """
  modality: str
  module: nn.Module
  taps: tuple[tuple[str, str, int, str], ...]


class Backbones(nn.Module):
  """The used modalities' backbones, each tap pooled as the prepare stage pools it.

  Args (call): x: modality -> raw inputs `[N, *input_shape]`; train: BatchNorm in
  train mode (batch statistics, running statistics updated) and dropout on.
  Returns: node -> float32 `[N, C_in, L_in]` (the stored features at the exported weights).
  """
  specs: tuple[TappedBackbone, ...]

  @nn.compact
  def __call__(self, x: Mapping[str, jax.Array], train: bool = False) -> dict[str, jax.Array]:
    feats = {}
    for s in self.specs:
      _, out = s.module.clone(parent=self, name=s.modality)(x[s.modality], train=train)
      for node, tap, length, mode in s.taps:
        feats[node] = pool_tap(out[tap], length, mode)
    return feats


class FinetuneNet(nn.Module):
  """Backbones (raw inputs -> pooled taps), then the genotype's fixed network.

  Variables: `params` and `batch_stats` hold `backbones/<Modality>/...` (the
  backbone's own tree) and `fusion/...` (the FixedNet's).
  Args (call): x: modality -> raw inputs `[N, *input_shape]`. Returns logits `[N, K]`.
  """
  backbones: Backbones
  fusion: FixedNet

  @nn.compact
  def __call__(self, x: Mapping[str, jax.Array], train: bool = False) -> jax.Array:
    return self.fusion(self.backbones(x, train), train)


def graft_backbones(variables: Mapping[str, Any], exported: Mapping[str, Mapping[str, Any]]
                    ) -> dict[str, Any]:
  """`variables` (a FinetuneNet's, one seed) with each backbone's collections replaced by
  its exported ones: `variables[col]['backbones'][m] = exported[m][col]`.

  Raises:
    DataError: an exported tree whose structure or shapes differ from the module's.
  """
  out = {col: dict(tree) for col, tree in variables.items()}
  for m, ev in exported.items():
    for col, tree in ev.items():
      have = variables.get(col, {}).get(BACKBONES, {}).get(m)
      same = have is not None and jax.tree.structure(have) == jax.tree.structure(tree) and all(
          np.shape(a) == np.shape(b) for a, b in zip(jax.tree.leaves(have), jax.tree.leaves(tree)))
      if not same:
        raise DataError(f"backbone {m}: exported {col!r} do not fit the fine-tuned model")
      out[col][BACKBONES] = {**out[col][BACKBONES], m: tree}
  return out


# -------------------------------------------------------------- optimizer

def finetune_optimizer(w_tx: optax.GradientTransformation, backbone_lr_mult: float
                       ) -> optax.GradientTransformation:
  """`w_tx` for the fusion params; `w_tx` with its updates scaled by `backbone_lr_mult`
  (its own moments, the same schedule) for the backbones' params. Labels come from the
  top-level entry of the params tree (`backbones` or anything else), no name patterns.
  A multiplier of 0 keeps the backbones at their exported weights (no update at all)."""
  backbone_tx = (optax.set_to_zero() if backbone_lr_mult == 0
                 else optax.chain(w_tx, optax.scale(backbone_lr_mult)))

  def labels(params):
    return {k: jax.tree.map(lambda _, k=k: BACKBONES if k == BACKBONES else FUSION, v)
            for k, v in params.items()}

  return optax.multi_transform({FUSION: w_tx, BACKBONES: backbone_tx}, labels)


def backbone_lr_mult(config) -> float:
  """`config.evaluate.backbone_lr_mult` checked: a finite number >= 0."""
  v = config.evaluate.get("backbone_lr_mult", 0.1)
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
    raise ConfigError(f"config.evaluate.backbone_lr_mult={v!r} must be a finite number >= 0")
  return float(v)


# ------------------------------------------------------------------- data

@dataclasses.dataclass
class RawSplits:
  """Raw inputs in the trainers' split layout, for loop.InMemoryEpochs.

  `splits[s].features[modality]` is `[n, *input_shape]` (one "node" per modality),
  `splits[s].labels` `[n]` int32 or `[n, K]` float32. They go to the devices as
  float32 (`loop.device_split`).
  """
  splits: dict[str, Split]
  label_kind: str
  views: dict[str, int] = dataclasses.field(default_factory=dict)

  @property
  def split_sizes(self) -> dict[str, int]:
    return {k: len(v) for k, v in self.splits.items()}


def raw_splits(ds: Dataset, names, modalities, skip_bad: bool, source: str = "") -> RawSplits:
  """The in-memory arrays of splits `names`, only `modalities`' inputs.

  Examples with a non-finite input are left out with `config.data.skip_bad` (as the
  prepare stage leaves them out), else raise DataError.

  Raises:
    ConfigError: a split that is not an `ArraySplit` (inputs held in memory).
  """
  out = {}
  for name in names:
    if name not in ds.splits:
      raise DataError(f"the fine-tuned evaluation needs split {name!r}; the dataset has "
                      f"{sorted(ds.splits)} (config.evaluate.train_splits?)")
    split = ds.splits[name]
    if not isinstance(split, ArraySplit):
      raise ConfigError(f"config.evaluate.finetune_backbones=True needs a dataset whose splits "
                        f"are in-memory arrays (bmnas_jax.data.source.ArraySplit); split "
                        f"{name!r} of config.data.source={source!r} is "
                        f"{type(split).__name__}")
    inputs = {m: split.inputs[m] for m in modalities}
    good = np.ones(len(split), bool)
    for arr in inputs.values():
      if arr.dtype.kind == "f":
        good &= np.isfinite(arr.reshape(len(split), -1)).all(axis=1)
    if not good.all():
      if not skip_bad:
        raise DataError(f"split {name!r} example {int(np.argmin(good))}: an input contains "
                        f"NaN/inf (config.data.skip_bad=True leaves such examples out)")
      inputs = {m: v[good] for m, v in inputs.items()}
    labels = split.labels[good]
    if ds.label_kind == "single":
      if labels.ndim != 1 or labels.min() < 0 or labels.max() >= ds.num_classes:
        raise DataError(f"split {name!r}: labels must be class ids [n] in "
                        f"[0, {ds.num_classes})")
      labels = labels.astype(np.int32)
    else:
      labels = labels.astype(np.float32)
    out[name] = Split(inputs, labels)
  return RawSplits(out, ds.label_kind)


# ------------------------------------------------------------------ build

@dataclasses.dataclass
class Finetune:
  """Everything `run_finetune` trains with (also what tests inspect).

  Attributes:
    model: the FinetuneNet.
    steps: its pure steps (weight optimizer: `finetune_optimizer`).
    data: the raw splits (train splits, val, test).
    exported: modality -> the exported backbone variables (`params`, `batch_stats`, ...).
    content_ids: modality -> the export's content id.
    n_train: examples in the training splits.
    data_fingerprint: the raw dataset's fingerprint (part of the stage's fingerprint).
  """
  model: FinetuneNet
  steps: Steps
  data: RawSplits
  exported: dict[str, Any]
  content_ids: dict[str, str]
  n_train: int
  data_fingerprint: str

  def init_state(self, key: jax.Array, sample_x) -> TrainState:
    """A fresh state for one seed: fusion params from `key`, backbones as exported."""
    state = self.steps.init_state(key, sample_x)
    v = graft_backbones({"params": state.params, "batch_stats": state.batch_stats},
                        self.exported)
    return state.replace(params=v["params"], batch_stats=v["batch_stats"],
                         w_opt=self.steps.w_tx.init(v["params"]))


def build_finetune(config, workdir: str, genotype: genotype_lib.Genotype) -> Finetune:
  """The fine-tuned model, optimizer and raw data of `genotype` (see `run_finetune`)."""
  ec = check_evaluate_config(config)
  mult = backbone_lr_mult(config)
  nodes = nodes_from_config(config.data)
  fusion = fixed_net_from_config(config, nodes, genotype, dropout=ec.dropout)
  used = genotype.used_nodes()
  ds = load_dataset(config, datasets.DATASETS)
  plans = [p for p in plan_modalities(config, ds) if any(n.name in used for n in p.nodes)]
  specs, exported, ids = [], {}, {}
  for p in plans:
    directory = backbone_dir(workdir, p.name)
    try:
      exported[p.name], meta = bb.restore_backbone(directory, p.module, p.input)
    except bb.BackboneError as e:
      raise DataError(f"{e} (the fine-tuned evaluation starts from the backbones the prepare "
                      f"stage exports: run it first)") from e
    ids[p.name] = meta["content_id"]
    taps = tuple((n.name, tap, length, mode) for n, (tap, length, mode) in zip(p.nodes, p.taps)
                 if n.name in used)
    specs.append(TappedBackbone(p.name, p.module, taps))
  model = FinetuneNet(Backbones(tuple(specs)), fusion)
  train_splits = tuple(ec.train_splits)
  names = list(dict.fromkeys(train_splits + ("val", "test")))
  data = raw_splits(ds, names, [p.name for p in plans], bool(config.data.get("skip_bad", False)),
                    str(config.data.source))
  n_train = sum(len(data.splits[s]) for s in train_splits)
  loop.num_batches(n_train, ec.batch_size, "config.evaluate.batch_size")
  w_tx = optim.weight_optimizer_from_config(config, ec.weight_opt, n_train, ec.batch_size,
                                            ec.epochs)
  steps = Steps.from_config(model, ds.label_kind, finetune_optimizer(w_tx, mult), None, config)
  return Finetune(model, steps, data, exported, ids, n_train, ds.data_fingerprint())


# ------------------------------------------------------------------ train

def run_finetune(config, workdir: str, genotype: genotype_lib.Genotype,
                 stage: str = "evaluate_finetune") -> dict:
  """Trains `genotype`'s fixed network on top of its modalities' backbones, jointly, from
  the raw inputs, for `config.seeds` seeds under vmap (paper section 3.4).

  The backbones of the modalities the genotype reads start from the prepare stage's
  exports (`workdir/backbones/<Modality>/`); their taps are pooled as the stored
  features were, so at the start the fusion network sees the stored features. The
  backbones' params learn with the evaluation's weight optimizer (`config.evaluate.
  weight_opt`) scaled by `config.evaluate.backbone_lr_mult`; their BatchNorm layers (if
  any) run in train mode while training (running statistics updated), in eval mode
  when evaluated; their own classifier heads get no gradient from the loss (only the
  weight decay moves them). The dataset's splits must
  be in-memory arrays (`ArraySplit`); they sit on the devices, and every epoch is one
  compiled program for all seeds (loop.InMemoryEpochs), checkpointed and resumable.

  Reports, as `run_evaluate` does, the test metric at the final epoch (mean ± std over
  seeds) and separately at the epoch the validation split selects; the test split
  selects nothing. Writes `workdir/<stage>/metrics.jsonl` (a line per epoch) and
  `metrics.json` (the result).

  Returns:
    `evaluate.summarize`'s dict (`final_test` {mean, std, values}, `final_val`,
    `val_selected`, `seeds`, `epochs`, ...) plus `backbone_lr_mult`, `backbones`
    (modality -> export content id) and `epoch_traces`.
  """
  ec = config.evaluate
  if hosts.is_multi():
    raise ConfigError("config.evaluate.finetune_backbones=True runs in one process (it "
                      "reads the raw dataset into memory); turn it off under "
                      "config.distributed, or run the evaluate stage in one process")
  seeds = seed_list(config)
  mesh = loop.mesh_from_config(config)
  loop.check_batch_divides(ec.batch_size, mesh, "config.evaluate.batch_size")
  ft = build_finetune(config, workdir, genotype)
  steps, batch = ft.steps, ec.batch_size
  train_splits = tuple(ec.train_splits)
  train_rows = loop.ViewRows(ft.data, train_splits, "config.evaluate.train_splits")
  nb = loop.num_batches(train_rows.examples, batch, "config.evaluate.batch_size")
  val_held_out = "val" not in train_splits
  epochs = loop.InMemoryEpochs(retraining_epoch(steps, train_rows, train_splits, batch, nb),
                               steps, ft.data, mesh)
  stage_dir = os.path.join(workdir, stage)
  mult = backbone_lr_mult(config)
  with jax.set_mesh(mesh):
    keys = loop.shard_seeds(seed_keys(seeds, 1), mesh)
  init = loop.SeedInit(lambda k: ft.init_state(k, epochs.sample_x), (keys,), mesh)
  loop.CompileAhead(loop.stage_programs(init, epochs, stage_dir, ec.epochs)).install()
  with jax.set_mesh(mesh):

    def on_epoch(epoch, states, m, seconds, extra):
      return epoch_record(stage, epoch, seconds, seeds, config.metric.name, m)

    def result(history):
      return {**summarize(history, seeds, config, genotype, val_held_out, stage),
              "finetune_backbones": True, "backbone_lr_mult": mult,
              "backbones": dict(ft.content_ids)}

    def write_outputs(history, extra):
      write_jsonl_atomic(os.path.join(stage_dir, "metrics.jsonl"), history)
      if len(history) == ec.epochs:
        write_json_atomic(os.path.join(stage_dir, "metrics.json"), result(history))

    fp = {**retraining_fingerprint(config, genotype),
          "backbones": dict(ft.content_ids), "data": ft.data_fingerprint,
          "net": hashlib.sha256(repr(ft.model).encode()).hexdigest()[:16]}
    _, history, _ = loop.run_epochs(stage_dir, fp, init, epochs, ec.epochs, on_epoch,
                                    write_outputs, stage, {}, epochs_key="config.evaluate.epochs")
  return {**result(history), "epoch_traces": epochs.traces}

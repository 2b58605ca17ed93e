"""The mfeat dataset end to end: backbones trained and exported, features extracted into shards."""

from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Any, Callable, Mapping

import numpy as np
import tqdm
from absl import logging

from bmnas_jax.checkpoint import write_json_atomic
from bmnas_jax.data import backbones as backbones_lib
from bmnas_jax.data import extract, mfeat, shards
from bmnas_jax.data.feature_set import FeatureSet, nodes_from_config

DATASET_NAME = "mfeat"
DATASET_VERSION = "1.0.0"
BACKBONES_DIRNAME = "backbones"
FEATURES_DIRNAME = "features"
UNIMODAL_FILENAME = "unimodal.json"
EXTRACTION_FILENAME = "extraction.json"

# Modality -> backbone input for all rows, float32 `[2000, ...]`, from (raw, split indices).
MODALITY_INPUTS: dict[str, Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray]],
                                    np.ndarray]] = {
    "Image": lambda raw, split: mfeat.pix_images(raw),
    "Shape": lambda raw, split: mfeat.shape_descriptors(raw, split["train"]),
}


def _inputs(config) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
  """modality -> split -> backbone inputs, and split -> labels int32 `[n]`."""
  raw = mfeat.load_raw()
  split = mfeat.split_indices(raw["labels"], seed=int(config.data.split_seed))
  inputs = {}
  for modality in config.data.modalities:
    if modality not in MODALITY_INPUTS:
      raise ValueError(f"config.data.modalities: mfeat has no modality {modality!r}; valid: "
                       f"{', '.join(MODALITY_INPUTS)}")
    everything = MODALITY_INPUTS[modality](raw, split)
    inputs[modality] = {s: everything[idx] for s, idx in split.items()}
  labels = {s: raw["labels"][idx].astype(np.int32) for s, idx in split.items()}
  return inputs, labels


def _training_spec(config, modality: str) -> dict[str, Any]:
  """What a backbone export must have been trained with to be reused."""
  if modality not in config.get("backbones", {}):
    raise ValueError(f"config.backbones has no entry for modality {modality!r}; have "
                     f"{sorted(config.get('backbones', {}))}")
  b = config.backbones[modality]
  for key in ("name", "epochs", "batch_size", "lr", "seed"):
    if key not in b:
      raise ValueError(f"config.backbones.{modality}.{key} is missing")
  if b.name not in backbones_lib.BACKBONES:
    raise ValueError(f"config.backbones.{modality}.name={b.name!r}; valid: "
                     f"{', '.join(backbones_lib.BACKBONES)}")
  return {"modality": modality, "epochs": int(b.epochs), "batch_size": int(b.batch_size),
          "lr": float(b.lr), "seed": int(b.seed), "split_seed": int(config.data.split_seed),
          "config": {"num_classes": mfeat.NUM_CLASSES}}


def check_nodes(config) -> None:
  """The config's nodes must be what the configured backbones' pooled taps give."""
  grid = int(config.data.get("pool_grid", 2))
  have = []
  for modality in config.data.modalities:
    spec = _training_spec(config, modality)
    module = backbones_lib.make_backbone(config.backbones[modality].name, **spec["config"])
    for k, shape in enumerate(backbones_lib.tap_shapes(module).values()):
      have.append((f"{modality}_{k + 1}", *extract.pooled_shape(shape, grid)))
  want = [(n.name, n.channels, n.length) for n in nodes_from_config(config.data)]
  if have != want:
    raise ValueError(f"config.data.channels/length/lengths describe nodes (name, C_in, L_in) "
                     f"{want}, but the backbones in config.backbones with "
                     f"config.data.pool_grid={grid} give {have}")


def backbone_dir(workdir: str | os.PathLike, name: str) -> pathlib.Path:
  return pathlib.Path(workdir).absolute() / BACKBONES_DIRNAME / name


def _train_and_export(config, workdir: pathlib.Path, inputs, labels) -> dict[str, dict]:
  """Trains and exports every backbone whose export is absent or was trained otherwise.

  Returns modality -> the export's meta.
  """
  metas, names = {}, {}
  bar = tqdm.tqdm(config.data.modalities, desc="backbones")
  for modality in bar:
    spec = _training_spec(config, modality)
    name = config.backbones[modality].name
    if name in names:
      raise ValueError(f"config.backbones: modalities {names[name]!r} and {modality!r} both "
                       f"use backbone {name!r} (exports are stored per backbone name)")
    names[name] = modality
    directory = backbone_dir(workdir, name)
    if directory.exists():
      meta = backbones_lib.read_backbone_meta(directory)
      if meta.get("training") == spec:
        metas[modality] = meta
        continue
      logging.warning("backbone export %s was trained with %s, the config asks for %s: "
                      "retraining", directory, meta.get("training"), spec)
    bar.set_postfix_str(f"{modality}: {name}")
    x, y = inputs[modality], labels
    params, metrics = backbones_lib.train_backbone(
        name, x["train"], y["train"], x["val"], y["val"], seed=spec["seed"],
        epochs=spec["epochs"], batch_size=spec["batch_size"], lr=spec["lr"],
        config=spec["config"], progress=True)
    module = backbones_lib.make_backbone(name, **spec["config"])
    test_acc = backbones_lib.accuracy(module, params, x["test"], y["test"])
    metas[modality] = backbones_lib.export_backbone(directory, name, params, {
        "config": spec["config"], "modality": modality, "training": spec,
        "val_accuracy": metrics["val_accuracy"], "test_accuracy": test_acc,
        "best_epoch": metrics["best_epoch"], "train_seconds": metrics["seconds"],
        "history": metrics["history"]})
    logging.info("backbone %s (%s): val %.4f test %.4f in %.1f s", name, modality,
                 metrics["val_accuracy"], test_acc, metrics["seconds"])
  return metas


def _write_if_changed(path: pathlib.Path, obj: Any) -> None:
  """Writes JSON atomically unless the file already holds the same object."""
  try:
    if json.loads(path.read_text()) == obj:
      return
  except (OSError, ValueError):
    pass
  write_json_atomic(path, obj)


def _features_current(data_dir: pathlib.Path, want: Mapping[str, Any]) -> bool:
  """Whether stored shards were extracted from these backbones with these settings."""
  if not (data_dir / DATASET_NAME / DATASET_VERSION).exists():
    return False
  try:
    user = shards.read_metadata(data_dir, DATASET_NAME, DATASET_VERSION)["user_metadata"]
  except shards.ShardError as e:
    logging.warning("features at %s are unreadable (%s): extracting again", data_dir, e)
    return False
  have = {k: user.get(k) for k in want}
  if have != want:
    logging.warning("features at %s came from %s, the backbones/config give %s: extracting "
                    "again", data_dir, have, want)
    return False
  return True


def prepare_mfeat(config, workdir: str | os.PathLike) -> FeatureSet:
  """The mfeat FeatureSet, building whatever stage is missing under `workdir`.

  Stages (each reused when its output is on disk and matches the config):
    1. `workdir/backbones/<name>/`: one backbone per modality
       (`config.backbones.<Modality>`: `name`, `epochs`, `batch_size`, `lr`,
       `seed`), trained on train, selected by val, exported with orbax;
       `workdir/backbones/unimodal.json` summarizes them (modality, val/test
       accuracy, train seconds, checkpoint id).
    2. `workdir/features/mfeat/1.0.0/`: the exports restored from disk, their
       taps pooled (`config.data.pool_grid`) over train/val/test and written as
       shards; the shard metadata holds the backbone checkpoint ids, the
       unimodal accuracies, the extraction seconds and the split seed
       (also in `workdir/features/extraction.json`).
  The shards are then read back and checked against `config.data`'s nodes.

  Returns:
    The FeatureSet read from the shards: nodes `<Modality>_<k>`, float32
    `[n, C_in, L_in]`, 1200/400/400 examples, 10 classes `'0'..'9'`.
  """
  workdir = pathlib.Path(workdir).absolute()
  check_nodes(config)
  expect = nodes_from_config(config.data)
  grid = int(config.data.get("pool_grid", 2))
  inputs, labels = _inputs(config)

  metas = _train_and_export(config, workdir, inputs, labels)
  _write_if_changed(workdir / BACKBONES_DIRNAME / UNIMODAL_FILENAME, {
      m: {"backbone": meta["name"], "checkpoint_id": meta["content_id"],
          "val_accuracy": meta["val_accuracy"], "test_accuracy": meta["test_accuracy"],
          "best_epoch": meta["best_epoch"], "epochs": meta["training"]["epochs"],
          "train_seconds": meta["train_seconds"]} for m, meta in metas.items()})

  data_dir = workdir / FEATURES_DIRNAME
  want = {"backbones": {m: {"name": meta["name"], "checkpoint_id": meta["content_id"]}
                        for m, meta in metas.items()},
          "split_seed": int(config.data.split_seed), "pool_grid": grid}
  if not _features_current(data_dir, want):
    start = time.perf_counter()
    restored = {}
    for modality in tqdm.tqdm(config.data.modalities, desc="restore backbones"):
      module, params, _ = backbones_lib.restore_backbone(
          backbone_dir(workdir, metas[modality]["name"]))
      restored[modality] = (module, params)
    fs, acc = extract.extract_features(restored, inputs, labels, mfeat.NUM_CLASSES,
                                       mfeat.CLASS_NAMES, grid=grid)
    seconds = time.perf_counter() - start
    summary = dict(want, unimodal_accuracy=acc, extraction_seconds=seconds,
                   dataset="UCI Multiple Features (mfeat)")
    shards.write_shards(fs, data_dir, DATASET_NAME, metadata=summary, version=DATASET_VERSION)
    write_json_atomic(data_dir / EXTRACTION_FILENAME, summary)
    logging.info("mfeat features extracted in %.1f s: %s", seconds, acc)
  return shards.read_feature_set(data_dir, DATASET_NAME, DATASET_VERSION, expect_nodes=expect)

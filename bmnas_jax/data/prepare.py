"""The prepare stage: raw dataset -> backbones -> pooled taps -> TFDS shards, resumable.

`run_prepare(config, workdir)`:
  1. calls the dataset function `config.data.source` names (`source.load_dataset`);
  2. checks every modality's `config.backbones.<Modality>` against the data and
     against the nodes `config.data` describes (taps exist, pool to `[C_in, L_in]`)
     before anything is written;
  3. gets each backbone's weights (`weights`: `train` on the train split,
     selected on val; `init`, the seeded initialization; `orbax`, a checkpoint
     directory; `torch`, a PyTorch file converted by the backbone class), exported
     with orbax to `workdir/backbones/<Modality>/` and reused while current;
  4. runs the backbones over every split in chunks of examples, each chunk
     written once to a staging folder (a killed run resumes at the first missing
     chunk), then writes the shards `workdir/features/<name>/1.0.0/`, the linear
     probes and `workdir/features/prepare.json`.
Re-running reuses what is current: the shards record a fingerprint of the data,
the backbones' checkpoint ids and the tap/pool spec, and are rebuilt only when
it changes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shutil
import time
from typing import Any, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
import tqdm
from absl import logging

from bmnas_jax import metrics
from bmnas_jax.checkpoint import read_json, write_json_atomic
from bmnas_jax.data import backbones as bb
from bmnas_jax.data import datasets, extract, shards
from bmnas_jax.data.feature_set import (HELD_OUT, FeatureSet, NodeSpec, nodes_from_config,
                                        split_order)
from bmnas_jax.data.pooling import POOL_MODES, check_tap
from bmnas_jax.data.source import (BadExample, Dataset, InputSpec, fingerprint_json,
                                   input_specs, load_dataset, read_examples)
from bmnas_jax.errors import ConfigError, DataError

VERSION = "1.0.0"
BACKBONES_DIRNAME = "backbones"
FEATURES_DIRNAME = "features"
UNIMODAL_FILENAME = "unimodal.json"
PREPARE_FILENAME = "prepare.json"
STAGING_PREFIX = ".prepare-"
WEIGHT_SOURCES = ("train", "init", "orbax", "torch")
FINGERPRINT_FORMAT = 1
_BACKBONE_KEYS = ("name", "kwargs", "taps", "pool", "weights", "checkpoint", "epochs",
                  "batch_size", "lr", "seed")
_PREPARE_KEYS = ("batch_size", "chunk_size", "probe_examples", "read_workers")


@dataclasses.dataclass
class Modality:
  """One modality's backbone, input and stored features, as the config and data give them."""
  name: str                      # the modality, e.g. "Image"
  key: str                       # its config entry, "config.backbones.Image"
  backbone: str                  # registry name or module:Class
  kwargs: dict[str, Any]
  module: nn.Module
  input: InputSpec
  taps: extract.TapSpec          # (tap, L_in, pool mode) per node
  nodes: tuple[NodeSpec, ...]
  weights: str
  checkpoint: str
  training: dict[str, Any]       # epochs, batch_size, lr, seed


def dataset_name(config) -> str:
  """The shards' dataset name: `config.name` in snake_case (`dataset` if empty)."""
  name = re.sub(r"[^a-z0-9_]+", "_", str(config.get("name", "")).lower()).strip("_")
  return name if name and name[0].isalpha() else f"dataset_{name}".rstrip("_")


def features_dir(workdir: str | os.PathLike) -> pathlib.Path:
  return pathlib.Path(workdir).absolute() / FEATURES_DIRNAME


def backbone_dir(workdir: str | os.PathLike, modality: str) -> pathlib.Path:
  return pathlib.Path(workdir).absolute() / BACKBONES_DIRNAME / modality


# ------------------------------------------------------------------ config

def _section(config, key: str, allowed: Sequence[str]):
  """`config.<key>` as a ConfigDict whose keys are all among `allowed`."""
  node = config
  for part in key.split("."):
    if part not in node:
      raise ConfigError(f"config.{key} is missing")
    node = node[part]
  unknown = sorted(set(node.keys()) - set(allowed))
  if unknown:
    raise ConfigError(f"config.{key} has unknown key(s) {unknown}; valid: {list(allowed)}")
  return node


def prepare_settings(config) -> dict[str, int]:
  """`config.prepare` checked: extraction batch, chunk size, probe examples, readers."""
  p = _section(config, "prepare", _PREPARE_KEYS)
  out = {}
  for k in _PREPARE_KEYS:
    v = p.get(k)
    low = 0 if k == "probe_examples" else 1
    if not isinstance(v, int) or v < low:
      raise ConfigError(f"config.prepare.{k}={v!r} must be an int >= {low}")
    out[k] = v
  out["chunk_size"] = -(-out["chunk_size"] // out["batch_size"]) * out["batch_size"]
  return out


def plan_modalities(config, ds: Dataset) -> list[Modality]:
  """Checks `config.backbones` and `config.data`'s nodes against the data; nothing is run.

  Raises:
    ConfigError: a missing or unknown key, an unknown backbone, a tap the backbone
      does not have, a tap that cannot be pooled as asked, channels that differ
      from `config.data.channels`; the message names the key.
  """
  modalities = tuple(config.data.modalities)
  if not modalities:
    raise ConfigError("config.data.modalities is empty")
  if "backbones" not in config:
    raise ConfigError("config.backbones is missing: one entry per modality in "
                      "config.data.modalities")
  extra = sorted(set(config.backbones.keys()) - set(modalities))
  if extra:
    raise ConfigError(f"config.backbones has entries {extra} for modalities that are not in "
                      f"config.data.modalities={list(modalities)}")
  try:
    nodes = nodes_from_config(config.data)
  except (KeyError, ValueError) as e:
    raise ConfigError(str(e).strip("'\"")) from e
  specs = input_specs(ds, modalities)
  plans = []
  for m in modalities:
    key = f"config.backbones.{m}"
    if m not in config.backbones:
      raise ConfigError(f"{key} is missing (every modality in config.data.modalities needs "
                        f"a backbone)")
    b = _section(config, f"backbones.{m}", _BACKBONE_KEYS)
    for k in ("name", "weights"):
      if k not in b:
        raise ConfigError(f"{key}.{k} is missing")
    if b.weights not in WEIGHT_SOURCES:
      raise ConfigError(f"{key}.weights={b.weights!r}; valid: {', '.join(WEIGHT_SOURCES)}")
    if b.weights in ("orbax", "torch") and not b.get("checkpoint"):
      raise ConfigError(f"{key}.checkpoint is empty: weights={b.weights!r} reads a checkpoint")
    kwargs = dict(b.get("kwargs") or {})
    module = bb.make_backbone(b.name, kwargs, key)
    try:
      logits, tap_shapes = bb.output_shapes(module, specs[m])
    except Exception as e:  # a user module's own error on this input: report where
      raise ConfigError(f"{key}: backbone {b.name!r} cannot run on the {m} inputs "
                        f"({specs[m]}): {type(e).__name__}: "
                        f"{e}") from e
    if logits is not None and logits != [int(config.model.num_classes)]:
      raise ConfigError(f"{key}: backbone {b.name!r} predicts {logits} classes, "
                        f"config.model.num_classes={config.model.num_classes}")
    want_taps = tuple(b.get("taps") or ()) or tuple(tap_shapes)
    unknown = [t for t in want_taps if t not in tap_shapes]
    if unknown:
      raise ConfigError(f"{key}.taps: backbone {b.name!r} has no tap(s) {unknown}; its taps: "
                        f"{ {t: s for t, s in tap_shapes.items()} }")
    mod_nodes = tuple(n for n in nodes if n.modality == m)
    if len(mod_nodes) != len(want_taps):
      raise ConfigError(f"config.data.channels.{m} describes {len(mod_nodes)} node(s) but "
                        f"{key}.taps gives {len(want_taps)}: {list(want_taps)}")
    pools = b.get("pool", "first")
    pools = (pools,) * len(want_taps) if isinstance(pools, str) else tuple(pools)
    if len(pools) != len(want_taps) or any(p not in POOL_MODES for p in pools):
      raise ConfigError(f"{key}.pool={b.get('pool')!r}: one of {POOL_MODES}, or one per tap")
    taps = []
    for tap, pool, node in zip(want_taps, pools, mod_nodes):
      try:
        c_in, _ = check_tap(tap_shapes[tap], node.length, pool)
      except ValueError as e:
        raise ConfigError(f"{key}: tap {tap!r} {tap_shapes[tap]} -> node {node.name} "
                          f"(L_in={node.length}, config.data.length/lengths): {e}") from e
      if c_in != node.channels:
        got = [tap_shapes[t][-1] for t in want_taps]
        raise ConfigError(f"config.data.channels.{m}: node {node.name} has C_in="
                          f"{node.channels} but tap {tap!r} of {key} has {c_in} channels "
                          f"(the taps {list(want_taps)} give {tuple(got)})")
      taps.append((tap, node.length, pool))
    training = {k: b.get(k) for k in ("epochs", "batch_size", "lr", "seed")}
    if b.weights in ("train", "init") and not isinstance(training["seed"], int):
      raise ConfigError(f"{key}.seed={training['seed']!r} must be an int")
    plans.append(Modality(m, key, str(b.name), kwargs, module, specs[m], tuple(taps), mod_nodes,
                          str(b.weights), str(b.get("checkpoint") or ""), training))
  return plans


# ------------------------------------------------------------------ weights

def _read_good(ds: Dataset, split: str, indices: Sequence[int], modalities: Sequence[str],
               specs, skip_bad: bool, workers: int, bar: tqdm.tqdm, views: Sequence[int] = (0,)
               ) -> tuple[dict[str, list[np.ndarray]], list, list[int], list[dict]]:
  """The good examples among `indices`: inputs per modality and labels, one record per
  view of each (example-major), their indices, and the bad ones (a bad example stops
  here unless `skip_bad`; an example bad in any view is left out whole)."""
  got, bad = [], {}
  for view in views:
    good = {}
    for i, inputs, label in read_examples(ds.splits[split], indices, modalities, specs,
                                          ds.label_kind, ds.num_classes, workers, view):
      if inputs is None:
        bad.setdefault(i, _bad_record(split, i, label))
        _maybe_raise_bad(list(bad.values()), skip_bad)
      else:
        good[i] = (inputs, label)
    got.append(good)
  bar.update(len(indices))
  kept = [int(i) for i in indices if i not in bad]
  xs, ys = {m: [] for m in modalities}, []
  for i in kept:
    for good in got:
      inputs, label = good[i]
      for m in modalities:
        xs[m].append(inputs[m])
      ys.append(label)
  return xs, ys, kept, list(bad.values())


def _read_arrays(ds: Dataset, split: str, modalities: Sequence[str], specs, skip_bad: bool,
                 workers: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """A whole split in memory (for backbone training): inputs and labels."""
  n = len(ds.splits[split])
  with tqdm.tqdm(total=n, desc=f"read {split}", unit="ex", leave=False) as bar:
    xs, ys, _, _ = _read_good(ds, split, range(n), modalities, specs, skip_bad, workers, bar)
  return {m: np.stack(v) for m, v in xs.items()}, np.stack(ys)


def _bad_record(split: str, index: int, err: BadExample) -> dict:
  return {"split": split, "index": int(index), "file": err.file, "reason": err.reason}


def _maybe_raise_bad(bad: list[dict], skip_bad: bool) -> None:
  if bad and not skip_bad:
    b = bad[0]
    where = f"{b['file']}: " if b["file"] else ""
    raise DataError(f"bad example {b['split']}[{b['index']}]: {where}{b['reason']} (list every "
                    f"bad example with experiments.check_data; config.data.skip_bad=True "
                    f"leaves them out)")


def _checkpoint_fingerprint(path: pathlib.Path) -> str:
  """sha256 of a checkpoint file, or of every file below a checkpoint folder."""
  h = hashlib.sha256()
  files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
  for f in files:
    h.update(os.fspath(f.relative_to(path) if path.is_dir() else f.name).encode())
    with open(f, "rb") as fh:
      for block in iter(lambda: fh.read(1 << 20), b""):
        h.update(block)
  return "sha256:" + h.hexdigest()


def checkpoint_path(checkpoint: str, config) -> pathlib.Path:
  """A backbone checkpoint's path: a relative one is looked up in `config.data.root`
  (where the paper datasets keep the release's checkpoints), else the current folder."""
  path = pathlib.Path(checkpoint).expanduser()
  root = str(config.data.get("root", "") or "")
  if not path.is_absolute() and root:
    path = pathlib.Path(root).expanduser() / path
  return path.absolute()


def _weights_spec(mod: Modality, config, data_fp: str) -> dict[str, Any]:
  """What an export must have been made from to be reused."""
  spec = {"weights": mod.weights, "backbone": mod.backbone, "kwargs": mod.kwargs,
          "input": mod.input.to_json()}
  if mod.weights == "train":
    for k, kind in (("epochs", int), ("batch_size", int), ("lr", float)):
      v = mod.training[k]
      if not isinstance(v, (int, float)) or isinstance(v, bool) or (kind is int and
                                                                   not isinstance(v, int)):
        raise ConfigError(f"{mod.key}.{k}={v!r} must be {'an int' if kind is int else 'a number'}")
    spec.update(training=mod.training, data=data_fp, label_kind=config.data.label_kind,
                skip_bad=bool(config.data.get("skip_bad", False)),
                threshold=float(config.metric.threshold))
  elif mod.weights == "init":
    spec["seed"] = mod.training["seed"]
  else:
    path = checkpoint_path(mod.checkpoint, config)
    if not path.exists():
      raise ConfigError(f"{mod.key}.checkpoint={mod.checkpoint!r}: {path} does not exist")
    spec.update(checkpoint=os.fspath(path), checkpoint_sha256=_checkpoint_fingerprint(path))
  return _json_form(spec)


def _json_form(obj: Any) -> Any:
  """`obj` as it reads back from JSON (tuples become lists), for comparisons with files."""
  return json.loads(json.dumps(obj))


def _convert_torch(mod: Modality, path: str):
  """Variables from a PyTorch checkpoint, by the backbone class's `variables_from_torch`."""
  convert = getattr(type(mod.module), "variables_from_torch", None)
  if convert is None:
    raise ConfigError(f"{mod.key}.weights='torch': backbone {mod.backbone!r} has no "
                      f"variables_from_torch(state_dict, like, source) to convert PyTorch "
                      f"checkpoints")
  from bmnas_jax.data import torch_import
  state_dict = torch_import.load_state_dict(path)
  return convert(state_dict, bb.abstract_variables(mod.module, mod.input), path)


def ensure_backbones(mods: Sequence[Modality], config, ds: Dataset, workdir: pathlib.Path,
                     data_fp: str, settings: Mapping[str, int]) -> dict[str, tuple[Any, dict]]:
  """Each modality's `(variables, meta)`: reused, trained, initialized, restored or
  converted, as `weights` says; exports go to `workdir/backbones/<Modality>/`."""
  out, train_data = {}, {}
  skip_bad = bool(config.data.get("skip_bad", False))
  bar = tqdm.tqdm(mods, desc="backbones", leave=False)
  for mod in bar:
    bar.set_postfix_str(f"{mod.name}: {mod.backbone} ({mod.weights})")
    spec = _weights_spec(mod, config, data_fp)
    directory = backbone_dir(workdir, mod.name)
    if mod.weights == "orbax":
      path = pathlib.Path(spec["checkpoint"])
      if (path / bb.META_FILENAME).is_file():
        variables, _ = bb.restore_backbone(path, mod.module, mod.input)
      else:
        variables = bb.restore_variables(path, mod.module, mod.input, f"{mod.key}.checkpoint")
      out[mod.name] = (variables, {"content_id": bb.content_id(variables), "spec": spec})
      continue
    if directory.exists():
      try:
        meta = bb.read_backbone_meta(directory)
      except bb.BackboneError as e:
        logging.warning("%s: %s; making it again", directory, e)
        meta = {}
      if meta.get("spec") == spec:
        variables, meta = bb.restore_backbone(directory, mod.module, mod.input)
        out[mod.name] = (variables, meta)
        continue
    extra: dict[str, Any] = {"modality": mod.name, "spec": spec}
    if mod.weights == "train":
      if not train_data:
        needs = [m.name for m in mods if m.weights == "train"]
        specs = {m.name: m.input for m in mods}
        for split in ("train", "val"):
          train_data[split] = _read_arrays(ds, split, needs, specs, skip_bad,
                                           settings["read_workers"])
      t = mod.training
      variables, metrics = bb.train_backbone(
          mod.module, mod.input, (train_data["train"][0][mod.name], train_data["train"][1]),
          (train_data["val"][0][mod.name], train_data["val"][1]), label_kind=ds.label_kind,
          threshold=float(config.metric.threshold), seed=t["seed"], epochs=t["epochs"],
          batch_size=t["batch_size"], lr=float(t["lr"]), where=mod.key, progress=True)
      extra.update(best_epoch=metrics["best_epoch"], epochs=metrics["epochs"],
                   train_seconds=metrics["seconds"], history=metrics["history"])
    elif mod.weights == "init":
      variables = bb.init_variables(mod.module, mod.input, mod.training["seed"])
    else:
      variables = _convert_torch(mod, spec["checkpoint"])
    meta = bb.export_backbone(directory, mod.backbone, mod.kwargs, mod.module, mod.input,
                              variables, extra)
    out[mod.name] = (variables, meta)
  return out


# ------------------------------------------------------------------ chunks

def _chunk_path(staging: pathlib.Path, split: str, k: int) -> pathlib.Path:
  return staging / f"{split}-{k:05d}.npz"


def _write_npz_atomic(path: pathlib.Path, arrays: Mapping[str, np.ndarray]) -> None:
  tmp = path.with_name(f".{path.name}.tmp")
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
  os.replace(tmp, path)


def _extract_chunk(mods: Sequence[Modality], variables: Mapping[str, Any], ds: Dataset,
                   split: str, indices: range, settings, skip_bad: bool, bar: tqdm.tqdm,
                   views: Sequence[int] = (0,)) -> dict[str, np.ndarray]:
  """One chunk's pooled features, labels, logits and bad examples, as npz arrays (one
  record per view of every good example, example-major)."""
  names = [m.name for m in mods]
  xs, ys, kept, bad = _read_good(ds, split, indices, names, {m.name: m.input for m in mods},
                                 skip_bad, settings["read_workers"], bar, views)
  arrays: dict[str, np.ndarray] = {"__bad__": np.asarray(json.dumps(bad)),
                                   "__index__": np.asarray(kept, np.int64)}
  if not kept:
    return arrays
  logits, feats = extract.extract_all(
      {m.name: (m.module, variables[m.name], m.taps) for m in mods},
      {m: np.stack(v) for m, v in xs.items()}, {m.name: [n.name for n in m.nodes] for m in mods},
      settings["batch_size"])
  for mod in mods:
    for node, (tap, _, _) in zip(mod.nodes, mod.taps):
      finite = np.isfinite(feats[node.name]).reshape(len(ys), -1).all(axis=1)
      if not finite.all():
        j = int(np.argmin(finite)) // len(views)
        raise DataError(f"{mod.key}: tap {tap!r} (node {node.name}) gives NaN/inf for "
                        f"{split} example {kept[j]} (check the input and the weights)")
  arrays.update({f"node/{k}": v for k, v in feats.items()})
  arrays.update({f"logits/{m}": v for m, v in logits.items() if v is not None})
  arrays["__label__"] = np.stack(ys)
  return arrays


def _chunks(staging: pathlib.Path, split: str, n: int, chunk: int) -> list[pathlib.Path]:
  return [_chunk_path(staging, split, k) for k in range(-(-n // chunk))]


def _read_chunk_key(path: pathlib.Path, key: str) -> np.ndarray | None:
  with np.load(path, allow_pickle=False) as z:
    return z[key] if key in z.files else None


def _split_rows(staging, split: str, n: int, chunk: int, nodes: Sequence[str]
                ) -> Iterator[dict[str, Any]]:
  """Stored examples of a split, in order, one chunk file in memory at a time."""
  for path in _chunks(staging, split, n, chunk):
    with np.load(path, allow_pickle=False) as z:
      if "__label__" not in z.files:
        continue
      feats = {name: z[f"node/{name}"] for name in nodes}
      labels = z["__label__"]
    for j in range(labels.shape[0]):
      yield {**{k: v[j] for k, v in feats.items()}, shards.LABEL_KEY: labels[j]}


def _gather(staging, split: str, n: int, chunk: int, key: str, rows: np.ndarray | None = None
            ) -> np.ndarray | None:
  """`key` over a split's chunks, concatenated (only the stored `rows` if given)."""
  parts, offset = [], 0
  for path in _chunks(staging, split, n, chunk):
    arr = _read_chunk_key(path, key)
    if arr is None:
      if _read_chunk_key(path, "__index__").size:
        return None
      continue
    if rows is not None:
      sel = rows[(rows >= offset) & (rows < offset + arr.shape[0])] - offset
      offset += arr.shape[0]
      arr = arr[sel]
    parts.append(arr)
  return np.concatenate(parts) if parts else None


# ------------------------------------------------------------------ the stage

def fingerprint(mods: Sequence[Modality], metas: Mapping[str, dict], config, ds: Dataset,
                data_fp: str) -> dict[str, Any]:
  """Everything the stored features depend on."""
  return _json_form({
      "format": FINGERPRINT_FORMAT, "data": data_fp, "label_kind": ds.label_kind,
      "num_classes": int(ds.num_classes), "skip_bad": bool(config.data.get("skip_bad", False)),
      "views": split_views(config, split_order(ds.splits)),
      "modalities": {m.name: {"backbone": m.backbone, "kwargs": m.kwargs,
                              "input": m.input.to_json(),
                              "checkpoint_id": metas[m.name]["content_id"],
                              "taps": [list(t) for t in m.taps]} for m in mods}})


def split_views(config, splits: Sequence[str]) -> dict[str, list[int]]:
  """The views stored per split: `config.data.train_views = K > 1` stores K augmented
  views (1..K) of every example of the training splits (all but val and test); val,
  test (and everything when K = 1) view 0."""
  k = config.data.get("train_views", 1)
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ConfigError(f"config.data.train_views={k!r} must be a positive int")
  return {s: list(range(1, k + 1)) if s not in HELD_OUT and k > 1 else [0] for s in splits}


def _stored_fingerprint(data_dir: pathlib.Path, name: str) -> dict | None:
  if not (data_dir / name / VERSION).exists():
    return None
  try:
    return shards.read_metadata(data_dir, name, VERSION)["user_metadata"].get("prepare")
  except shards.ShardError as e:
    logging.warning("features at %s are unreadable (%s): extracting again", data_dir, e)
    return None


def check_workdir_owner(config, workdir: pathlib.Path, name: str,
                        mods: Sequence[Modality]) -> None:
  """Refuses a workdir that another experiment prepared (its `features/prepare.json`
  names another dataset, source or set of modalities), so that nothing is written
  next to or over that experiment's backbones and features.

  Raises:
    ConfigError: naming the config key that differs.
  """
  path = features_dir(workdir) / PREPARE_FILENAME
  if not path.is_file():
    return
  old = read_json(path)
  if not isinstance(old, dict):
    return
  new = {"config.name": (old.get("dataset"), name),
         "config.data.source": (old.get("source"), str(config.data.source)),
         "config.data.modalities": (sorted(old.get("backbones") or {}),
                                    sorted(m.name for m in mods))}
  for key, (was, now) in new.items():
    if was is not None and was != now:
      raise ConfigError(f"{workdir} holds the run of another experiment: its {key} gives "
                        f"{was!r} ({FEATURES_DIRNAME}/{PREPARE_FILENAME}), this config "
                        f"gives {now!r}; use a new --workdir or that experiment's config")


def run_prepare(config, workdir: str | os.PathLike) -> dict[str, Any]:
  """Runs the prepare stage (see the module docstring); returns `prepare.json`'s content
  (or, when everything was current, `{'reused': True, ...}`)."""
  workdir = pathlib.Path(workdir).absolute()
  settings = prepare_settings(config)
  skip_bad = bool(config.data.get("skip_bad", False))
  ds = load_dataset(config, datasets.DATASETS)
  mods = plan_modalities(config, ds)
  data_fp = ds.data_fingerprint()
  name = dataset_name(config)
  data_dir = features_dir(workdir)
  check_workdir_owner(config, workdir, name, mods)   # before anything is written

  loaded = ensure_backbones(mods, config, ds, workdir, data_fp, settings)
  variables = {m: v for m, (v, _) in loaded.items()}
  metas = {m: meta for m, (_, meta) in loaded.items()}
  fp = fingerprint(mods, metas, config, ds, data_fp)
  if _stored_fingerprint(data_dir, name) == fp:
    return {"reused": True, "dataset": name, "fingerprint": fp}

  staging = data_dir / f"{STAGING_PREFIX}{fingerprint_json(fp)[7:23]}"
  for old in data_dir.glob(f"{STAGING_PREFIX}*"):
    if old != staging:
      shutil.rmtree(old, ignore_errors=True)
  staging.mkdir(parents=True, exist_ok=True)
  write_json_atomic(staging / "fingerprint.json", fp)
  chunk = settings["chunk_size"]
  splits = split_order(ds.splits)
  sizes = {s: len(ds.splits[s]) for s in splits}
  views = split_views(config, splits)
  start = time.perf_counter()
  computed = 0
  for split in splits:
    paths = _chunks(staging, split, sizes[split], chunk)
    bar = tqdm.tqdm(total=sizes[split], desc=f"extract {split}", unit="ex", leave=False)
    for k, path in enumerate(paths):
      lo, hi = k * chunk, min(sizes[split], (k + 1) * chunk)
      if path.exists():
        bar.update(hi - lo)
        continue
      _write_npz_atomic(path, _extract_chunk(mods, variables, ds, split, range(lo, hi),
                                             settings, skip_bad, bar, views[split]))
      computed += hi - lo
    bar.close()
  seconds = time.perf_counter() - start

  bad = [b for s in splits for p in _chunks(staging, s, sizes[s], chunk)
         for b in json.loads(str(_read_chunk_key(p, "__bad__")))]
  kept = {s: len(views[s]) * sum(_read_chunk_key(p, "__index__").size
                                 for p in _chunks(staging, s, sizes[s], chunk))
          for s in splits}                   # records: one per stored view of an example
  labels = {s: _gather(staging, s, sizes[s], chunk, "__label__") for s in splits}
  for s in splits:
    if not kept[s]:
      raise DataError(f"config.data.source={config.data.source!r}: every {s} example is bad")
  unimodal = _unimodal(mods, metas, staging, sizes, chunk, labels, ds, config)
  ensemble = _ensemble(mods, staging, sizes, chunk, labels, ds, config)
  probes = _probes(mods, staging, sizes, kept, chunk, labels, unimodal, ds, config,
                   settings["probe_examples"])

  nodes = [n for m in mods for n in m.nodes]
  user = {"prepare": fp, "dataset": ds.description or str(config.data.source)}
  stored = shards.stored_metadata(nodes, ds.label_kind, ds.num_classes, ds.class_names,
                                  "int32" if ds.label_kind == "single" else "float32", kept, user,
                                  {s: len(v) for s, v in views.items()})
  node_names = [n.name for n in nodes]
  shards.write_examples(
      stored, {s: (lambda s=s: _split_rows(staging, s, sizes[s], chunk, node_names))
               for s in splits}, data_dir, name, VERSION)
  summary = {"dataset": name, "source": str(config.data.source),
             "description": ds.description, "split_sizes": kept, "source_sizes": sizes,
             "views": {s: len(v) for s, v in views.items()},
             "bad_examples": bad, "extraction_seconds": round(seconds, 3),
             "examples_extracted_now": computed,
             "examples_per_second": round(computed / seconds, 1) if seconds > 0 else None,
             "unimodal": unimodal, "ensemble": ensemble, "probes": probes,
             "backbones": {m.name: {"backbone": m.backbone, "weights": m.weights,
                                    "checkpoint_id": metas[m.name]["content_id"]}
                           for m in mods}}
  write_json_atomic(data_dir / PREPARE_FILENAME, summary)
  write_json_atomic(workdir / BACKBONES_DIRNAME / UNIMODAL_FILENAME, {
      m.name: {"backbone": m.backbone, "weights": m.weights,
               "checkpoint_id": metas[m.name]["content_id"], **unimodal.get(m.name, {}),
               **{k: metas[m.name][k] for k in ("best_epoch", "epochs", "train_seconds")
                  if k in metas[m.name]}} for m in mods})
  shutil.rmtree(staging, ignore_errors=True)
  logging.info("prepare: %s examples in %.1f s", kept, seconds)
  return summary


def _unimodal(mods, metas, staging, sizes, chunk, labels, ds, config) -> dict[str, dict]:
  """Each backbone's own val and test score from its logits (backbones with a classifier)."""
  out = {}
  for mod in mods:
    row = {}
    for split in ("val", "test"):
      logits = _gather(staging, split, sizes[split], chunk, f"logits/{mod.name}")
      if logits is None:
        break
      metric, value = bb.score(logits, labels[split], ds.label_kind,
                               float(config.metric.threshold))
      row[f"{split}_{metric}"] = value
    if row:
      out[mod.name] = row
  return out


def _ensemble(mods, staging, sizes, chunk, labels, ds, config) -> dict[str, Any] | None:
  """The baseline nobody trains: the backbones' predicted probabilities averaged (softmax,
  or sigmoid for multi-label data), scored with `config.metric` on val and test; None
  with fewer than two backbones that classify."""
  out = {"modalities": [], "metric": str(config.metric.name)}
  for split in ("val", "test"):
    probs = []
    for mod in mods:
      logits = _gather(staging, split, sizes[split], chunk, f"logits/{mod.name}")
      if logits is None:
        continue
      probs.append(jax.nn.softmax(logits, -1) if ds.label_kind == "single"
                   else jax.nn.sigmoid(logits))
      if split == "val":
        out["modalities"].append(mod.name)
    if len(probs) < 2:
      return None
    p = np.clip(np.mean(np.stack(probs), axis=0), 1e-7, 1 - 1e-7)
    logits = np.log(p) if ds.label_kind == "single" else np.log(p) - np.log1p(-p)
    out[split] = metrics.score(logits, labels[split], config.metric.name,
                               float(config.metric.threshold),
                               1.0 if config.fidelity == "reference" else 0.0)
  return out


def _probes(mods, staging, sizes, kept, chunk, labels, unimodal, ds, config,
            max_examples: int) -> list[dict]:
  """A linear probe per node on a seeded sample of train, scored on val."""
  if max_examples <= 0:
    return []
  from bmnas_jax.data import probe        # scikit-learn: only when probing
  rng = np.random.default_rng(0)
  rows = {s: np.sort(rng.choice(kept[s], min(kept[s], max_examples), replace=False))
          for s in ("train", "val")}
  out = []
  for mod in tqdm.tqdm(mods, desc="linear probes", leave=False):
    for node, (tap, length, pool) in zip(mod.nodes, mod.taps):
      x = {s: _gather(staging, s, sizes[s], chunk, f"node/{node.name}", rows[s])
           for s in ("train", "val")}
      metric, value = probe.linear_probe(
          x["train"], labels["train"][rows["train"]], x["val"], labels["val"][rows["val"]],
          ds.label_kind, ds.num_classes, float(config.metric.threshold))
      own = unimodal.get(mod.name, {}).get(f"val_{metric}")
      out.append({"node": node.name, "modality": mod.name, "tap": tap, "pool": pool,
                  "C_in": node.channels, "L_in": length, "metric": metric,
                  "probe_val": value, "backbone_val": own,
                  "kept": None if not own else value / own,
                  "train_examples": int(rows["train"].size)})
  return out


def load_features(config, workdir: str | os.PathLike) -> FeatureSet | shards.ShardSource:
  """The stored features the search and evaluation read: a whole FeatureSet in memory
  (`config.data.in_memory`, the default) or a ShardSource that streams them."""
  data_dir = features_dir(workdir)
  name = dataset_name(config)
  try:
    expect = nodes_from_config(config.data)
  except (KeyError, ValueError) as e:
    raise ConfigError(str(e).strip("'\"")) from e
  if not (data_dir / name).exists():
    raise DataError(f"{data_dir / name}: no features (run the prepare stage: "
                    f"config.stages must start with 'prepare')")
  if config.data.get("in_memory", True):
    return shards.read_feature_set(data_dir, name, VERSION, expect_nodes=expect)
  return shards.open_shards(data_dir, name, VERSION, expect_nodes=expect)

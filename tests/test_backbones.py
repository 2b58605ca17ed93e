"""Tests of the unimodal backbones, their orbax export, extraction and the mfeat pipeline."""

import hashlib
import json
import math
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest

from bmnas_jax.data import backbones as bb
from bmnas_jax.data import datasets, extract, mfeat, mfeat_pipeline, shards
from bmnas_jax.data.feature_set import nodes_from_config
from experiments.configs import mfeat as mfeat_config

EPOCHS, BATCH = 1, 128          # tiny training: the tests check plumbing, not accuracy
NODE_SHAPES = {"Image_1": (16, 4), "Image_2": (32, 4), "Shape_1": (128, 1), "Shape_2": (64, 1)}


def tiny_config():
  c = mfeat_config.get_config()
  for modality in c.data.modalities:
    c.backbones[modality].epochs = EPOCHS
    c.backbones[modality].batch_size = BATCH
  return c


def tree_digest(root: pathlib.Path) -> dict[str, str]:
  """Relative path -> sha256 of every file under `root`."""
  return {os.fspath(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def tree_mtimes(root: pathlib.Path) -> dict[str, int]:
  return {os.fspath(p.relative_to(root)): p.stat().st_mtime_ns
          for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data():
  """mfeat backbone inputs (modality -> split -> array) and labels (split -> [n])."""
  return mfeat_pipeline._inputs(tiny_config())


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
  """One `prepare_mfeat` run with tiny epochs: (config, workdir, feature set)."""
  config = tiny_config()
  workdir = tmp_path_factory.mktemp("mfeat")
  return config, workdir, mfeat_pipeline.prepare_mfeat(config, workdir)


@pytest.fixture(scope="module")
def trained(data, pipeline_run):
  """The pipeline's backbones trained again in memory with the same settings."""
  inputs, labels = data
  config = pipeline_run[0]
  out = {}
  for modality in config.data.modalities:
    b = config.backbones[modality]
    x = inputs[modality]
    params, metrics = bb.train_backbone(b.name, x["train"], labels["train"], x["val"],
                                        labels["val"], seed=b.seed, epochs=b.epochs,
                                        batch_size=b.batch_size, lr=b.lr)
    out[modality] = (bb.make_backbone(b.name), params, metrics)
  return out


def test_unknown_backbone_lists_valid_names():
  with pytest.raises(ValueError, match="digit_cnn, shape_mlp"):
    bb.make_backbone("resnet")
  with pytest.raises(ValueError, match="no fields"):
    bb.make_backbone("shape_mlp", depth=3)


def test_taps_have_documented_shapes(data, trained):
  inputs, _ = data
  want = {"Image": {"conv1": (8, 7, 16), "conv2": (4, 3, 32)},
          "Shape": {"hidden1": (128,), "hidden2": (64,)}}
  for modality, (module, params, _) in trained.items():
    x = inputs[modality]["test"][:3]
    logits, taps = jax.jit(module.apply)({"params": params}, x)
    assert logits.shape == (3, 10)
    assert list(taps) == list(want[modality])          # tap order
    assert {k: v.shape[1:] for k, v in taps.items()} == want[modality]
    assert bb.tap_shapes(module) == {k: list(v) for k, v in want[modality].items()}


def test_training_is_deterministic_and_selects_by_val(data, trained, pipeline_run):
  workdir = pipeline_run[1]
  for modality, (module, params, metrics) in trained.items():
    meta = bb.read_backbone_meta(mfeat_pipeline.backbone_dir(workdir, bb.backbone_name(module)))
    # Same seed, same data: the in-memory run reproduces the pipeline's export bit for bit.
    assert bb.content_id(params) == meta["content_id"]
    accs = [h["val_accuracy"] for h in metrics["history"]]
    assert metrics["best_epoch"] == int(np.argmax(accs))
    assert metrics["val_accuracy"] == max(accs) == meta["val_accuracy"]
  inputs, labels = data
  x = inputs["Shape"]
  other, _ = bb.train_backbone("shape_mlp", x["train"], labels["train"], x["val"],
                               labels["val"], seed=1, epochs=EPOCHS, batch_size=BATCH, lr=1e-3)
  assert bb.content_id(other) != bb.content_id(trained["Shape"][1])


def test_export_restore_round_trip(trained, tmp_path):
  module, params, metrics = trained["Shape"]
  meta = bb.export_backbone(tmp_path / "shape_mlp", "shape_mlp", params,
                            {"val_accuracy": metrics["val_accuracy"], "note": "x"})
  assert meta["taps"] == {"hidden1": [128], "hidden2": [64]}
  assert meta["content_id"] == bb.content_id(params)
  restored_module, restored, restored_meta = bb.restore_backbone(tmp_path / "shape_mlp")
  assert restored_module == module
  assert restored_meta == meta
  assert json.loads((tmp_path / "shape_mlp" / bb.META_FILENAME).read_text()) == meta
  assert jax.tree.structure(restored) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)


def test_extraction_from_restored_export_equals_in_memory(data, trained, pipeline_run):
  inputs, labels = data
  workdir = pipeline_run[1]
  in_memory = {m: (module, params) for m, (module, params, _) in trained.items()}
  restored = {m: bb.restore_backbone(mfeat_pipeline.backbone_dir(workdir, bb.backbone_name(mod)))
              [:2] for m, (mod, _) in in_memory.items()}
  fs_mem, acc_mem = extract.extract_features(in_memory, inputs, labels, 10, mfeat.CLASS_NAMES)
  fs_disk, acc_disk = extract.extract_features(restored, inputs, labels, 10, mfeat.CLASS_NAMES)
  assert acc_mem == acc_disk
  assert fs_disk.node_names == tuple(NODE_SHAPES)
  assert {n.name: (n.channels, n.length) for n in fs_disk.nodes} == NODE_SHAPES
  for split in ("train", "val", "test"):
    for name in NODE_SHAPES:
      np.testing.assert_array_equal(fs_disk.splits[split].features[name],
                                    fs_mem.splits[split].features[name])
  # And the shards the pipeline wrote hold exactly these features.
  fs_shards = pipeline_run[2]
  for split in ("train", "val", "test"):
    np.testing.assert_array_equal(fs_shards.splits[split].labels, labels[split])
    for name in NODE_SHAPES:
      np.testing.assert_array_equal(fs_shards.splits[split].features[name],
                                    fs_disk.splits[split].features[name])
  # Padded fixed-size batches give what one unbatched call gives.
  module, params = in_memory["Shape"]
  _, taps = module.apply({"params": params}, inputs["Shape"]["test"])
  np.testing.assert_allclose(fs_disk.splits["test"].features["Shape_2"],
                             np.asarray(taps["hidden2"])[:, :, None], rtol=1e-5, atol=1e-6)
  logits, _ = module.apply({"params": params}, inputs["Shape"]["test"])
  assert acc_disk["Shape"]["test"] == pytest.approx(
      np.mean(np.argmax(logits, -1) == labels["test"]))


def numpy_adaptive_max_pool(x: np.ndarray, p: int) -> np.ndarray:
  """Reference: PyTorch's adaptive max-pool bins, grid flattened row-major -> [n, C, p*p]."""
  n, h, w, c = x.shape
  out = np.empty((n, c, p * p), x.dtype)
  for i in range(p):
    r0, r1 = math.floor(i * h / p), math.ceil((i + 1) * h / p)
    for j in range(p):
      c0, c1 = math.floor(j * w / p), math.ceil((j + 1) * w / p)
      out[:, :, i * p + j] = x[:, r0:r1, c0:c1, :].max(axis=(1, 2))
  return out


@pytest.mark.parametrize("shape,grid", [((2, 8, 7, 3), 2), ((2, 4, 3, 5), 2), ((3, 7, 5, 2), 3),
                                        ((1, 1, 1, 4), 2), ((2, 6, 6, 1), 1)])
def test_pooling_matches_numpy_reference(shape, grid):
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  got = np.asarray(extract.pool_tap(x, grid))
  assert got.shape == (shape[0], shape[3], grid * grid)
  np.testing.assert_array_equal(got, numpy_adaptive_max_pool(x, grid))
  assert extract.pooled_shape(shape[1:], grid) == (shape[3], grid * grid)


def test_pooling_vectors_and_bad_taps():
  x = np.arange(6, dtype=np.float32).reshape(2, 3)
  np.testing.assert_array_equal(extract.pool_tap(x, 2), x[:, :, None])
  assert extract.pooled_shape((3,), 2) == (3, 1)
  with pytest.raises(ValueError, match="image"):
    extract.pool_tap(np.zeros((2, 3, 4), np.float32), 2)
  # Row bin 0 of a 3-high map covers rows 0-1, row bin 1 rows 1-2 (they overlap).
  assert extract.adaptive_bins(3, 2) == [(0, 2), (1, 3)]
  assert extract.adaptive_bins(7, 2) == [(0, 4), (3, 7)]


def test_missing_export_names_the_path(tmp_path):
  with pytest.raises(bb.BackboneError, match=str(tmp_path / "absent")):
    bb.restore_backbone(tmp_path / "absent")
  (tmp_path / "empty").mkdir()
  with pytest.raises(bb.BackboneError, match="meta.json"):
    bb.restore_backbone(tmp_path / "empty")


def test_corrupt_export_raises_and_good_export_survives(trained, tmp_path):
  module, params, _ = trained["Shape"]
  good = tmp_path / "shape_mlp"
  bb.export_backbone(good, "shape_mlp", params, {"val_accuracy": 0.5})
  before = tree_digest(good)

  # Damaged params files.
  bad = tmp_path / "bad_params"
  shutil.copytree(good, bad)
  for f in (bad / bb.PARAMS_DIRNAME).rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(b"\x00garbage" * 8)
  with pytest.raises(bb.BackboneError, match=str(bad)):
    bb.restore_backbone(bad)
  # Damaged meta.json.
  bad_meta = tmp_path / "bad_meta"
  shutil.copytree(good, bad_meta)
  (bad_meta / bb.META_FILENAME).write_text("{not json")
  with pytest.raises(bb.BackboneError, match=str(bad_meta)):
    bb.restore_backbone(bad_meta)
  # Params missing entirely.
  no_params = tmp_path / "no_params"
  shutil.copytree(good, no_params)
  shutil.rmtree(no_params / bb.PARAMS_DIRNAME)
  with pytest.raises(bb.BackboneError, match=str(no_params / bb.PARAMS_DIRNAME)):
    bb.restore_backbone(no_params)

  # Failed exports over the good one leave it byte-identical.
  wrong = jax.tree.map(lambda a: a[..., :1], params)
  with pytest.raises(bb.BackboneError, match="do not fit"):
    bb.export_backbone(good, "shape_mlp", wrong, {})
  with pytest.raises(bb.BackboneError, match="JSON"):
    bb.export_backbone(good, "shape_mlp", params, {"when": object()})

  def failing_save(self, *args, **kwargs):
    raise OSError("disk full")

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(bb.ocp.StandardCheckpointer, "save", failing_save)
    with pytest.raises(bb.BackboneError, match="disk full"):
      bb.export_backbone(good, "shape_mlp", params, {})
  assert tree_digest(good) == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["bad_meta", "bad_params", "no_params",
                                                        "shape_mlp"]
  assert bb.restore_backbone(good)[2]["val_accuracy"] == 0.5
  # A successful export replaces it.
  bb.export_backbone(good, "shape_mlp", params, {"val_accuracy": 0.75})
  assert bb.restore_backbone(good)[2]["val_accuracy"] == 0.75


def test_prepare_mfeat_writes_and_reuses(pipeline_run, monkeypatch):
  config, workdir, fs = pipeline_run
  assert fs.nodes == nodes_from_config(config.data)
  assert [len(fs.splits[s]) for s in ("train", "val", "test")] == [1200, 400, 400]
  assert fs.label_kind == "single" and fs.num_classes == 10
  assert fs.class_names == tuple("0123456789")

  unimodal = json.loads((workdir / "backbones" / "unimodal.json").read_text())
  assert set(unimodal) == {"Image", "Shape"}
  user = shards.read_metadata(workdir / "features", "mfeat")["user_metadata"]
  for modality, row in unimodal.items():
    meta = bb.read_backbone_meta(workdir / "backbones" / row["backbone"])
    assert row["checkpoint_id"] == meta["content_id"]
    assert user["backbones"][modality]["checkpoint_id"] == meta["content_id"]
    assert user["unimodal_accuracy"][modality]["test"] == pytest.approx(meta["test_accuracy"])
    assert {"val_accuracy", "test_accuracy", "train_seconds"} <= set(row)
  assert user["split_seed"] == 0 and user["extraction_seconds"] > 0

  # A second run (through the registry) reuses everything: no training, no extraction.
  before = tree_mtimes(workdir)

  def forbidden(*args, **kwargs):
    raise AssertionError("a finished stage ran again")

  monkeypatch.setattr(bb, "train_backbone", forbidden)
  monkeypatch.setattr(extract, "extract_features", forbidden)
  again = datasets.load_features(config, os.fspath(workdir))
  assert tree_mtimes(workdir) == before
  for split in fs.splits:
    for name in fs.node_names:
      np.testing.assert_array_equal(again.splits[split].features[name],
                                    fs.splits[split].features[name])


def test_config_nodes_must_match_the_backbones(tmp_path):
  config = tiny_config()
  config.data.channels = {"Image": (16, 32), "Shape": (128, 32)}
  with pytest.raises(ValueError, match="config.data.channels"):
    mfeat_pipeline.prepare_mfeat(config, tmp_path)
  assert not (tmp_path / "backbones").exists()
  config = tiny_config()
  config.backbones.Image.name = "vgg"
  with pytest.raises(ValueError, match="digit_cnn, shape_mlp"):
    mfeat_pipeline.prepare_mfeat(config, tmp_path)


def test_prepare_mfeat_redoes_only_stale_stages(pipeline_run, tmp_path):
  config, workdir, _ = pipeline_run
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  image_before = tree_digest(copy / "backbones" / "digit_cnn")
  old_id = bb.read_backbone_meta(copy / "backbones" / "shape_mlp")["content_id"]
  config = tiny_config()
  config.backbones.Shape.lr = 2e-3          # Shape trained otherwise: retrain it, re-extract
  fs = mfeat_pipeline.prepare_mfeat(config, copy)
  assert tree_digest(copy / "backbones" / "digit_cnn") == image_before
  new_id = bb.read_backbone_meta(copy / "backbones" / "shape_mlp")["content_id"]
  assert new_id != old_id
  user = shards.read_metadata(copy / "features", "mfeat")["user_metadata"]
  assert user["backbones"]["Shape"]["checkpoint_id"] == new_id
  unimodal = json.loads((copy / "backbones" / "unimodal.json").read_text())
  assert unimodal["Shape"]["checkpoint_id"] == new_id
  np.testing.assert_array_equal(fs.splits["test"].features["Image_1"],
                                pipeline_run[2].splits["test"].features["Image_1"])

"""Tests for TFDS array_record shards of feature sets, read back without TensorFlow."""

import hashlib
import importlib.util
import json
import os
import pathlib
import shutil
import sys

import numpy as np
import pytest

from bmnas_jax.data import shards
from bmnas_jax.data.feature_set import FeatureSet, NodeSpec, Split
from bmnas_jax.data.shards import ShardError

NODES = (NodeSpec("Image_1", "Image", 4, 2), NodeSpec("Image_2", "Image", 3, 2),
         NodeSpec("Text_1", "Text", 5, 1))
SIZES = {"train": 10, "val": 4, "test": 4}
NUM_CLASSES = 3
USER_METADATA = {"backbone": {"Image": "ckpt-img-7", "Text": "ckpt-txt-2"}, "seed": 3}


def make_feature_set(label_kind: str, seed: int = 0) -> FeatureSet:
  """Tiny feature set: 3 nodes, 10/4/4 examples, single or multi labels."""
  rng = np.random.default_rng(seed)
  splits = {}
  for name, n in SIZES.items():
    features = {node.name: rng.normal(size=(n, node.channels, node.length)).astype(np.float32)
                for node in NODES}
    if label_kind == "single":
      labels = rng.integers(0, NUM_CLASSES, size=(n,)).astype(np.int32)
    else:
      labels = (rng.random((n, NUM_CLASSES)) < 0.5).astype(np.float32)
    splits[name] = Split(features=features, labels=labels)
  return FeatureSet(nodes=NODES, splits=splits, label_kind=label_kind,
                    num_classes=NUM_CLASSES, class_names=("cat", "dog", "emu"))


def tree_digest(root: pathlib.Path) -> dict[str, str]:
  """Relative path -> sha256 of every file under `root`."""
  return {os.fspath(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  """One data_dir holding `tiny_single` and `tiny_multi` (2 shards per split)."""
  data_dir = tmp_path_factory.mktemp("tfds")
  sets = {}
  for kind in ("single", "multi"):
    fs = make_feature_set(kind)
    path = shards.write_shards(fs, data_dir, f"tiny_{kind}", metadata=USER_METADATA,
                               num_shards=2)
    assert path == data_dir / f"tiny_{kind}" / "1.0.0"
    sets[kind] = fs
  return data_dir, sets


def copy_dataset(data_dir: pathlib.Path, kind: str, dest: pathlib.Path) -> pathlib.Path:
  """Copies one written dataset to `dest`; returns its version directory."""
  shutil.copytree(data_dir / f"tiny_{kind}", dest / f"tiny_{kind}")
  return dest / f"tiny_{kind}" / "1.0.0"


def test_tensorflow_absent(written):
  assert importlib.util.find_spec("tensorflow") is None
  shards.read_feature_set(written[0], "tiny_single")
  assert "tensorflow" not in sys.modules


@pytest.mark.parametrize("kind", ["single", "multi"])
def test_round_trip(written, kind):
  data_dir, sets = written
  want = sets[kind]
  got = shards.read_feature_set(data_dir, f"tiny_{kind}", expect_nodes=NODES)
  assert got.nodes == want.nodes
  assert got.label_kind == kind
  assert got.num_classes == NUM_CLASSES
  assert got.class_names == want.class_names
  assert list(got.splits) == list(want.splits)
  for name, split in want.splits.items():
    for node in NODES:
      arr = got.splits[name].features[node.name]
      assert arr.dtype == split.features[node.name].dtype
      np.testing.assert_array_equal(arr, split.features[node.name])
    assert got.splits[name].labels.dtype == split.labels.dtype
    np.testing.assert_array_equal(got.splits[name].labels, split.labels)

  meta = shards.read_metadata(data_dir, f"tiny_{kind}")
  assert meta["user_metadata"] == USER_METADATA
  assert meta["label_kind"] == kind
  assert meta["num_classes"] == NUM_CLASSES
  assert meta["class_names"] == list(want.class_names)
  assert meta["split_sizes"] == SIZES
  assert [(n["name"], n["modality"], n["channels"], n["length"]) for n in meta["nodes"]] == [
      (n.name, n.modality, n.channels, n.length) for n in NODES]


def test_shards_written_as_array_record(written):
  files = sorted(p.name for p in (written[0] / "tiny_single" / "1.0.0").iterdir())
  assert "tiny_single-train.array_record-00000-of-00002" in files
  assert "tiny_single-train.array_record-00001-of-00002" in files
  assert {"dataset_info.json", "features.json", "metadata.json"} <= set(files)


@pytest.mark.parametrize("kind", ["single", "multi"])
def test_stream_each_sample_once_per_epoch(written, kind):
  data_dir, sets = written
  fs = sets[kind]
  n = SIZES["train"]
  batches = list(shards.stream(data_dir, f"tiny_{kind}", "train", batch_size=3, seed=7,
                               num_epochs=2))
  assert len(batches) == 2 * 4  # ceil(10 / 3) per epoch, batches never straddle epochs
  for b in batches:
    for node in NODES:
      assert b[node.name].dtype == np.float32
      assert b[node.name].shape == (len(b["index"]), node.channels, node.length)
      want = fs.splits["train"].features[node.name][b["index"]]
      np.testing.assert_array_equal(b[node.name], want)
    np.testing.assert_array_equal(b["label"], fs.splits["train"].labels[b["index"]])
    assert b["label"].shape[1:] == (() if kind == "single" else (NUM_CLASSES,))
  order = np.concatenate([b["index"] for b in batches])
  first, second = order[:n], order[n:]
  assert sorted(first.tolist()) == list(range(n))
  assert sorted(second.tolist()) == list(range(n))
  assert first.tolist() != second.tolist()  # Reshuffled per epoch.


def test_stream_seed_determinism_and_no_shuffle(written):
  data_dir = written[0]

  def order(**kw):
    return np.concatenate([b["index"] for b in shards.stream(
        data_dir, "tiny_single", "train", batch_size=4, **kw)]).tolist()

  assert order(seed=1) == order(seed=1)
  assert order(seed=1) != order(seed=2)
  assert order(seed=1, shuffle=False) == list(range(SIZES["train"]))
  dropped = list(shards.stream(data_dir, "tiny_single", "val", batch_size=3, seed=0,
                               drop_remainder=True))
  assert [len(b["index"]) for b in dropped] == [3]


def test_missing_dataset_directory(tmp_path):
  with pytest.raises(ShardError, match="absent_set"):
    shards.read_feature_set(tmp_path, "absent_set")
  with pytest.raises(ShardError, match="absent_set"):
    shards.stream(tmp_path, "absent_set", "train", 2, 0)


def test_missing_shard_file(written, tmp_path):
  path = copy_dataset(written[0], "single", tmp_path)
  victim = path / "tiny_single-val.array_record-00001-of-00002"
  victim.unlink()
  with pytest.raises(ShardError, match=victim.name):
    shards.read_feature_set(tmp_path, "tiny_single")
  with pytest.raises(ShardError, match=victim.name):
    shards.stream(tmp_path, "tiny_single", "train", 2, 0)


@pytest.mark.parametrize("keep", [10, 70000, 131071])
def test_truncated_shard_file(written, tmp_path, keep):
  path = copy_dataset(written[0], "multi", tmp_path)
  victim = path / "tiny_multi-train.array_record-00000-of-00002"
  assert victim.stat().st_size > keep
  os.truncate(victim, keep)
  with pytest.raises(ShardError, match=victim.name):
    shards.read_feature_set(tmp_path, "tiny_multi")


def test_missing_metadata_file(written, tmp_path):
  path = copy_dataset(written[0], "single", tmp_path)
  (path / "metadata.json").unlink()
  with pytest.raises(ShardError, match="metadata.json"):
    shards.read_metadata(tmp_path, "tiny_single")


def test_metadata_disagrees_with_features(written, tmp_path):
  path = copy_dataset(written[0], "single", tmp_path)
  meta = json.loads((path / "metadata.json").read_text())
  meta["nodes"][1]["channels"] = 9
  (path / "metadata.json").write_text(json.dumps(meta))
  with pytest.raises(ShardError, match=r"features\.json.*'Image_2'"):
    shards.read_feature_set(tmp_path, "tiny_single")


def test_expected_nodes_mismatch(written):
  wrong = (NODES[0], NodeSpec("Image_2", "Image", 3, 4), NODES[2])
  with pytest.raises(ShardError, match=r"'Image_2'.*\(3, 2\).*\(3, 4\)"):
    shards.read_feature_set(written[0], "tiny_single", expect_nodes=wrong)
  with pytest.raises(ShardError, match="'Audio_1'"):
    shards.read_feature_set(written[0], "tiny_single",
                            expect_nodes=NODES + (NodeSpec("Audio_1", "Audio", 2, 2),))


def test_labels_out_of_range(written, tmp_path):
  fs = make_feature_set("single")
  fs.splits["val"].labels[2] = NUM_CLASSES
  with pytest.raises(ShardError, match="'val' labels out of range"):
    shards.write_shards(fs, tmp_path, "bad_labels")
  assert not (tmp_path / "bad_labels").exists()
  assert [p.name for p in tmp_path.iterdir()] == []

  # A stored dataset whose metadata shrank num_classes fails on read.
  path = copy_dataset(written[0], "single", tmp_path)
  meta = json.loads((path / "metadata.json").read_text())
  meta["num_classes"] = 1
  meta["class_names"] = ["cat"]
  (path / "metadata.json").write_text(json.dumps(meta))
  with pytest.raises(ShardError, match="labels out of range"):
    shards.read_feature_set(tmp_path, "tiny_single")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_features_rejected(tmp_path, bad):
  fs = make_feature_set("multi")
  fs.splits["test"].features["Text_1"][1, 3, 0] = bad
  with pytest.raises(ShardError, match="'Text_1' contains NaN/inf"):
    shards.write_shards(fs, tmp_path, "bad_values")
  assert list(tmp_path.iterdir()) == []


def test_unserializable_metadata_rejected(tmp_path):
  with pytest.raises(ShardError, match="'when'"):
    shards.write_shards(make_feature_set("single"), tmp_path, "bad_meta",
                        metadata={"ok": 1, "when": object()})


def test_failed_write_keeps_previous_dataset(written, tmp_path, monkeypatch):
  path = copy_dataset(written[0], "single", tmp_path)
  before = tree_digest(tmp_path)

  fs = make_feature_set("single", seed=1)
  fs.splits["train"].features["Image_1"][0, 0, 0] = np.nan
  with pytest.raises(ShardError):
    shards.write_shards(fs, tmp_path, "tiny_single", metadata={"new": True})
  assert tree_digest(tmp_path) == before

  # A failure in the middle of generation (after some records) changes nothing either.
  original = shards._FeatureSetBuilder._generate_examples

  def failing(self, split_name):
    for i, example in enumerate(original(self, split_name)):
      if split_name == "val" and i == 2:
        raise OSError("disk went away")
      yield example

  monkeypatch.setattr(shards._FeatureSetBuilder, "_generate_examples", failing)
  with pytest.raises(OSError, match="disk went away"):
    shards.write_shards(make_feature_set("single", seed=1), tmp_path, "tiny_single",
                        num_shards=2)
  assert tree_digest(tmp_path) == before
  monkeypatch.undo()

  # A successful rewrite replaces the dataset and leaves no temporary directories.
  new = make_feature_set("single", seed=1)
  assert shards.write_shards(new, tmp_path, "tiny_single", metadata={"new": True}) == path
  assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny_single"]
  assert sorted(p.name for p in (tmp_path / "tiny_single").iterdir()) == ["1.0.0"]
  got = shards.read_feature_set(tmp_path, "tiny_single")
  np.testing.assert_array_equal(got.splits["train"].features["Image_1"],
                                new.splits["train"].features["Image_1"])
  assert shards.read_metadata(tmp_path, "tiny_single")["user_metadata"] == {"new": True}


def test_versions_and_name_of_a_registered_tfds_dataset(tmp_path):
  # `mnist` is a registered TFDS builder; the stored files must still be used.
  old, new = make_feature_set("single", seed=1), make_feature_set("single", seed=2)
  shards.write_shards(old, tmp_path, "mnist", version="1.0.0")
  shards.write_shards(new, tmp_path, "mnist", version="1.1.0")
  latest = shards.read_feature_set(tmp_path, "mnist")
  pinned = shards.read_feature_set(tmp_path, "mnist", version="1.0.0")
  np.testing.assert_array_equal(latest.splits["val"].labels, new.splits["val"].labels)
  np.testing.assert_array_equal(pinned.splits["val"].labels, old.splits["val"].labels)
  with pytest.raises(ShardError, match="2.0.0"):
    shards.read_feature_set(tmp_path, "mnist", version="2.0.0")

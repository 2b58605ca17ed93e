"""MM-IMDB from a synthetic multimodal_imdb.hdf5 in the GMU layout: the reader, its errors,
and prepare -> search -> evaluate -> report with a width-reduced VGG19 from a PyTorch file."""

import json
import os
import pathlib

import h5py
import numpy as np
import pytest

from bmnas_jax import pipeline
from bmnas_jax.data import mmimdb, shards
from bmnas_jax.errors import ConfigError, DataError
from experiments.configs import mmimdb as mmimdb_config
from tests.conftest import tiny_run

N = 64                                   # 32 train, 16 dev, 16 test rows
GENRES = [f"genre_{k}" for k in range(23)]
FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "torch"


def write_hdf5(folder: pathlib.Path, n: int = N, layout: str = "chw", drop: str = "",
               genres_shape=None) -> pathlib.Path:
  """The GMU file's layout at small size: images int32 [n, 3, 64, 32] (or the release's
  [n, 32, 64, 3]), features float32 [n, 300], genres int32 [n, 23], imdb_ids S7."""
  rng = np.random.default_rng(0)
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / mmimdb.HDF5_FILENAME
  genres = (rng.random((n, 23)) < 0.2).astype(np.int32)
  genres[np.arange(n), rng.integers(0, 23, n)] = 1
  images = rng.integers(-124, 152, (n, 3, 64, 32)).astype(np.int32)
  # The plot vector says which genre is first (a learnable signal).
  features = rng.normal(0, 1, (n, 300)).astype(np.float32)
  features[:, :23] += 2.0 * genres
  with h5py.File(path, "w") as f:
    if drop != "images":
      f["images"] = images if layout == "chw" else np.swapaxes(images, 1, 3)
    f["features"] = features
    f["genres"] = genres if genres_shape is None else np.zeros(genres_shape, np.int32)
    f["genres"].attrs["target_names"] = json.dumps(GENRES)
    f["imdb_ids"] = np.asarray([f"tt{i:05d}" for i in range(n)], dtype="S7")
    f["vgg_features"] = np.zeros((n, 4), np.float32)
  return path


def config(root, **data):
  c = mmimdb_config.get_config()
  c.data.root = os.fspath(root)
  c.data.split_counts = (32, 16, 16)
  c.data.update(data)
  return c


def test_reader_rows_labels_and_split_file(tmp_path):
  path = write_hdf5(tmp_path)
  ds = mmimdb.get_dataset(config(tmp_path))
  assert {k: len(v) for k, v in ds.splits.items()} == {"train": 32, "val": 16, "test": 16}
  assert ds.label_kind == "multi" and ds.num_classes == 23 and ds.class_names == tuple(GENRES)
  with h5py.File(path) as f:
    ex = ds.splits["val"][3]                                       # row 35
    np.testing.assert_array_equal(ex.inputs["Image"], f["images"][35])
    assert ex.inputs["Image"].dtype == np.int32
    np.testing.assert_array_equal(ex.inputs["Text"], f["features"][35])
    np.testing.assert_array_equal(ex.label, f["genres"][35].astype(np.float32))
    assert set(ds.splits["train"].example(0, ("Text",)).inputs) == {"Text"}
  # A split file reassigns rows and orders each split as it lists them.
  (tmp_path / mmimdb.SPLIT_FILENAME).write_text(json.dumps(
      {"train": [f"tt{i:05d}" for i in (5, 2, 9)], "dev": ["tt00001", "tt00000"],
       "test": ["tt00063", "tt00003"]}))
  ds = mmimdb.get_dataset(config(tmp_path))
  rows = {k: v.rows.tolist() for k, v in ds.splits.items()}
  assert rows["train"] == [5, 2, 9] and rows["val"] == [1, 0]
  assert rows["test"][:2] == [63, 3] and len(rows["test"]) == N - 5
  assert "row 9" in ds.splits["train"].file(2)
  # The fingerprint follows the files.
  before = ds.data_fingerprint()
  (tmp_path / mmimdb.SPLIT_FILENAME).write_text(json.dumps({"train": ["tt00005"],
                                                            "dev": ["tt00001"]}))
  assert mmimdb.get_dataset(config(tmp_path)).data_fingerprint() != before


def test_release_image_layout_is_swapped_back(tmp_path):
  chw = mmimdb.get_dataset(config(write_hdf5(tmp_path / "a").parent))
  swapped = mmimdb.get_dataset(config(write_hdf5(tmp_path / "b", layout="release").parent))
  # [N, W, H, 3] in the file; the release's transpose(1, 3) makes [3, H, W] of it.
  np.testing.assert_array_equal(swapped.splits["test"][5].inputs["Image"],
                                chw.splits["test"][5].inputs["Image"])
  assert swapped.splits["test"][5].inputs["Image"].shape == (3, 64, 32)


@pytest.mark.parametrize("kind,match", [
    ("no_root", "config.data.root is empty"),
    ("no_file", "multimodal_imdb.hdf5: not found"),
    ("no_images", r"lacks key\(s\) \['images'\]"),
    ("genres", r"key 'genres' has shape \[64, 5\]"),
    ("counts", r"64 rows, but config.data.split_counts=\(10, 10, 10\)"),
    ("split_ids", r"1 'train' id\(s\) are not in"),
    ("layout", "config.data.image_layout='nhwc'"),
])
def test_bad_files_name_the_file_and_key(tmp_path, kind, match):
  data = {}
  if kind == "no_images":
    write_hdf5(tmp_path, drop="images")
  elif kind == "genres":
    write_hdf5(tmp_path, genres_shape=(N, 5))
  elif kind != "no_file":
    write_hdf5(tmp_path)
  if kind == "counts":
    data["split_counts"] = (10, 10, 10)
  if kind == "split_ids":
    (tmp_path / mmimdb.SPLIT_FILENAME).write_text(json.dumps({"train": ["tt99999"],
                                                              "dev": []}))
  if kind == "layout":
    data["image_layout"] = "nhwc"
  c = config(tmp_path, **data)
  if kind == "no_root":
    c.data.root = ""
  with pytest.raises((ConfigError, DataError), match=match):
    mmimdb.get_dataset(c)


def test_prepare_search_evaluate_report(tmp_path):
  """The paper config on the synthetic file: a width-reduced VGG19 read from a legacy
  PyTorch file with torchvision's key names, the Maxout-MLP trained, every stage."""
  write_hdf5(tmp_path / "data")
  c = config(tmp_path / "data")
  c.backbones.Image.kwargs = {"widths": (4, 4, 8, 8, 8)}
  c.backbones.Image.checkpoint = os.fspath(FIXTURES / "vgg19_legacy.pth")
  c.backbones.Text.kwargs = {"num_classes": 23, "hidden": 4}
  c.backbones.Text.epochs, c.backbones.Text.batch_size = 2, 16
  c.data.channels = {"Image": (8, 8, 8, 8), "Text": (4, 8)}
  c.prepare.probe_examples = 32
  tiny_run(c)
  c.stages += ",report"                 # the multi-label F1 tables
  c.data.in_memory = False              # the trainers stream multi-hot labels from the shards
  out = pipeline.run(c, os.fspath(tmp_path / "run"))
  fs = shards.read_feature_set(tmp_path / "run" / "features", "mmimdb")
  assert [(n.name, n.channels, n.length) for n in fs.nodes] == [
      ("Image_1", 8, 16), ("Image_2", 8, 16), ("Image_3", 8, 16), ("Image_4", 8, 16),
      ("Text_1", 4, 1), ("Text_2", 8, 1)]
  assert fs.label_kind == "multi" and fs.splits["test"].labels.shape == (16, 23)
  uni = out["prepare"]["unimodal"]
  assert set(uni) == {"Text"} and "val_f1_weighted" in uni["Text"]     # VGG: no classifier
  assert out["prepare"]["backbones"]["Image"]["weights"] == "torch"
  assert out["evaluate"]["metric"] == "f1_weighted"
  assert 0 <= out["evaluate"]["final_test"]["mean"] <= 1
  assert "Table 1-3 form" in (tmp_path / "run" / "report.md").read_text()


def test_checkpoint_is_looked_up_in_the_data_root(tmp_path):
  from bmnas_jax.data import prepare
  write_hdf5(tmp_path)
  c = config(tmp_path)
  c.backbones.Image.kwargs = {"widths": (4, 4, 8, 8, 8)}
  c.data.channels = {"Image": (8, 8, 8, 8), "Text": (64, 128)}
  with pytest.raises(ConfigError, match=f"{tmp_path}/vgg19-dcbb9e9d.pth does not exist"):
    prepare.run_prepare(c, tmp_path / "run")
  assert not (tmp_path / "run" / "backbones").exists()

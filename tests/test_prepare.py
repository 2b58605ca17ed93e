"""The prepare stage on a dataset defined here, outside the package: shards, reuse, resume,
probes, errors, and prepare -> search -> evaluate -> report."""

import hashlib
import json
import os
import pathlib
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmnas_jax import pipeline
from bmnas_jax.data import backbones as bb
from bmnas_jax.data import prepare, shards, torch_import
from bmnas_jax.data.check import check_data
from bmnas_jax.data.source import ArraySplit, BadExample, Dataset, Example, InputSpec
from bmnas_jax.errors import ConfigError, DataError
from experiments.configs import common
from tests.conftest import assert_trainers_accept

SIZES = {"train": 96, "val": 48, "test": 48}


def _arrays(seed: int, n: int, label_kind: str):
  """Img [1, 6, 6] images whose bright quadrant is the class; Vec [5] vectors with a
  noisy copy of the class in feature 0."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 3, n)
  img = rng.normal(0, 0.2, (n, 1, 6, 6)).astype(np.float32)
  for i, k in enumerate(y):
    img[i, 0, 3 * (k // 2):3 * (k // 2) + 3, 3 * (k % 2):3 * (k % 2) + 3] += 1.0
  vec = rng.normal(0, 1.0, (n, 5)).astype(np.float32)
  vec[:, 0] += y
  labels = y.astype(np.int32) if label_kind == "single" else np.eye(3, dtype=np.float32)[y]
  return {"Img": img, "Vec": vec}, labels


def get_dataset(config) -> Dataset:
  """The test's dataset function (`config.data.source='tests.test_prepare:get_dataset'`)."""
  kind = config.data.label_kind
  splits = {s: ArraySplit(*_arrays(k, n, kind)) for k, (s, n) in enumerate(SIZES.items())}
  return Dataset(splits, 3, kind, ("a", "b", "c"), description="test quadrants")


class _Files:
  """A split over 'files' (one per example): example 5 of train is unreadable, example 7
  has the wrong shape; every other example is the ArraySplit's."""

  def __init__(self, split: ArraySplit, name: str):
    self.split, self.name = split, name

  def __len__(self):
    return len(self.split)

  def file(self, i):
    return f"/data/{self.name}/{i:04d}.bin"

  def __getitem__(self, i):
    if self.name == "train" and i == 5:
      raise BadExample(self.file(i), "truncated record at byte 12")
    ex = self.split[i]
    if self.name == "train" and i == 7:
      return Example({"Img": ex.inputs["Img"][:, :5], "Vec": ex.inputs["Vec"]}, ex.label)
    return ex


def get_bad_dataset(config) -> Dataset:
  ds = get_dataset(config)
  return Dataset({k: _Files(v, k) for k, v in ds.splits.items()}, 3, ds.label_kind,
                 ds.class_names, fingerprint="bad-v1")


def config(label_kind: str = "single", source: str = "tests.test_prepare:get_dataset"):
  c = common.base_config()
  c.name = "quadrants"
  c.data.source = source
  c.data.modalities = ("Img", "Vec")
  c.data.label_kind = label_kind
  c.data.channels = {"Img": (4, 8), "Vec": (8, 4)}
  c.data.length = 4
  c.data.lengths = {"Vec": (1, 2)}
  c.backbones.Img = common.backbone("digit_cnn", {"num_classes": 3, "features": (4, 8)},
                                    pool="grid", epochs=2, batch_size=16, lr=1e-2)
  c.backbones.Vec = common.backbone("shape_mlp", {"num_classes": 3, "hidden": (8, 4)},
                                    weights="init", seed=3)
  c.prepare.batch_size, c.prepare.chunk_size, c.prepare.probe_examples = 16, 32, 64
  c.prepare.read_workers = 2
  c.model.C, c.model.L = 4, 4
  c.model.num_cells, c.model.multiplier, c.model.steps, c.model.node_multiplier = 1, 1, 1, 1
  c.model.num_classes = 3
  c.metric.name = "accuracy" if label_kind == "single" else "f1_weighted"
  c.devices, c.seeds = 1, 2
  c.search.epochs, c.search.batch_size = 1, 16
  c.evaluate.epochs, c.evaluate.batch_size = 1, 16
  c.evaluate.baselines = ()
  return c


def digest(root: pathlib.Path) -> dict[str, str]:
  return {os.fspath(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def mtimes(root: pathlib.Path) -> dict[str, int]:
  return {os.fspath(p.relative_to(root)): p.stat().st_mtime_ns
          for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def full(tmp_path_factory):
  """The prepare stage, uninterrupted (the later stages on prepared features: the
  embedded default's, MM-IMDB's and the own-data example's end-to-end tests)."""
  wd = tmp_path_factory.mktemp("full")
  c = config()
  c.stages = "prepare"
  return c, wd, pipeline.run(c, os.fspath(wd))


def test_prepare(full):
  c, wd, out = full
  prep = out["prepare"]
  assert prep["split_sizes"] == SIZES and prep["bad_examples"] == []
  fs = shards.read_feature_set(wd / "features", "quadrants")
  assert [(n.name, n.channels, n.length) for n in fs.nodes] == [
      ("Img_1", 4, 4), ("Img_2", 8, 4), ("Vec_1", 8, 1), ("Vec_2", 4, 2)]
  # The stored features are the backbones' pooled taps of the dataset's examples.
  ds = get_dataset(c)
  module = bb.make_backbone("shape_mlp", {"num_classes": 3, "hidden": (8, 4)})
  variables, _ = bb.restore_backbone(wd / "backbones" / "Vec", module,
                                     prepare.plan_modalities(c, ds)[1].input)
  _, taps = module.apply(variables, ds.splits["test"].inputs["Vec"])
  np.testing.assert_allclose(fs.splits["test"].features["Vec_1"],
                             np.asarray(taps["hidden1"])[:, :, None], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(fs.splits["test"].features["Vec_2"],
                             np.repeat(np.asarray(taps["hidden2"])[:, :, None], 2, axis=2),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(fs.splits["test"].labels, ds.splits["test"].labels)
  # Unimodal scores and probes: the trained image backbone scores, the probe numbers are
  # scikit-learn's on the stored features.
  uni = json.loads((wd / "backbones" / "unimodal.json").read_text())
  assert set(uni) == {"Img", "Vec"} and 0 <= uni["Img"]["test_accuracy"] <= 1
  assert uni["Img"]["weights"] == "train" and uni["Vec"]["weights"] == "init"
  probes = {p["node"]: p for p in prep["probes"]}
  assert set(probes) == {"Img_1", "Img_2", "Vec_1", "Vec_2"}
  assert probes["Img_1"]["backbone_val"] == uni["Img"]["val_accuracy"]
  assert probes["Img_1"]["kept"] == pytest.approx(
      probes["Img_1"]["probe_val"] / uni["Img"]["val_accuracy"])
  assert probes["Img_2"]["probe_val"] > 0.6             # the quadrant is easy to read
  assert_trainers_accept(c, wd)


def test_rerun_reuses_everything(full, tmp_path, monkeypatch):
  c, wd, _ = full
  copy = tmp_path / "run"
  shutil.copytree(wd, copy)
  before = mtimes(copy / "features") | mtimes(copy / "backbones")

  def forbidden(*args, **kwargs):
    raise AssertionError("a current stage ran again")

  monkeypatch.setattr(bb, "train_backbone", forbidden)
  monkeypatch.setattr(prepare, "_extract_chunk", forbidden)
  assert prepare.run_prepare(c, copy)["reused"] is True
  assert mtimes(copy / "features") | mtimes(copy / "backbones") == before


def test_changed_taps_reextract_without_retraining(full, tmp_path, monkeypatch):
  c, wd, _ = full
  copy = tmp_path / "run"
  shutil.copytree(wd, copy)
  image_export = digest(copy / "backbones" / "Img")

  def forbidden(*args, **kwargs):
    raise AssertionError("the image backbone was retrained")

  monkeypatch.setattr(bb, "train_backbone", forbidden)
  c = config()
  c.data.lengths = {"Vec": (1, 3)}              # Vec_2 pooled to 3 positions now
  prepare.run_prepare(c, copy)
  assert digest(copy / "backbones" / "Img") == image_export
  fs = shards.read_feature_set(copy / "features", "quadrants")
  assert fs.splits["val"].features["Vec_2"].shape == (48, 4, 3)


def test_killed_prepare_resumes_to_identical_shards(full, tmp_path, monkeypatch):
  c, wd, _ = full
  run = tmp_path / "run"
  shutil.copytree(wd / "backbones", run / "backbones")    # the same trained export
  written = []
  original = prepare._write_npz_atomic

  def dies_after_first_chunk(path, arrays):
    if written:
      raise KeyboardInterrupt("killed")
    original(path, arrays)
    written.append(path.name)

  monkeypatch.setattr(prepare, "_write_npz_atomic", dies_after_first_chunk)
  with pytest.raises(KeyboardInterrupt):
    prepare.run_prepare(config(), run)
  assert written == ["train-00000.npz"]
  assert not (run / "features" / "quadrants").exists()
  monkeypatch.setattr(prepare, "_write_npz_atomic", original)
  computed = []
  extract_chunk = prepare._extract_chunk
  monkeypatch.setattr(prepare, "_extract_chunk",
                      lambda *a, **k: computed.append((a[3], a[4].start)) or
                      extract_chunk(*a, **k))
  prepare.run_prepare(config(), run)
  # The finished first chunk is not computed again.
  assert computed == [("train", 32), ("train", 64), ("val", 0), ("val", 32), ("test", 0),
                      ("test", 32)]
  assert digest(run / "features" / "quadrants") == digest(wd / "features" / "quadrants")
  assert not list((run / "features").glob(".prepare-*"))          # staging removed


def test_multilabel_end_to_end(tmp_path):
  c = config("multi")
  c.backbones.Img.epochs = 1
  c.data.in_memory = False
  c.stages = "prepare"       # streamed multi-label training: tests/test_mmimdb.py
  out = pipeline.run(c, os.fspath(tmp_path))
  assert_trainers_accept(c, tmp_path)
  fs = shards.read_feature_set(tmp_path / "features", "quadrants")
  assert fs.label_kind == "multi" and fs.splits["train"].labels.shape == (96, 3)
  assert out["prepare"]["probes"][0]["metric"] == "f1_weighted"


def test_bad_examples_are_named_and_can_be_skipped(tmp_path):
  c = config(source="tests.test_prepare:get_bad_dataset")
  c.backbones.Img.weights = "init"
  with pytest.raises(DataError, match=r"train\[5\]: /data/train/0005.bin: truncated"):
    prepare.run_prepare(c, tmp_path)
  report = check_data(c, workers=2)
  assert report["examples"] == SIZES and report["good"]["train"] == 94
  assert [(b["index"], b["file"]) for b in report["bad"]] == [
      (5, "/data/train/0005.bin"), (7, "/data/train/0007.bin")]
  assert "input is float32 [1, 5, 6], the first example's is float32 [1, 6, 6]" in (
      report["bad"][1]["reason"])
  assert report["inputs"] == {"Img": {"shape": [1, 6, 6], "dtype": "float32"},
                              "Vec": {"shape": [5], "dtype": "float32"}}
  assert sum(report["label_counts"]["val"].values()) == 48
  c.data.skip_bad = True
  out = prepare.run_prepare(c, tmp_path)
  assert out["split_sizes"]["train"] == 94
  assert [b["index"] for b in out["bad_examples"]] == [5, 7]


@pytest.mark.parametrize("change,match", [
    (("data.source", "tests.no_such_module:get_dataset"), "no module named 'tests.no_such"),
    (("data.source", "tests.test_prepare:nothing"), "has no attribute 'nothing'"),
    (("data.source", "imagenet"), "neither a registered name"),
    (("backbones.Img.taps", ("conv1", "conv9")), r"config.backbones.Img.taps.*conv9"),
    (("backbones.Img.name", "resnet"), "config.backbones.Img.name='resnet'"),
    (("backbones.Img.weights", "download"), "config.backbones.Img.weights"),
    (("backbones.Vec.weights", "orbax"), "config.backbones.Vec.checkpoint is empty"),
    (("data.channels", {"Img": (4, 9), "Vec": (8, 4)}), r"config.data.channels.Img.*Img_2"),
    (("data.lengths", {"Vec": (1, 2), "Img": (4, 3)}), "square L_in"),
    (("model.num_classes", 4), "config.model.num_classes=4"),
    (("prepare.chunk_size", 0), "config.prepare.chunk_size"),
])
def test_config_errors_name_the_key(tmp_path, change, match):
  c = config()
  key, value = change
  node = c
  *path, last = key.split(".")
  for p in path:
    node = node[p]
  node[last] = value
  with pytest.raises(ConfigError, match=match):
    prepare.run_prepare(c, tmp_path)
  assert not (tmp_path / "features").exists() and not (tmp_path / "backbones").exists()


# ------------------------------------------------------------------ weights='torch'

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "torch"


class TorchConvBN(nn.Module):
  """The torch fixture's ConvBN2d as a backbone: NCHW input, tap `conv` [H', W', 4]."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Conv(4, (3, 3), strides=2, padding=((1, 1), (1, 1)), name="conv")(
        jnp.transpose(x, (0, 2, 3, 1)))
    h = nn.BatchNorm(use_running_average=not train, epsilon=1e-5, name="bn")(h)
    h = nn.relu(h)
    return nn.Dense(5, name="fc")(h.mean(axis=(1, 2))), {"conv": h}

  @staticmethod
  def variables_from_torch(state_dict, like, source):
    return torch_import.to_variables(state_dict, [("conv", "conv", "conv"), ("bn", "bn", "bn"),
                                                  ("fc", "fc", "linear")], like, source=source)


def get_torch_dataset(config) -> Dataset:
  with np.load(FIXTURES / "convbn.npz") as z:
    x = z["x"]                                          # [2, 3, 6, 5] NCHW
  split = ArraySplit({"Pic": x}, np.array([0, 1], np.int32))
  return Dataset({"train": split, "val": split, "test": split}, 5, fingerprint="fixture")


def test_torch_checkpoint_is_converted_once_and_extracted(tmp_path, monkeypatch):
  c = config(source="tests.test_prepare:get_torch_dataset")
  c.data.modalities = ("Pic",)
  c.data.channels, c.data.lengths = {"Pic": (4,)}, {"Pic": (1,)}
  del c.backbones["Img"], c.backbones["Vec"]
  c.backbones.Pic = common.backbone("tests.test_prepare:TorchConvBN", weights="torch",
                                    checkpoint=os.fspath(FIXTURES / "convbn_zip.pth"))
  c.model.num_classes, c.prepare.probe_examples = 5, 0
  prepare.run_prepare(c, tmp_path)
  with np.load(FIXTURES / "convbn.npz") as z:
    x, y = z["x"], z["y"]
  module = TorchConvBN()
  variables, meta = bb.restore_backbone(tmp_path / "backbones" / "Pic", module,
                                        InputSpec((3, 6, 5), "float32"))
  logits, taps = module.apply(variables, x)
  np.testing.assert_allclose(logits, y, rtol=1e-5, atol=1e-6)       # PyTorch's own output
  fs = shards.read_feature_set(tmp_path / "features", "quadrants")
  np.testing.assert_allclose(fs.splits["test"].features["Pic_1"][:, :, 0],
                             np.asarray(taps["conv"]).max(axis=(1, 2)), rtol=1e-6)
  assert meta["spec"]["weights"] == "torch" and meta["spec"]["checkpoint_sha256"]
  monkeypatch.setattr(torch_import, "load_state_dict", None)       # not read again
  assert prepare.run_prepare(c, tmp_path)["reused"] is True


# ------------------------------------------------------------------ entry points

def _run(module, *args, cwd=None):
  import subprocess
  import sys
  return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                        cwd=cwd or pathlib.Path(__file__).parents[1])


@pytest.mark.parametrize("args,message", [
    (["--config.search.epoch=3"], 'Did you mean "epochs"'),
    (["--config=experiments/configs/absent.py"], "experiments/configs/absent.py"),
    (["--config.data.source=mypkg.data:get"], "config.data.source='mypkg.data:get': no module"),
    (["--config.backbones.Image.taps=('conv1','conv3')"], "config.backbones.Image.taps"),
])
def test_bad_input_is_one_line_through_the_entry_point(tmp_path, args, message):
  out = _run("experiments.main", f"--workdir={tmp_path / 'run'}", *args)
  assert out.returncode == 1
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert "Traceback" not in out.stderr and lines[-1].startswith("error: ")
  assert message in lines[-1], out.stderr
  assert not (tmp_path / "run" / "features").exists()


def test_check_data_cli(tmp_path):
  args = ["--config=tests/data_config.py", "--config.data.source=tests.test_prepare:get_bad_dataset"]
  bad = _run("experiments.check_data", *args)
  assert bad.returncode == 1 and "error: 2 bad example(s)" in bad.stderr
  report = json.loads(bad.stdout)
  assert [b["file"] for b in report["bad"]] == ["/data/train/0005.bin", "/data/train/0007.bin"]
  assert report["good"]["train"] == 94


# ------------------------------------------------------------------ training views

class _Views(ArraySplit):
  """An ArraySplit whose view v adds 10 * v to the vector input (view 0: as stored)."""

  def example(self, i, modalities, view=0):
    ex = self[i]
    return Example({m: ex.inputs[m] + (10.0 * view if m == "Vec" else 0) for m in modalities},
                   ex.label)


def get_views_dataset(config) -> Dataset:
  ds = get_dataset(config)
  return Dataset({k: _Views(v.inputs, v.labels) for k, v in ds.splits.items()}, 3,
                 fingerprint="views-v1")


def test_training_views_are_stored_example_major_and_drawn_per_epoch(tmp_path):
  from bmnas_jax import loop
  c = config(source="tests.test_prepare:get_views_dataset")
  c.backbones.Img.weights = "init"
  c.data.train_views = 3
  c.prepare.probe_examples = 0
  out = prepare.run_prepare(c, tmp_path)
  assert out["split_sizes"] == {"train": 288, "val": 48, "test": 48}
  fs = shards.read_feature_set(tmp_path / "features", "quadrants")
  assert fs.views == {"train": 3}
  # Record i * 3 + (v - 1) is view v of example i: the Vec backbone's first tap differs.
  ds = get_views_dataset(c)
  module = bb.make_backbone("shape_mlp", {"num_classes": 3, "hidden": (8, 4)})
  variables, _ = bb.restore_backbone(tmp_path / "backbones" / "Vec", module,
                                     InputSpec((5,), "float32"))
  for v in (1, 3):
    x = ds.splits["train"].example(7, ("Vec",), v).inputs["Vec"][None]
    _, taps = module.apply(variables, x)
    np.testing.assert_allclose(fs.splits["train"].features["Vec_1"][7 * 3 + v - 1, :, 0],
                               np.asarray(taps["hidden1"])[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(fs.splits["train"].labels[21:24],
                                [ds.splits["train"].labels[7]] * 3)
  # Each epoch takes one view of every example; train + val concatenated for retraining.
  rows = loop.ViewRows(fs, ("train", "val"), "test")
  assert rows.examples == 96 + 48
  idx = jnp.arange(144)
  a, b = (np.asarray(rows(idx, jax.random.key(s))) for s in (0, 1))
  assert np.all(a[:96] // 3 == np.arange(96)) and np.all(a[96:] == 288 + np.arange(48))
  assert set(a[:96] % 3) == {0, 1, 2} and not np.array_equal(a, b)
  val_idx = idx[:48]
  assert loop.ViewRows(fs, ("val",), "test")(val_idx, jax.random.key(0)) is val_idx
  c.data.train_views = 0
  with pytest.raises(ConfigError, match="config.data.train_views=0"):
    prepare.run_prepare(c, tmp_path)


def test_a_multi_line_error_is_one_line(capsys):
  from experiments import cli
  with pytest.raises(SystemExit) as e:
    cli.fail("x.pth: the state dict does not match:\n  missing (1): a\n  unexpected (1): b")
  assert e.value.code == 1
  assert capsys.readouterr().err == ("error: x.pth: the state dict does not match: "
                                     "missing (1): a; unexpected (1): b\n")

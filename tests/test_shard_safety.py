"""Opening stored feature shards imports nothing a workdir names (the feature spec is checked)."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from bmnas_jax.data import prepare, shards
from bmnas_jax.data.feature_set import FeatureSet, Split, nodes_from_config
from bmnas_jax.errors import DataError
from experiments.configs import planted

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "experiments/configs/planted.py"
SIZES = {"train": 4, "val": 2, "test": 2}


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
  """A workdir whose `features/` holds what prepare writes for the planted config, tiny."""
  config = planted.get_config()
  nodes = nodes_from_config(config.data)
  rng = np.random.default_rng(0)
  splits = {s: Split(features={n.name: rng.normal(size=(k, n.channels, n.length))
                               .astype(np.float32) for n in nodes},
                     labels=rng.integers(0, config.model.num_classes, size=(k,)))
            for s, k in SIZES.items()}
  fs = FeatureSet(nodes=nodes, splits=splits, label_kind="single",
                  num_classes=config.model.num_classes)
  workdir = tmp_path_factory.mktemp("stored")
  shards.write_shards(fs, prepare.features_dir(workdir), prepare.dataset_name(config),
                      version=prepare.VERSION)
  return workdir, prepare.dataset_name(config), nodes


def copy_workdir(stored, dest: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """Copies the stored workdir to `dest`; returns (features dir, dataset version dir)."""
  workdir, name, _ = stored
  shutil.copytree(workdir, dest)
  data_dir = prepare.features_dir(dest)
  return data_dir, data_dir / name / prepare.VERSION


def plant_module(where: pathlib.Path, module: str) -> pathlib.Path:
  """Writes `where/module.py`, which writes a marker file when imported; returns the marker."""
  marker = where / f"{module}.ran"
  (where / f"{module}.py").write_text(
      f"import pathlib\npathlib.Path({os.fspath(marker)!r}).write_text('ran')\n"
      "class Evil:\n  pass\n")
  return marker


def edit_json(path: pathlib.Path, edit) -> None:
  content = json.loads(path.read_text())
  content = edit(content) or content
  path.write_text(json.dumps(content))


def class_names(node) -> list[str]:
  """Every `pythonClassName` in a JSON tree."""
  if isinstance(node, dict):
    own = [node["pythonClassName"]] if "pythonClassName" in node else []
    return own + [c for v in node.values() for c in class_names(v)]
  if isinstance(node, list):
    return [c for v in node for c in class_names(v)]
  return []


def test_writer_output_passes_the_check(stored):
  workdir, name, nodes = stored
  path = prepare.features_dir(workdir) / name / prepare.VERSION
  written = class_names(json.loads((path / shards.FEATURES_FILENAME).read_text()))
  written += class_names(json.loads((path / shards.DATASET_INFO_FILENAME).read_text()))
  assert written and set(written) <= set(shards.ALLOWED_FEATURE_CLASSES)
  fs = shards.read_feature_set(prepare.features_dir(workdir), name, prepare.VERSION,
                               expect_nodes=nodes)
  assert {s: len(v) for s, v in fs.splits.items()} == SIZES
  opened = shards.open_shards(prepare.features_dir(workdir), name, prepare.VERSION)
  assert opened.read("val", [1, 0])["index"].tolist() == [1, 0]


def test_crafted_class_through_the_entry_point(stored, tmp_path):
  """The issue's case: a run on a workdir with a crafted features.json exits 1 with one
  line naming the file, and the module it names is never imported."""
  _, path = copy_workdir(stored, tmp_path / "work")
  marker = plant_module(tmp_path, "planted_payload")
  feats = path / shards.FEATURES_FILENAME

  def craft(spec):
    spec["featuresDict"]["features"]["A_1"]["pythonClassName"] = "planted_payload.Evil"
  edit_json(feats, craft)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [os.fspath(tmp_path), os.fspath(ROOT), os.environ.get("PYTHONPATH", "")]))
  run = subprocess.run([sys.executable, "-m", "experiments.main", f"--config={CONFIG}",
                        f"--workdir={tmp_path / 'work'}", "--config.stages=search"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
  assert run.returncode == 1, run.stderr
  lines = [line for line in run.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, run.stderr
  assert lines[0].startswith("error: ") and os.fspath(feats) in lines[0], run.stderr
  assert "planted_payload.Evil" in lines[0]
  assert not marker.exists()
  # The planted module does run when imported from that path: the check is what stopped it.
  subprocess.run([sys.executable, "-c", "import planted_payload"], env=env, check=True)
  assert marker.exists()


def _top(spec, cls):
  spec["pythonClassName"] = cls


def _child(spec, cls):
  spec["featuresDict"]["features"]["label"]["pythonClassName"] = cls


def _legacy(spec, cls):
  spec["featuresDict"]["features"]["label"] = {"type": cls, "content": {}}


def _snake_case(spec, cls):
  feature = spec["featuresDict"]["features"]["index"]
  del feature["pythonClassName"]
  feature["python_class_name"] = cls          # the proto field's own name, also parsed


def _info_features(info, cls):
  info["features"] = {"pythonClassName": cls, "featuresDict": {"features": {}}}


def _info_module(info, cls):
  info["moduleName"] = cls.rsplit(".", 1)[0]


@pytest.mark.parametrize("filename,edit", [
    (shards.FEATURES_FILENAME, _top), (shards.FEATURES_FILENAME, _child),
    (shards.FEATURES_FILENAME, _legacy), (shards.FEATURES_FILENAME, _snake_case),
    (shards.DATASET_INFO_FILENAME, _info_features),
    (shards.DATASET_INFO_FILENAME, _info_module)])
def test_foreign_class_or_module_refused(stored, tmp_path, monkeypatch, filename, edit):
  data_dir, path = copy_workdir(stored, tmp_path / "work")
  module = f"payload_{edit.__name__.strip('_')}"
  marker = plant_module(tmp_path, module)
  monkeypatch.syspath_prepend(os.fspath(tmp_path))
  edit_json(path / filename, lambda spec: edit(spec, f"{module}.Evil"))
  with pytest.raises(DataError) as e:
    shards.open_shards(data_dir, stored[1], prepare.VERSION)
  message = str(e.value)
  assert os.fspath(path / filename) in message and module in message and "\n" not in message
  assert not marker.exists() and module not in sys.modules


@pytest.mark.parametrize("opener", ["read_feature_set", "stream", "load_features"])
def test_every_reader_checks(stored, tmp_path, monkeypatch, opener):
  data_dir, path = copy_workdir(stored, tmp_path / "work")
  module = f"payload_{opener}"
  marker = plant_module(tmp_path, module)
  monkeypatch.syspath_prepend(os.fspath(tmp_path))
  edit_json(path / shards.FEATURES_FILENAME, lambda spec: _child(spec, f"{module}.Evil"))
  name = stored[1]
  with pytest.raises(DataError, match=f"{shards.FEATURES_FILENAME}.*{module}.Evil"):
    if opener == "read_feature_set":
      shards.read_feature_set(data_dir, name)
    elif opener == "stream":
      shards.stream(data_dir, name, "train", batch_size=2, seed=0)
    else:
      config = planted.get_config()
      config.data.in_memory = False
      prepare.load_features(config, tmp_path / "work")
  assert not marker.exists()


@pytest.mark.parametrize("filename,text,expected", [
    (shards.FEATURES_FILENAME, '{"pythonClassName": ', "is not valid JSON"),
    (shards.FEATURES_FILENAME, "[]", "not a JSON object"),
    (shards.FEATURES_FILENAME, "{}", "lacks key 'pythonClassName'"),
    (shards.FEATURES_FILENAME,
     '{"pythonClassName": "tensorflow_datasets.core.features.features_dict.FeaturesDict"}',
     "lacks the JSON object 'featuresDict'"),
    (shards.FEATURES_FILENAME,
     '{"pythonClassName": "tensorflow_datasets.core.features.features_dict.FeaturesDict", '
     '"featuresDict": {"features": {"label": {"pythonClassName": '
     '"tensorflow_datasets.core.features.tensor_feature.Tensor"}}}}',
     "feature 'label' lacks the JSON object 'tensor'"),
    (shards.DATASET_INFO_FILENAME, "not json", "is not valid JSON"),
    (shards.DATASET_INFO_FILENAME, '{"name": "planted", "version": "1.0.0"}',
     "lacks keys ['splits']"),
])
def test_malformed_spec_is_one_line(stored, tmp_path, filename, text, expected):
  data_dir, path = copy_workdir(stored, tmp_path / "work")
  (path / filename).write_text(text)
  with pytest.raises(DataError) as e:
    shards.open_shards(data_dir, stored[1], prepare.VERSION)
  message = str(e.value)
  assert os.fspath(path / filename) in message and expected in message, message
  assert "\n" not in message

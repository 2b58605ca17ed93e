"""EgoGesture from a synthetic frame tree: both annotation forms, subject splits, the temporal
centre crop and loop padding, the spatial transforms, training views, bad examples, errors."""

import json
import os
import pathlib

import numpy as np
import pytest
from PIL import Image

from bmnas_jax.data import ego
from bmnas_jax.data.check import check_data
from bmnas_jax.data.source import BadExample
from bmnas_jax.errors import ConfigError, DataError
from experiments.configs import ego as ego_config
from tests.conftest import assert_trainers_accept, tiny_run

FRAMES = 36                       # JPEGs per folder, 000001.jpg .. 000036.jpg
W, H = 32, 24                     # 640 x 480 in miniature: the same 4:3 aspect
NAMES = [f"Gesture_{k}" for k in range(1, 84)]
# (subject, scene, group) -> rows (class 1..83, start, end), in file order.
GROUPS = {
    (3, 1, 1): [(5, 3, 12), (12, 1, 36)],
    (3, 1, 2): [(83, 14, 40), (1, 2, 33)],        # 14..40 runs past frame 36
    (4, 2, 1): [(7, 5, 10), (2, 20, 30)],         # rgb frame 7 missing
    (5, 1, 1): [(10, 1, 5)],                      # rgb frame 3 is not a JPEG
    (1, 2, 1): [(40, 10, 29)],
    (2, 1, 1): [(3, 1, 20)],                      # no depth folder
    (9, 3, 2): [(9, 4, 24)],
}
SPLIT_KEYS = {   # (subject, scene, group, start, end, label) per split, in the split's order
    "train": [(3, 1, 1, 1, 36, 11), (3, 1, 1, 3, 12, 4), (3, 1, 2, 2, 33, 0),
              (3, 1, 2, 14, 40, 82), (4, 2, 1, 5, 10, 6), (4, 2, 1, 20, 30, 1),
              (5, 1, 1, 1, 5, 9)],
    "val": [(1, 2, 1, 10, 29, 39)],
    "test": [(2, 1, 1, 1, 20, 2), (9, 3, 2, 4, 24, 8)],
}


def code(frame: int) -> int:
  """The value frame `frame` carries: 20, 24, .., 160."""
  return 16 + 4 * frame


def frame_images(frame: int) -> tuple[np.ndarray, np.ndarray]:
  """Colour: R = code everywhere, G = 60 left / 180 right half, B = 100. Depth (3-channel
  gray, as a colour JPEG): code left, code + 80 right. Halves are 16 wide (whole 8x8 JPEG
  blocks), so quality 100 4:4:4 JPEGs decode within 1."""
  rgb = np.empty((H, W, 3), np.uint8)
  rgb[..., 0], rgb[..., 1], rgb[..., 2] = code(frame), 60, 100
  rgb[:, W // 2:, 1] = 180
  depth = np.full((H, W, 3), code(frame), np.uint8)
  depth[:, W // 2:] += 80
  return rgb, depth


def write_frames(root: pathlib.Path, subject: int, scene: int, group: int,
                 depth: bool = True) -> None:
  rgb_dir = root / f"Subject{subject:02d}/Scene{scene}/Color/rgb{group}"
  depth_dir = root / f"Subject{subject:02d}/Scene{scene}/Depth/depth{group}"
  rgb_dir.mkdir(parents=True)
  if depth:
    depth_dir.mkdir(parents=True)
  for f in range(1, FRAMES + 1):
    rgb, d = frame_images(f)
    Image.fromarray(rgb).save(rgb_dir / f"{f:06d}.jpg", quality=100, subsampling=0)
    if depth:
      Image.fromarray(d).save(depth_dir / f"{f:06d}.jpg", quality=100, subsampling=0)


def write_csvs(folder: pathlib.Path, groups) -> None:
  for (subject, scene, group), rows in groups.items():
    path = folder / f"subject{subject:02d}/Scene{scene}/Group{group}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{c},{s},{e}\n" for c, s, e in rows))


def json_annotations(groups, subsets=None) -> dict:
  """As Real-time-GesRec writes it: the first gesture of a folder keyed by the folder, later
  ones with `_<running row number>`; frames as text, some in float form."""
  subset_of = {s: ego.SUBSETS[name] for name, subs in ego.SUBJECTS.items() for s in subs}
  subset_of.update(subsets or {})
  database, row = {}, 0
  for (subject, scene, group), rows in groups.items():
    folder = f"Subject{subject:02d}/Scene{scene}/Color/rgb{group}"
    for c, s, e in rows:
      key = folder if folder not in database else f"{folder}_{row}"
      database[key] = {"annotations": {"start_frame": f"{s}.0" if row % 2 else str(s),
                                       "label": NAMES[c - 1], "end_frame": str(e)},
                       "subset": subset_of[subject]}
      row += 1
  return {"labels": NAMES, "database": database}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  root = tmp_path_factory.mktemp("ego")
  for (subject, scene, group) in GROUPS:
    write_frames(root, subject, scene, group, depth=(subject, scene, group) != (2, 1, 1))
  (root / "Subject04/Scene2/Color/rgb1/000007.jpg").unlink()
  (root / "Subject05/Scene1/Color/rgb1/000003.jpg").write_bytes(b"not a jpeg")
  write_csvs(root / ego.CSV_DIR, GROUPS)
  (root / ego.JSON_NAME).write_text(json.dumps(json_annotations(GROUPS)))
  return root


def config(root, **data):
  c = ego_config.get_config()
  c.data.source = "ego"
  c.data.root = os.fspath(root)
  for k, v in data.items():
    setattr(c.data, k, v)
  return c


def frame_numbers(clip: np.ndarray) -> list[int]:
  """The frame each RGB output frame shows (its flat R channel)."""
  r = clip[..., 0].reshape(len(clip), -1).astype(float)
  assert np.all(r.max(1) - r.min(1) <= 2)
  return [round((v - 16) / 4) for v in r.mean(1)]


def assert_depth_matches(rgb: np.ndarray, depth: np.ndarray) -> None:
  """Depth = code + 80 x (right half) with the same crops: D = R + (G - 60) 80 / 120."""
  want = rgb[..., 0].astype(float) + (rgb[..., 1].astype(float) - 60) * 80 / 120
  assert np.abs(depth[..., 0] - want).max() <= 4


def test_annotation_forms_splits_and_labels(root):
  csv = ego.get_dataset(config(root))                       # auto: the CSV folder first
  js = ego.get_dataset(config(root, annotations=ego.JSON_NAME))
  assert "csv annotations" in csv.description and "json annotations" in js.description
  for ds in (csv, js):
    assert (ds.num_classes, ds.label_kind, list(ds.splits)) == (83, "single", ["train", "val",
                                                                                "test"])
    for name, keys in SPLIT_KEYS.items():
      split = ds.splits[name]
      assert [(*g.key, g.label) for g in split.gestures] == keys
      assert split.labels.tolist() == [k[-1] for k in keys]
  for name in SPLIT_KEYS:
    assert csv.splits[name].gestures == js.splits[name].gestures
  assert csv.class_names == tuple(f"class_{k}" for k in range(1, 84))
  assert js.class_names == tuple(NAMES)
  a, b = csv.splits["val"][0], js.splits["val"][0]
  assert a.label == b.label == 39
  for m in ego.MODALITIES:
    np.testing.assert_array_equal(a.inputs[m], b.inputs[m])
  assert ego.get_dataset(config(root)).fingerprint == csv.fingerprint != js.fingerprint
  other = ego.get_dataset(config(root, subjects={"train": [9], "val": [1, 3], "test": [2]}))
  assert [g.subject for g in other.splits["val"].gestures] == [1, 3, 3, 3, 3]
  assert [g.subject for g in other.splits["train"].gestures] == [9]


def test_temporal_centre_crop_and_loop_padding(root):
  pos = ego.temporal_positions
  assert pos(10).tolist() == list(range(10)) * 3 + [0, 1]
  assert pos(36).tolist() == list(range(2, 34))               # begin 36 // 2 - 16 = 2
  assert pos(32).tolist() == list(range(32))
  assert pos(20).tolist() == list(range(20)) + list(range(12))
  assert pos(40, 5).tolist() == list(range(5, 37))
  assert pos(34, 3).tolist() == list(range(3, 34)) + [3]      # a crop past the end loops
  assert [ego.random_begin_bound(n) for n in (10, 32, 33, 36)] == [0, 0, 0, 3]
  ds = ego.get_dataset(config(root))
  train, val = ds.splits["train"], ds.splits["val"]
  for split, i, want in ((train, 0, list(range(3, 35))),
                         (train, 1, (list(range(3, 13)) * 4)[:32]),
                         (val, 0, list(range(10, 30)) + list(range(10, 22)))):
    ex = split[i]
    rgb, depth = ex.inputs["RGB"], ex.inputs["Depth"]
    assert (rgb.shape, rgb.dtype, depth.shape, depth.dtype) == (
        (32, 112, 112, 3), np.uint8, (32, 112, 112, 1), np.uint8)
    assert frame_numbers(rgb) == want == split.frames(i).tolist()
    assert_depth_matches(rgb, depth)
    # The 149 x 112 scaled frame's halves meet at x = 74.5, 56.5 after the crop at x = 18.
    assert np.all(np.abs(rgb[..., :50, 1].astype(int) - 60) <= 2)
    assert np.all(np.abs(rgb[..., 63:, 1].astype(int) - 180) <= 2)
  only = train.example(0, ("Depth",))
  assert list(only.inputs) == ["Depth"]
  np.testing.assert_array_equal(only.inputs["Depth"], train[0].inputs["Depth"])


def test_spatial_transforms_hand_computed():
  img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (H, W, 3), np.uint8))
  # Scale(112): 32 x 24 -> int(112 * 32 / 24) = 149 x 112; CenterCrop: round(37 / 2) = 18.
  want = img.resize((149, 112), Image.BILINEAR).crop((18, 0, 130, 112))
  np.testing.assert_array_equal(np.asarray(ego.scale_center_crop(img)), np.asarray(want))
  small = img.resize((112, 112), Image.BILINEAR)               # already 112: crop only
  np.testing.assert_array_equal(np.asarray(ego.scale_center_crop(small)), np.asarray(small))
  # scale 0.4999999999911653: side int(24 x s) = 11; x1 = 0.5 x 21 = 10.5, x2 = 21.5,
  # y1 = 0.25 x 13 = 3.25, y2 = 14.25; PIL rounds half to even: box (10, 3, 22, 14).
  want = img.crop((10, 3, 22, 14)).resize((112, 112), Image.BILINEAR)
  got = ego.multiscale_random_crop(img, ego.SCALES[4], 0.5, 0.25)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # scale 1 on a depth ('L') frame: side 24; x1 = 0.999 x 8 = 7.992 -> 8, the right edge.
  gray = img.convert("L")
  want = gray.crop((8, 0, 32, 24)).resize((112, 112), Image.BILINEAR)
  got = ego.multiscale_random_crop(gray, 1.0, 0.999, 0.0)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_training_views(root):
  csv = ego.get_dataset(config(root)).splits["train"]
  js = ego.get_dataset(config(root, annotations=ego.JSON_NAME)).splits["train"]
  base = csv.example(0)
  firsts = set()
  for view in (1, 2, 3, 4):
    ex = csv.example(0, ego.MODALITIES, view=view)
    again = js.example(0, ego.MODALITIES, view=view)       # same sample, other annotations
    for m in ego.MODALITIES:
      np.testing.assert_array_equal(ex.inputs[m], again.inputs[m])
    rgb, depth = ex.inputs["RGB"], ex.inputs["Depth"]
    assert (rgb.shape, depth.shape) == ((32, 112, 112, 3), (32, 112, 112, 1))
    frames = frame_numbers(rgb)
    assert frames == csv.frames(0, view).tolist()
    assert frames[0] in (1, 2, 3, 4) and frames == list(range(frames[0], frames[0] + 32))
    firsts.add(frames[0])
    assert_depth_matches(rgb, depth)                         # the same crops in both
    assert not np.array_equal(rgb, base.inputs["RGB"])
  assert len(firsts) > 1
  short = csv.example(1, ("RGB",), view=1).inputs["RGB"]     # 10 frames: begin 0, looped
  assert frame_numbers(short) == (list(range(3, 13)) * 4)[:32]


def test_bad_examples_named_and_check_data(root):
  result = check_data(config(root), workers=1)
  assert result["examples"] == {"train": 7, "val": 1, "test": 2}
  assert result["good"] == {"train": 4, "val": 1, "test": 1}
  assert result["inputs"] == {"RGB": {"shape": [32, 112, 112, 3], "dtype": "uint8"},
                              "Depth": {"shape": [32, 112, 112, 1], "dtype": "uint8"}}
  bad = {(b["split"], b["index"]): (b["file"], b["reason"]) for b in result["bad"]}
  assert set(bad) == {("train", 3), ("train", 4), ("train", 6), ("test", 0)}
  file, reason = bad["train", 3]
  assert file.endswith("Subject03/Scene1/Color/rgb2/000040.jpg")
  assert "frames 14..40" in reason and "outside the folder's frames 1..36" in reason
  assert "Group2.csv: line 1" in reason
  file, reason = bad["train", 4]
  assert file.endswith("Subject04/Scene2/Color/rgb1/000007.jpg") and reason == "missing frame"
  file, reason = bad["train", 6]
  assert file.endswith("Subject05/Scene1/Color/rgb1/000003.jpg")
  assert reason.startswith("unreadable JPEG")
  file, reason = bad["test", 0]
  assert file.endswith("Subject02/Scene1/Depth/depth1")
  assert "depth frames folder is missing" in reason
  test = ego.get_dataset(config(root)).splits["test"]
  with pytest.raises(BadExample, match="depth frames folder is missing"):
    test.example(0, ("RGB",))                 # bad whichever modalities are read
  assert result["label_counts"]["val"]["class_40"] == 1


def test_malformed_annotations_and_config_errors(tmp_path):
  write_frames(tmp_path, 3, 1, 1)
  labels = tmp_path / ego.CSV_DIR
  write_csvs(labels, {(3, 1, 1): [(5, 3, 12)]})
  csv = labels / "subject03/Scene1/Group1.csv"
  before = ego.get_dataset(config(tmp_path, subjects={"train": [3], "val": [1], "test": [2]}))
  for text, says in (("5,3,12\n7,20\n", "line 2: '7,20' has 2 field"),
                     ("5,3,12\n\n84,1,2\n", "line 3: class '84' is not 1..83"),
                     ("5,13,12\n", "line 1: frames 13..12"),
                     ("5,a,12\n", "line 1: frames 'a', '12' are not whole numbers")):
    csv.write_text(text)
    with pytest.raises(DataError, match=f"Group1.csv: {says}"):
      ego.get_dataset(config(tmp_path))
  csv.write_text("5,3,12\n6,14,30,\n")                          # a trailing comma is fine
  after = ego.get_dataset(config(tmp_path, subjects={"train": [3], "val": [1], "test": [2]}))
  assert len(after.splits["train"]) == 2 and after.fingerprint != before.fingerprint

  path = tmp_path / "ann.json"
  good = json_annotations({(3, 1, 1): [(5, 3, 12), (6, 14, 30)]})
  for edit, says in (
      (lambda d: d.update(labels=NAMES[:80]), "key 'labels' must list 83"),
      (lambda d: d["database"].update({"Subject03/Scene1/rgb1": {}}), "'Subject03/Scene1/rgb1'"
       ": not SubjectXX"),
      (lambda d: d["database"]["Subject03/Scene1/Color/rgb1"]["annotations"].update(
          label="Nope"), "'Subject03/Scene1/Color/rgb1': label 'Nope'"),
      (lambda d: d["database"]["Subject03/Scene1/Color/rgb1_1"].update(subset="dev"),
       "'Subject03/Scene1/Color/rgb1_1': subset 'dev'"),
      (lambda d: d["database"]["Subject03/Scene1/Color/rgb1_1"].update(subset="testing"),
       "'Subject03/Scene1/Color/rgb1_1': subset 'testing', but subject 3 is in the train")):
    data = json.loads(json.dumps(good))
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=says):
      ego.get_dataset(config(tmp_path, annotations=os.fspath(path)))
  # With subjects given, the JSON's subsets are not consulted.
  ds = ego.get_dataset(config(tmp_path, annotations="ann.json",
                              subjects={"train": [1], "val": [2], "test": [3]}))
  assert len(ds.splits["test"]) == 2
  path.write_text("{")
  with pytest.raises(DataError, match="ann.json: unreadable as JSON"):
    ego.get_dataset(config(tmp_path, annotations="ann.json"))

  with pytest.raises(ConfigError, match="config.data.root"):
    ego.get_dataset(config(""))
  with pytest.raises(ConfigError, match="config.data.annotations='nope.json'"):
    ego.get_dataset(config(tmp_path, annotations="nope.json"))
  with pytest.raises(ConfigError, match=r"subjects \[3\] are in both test and train"):
    ego.get_dataset(config(tmp_path, subjects={"train": [3], "val": [1], "test": [3]}))
  with pytest.raises(ConfigError, match="val subjects"):
    ego.get_dataset(config(tmp_path, subjects={"train": [3], "val": [51], "test": [2]}))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(DataError, match="holds neither labels-final-revised1/ nor"):
    ego.get_dataset(config(empty))


# ------------------------------------------------------------------ end to end

def test_prepare_search_evaluate(tmp_path):
  """The paper config on a synthetic frame tree: reduced 3D ResNeXt (seeded init) for both
  stems, two training views; prepare, and the trainers accept its features."""
  from bmnas_jax import pipeline
  from bmnas_jax.data import backbones as bb
  from bmnas_jax.data import shards
  from bmnas_jax.data.source import InputSpec
  root = tmp_path / "data"
  groups = {(s, 1, g): [(1 + (s + g) % 3, 1, 36)] for s in (3, 4, 1, 2) for g in (1, 2, 3)}
  for subject, scene, group in groups:
    write_frames(root, subject, scene, group)
  write_csvs(root / "labels-final-revised1", groups)
  c = config(root, subjects={"train": [3, 4], "val": [1], "test": [2]}, train_views=2,
             sample_duration=16, sample_size=48)           # clips of 16 frames of 48 x 48
  for m in ("RGB", "Depth"):
    b = c.backbones[m]
    b.kwargs.update(blocks=(1, 1, 1, 1), cardinality=2, widths=(4, 4, 8, 8), stem_width=4,
                    sample_duration=16, sample_size=48)
    b.weights = "init"
  shapes = bb.output_shapes(bb.make_backbone("resnext3d", c.backbones.RGB.kwargs),
                            InputSpec((16, 48, 48, 3), "uint8"))[1]
  channels = tuple(shapes[t][-1] for t in c.backbones.RGB.taps)
  c.data.channels = {"RGB": channels, "Depth": channels}
  c.prepare.batch_size, c.prepare.probe_examples = 2, 0
  tiny_run(c, batch_size=2).stages = "prepare"
  pipeline.run(c, os.fspath(tmp_path / "run"))
  assert_trainers_accept(c, tmp_path / "run")
  fs = shards.read_feature_set(tmp_path / "run" / "features", "ego")
  assert {k: len(v) for k, v in fs.splits.items()} == {"train": 12, "val": 3, "test": 3}
  assert fs.views == {"train": 2} and [n.length for n in fs.nodes] == [8, 8, 8, 1] * 2
  assert fs.nodes[0].channels == shapes["layer2"][-1]


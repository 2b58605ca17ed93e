"""NTU RGB+D from synthetic `.skeleton` files and FFV1 `.avi` videos: the skeleton reader and
its errors, the frame sampling (release and even), the time resize, pairing, splits, views."""

import os
import pathlib

import av
import numpy as np
import pytest

from bmnas_jax.data import ntu
from bmnas_jax.data.check import check_data
from bmnas_jax.data.source import BadExample
from bmnas_jax.errors import ConfigError, DataError
from experiments.configs import ntu as ntu_config
from tests.conftest import assert_trainers_accept, tiny_run

BODY_LINE = "72057594037931101 0 1 1 1 1 0 0.0196 0.3046 2"


def joints(base: float, body: int) -> np.ndarray:
  """Distinct xyz `[25, 3]` of one body: x = base + j, y = 10 body + j / 10, z = 3 + body."""
  j = np.arange(25, dtype=np.float64)
  return np.stack([base + j, 10 * body + j / 10, np.full(25, 3.0 + body)], axis=1)


def skeleton_text(frames: list[list[np.ndarray]]) -> str:
  """A `.skeleton` file: per frame a list of bodies, each `[25, 3]` xyz."""
  out = [str(len(frames))]
  for bodies in frames:
    out.append(str(len(bodies)))
    for xyz in bodies:
      out += [BODY_LINE, "25"]
      out += [f"{x} {y} {z} 262.9 197.8 1035.6 533.4 -0.26 0.04 0.96 -0.05 2" for x, y, z in xyz]
  return "\n".join(out) + "\n"


def write_video(path: pathlib.Path, n: int, width: int = 64, height: int = 48) -> None:
  """FFV1 (lossless) in AVI: frame i is R = 6 i, G = 100, B = 200 everywhere."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with av.open(os.fspath(path), "w") as container:
    stream = container.add_stream("ffv1", rate=30)
    stream.width, stream.height, stream.pix_fmt = width, height, "bgr0"
    for i in range(n):
      rgb = np.empty((height, width, 3), np.uint8)
      rgb[...] = (6 * i, 100, 200)
      for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def frame_ids(video: np.ndarray) -> list[int]:
  """The frame index of each output frame (-1 for a blank one), checking BGR order."""
  ids = []
  for f in video:
    if not f.any():
      ids.append(-1)
      continue
    assert np.all(f[..., 0] == 200) and np.all(f[..., 1] == 100)          # B, G
    assert f[..., 2].min() == f[..., 2].max() and f[..., 2].max() % 6 == 0
    ids.append(int(f[0, 0, 2]) // 6)
  return ids


def ramp_skeleton(t: int) -> list[list[np.ndarray]]:
  """One body whose joint 1 is (1, 2, 3) and joint j != 1 has x = t / 2 + j at frame t."""
  frames = []
  for k in range(t):
    xyz = joints(0.5 * k, 0)
    xyz[1] = (1, 2, 3)
    frames.append([xyz])
  return frames


def name(subject: int, action: int, rep: int = 1) -> str:
  return f"S001C001P{subject:03d}R{rep:03d}A{action:03d}"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  """Subjects 1 (search train), 2 (val), 3 (test), 4 (evaluate train); S..P001..A007 has
  no skeleton, S..P002..A009 no video."""
  root = tmp_path_factory.mktemp("ntu")
  skel = root / ntu.SKELETON_DIR
  skel.mkdir()
  videos = root / ntu.VIDEO_DIR
  for subject, action, frames in ((1, 5, 40), (1, 6, 10), (2, 1, 40), (3, 60, 40), (4, 2, 40)):
    write_video(videos / f"{name(subject, action)}_rgb.avi", frames)
    (skel / f"{name(subject, action)}.skeleton").write_text(
        skeleton_text(ramp_skeleton(100 if action == 5 else 64)))
  write_video(videos / f"{name(1, 7)}_rgb.avi", 40)
  (skel / f"{name(2, 9)}.skeleton").write_text(skeleton_text(ramp_skeleton(64)))
  return root


def config(root, fidelity="paper", **data):
  c = ntu_config.get_config()
  c.fidelity = fidelity
  c.data.source = "ntu"
  c.data.root = os.fspath(root)
  c.data.update(data)
  return c


# ------------------------------------------------------------------ skeletons

def test_read_skeleton_bodies_nan_and_centring(tmp_path):
  b0, b1, b2 = joints(0, 0), joints(100, 1), joints(200, 2)
  nan = joints(50, 0)
  nan[3, 1] = np.nan
  path = tmp_path / "a.skeleton"
  # Frames: one body, two bodies, three bodies (the third dropped), none, a NaN.
  path.write_text(skeleton_text([[b0], [b0, b1], [b1, b0, b2], [], [nan]]))
  xyz = ntu.read_skeleton(path)
  want = np.zeros((3, 5, 25, 2), np.float32)
  want[:, 0, :, 0] = want[:, 1, :, 0] = want[:, 2, :, 1] = b0.T
  want[:, 1, :, 1] = want[:, 2, :, 0] = b1.T
  want[:, 4, :, 0] = np.nan_to_num(nan.T)
  assert xyz.dtype == np.float32 and xyz.shape == (3, 5, 25, 2)
  np.testing.assert_array_equal(xyz, want)
  assert xyz[1, 4, 3, 0] == 0
  # Joint 1 of body 0 is subtracted from both bodies, per frame (an absent body -> -origin).
  c = ntu.centre_skeleton(xyz)
  f0, f1, origin = b0.astype(np.float32), b1.astype(np.float32), b0[1].astype(np.float32)
  np.testing.assert_array_equal(c[:, 0, :, 0], (f0 - origin).T)
  np.testing.assert_array_equal(c[:, 0, :, 1], -np.repeat(origin[:, None], 25, 1))
  np.testing.assert_array_equal(c[:, 1, :, 1], (f1 - origin).T)
  np.testing.assert_array_equal(c[:, 3], 0)


@pytest.mark.parametrize("edit, line, says", [
    (lambda ls: ls[:30], 31, "ends early"),                   # cut before frame 1's body
    (lambda ls: ls[:2] + [ls[2] + " 7"] + ls[3:], 3, "11 value(s)"),
    (lambda ls: ls[:9] + ["1 2.x 3 4 5 6 7 8 9 10 11 12"] + ls[10:], 10, "'2.x' is not a number"),
    (lambda ls: ["two"] + ls[1:], 1, "not the frame count"),
    (lambda ls: ls[:3] + ["24"] + ls[4:], 4, "24 joints"),
])
def test_skeleton_errors_name_file_and_line(tmp_path, edit, line, says):
  path = tmp_path / "bad.skeleton"
  path.write_text("\n".join(edit(skeleton_text([[joints(0, 0)], [joints(1, 0)]]).splitlines())))
  with pytest.raises(BadExample) as e:
    ntu.read_skeleton(path)
  assert e.value.file == os.fspath(path)
  assert f"line {line}:" in e.value.reason and says in e.value.reason


def test_interpole_hand_computed():
  # Up 4 -> 8: s = d / 2 - 1/4, clamped at 0, the last reads frame 3 alone.
  x = np.asarray([0, 10, 20, 30], np.float32).reshape(1, 4, 1, 1)
  np.testing.assert_allclose(ntu.interpole(x, 8).ravel(),
                             [0, 2.5, 7.5, 12.5, 17.5, 22.5, 27.5, 30], atol=1e-6)
  # Down 6 -> 3: s = 2 d + 1/2.
  x = np.asarray([0, 1, 4, 9, 16, 25], np.float32).reshape(1, 6, 1, 1)
  np.testing.assert_allclose(ntu.interpole(x, 3).ravel(), [0.5, 6.5, 20.5], atol=1e-6)
  # Every channel, joint and body alone; 5 -> 32 keeps the ends.
  x = np.random.default_rng(0).normal(size=(3, 5, 25, 2)).astype(np.float32)
  y = ntu.interpole(x, 32)
  assert y.shape == (3, 32, 25, 2) and y.dtype == np.float32
  np.testing.assert_allclose(y[:, 0], x[:, 0], atol=1e-6)
  np.testing.assert_allclose(y[:, -1], x[:, -1], atol=1e-6)
  assert ntu.skeleton_crop(100, 0.5, 0.0) == (0, 64)          # at least 64 frames
  assert ntu.skeleton_crop(100, 0.9, 0.999) == (10, 90)
  assert ntu.skeleton_crop(50, 0.7, 0.5) == (0, 50)           # at most T


def test_frame_indices():
  # linspace(0, N, 24) -> int(k N / 23); slots [0, 3, 6, 9, 13, 16, 19, 23]; slot 23 blank.
  np.testing.assert_array_equal(ntu.release_frame_indices(40), [0, 5, 10, 15, 22, 27, 33, -1])
  np.testing.assert_array_equal(ntu.release_frame_indices(10), [0, 3, 6, 9, -1, -1, -1, -1])
  # AugCrop ratio 0.75: slots [3, 21) and picks [0, 2, 4, 7, 9, 12, 14, 17] of them.
  np.testing.assert_array_equal(ntu.release_frame_indices(40, 0.75),
                                [5, 8, 12, 17, 20, 26, 29, 34])
  np.testing.assert_array_equal(ntu.even_frame_indices(40), [0, 6, 11, 17, 22, 28, 33, 39])
  np.testing.assert_array_equal(ntu.even_frame_indices(40, 0.75),     # frames [5, 35)
                                [5, 9, 13, 17, 22, 26, 30, 34])


# ------------------------------------------------------------------ the dataset

def test_pairing_splits_labels_and_check_data(root, tmp_path):
  ds = ntu.get_dataset(config(root))
  names = {k: v.names for k, v in ds.splits.items()}
  assert names == {"train": [name(1, 5), name(1, 6), name(1, 7)],
                   "val": [name(2, 1), name(2, 9)], "test": [name(3, 60)],
                   "retrain": [name(4, 2)]}     # the rest of the release's retraining set
  assert ds.splits["train"].labels.tolist() == [4, 5, 6] and ds.splits["test"][0].label == 59
  assert ds.num_classes == 60 and ds.class_names[0] == "drink water"
  # The evaluate split: train + val = the release's 'train_val' subjects.
  ds = ntu.get_dataset(config(root, split="evaluate"))
  assert [s.subject for s in ds.splits["train"].samples] == [1, 1, 1, 4]
  ds = ntu.get_dataset(config(root, subjects={"train": [4], "val": [1], "test": [2, 3]}))
  assert {k: len(v) for k, v in ds.splits.items()} == {"train": 1, "val": 3, "test": 3}
  # Unpaired samples are bad examples naming the missing file.
  result = check_data(config(root), workers=1)
  bad = {(b["split"], os.path.basename(b["file"])) for b in result["bad"]}
  assert bad == {("train", f"{name(1, 7)}.skeleton"), ("val", f"{name(2, 9)}_rgb.avi")}
  assert result["good"] == {"train": 2, "val": 1, "test": 1, "retrain": 1}
  assert result["inputs"] == {"Video": {"shape": [8, 256, 256, 3], "dtype": "uint8"},
                              "Skeleton": {"shape": [3, 32, 25, 2], "dtype": "float32"}}
  # An exclude list leaves them out.
  (tmp_path / "missing.txt").write_text(f"# missing\n{name(1, 7)}\n\n{name(2, 9)}.skeleton\n")
  ds = ntu.get_dataset(config(root, exclude_list=os.fspath(tmp_path / "missing.txt")))
  assert len(ds.splits["train"]) == 2 and ds.splits["val"].names == [name(2, 1)]


def test_inputs_views_and_fingerprint(root):
  split = ntu.get_dataset(config(root, "reference")).splits["train"]
  ex = split[0]                                          # 40 frames, 100 skeleton frames
  assert frame_ids(ex.inputs["Video"]) == [0, 5, 10, 15, 22, 27, 33, -1]
  assert frame_ids(split.example(1, ("Video",)).inputs["Video"]) == [0, 3, 6, 9, -1, -1, -1, -1]
  paper = ntu.get_dataset(config(root)).splits["train"]
  assert frame_ids(paper.example(0, ("Video",)).inputs["Video"]) == [0, 6, 11, 17, 22, 28, 33,
                                                                    39]
  # Skeleton: joint 1 is the origin; x of joint j is t / 2 + j - 1 read at t = 100 (d + 0.5)
  # / 32 - 0.5; the absent body is minus the origin.
  s = ex.inputs["Skeleton"]
  src = np.maximum((np.arange(32) + 0.5) * 100 / 32 - 0.5, 0)
  np.testing.assert_allclose(s[0, :, 5, 0], src / 2 + 4, atol=1e-5)
  np.testing.assert_array_equal(s[:, :, 1, 0], 0)
  np.testing.assert_allclose(s[:, :, 7, 1], np.repeat([[-1.0], [-2.0], [-3.0]], 32, 1))
  assert set(split.example(0, ("Skeleton",)).inputs) == {"Skeleton"}
  # Views: the same each time, from the release's crop family, not all equal to view 0.
  crops = [ntu.release_frame_indices(40, r).tolist() for r in np.linspace(0.51, 1, 50)]
  views = [split.example(0, ntu.MODALITIES, view=k) for k in (1, 2, 3)]
  again = split.example(0, ntu.MODALITIES, view=2)
  for m in ntu.MODALITIES:
    np.testing.assert_array_equal(again.inputs[m], views[1].inputs[m])
    assert any(not np.array_equal(v.inputs[m], ex.inputs[m]) for v in views)
  for v in views:
    assert frame_ids(v.inputs["Video"]) in crops
    x = v.inputs["Skeleton"][0, :, 5, 0]                   # still a ramp of slope <= 100/32/2
    assert np.all(np.diff(x) > 0) and np.all(np.diff(x) <= 100 / 64 + 1e-5)
  # The fingerprint follows the files; a broken video is a bad example naming it.
  ds = ntu.get_dataset(config(root))
  before = ds.data_fingerprint()
  path = root / ntu.VIDEO_DIR / f"{name(3, 60)}_rgb.avi"
  data = path.read_bytes()
  try:
    path.write_bytes(b"not a video")
    ds2 = ntu.get_dataset(config(root))
    assert ds2.data_fingerprint() != before
    with pytest.raises(BadExample) as e:
      ds2.splits["test"].example(0, ("Video",))
    assert e.value.file == os.fspath(path)
  finally:
    path.write_bytes(data)


def test_folders_and_config_errors(tmp_path):
  (tmp_path / ntu.SKELETON_DIR).mkdir()
  (tmp_path / ntu.SKELETON_DIR / f"{name(1, 1)}.skeleton").write_text("0\n")
  with pytest.raises(DataError, match="neither"):
    ntu.get_dataset(config(tmp_path))
  (tmp_path / ntu.VIDEO_DIR).mkdir()
  (tmp_path / ntu.REENCODED_VIDEO_DIR).mkdir()
  (tmp_path / ntu.REENCODED_VIDEO_DIR / f"{name(1, 1)}_rgb.avi").write_bytes(b"")
  (tmp_path / ntu.REENCODED_VIDEO_DIR / "dict_id_length.pickle").write_bytes(b"")
  ds = ntu.get_dataset(config(tmp_path))                  # the re-encoded folder first
  assert ds.splits["train"].samples[0].video.parent.name == ntu.REENCODED_VIDEO_DIR
  ds = ntu.get_dataset(config(tmp_path, video_folder=ntu.VIDEO_DIR))
  assert ds.splits["train"].samples[0].video is None
  with pytest.raises(ConfigError, match="config.data.root"):
    ntu.get_dataset(config(""))
  with pytest.raises(ConfigError, match="config.data.split='cs'"):
    ntu.get_dataset(config(tmp_path, split="cs"))
  with pytest.raises(ConfigError, match=r"\[1\] are in both test and train"):
    ntu.get_dataset(config(tmp_path, subjects={"train": [1], "val": [2], "test": [1]}))
  with pytest.raises(ConfigError, match="config.data.exclude_list"):
    ntu.get_dataset(config(tmp_path, exclude_list="nope.txt"))
  (tmp_path / "x.txt").write_text(f"{name(1, 1)}\nS001 typo\n")
  with pytest.raises(DataError, match="x.txt: line 2"):
    ntu.get_dataset(config(tmp_path, exclude_list="x.txt"))
  (tmp_path / ntu.SKELETON_DIR / f"{name(1, 61)}.skeleton").write_text("0\n")
  with pytest.raises(DataError, match="A061"):
    ntu.get_dataset(config(tmp_path))


# ------------------------------------------------------------------ end to end

def test_prepare_search_evaluate(tmp_path):
  """The paper config on synthetic files: reduced inflated ResNet-50 and HCN (seeded
  init), two training views; prepare, and the trainers accept its features (search on
  train / val, retraining on train + val + retrain)."""
  from bmnas_jax import pipeline
  from bmnas_jax.data import backbones as bb
  from bmnas_jax.data import shards
  from bmnas_jax.data.source import InputSpec
  rng = np.random.default_rng(0)
  root = tmp_path / "data"
  (root / ntu.SKELETON_DIR).mkdir(parents=True)
  for subject, count in ((1, 8), (2, 4), (3, 4), (4, 4)):    # train, val, test, retrain
    for k in range(count):
      action = int(rng.integers(1, 4))
      write_video(root / ntu.VIDEO_DIR / f"{name(subject, action, k + 1)}_rgb.avi", 12, 32, 24)
      frames = [[joints(float(rng.normal()) + action, 0)] for _ in range(40)]
      (root / ntu.SKELETON_DIR / f"{name(subject, action, k + 1)}.skeleton").write_text(
          skeleton_text(frames))
  c = config(root, subjects={"train": [1], "val": [2], "test": [3], "retrain": [4]},
             frame_size=224, train_views=2)
  c.backbones.Video.kwargs.update(widths=(2, 2, 4, 4), blocks=(1, 1, 1, 1))
  c.backbones.Skeleton.kwargs.update(channels=4, hidden=8)
  for m in ("Video", "Skeleton"):
    c.backbones[m].weights = "init"
  shapes = {m: bb.output_shapes(bb.make_backbone(c.backbones[m].name, c.backbones[m].kwargs),
                                spec)[1]
            for m, spec in (("Video", InputSpec((8, 224, 224, 3), "uint8")),
                            ("Skeleton", InputSpec((3, 32, 25, 2), "float32")))}
  c.data.channels = {m: tuple(shapes[m][t][-1] for t in c.backbones[m].taps) for m in shapes}
  c.prepare.batch_size, c.prepare.probe_examples = 4, 0
  tiny_run(c, batch_size=4).stages = "prepare"
  pipeline.run(c, os.fspath(tmp_path / "run"))
  assert_trainers_accept(c, tmp_path / "run")       # retraining on train + val + retrain
  fs = shards.read_feature_set(tmp_path / "run" / "features", "ntu")
  assert {k: len(v) for k, v in fs.splits.items()} == {"train": 16, "val": 4, "test": 4,
                                                       "retrain": 8}
  assert fs.views == {"train": 2, "retrain": 2}
  assert [n.length for n in fs.nodes] == [8, 8, 8, 1, 8, 8, 1, 1]
  assert tuple(c.evaluate.train_splits) == ("train", "val", "retrain")

"""EgoGesture (83 gestures, RGB + depth, cross-subject) from its original JPEG frames and labels.

Files under `config.data.root`: the frames `SubjectXX/SceneY/Color/rgbN/%06d.jpg` and
`SubjectXX/SceneY/Depth/depthN/%06d.jpg` (N the group, 1..9; frames numbered from
000001.jpg), and the annotations in either form:

* the dataset's per-group CSVs `labels-final-revised1/subjectXX/SceneY/GroupN.csv` (no
  header; one gesture a row `class,start,end`: class 1..83, the first and last frame,
  1-based and inclusive, the numbers of the JPEG files);
* the derived `egogestureall_but_None.json` the release reads (made by Real-time-GesRec's
  `ego_prepare.py` + `egogesture_json.py` from those CSVs, row for row): `{"labels": [83
  names], "database": {"SubjectXX/SceneY/Color/rgbN[_i]": {"annotations": {"start_frame",
  "end_frame", "label"}, "subset": "training" | "validation" | "testing"}}}`. The first
  gesture of a folder has the bare folder as key, later ones `_<i>` (a running row
  number) appended; the label is the name's position in `labels` (CSV class - 1); frame
  numbers are strings, some written as floats ('67.0'). The public file holds 24,161
  gestures, 14,416 / 4,768 / 4,977 by subset, and every subset agrees with the subject
  lists below (checked); the release splits by that `subset` field.

Both forms give the same samples: each split holds its subjects' gestures ordered by
(subject, scene, group, start, end). The subject lists (`SUBJECTS`) are config values.

What the release's network receives (datasets/ego.py, nv_*_transforms.py, models/utils.py
`parse_opts`, checked against its code): the loader runs with modality 'RGB-D', reading
for each frame number `rgbN/%06d.jpg` with PIL `.convert('RGB')` and `depthN/%06d.jpg`
with `.convert('L')` (8-bit luma; the release builds the depth folder as 'depth' + the
LAST CHARACTER of the rgb folder, right for groups 1..9, all there are). Frames are the
gesture's `start..end` (inclusive), cropped in time to 32 (no downsampling):
TemporalCenterCrop for validation and test (begin `max(0, n // 2 - 16)`), TemporalRandomCrop
for training (begin uniform in `[0, max(0, n - 33)]`, so never the last possible start);
a shorter run is loop-padded (positions `k % n`). One spatial transform, its randomness
drawn once per clip, is applied to every image of both modalities: validation/test
Scale(112) (short side to 112, the long one `int(112 * long / short)`, PIL bilinear) then
CenterCrop(112) (offset `int(round((size - 112) / 2))`); training MultiScaleRandomCrop: a
square of side `int(short side * scale)`, scale one of (1, 0.84089641525,
0.7071067811803005, 0.5946035574934808, 0.4999999999911653), top-left at
`(u * (W - side), v * (H - side))` for u, v uniform in [0, 1) (a continuous position, not
the corner/centre choice of MultiScaleCornerCrop, which the release does not use), the
float box rounded by PIL's crop, then resized to 112 x 112 bilinear. `ToTensor(1)` keeps
0..255 (`norm_value` = 1: no /255) and `Normalize(mean, [1, 1, 1])` subtracts
(114.7748, 107.7354, 99.475) from R, G, B and 114.7748 from the one depth channel (zip over
the image's channels stops after the first); no std division, nothing else. The clip
`[R, G, B, D]` x 32 frames is split into RGB `[B, 3, 32, 112, 112]` and depth
`[B, 1, 32, 112, 112]` float32, the inputs of the two ResNeXt-101s. This reader returns
the uint8 values before the mean subtraction (the backbone subtracts the means):
`RGB` uint8 `[32, 112, 112, 3]`, `Depth` uint8 `[32, 112, 112, 1]`.

View 0 is the validation/test transform; view k >= 1 a training view, its temporal start,
scale and position drawn from a generator seeded with (subject, scene, group, start, end,
k), so the same whichever split, modality or form of annotations reads it.

Differences from the release: it skips a sample whose colour folder is missing and
crashes on a missing frame; here either is a `BadExample` naming the file (so are a
missing depth folder, an unreadable JPEG and a gesture whose first or last frame is not
in its folders), which `experiments.check_data` lists and `config.data.skip_bad=True`
leaves out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import pathlib
import re
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from bmnas_jax.data.source import BadExample, Dataset, Example
from bmnas_jax.errors import ConfigError, DataError

NUM_CLASSES = 83
MODALITIES = ("RGB", "Depth")
CLIP_FRAMES = 32
SIZE = 112
# MultiScaleRandomCrop's scales as the release's parse_opts writes them.
SCALES = (1.0, 0.84089641525, 0.7071067811803005, 0.5946035574934808, 0.4999999999911653)
MEANS = {"RGB": (114.7748, 107.7354, 99.475), "Depth": (114.7748,)}
CSV_DIR = "labels-final-revised1"
JSON_NAME = "egogestureall_but_None.json"
SUBSETS = {"train": "training", "val": "validation", "test": "testing"}
SUBJECTS: dict[str, tuple[int, ...]] = {
    "train": (3, 4, 5, 6, 8, 10, 15, 16, 17, 20, 21, 22, 23, 25, 26, 27, 30, 32, 36, 38, 39,
              40, 42, 43, 44, 45, 46, 48, 49, 50),
    "val": (1, 7, 12, 13, 24, 29, 33, 34, 35, 37),
    "test": (2, 9, 11, 14, 18, 19, 28, 31, 41, 47),
}
NUM_SUBJECTS = 50
JSON_KEY = re.compile(r"Subject(\d+)/Scene(\d+)/Color/rgb(\d+)")
Transform = Callable[[Image.Image], Image.Image]


# ------------------------------------------------------------------ annotations

@dataclasses.dataclass(frozen=True)
class Gesture:
  """One annotated gesture: frames `start..end` (inclusive, the JPEG numbers) of group
  `group` of `SubjectXX/SceneY`, label in `[0, 83)`; `where` names its annotation (file and
  line, or file and key) and `subset` is the JSON's subset ('' from a CSV)."""
  subject: int
  scene: int
  group: int
  start: int
  end: int
  label: int
  where: str = dataclasses.field(default="", compare=False)
  subset: str = dataclasses.field(default="", compare=False)

  @property
  def key(self) -> tuple[int, int, int, int, int]:
    return (self.subject, self.scene, self.group, self.start, self.end)

  @property
  def rgb_dir(self) -> str:
    return f"Subject{self.subject:02d}/Scene{self.scene}/Color/rgb{self.group}"

  @property
  def depth_dir(self) -> str:
    return f"Subject{self.subject:02d}/Scene{self.scene}/Depth/depth{self.group}"


def _whole(value: Any) -> int | None:
  """An int from an int, an integral float, or its text ('67', '67.0'); None otherwise."""
  if isinstance(value, bool):
    return None
  try:
    x = float(value.strip() if isinstance(value, str) else value)
  except (TypeError, ValueError):
    return None
  return int(x) if np.isfinite(x) and x.is_integer() else None


def _range(start: Any, end: Any, where: str) -> tuple[int, int]:
  """Validated 1-based inclusive frame numbers, or DataError naming `where`."""
  s, e = _whole(start), _whole(end)
  if s is None or e is None:
    raise DataError(f"{where}: frames {start!r}, {end!r} are not whole numbers")
  if s < 1 or e < s:
    raise DataError(f"{where}: frames {s}..{e} are not a range of frame numbers (1-based, "
                    f"start <= end)")
  return s, e


def _numbered(folder: pathlib.Path, pattern: str) -> list[tuple[int, pathlib.Path]]:
  """The entries of `folder` named `pattern` (a regex with one number, case-insensitive),
  as (number, path) sorted by number."""
  rx = re.compile(pattern, re.IGNORECASE)
  with os.scandir(folder) as it:
    found = [(int(m.group(1)), pathlib.Path(e.path)) for e in it
             if (m := rx.fullmatch(e.name))]
  return sorted(found)


def read_csv_annotations(folder: pathlib.Path) -> tuple[list[Gesture], list[pathlib.Path]]:
  """The gestures of `labels-final-revised1/subjectXX/SceneY/GroupN.csv`.

  Args:
    folder: the `labels-final-revised1` folder.
  Returns:
    The gestures (in file order) and the CSV files read.
  Raises:
    DataError: no CSVs, an unreadable file, or a malformed row (names the file and line).
  """
  gestures, files = [], []
  for subject, sdir in _numbered(folder, r"subject(\d+)"):
    if not sdir.is_dir():
      continue
    for scene, cdir in _numbered(sdir, r"scene(\d+)"):
      if not cdir.is_dir():
        continue
      for group, path in _numbered(cdir, r"group(\d+)\.csv"):
        files.append(path)
        try:
          text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
          raise DataError(f"{path}: unreadable ({e})") from e
        for n, line in enumerate(text.splitlines(), 1):
          if not line.strip():
            continue
          fields = [f.strip() for f in line.split(",")]
          while fields and not fields[-1]:
            fields.pop()
          where = f"{path}: line {n}"
          if len(fields) != 3:
            raise DataError(f"{where}: {line.strip()[:60]!r} has {len(fields)} field(s), "
                            f"expected class,start,end")
          cls = _whole(fields[0])
          if cls is None or not 1 <= cls <= NUM_CLASSES:
            raise DataError(f"{where}: class {fields[0]!r} is not 1..{NUM_CLASSES}")
          start, end = _range(fields[1], fields[2], where)
          gestures.append(Gesture(subject, scene, group, start, end, cls - 1, where))
  if not files:
    raise DataError(f"{folder}: holds no subjectXX/SceneY/GroupN.csv annotation files")
  return gestures, files


def read_json_annotations(path: pathlib.Path) -> tuple[list[Gesture], tuple[str, ...]]:
  """The gestures and the 83 class names of `egogestureall_but_None.json`.

  Raises:
    DataError: not JSON, or a missing or malformed key (names the file and the key).
  """
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise DataError(f"{path}: unreadable as JSON ({e})") from e
  if not isinstance(data, dict):
    raise DataError(f"{path}: expected an object with keys 'labels' and 'database'")
  labels = data.get("labels")
  if (not isinstance(labels, list) or len(labels) != NUM_CLASSES
      or not all(isinstance(x, str) for x in labels) or len(set(labels)) != NUM_CLASSES):
    raise DataError(f"{path}: key 'labels' must list {NUM_CLASSES} distinct class names")
  index = {name: k for k, name in enumerate(labels)}
  database = data.get("database")
  if not isinstance(database, dict) or not database:
    raise DataError(f"{path}: key 'database' must be a non-empty object")
  gestures = []
  for key, value in database.items():
    where = f"{path}: key 'database'/{key!r}"
    head, sep, tail = key.rpartition("_")
    folder = head if sep and tail.isdigit() else key
    m = JSON_KEY.fullmatch(folder)
    if not m:
      raise DataError(f"{where}: not SubjectXX/SceneY/Color/rgbN[_i]")
    ann = value.get("annotations") if isinstance(value, dict) else None
    if not isinstance(ann, dict) or not {"start_frame", "end_frame", "label"} <= set(ann):
      raise DataError(f"{where}: expected 'annotations' with 'start_frame', 'end_frame' and "
                      f"'label'")
    if ann["label"] not in index:
      raise DataError(f"{where}: label {ann['label']!r} is not one of the file's 'labels'")
    subset = value.get("subset")
    if subset not in SUBSETS.values():
      raise DataError(f"{where}: subset {subset!r} is not one of {sorted(SUBSETS.values())}")
    start, end = _range(ann["start_frame"], ann["end_frame"], where)
    gestures.append(Gesture(int(m.group(1)), int(m.group(2)), int(m.group(3)), start, end,
                            index[ann["label"]], where, subset))
  return gestures, tuple(labels)


# ------------------------------------------------------------------ clips

def temporal_positions(n: int, begin: int | None = None,
                       frames: int = CLIP_FRAMES) -> np.ndarray:
  """The positions (in `[0, n)`) of the `frames` (32) frames taken from a gesture of `n`.

  Args:
    n: the gesture's frame count, >= 1.
    begin: the crop's first position (a training view); None for the centre crop
      `max(0, n // 2 - frames // 2)`.
    frames: the clip length (the release's `sample_duration`).
  Returns:
    int64 `[frames]`: positions `begin .. min(begin + frames, n) - 1`, looped when fewer.
  """
  if begin is None:
    begin = max(0, n // 2 - frames // 2)
  kept = np.arange(begin, min(begin + frames, n), dtype=np.int64)
  return kept[np.arange(frames) % kept.size]


def random_begin_bound(n: int, frames: int = CLIP_FRAMES) -> int:
  """TemporalRandomCrop's last start position: `max(0, n - frames - 1)` (inclusive)."""
  return max(0, n - frames - 1)


def scale_center_crop(img: Image.Image, size: int = SIZE) -> Image.Image:
  """Scale(size) + CenterCrop(size) as the release (size 112): `img` PIL -> size x size."""
  w, h = img.size
  if not ((w <= h and w == size) or (h <= w and h == size)):
    new = (size, int(size * h / w)) if w < h else (int(size * w / h), size)
    img = img.resize(new, Image.BILINEAR)
  w, h = img.size
  x1, y1 = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
  return img.crop((x1, y1, x1 + size, y1 + size))


def multiscale_random_crop(img: Image.Image, scale: float, u: float, v: float,
                           size: int = SIZE) -> Image.Image:
  """MultiScaleRandomCrop as the release: a square of side `int(min(W, H) * scale)` at
  `(u (W - side), v (H - side))` (PIL rounds the float box), resized to size x size
  (112) bilinear."""
  w, h = img.size
  side = int(min(w, h) * scale)
  x1, y1 = u * (w - side), v * (h - side)
  return img.crop((x1, y1, x1 + side, y1 + side)).resize((size, size), Image.BILINEAR)


def _frame_path(folder: pathlib.Path, frame: int) -> pathlib.Path:
  return folder / f"{frame:06d}.jpg"


def load_frame(path: pathlib.Path, mode: str) -> Image.Image:
  """A JPEG as PIL `mode` ('RGB', or 'L' for depth), decoded now; BadExample if missing or
  unreadable."""
  try:
    with open(path, "rb") as f, Image.open(f) as img:
      return img.convert(mode)
  except FileNotFoundError as e:
    raise BadExample(os.fspath(path), "missing frame") from e
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise BadExample(os.fspath(path), f"unreadable JPEG ({e})") from e


# ------------------------------------------------------------------ splits

class EgoSplit:
  """The gestures of some subjects, read one clip at a time (32 JPEGs per modality).

  `RGB` is uint8 `[32, 112, 112, 3]`, `Depth` uint8 `[32, 112, 112, 1]` (0..255; the
  backbone subtracts `MEANS`); labels are ints in `[0, 83)`.
  """

  def __init__(self, root: pathlib.Path, gestures: Sequence[Gesture],
               frames: int = CLIP_FRAMES, size: int = SIZE):
    self.root, self.frames_per_clip, self.size = root, int(frames), int(size)
    self.gestures = list(gestures)
    self.labels = np.asarray([g.label for g in self.gestures], np.int64)

  def __len__(self) -> int:
    return len(self.gestures)

  def file(self, i: int) -> str:
    return os.fspath(self.root / self.gestures[i].rgb_dir)

  def _check(self, g: Gesture) -> None:
    """BadExample unless both folders exist and hold the gesture's first and last frames."""
    for kind, rel in (("colour", g.rgb_dir), ("depth", g.depth_dir)):
      folder = self.root / rel
      if not folder.is_dir():
        raise BadExample(os.fspath(folder), f"the {kind} frames folder is missing (gesture "
                                            f"frames {g.start}..{g.end}, {g.where})")
      for frame in (g.start, g.end):
        path = _frame_path(folder, frame)
        if path.is_file():
          continue
        numbers = [n for n, _ in _numbered(folder, r"(\d+)\.jpg")]
        if numbers and numbers[0] <= frame <= numbers[-1]:
          raise BadExample(os.fspath(path), f"missing frame (gesture frames {g.start}..{g.end}, "
                                            f"{g.where})")
        have = f"frames {numbers[0]}..{numbers[-1]}" if numbers else "no frames"
        raise BadExample(os.fspath(path), f"gesture frames {g.start}..{g.end} ({g.where}) run "
                                          f"outside the folder's {have}")

  def view_params(self, i: int, view: int) -> tuple[int | None, Transform]:
    """A view's temporal begin (None: centre) and spatial transform, the same every call."""
    if not view:
      return None, lambda img: scale_center_crop(img, self.size)
    g = self.gestures[i]
    rng = np.random.default_rng((*g.key, int(view)))
    bound = random_begin_bound(g.end - g.start + 1, self.frames_per_clip)
    begin = int(rng.integers(0, bound + 1))
    scale = SCALES[int(rng.integers(len(SCALES)))]
    u, v = float(rng.random()), float(rng.random())
    return begin, lambda img: multiscale_random_crop(img, scale, u, v, self.size)

  def frames(self, i: int, view: int = 0) -> np.ndarray:
    """The frame numbers (JPEG numbers) of view `view` of gesture `i`: int64 `[32]`."""
    g = self.gestures[i]
    begin, _ = self.view_params(i, view)
    return g.start + temporal_positions(g.end - g.start + 1, begin, self.frames_per_clip)

  def example(self, i: int, modalities: Sequence[str] = MODALITIES, view: int = 0) -> Example:
    """Gesture `i` with the named modalities' clips.

    Args:
      i: the gesture's index in this split.
      modalities: a subset of `('RGB', 'Depth')`.
      view: 0 for the validation/test transform; k >= 1 for the k-th training view.
    Raises:
      BadExample: a missing folder or frame, an unreadable JPEG, frames outside the folder.
    """
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown:
      raise DataError(f"EgoGesture has modalities {MODALITIES}, not {unknown}")
    g = self.gestures[i]
    self._check(g)
    begin, transform = self.view_params(i, view)
    numbers = g.start + temporal_positions(g.end - g.start + 1, begin, self.frames_per_clip)
    inputs = {}
    for m, rel, mode in (("RGB", g.rgb_dir, "RGB"), ("Depth", g.depth_dir, "L")):
      if m not in modalities:
        continue
      decoded = {int(f): np.asarray(transform(load_frame(_frame_path(self.root / rel, int(f)),
                                                         mode)))
                 for f in np.unique(numbers)}
      clip = np.stack([decoded[int(f)] for f in numbers])
      inputs[m] = clip if clip.ndim == 4 else clip[..., None]
    return Example(inputs, g.label)

  def __getitem__(self, i: int) -> Example:
    return self.example(i)


# ------------------------------------------------------------------ dataset

def _subjects(config) -> tuple[dict[str, tuple[int, ...]], bool]:
  """Subjects per split (`config.data.subjects`, else `SUBJECTS`) and whether they are given."""
  given = config.data.get("subjects", None)
  if not given:
    return dict(SUBJECTS), False
  given = dict(given)
  if not {"train", "val", "test"} <= set(given):
    raise ConfigError(f"config.data.subjects has keys {sorted(given)}; give 'train', 'val' and "
                      f"'test' (and any further training splits)")
  subjects = {}
  for name, values in given.items():
    ints = [_whole(v) for v in (values or ())]
    if not ints or any(v is None or not 1 <= v <= NUM_SUBJECTS for v in ints):
      raise ConfigError(f"config.data.subjects: {name} subjects {values!r} must be a non-empty "
                        f"list of 1..{NUM_SUBJECTS}")
    subjects[name] = tuple(ints)
  for a, b in itertools.combinations(sorted(subjects), 2):
    both = sorted(set(subjects[a]) & set(subjects[b]))
    if both:
      raise ConfigError(f"config.data.subjects: subjects {both} are in both {a} and {b}")
  return subjects, True


def _annotations(root: pathlib.Path, spec: str) -> tuple[str, pathlib.Path]:
  """('csv', the labels folder) or ('json', the file) from `config.data.annotations`."""
  if not spec:
    if (root / CSV_DIR).is_dir():
      return "csv", root / CSV_DIR
    if (root / JSON_NAME).is_file():
      return "json", root / JSON_NAME
    raise DataError(f"{root}: holds neither {CSV_DIR}/ nor {JSON_NAME} (config.data.root; or "
                    f"give config.data.annotations)")
  path = pathlib.Path(spec).expanduser()
  if not path.is_absolute():
    path = root / path if (root / path).exists() else path.absolute()
  if path.is_dir():
    return "csv", path
  if path.is_file() and path.suffix.lower() == ".json":
    return "json", path
  raise ConfigError(f"config.data.annotations={spec!r}: {path} is neither a folder of "
                    f"subjectXX/SceneY/GroupN.csv nor a .json file (a relative path is looked "
                    f"up in config.data.root, then here)")


def _stat(path: pathlib.Path) -> str:
  try:
    st = path.stat()
  except OSError:
    return "missing"
  return f"{st.st_size}|{st.st_mtime_ns}"


def _positive(config, key: str, default: int) -> int:
  value = config.data.get(key, default)
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ConfigError(f"config.data.{key}={value!r} must be a positive int")
  return value


def get_dataset(config) -> Dataset:
  """EgoGesture from `config.data.root` (`config.data.source='ego'`).

  Keys:
    config.data.root: the folder with the `SubjectXX/` frame folders.
    config.data.annotations: '' (default) takes `labels-final-revised1/` in the root if
      present, else `egogestureall_but_None.json` there; or a folder of CSVs or a
      `.json` file, relative to the root or absolute. Both give the same samples.
    config.data.subjects: optional `{'train': [...], 'val': [...], 'test': [...]}` (and
      any further training splits) overriding `SUBJECTS`, the dataset's split (train 30,
      val 10, test 10 subjects). With the defaults, a JSON entry whose `subset` disagrees
      with its subject's split is a DataError. The release searches on train / val and
      retrains on train + val ('train_dev'): config.evaluate.train_splits = ('train', 'val').
    config.data.sample_duration, config.data.sample_size: the clip's frames and side (the
      release's options of the same names; 32 and 112).

  Returns:
    Modalities `RGB` (uint8 `[32, 112, 112, 3]`) and `Depth` (uint8 `[32, 112, 112, 1]`),
    83 classes named by the JSON's `labels` (else 'class_1'..'class_83'); each split
    ordered by (subject, scene, group, start, end) and read lazily.
  """
  root_spec = str(config.data.get("root", "") or "")
  if not root_spec:
    raise ConfigError("config.data.root is empty: set it to the EgoGesture folder holding "
                      "SubjectXX/SceneY/{Color,Depth}/")
  root = pathlib.Path(root_spec).expanduser().absolute()
  if not root.is_dir():
    raise DataError(f"{root}: not a folder (config.data.root={root_spec!r})")
  kind, ann_path = _annotations(root, str(config.data.get("annotations", "") or ""))
  subjects, custom = _subjects(config)

  h = hashlib.sha256()
  if kind == "csv":
    gestures, files = read_csv_annotations(ann_path)
    class_names = tuple(f"class_{k + 1}" for k in range(NUM_CLASSES))
  else:
    gestures, class_names = read_json_annotations(ann_path)
    files = [ann_path]
  for f in files:
    h.update(f"{f.relative_to(ann_path) if kind == 'csv' else f.name}|{_stat(f)}\n".encode())

  split_of = {s: name for name, subs in subjects.items() for s in subs}
  if kind == "json" and not custom:
    for g in gestures:
      want = SUBSETS[split_of[g.subject]] if g.subject in split_of else None
      if g.subset != want:
        raise DataError(f"{g.where}: subset {g.subset!r}, but subject {g.subject} is in the "
                        f"{split_of.get(g.subject, 'no')} split ({want!r}); give "
                        f"config.data.subjects to split otherwise")
  folders = sorted({(g.rgb_dir, g.depth_dir) for g in gestures})
  for rgb, depth in folders:                 # a folder's mtime changes as files come and go
    h.update(f"{rgb}|{_stat(root / rgb)}|{depth}|{_stat(root / depth)}\n".encode())

  frames, size = (_positive(config, "sample_duration", CLIP_FRAMES),
                  _positive(config, "sample_size", SIZE))
  ordered = sorted(gestures, key=lambda g: (g.key, g.label))
  splits = {name: EgoSplit(root, [g for g in ordered if g.subject in subs], frames, size)
            for name, subs in subjects.items()}
  fingerprint = {"files": "sha256:" + h.hexdigest(), "root": os.fspath(root),
                 "annotations": [kind, os.fspath(ann_path)], "subjects": subjects,
                 "clip": [frames, size, list(SCALES)]}
  return Dataset(splits, NUM_CLASSES, "single", class_names,
                 fingerprint=json.dumps(fingerprint, sort_keys=True),
                 description=f"EgoGesture RGB + depth ({kind} annotations, "
                             f"{'/'.join(str(len(s)) for s in splits.values())} "
                             f"{'/'.join(splits)})")

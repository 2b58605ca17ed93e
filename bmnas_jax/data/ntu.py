"""NTU RGB+D (60 actions, cross-subject) from its original `.skeleton` files and RGB videos.

Files under `config.data.root`: `nturgb+d_skeletons/<name>.skeleton` and the RGB videos
`nturgb+d_rgb/<name>_rgb.avi` (1920x1080), or the release's re-encoded copies
`nturgb+d_rgb_256x256_30/<name>_rgb.avi` (`ffmpeg -vf scale=256:256 -crf 17 -r 30`,
aspect squashed). A name `SsssCcccPpppRrrrAaaa` gives the subject (`Pppp`) and the
label (`Aaaa` - 1). Videos and skeletons are paired by name (the release pairs sorted
lists by position, which misaligns every later sample when one side lacks a file);
a sample with only one of the two files stays in its split and reads as a
`BadExample` naming the missing file (`experiments.check_data` lists it;
`config.data.skip_bad=True` leaves it out).

What the release's network receives (datasets/ntu.py, checked against its code):

* RGB: `load_video` reads BGR frames with cv2 into 24 float32 slots at frame indices
  `linspace(0, N, 24).astype(int)` (N = the header's frame count); the last index is
  N, which the read loop never reaches, so slot 23 stays zeros (and for N < 23 the
  repeated indices fill only the first unique ones: the later slots stay zeros).
  `video_transform` then divides by 255 and normalises each channel by position
  with the ImageNet RGB statistics, mean (0.485, 0.456, 0.406) and std (0.229, 0.224,
  0.225), applied to B, G, R in that order: channel 0 (blue) uses 0.485 / 0.229. This
  runs on the 24 slots BEFORE the transforms, so a blank slot reaches the network as
  the constant (-0.485/0.229, -0.456/0.224, -0.406/0.225) = (-2.1179, -2.0357,
  -1.8044), exactly what a uint8 0 pixel gives under the same normalisation. The
  normalisation therefore moves to the backbone: this reader returns uint8 BGR frames
  with the blank frame 0. `NormalizeLen` keeps slots `linspace(0, 23, 8).astype(int)`
  = [0, 3, 6, 9, 13, 16, 19, 23], so in validation and test the 8th frame is always
  blank. The network views `[B, 8, 256, 256, 3]` as `[B, 3, 8, 256, 256]`.
* Skeleton: xyz of up to 2 bodies `[3, T, 25, 2]` (NaN -> 0, a third body dropped),
  then every joint of BOTH body slots has joint 1 (index 1, the middle of the spine)
  of body 0 of the same frame subtracted (`origin = skel[:, :, 1, 0]`), so a missing
  second body becomes -origin rather than 0, and frames without a body stay 0. Then
  time is resized bilinearly (align_corners=False) to 32: `[3, 32, 25, 2]`.

Transforms by stage (release): the search trains on 'train_exp' with `AugCrop` +
`NormalizeLen` and evaluates 'dev' and 'test' with `NormalizeLen` only; the
retraining (main_darts_found_ntu.py) trains on 'train_val' with `AugCrop` +
`NormalizeLen` and tests with `NormalizeLen`. `CenterCrop` is never used. Here
view 0 is the `NormalizeLen` input and view k >= 1 the `AugCrop` one: a temporal
crop of the 24-slot FRAME LIST (not of pixels): ratio r in (0.5, 1], begin
`(24 - int(24 r)) // 2`, slots `[begin, 24 - begin)` (which drops the blank slot when
begin >= 1) before the 8 are picked; the skeleton is cropped to `max(64, floor(T p))`
frames (at most T), p in [0.5, 1), at a random start, before the time resize. A
view's randomness is seeded from the sample (its name's five numbers) and k, so it
is the same whichever split or modality reads it.

`config.fidelity='reference'` samples frames as above, quirks included; otherwise the
8 frames are real ones, `round(linspace(0, N - 1, 8))` (a view: the same over the
release's crop of the N frames, `[begin, N - begin)` with begin `(N - int(N r)) // 2`).

Videos are decoded with PyAV (its own ffmpeg), sequentially up to the last frame
needed (frame counting as cv2's sequential reads; no seeking), converted to BGR
by swscale as OpenCV's ffmpeg reader does. A frame that is not
`config.data.frame_size` square (the originals) is resized, aspect squashed, with
swscale's bicubic filter in its own pixel format before the BGR conversion, the
same filter as the release's `ffmpeg -vf scale=256:256` (whose default is bicubic);
what differs from the re-encoded folder is the absence of its lossy H.264 (crf 17)
round trip and of `-r 30` frame-rate resampling (a no-op for the 30 fps originals).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import pathlib
import re
from typing import Any, Sequence

import numpy as np

from bmnas_jax.data.source import BadExample, Dataset, Example
from bmnas_jax.errors import ConfigError, DataError

NUM_CLASSES = 60
MODALITIES = ("Video", "Skeleton")
SKELETON_DIR = "nturgb+d_skeletons"
VIDEO_DIR = "nturgb+d_rgb"
REENCODED_VIDEO_DIR = "nturgb+d_rgb_256x256_30"
SKELETON_SUFFIX, VIDEO_SUFFIX = ".skeleton", "_rgb.avi"
NAME = re.compile(r"S(\d{3})C(\d{3})P(\d{3})R(\d{3})A(\d{3})")
FRAME_SIZE = 256
VIDEO_FRAMES, SKELETON_FRAMES = 8, 32
RELEASE_SLOTS = 24                     # load_video's vid_len
JOINTS, BODIES = 25, 2
MIN_SKELETON_CROP = 64                 # AugCrop's least skeleton crop length
FIDELITIES = ("paper", "reference")

# The release's subject lists (datasets/ntu.py, by its `stage` names).
RELEASE_SUBJECTS: dict[str, tuple[int, ...]] = {
    "train_exp": (1, 8, 15, 17, 19, 27, 31, 35),
    "dev": (2, 5, 9, 14),
    "train": (1, 4, 8, 13, 15, 16, 17, 18, 19, 25, 27, 28, 31, 34, 35, 38),
    "train_val": (1, 2, 4, 5, 8, 9, 13, 14, 15, 16, 17, 18, 19, 25, 27, 28, 31, 34, 35, 38),
    "test": (3, 6, 7, 10, 11, 12, 20, 21, 22, 23, 24, 26, 29, 30, 32, 33, 36, 37, 39, 40),
}
# config.data.split -> subjects of this project's train / val / test splits.
SPLITS: dict[str, dict[str, tuple[int, ...]]] = {
    # The release's search: train_exp / dev / test, and as `retrain` the rest of its
    # retraining set, so that config.evaluate.train_splits = ('train', 'val', 'retrain')
    # retrains on its 'train_val' (the 20 cross-subject training subjects) in one run.
    "search": {"train": RELEASE_SUBJECTS["train_exp"], "val": RELEASE_SUBJECTS["dev"],
               "test": RELEASE_SUBJECTS["test"],
               "retrain": tuple(sorted(set(RELEASE_SUBJECTS["train"])
                                       - set(RELEASE_SUBJECTS["train_exp"])))},
    # The release's retraining: train + val = its 'train_val' (the 20 cross-subject
    # training subjects), for config.evaluate.train_splits = ('train', 'val').
    "evaluate": {"train": RELEASE_SUBJECTS["train"], "val": RELEASE_SUBJECTS["dev"],
                 "test": RELEASE_SUBJECTS["test"]},
    # The paper's text: search training on subjects 1, 4, 8, 13, 15, 17, 19.
    "paper_search": {"train": (1, 4, 8, 13, 15, 17, 19), "val": RELEASE_SUBJECTS["dev"],
                     "test": RELEASE_SUBJECTS["test"]},
}

# The dataset's documented action names, A001..A060.
CLASS_NAMES = (
    "drink water", "eat meal/snack", "brushing teeth", "brushing hair", "drop", "pickup",
    "throw", "sitting down", "standing up (from sitting position)", "clapping", "reading",
    "writing", "tear up paper", "wear jacket", "take off jacket", "wear a shoe",
    "take off a shoe", "wear on glasses", "take off glasses", "put on a hat/cap",
    "take off a hat/cap", "cheer up", "hand waving", "kicking something",
    "reach into pocket", "hopping (one foot jumping)", "jump up",
    "make a phone call/answer phone", "playing with phone/tablet", "typing on a keyboard",
    "pointing to something with finger", "taking a selfie", "check time (from watch)",
    "rub two hands together", "nod head/bow", "shake head", "wipe face", "salute",
    "put the palms together", "cross hands in front (say stop)", "sneeze/cough",
    "staggering", "falling", "touch head (headache)", "touch chest (stomachache/heart pain)",
    "touch back (backache)", "touch neck (neckache)", "nausea or vomiting condition",
    "use a fan (with hand or paper)/feeling warm", "punching/slapping other person",
    "kicking other person", "pushing other person", "pat on back of other person",
    "point finger at the other person", "hugging other person",
    "giving something to other person", "touch other person's pocket", "handshaking",
    "walking towards each other", "walking apart from each other",
)


# ------------------------------------------------------------------ skeletons

class _Lines:
  """A text file read line by line, counting lines for error messages."""

  def __init__(self, f, path: pathlib.Path):
    self.f, self.path, self.n = f, path, 0

  def fields(self, what: str, count: int) -> list[str]:
    """The next line's `count` whitespace-separated fields, or BadExample."""
    line = self.f.readline()
    if not line:
      raise BadExample(os.fspath(self.path), f"line {self.n + 1}: the file ends early; "
                                             f"expected {what}")
    self.n += 1
    fields = line.split()
    if len(fields) != count:
      raise BadExample(os.fspath(self.path), f"line {self.n}: {len(fields)} value(s) "
                                             f"{line.strip()[:60]!r}, expected {what}")
    return fields

  def count(self, what: str) -> int:
    """The next line as a count >= 0."""
    (field,) = self.fields(what, 1)
    try:
      value = int(field)
    except ValueError:
      value = -1
    if value < 0:
      raise BadExample(os.fspath(self.path), f"line {self.n}: {field!r} is not {what}")
    return value

  def numbers(self, what: str, count: int) -> list[float]:
    fields = self.fields(what, count)
    try:
      return [float(v) for v in fields]
    except ValueError:
      bad = next(v for v in fields if not _is_float(v))
      raise BadExample(os.fspath(self.path), f"line {self.n}: {bad!r} is not a number "
                                             f"({what})") from None


def _is_float(text: str) -> bool:
  try:
    float(text)
  except ValueError:
    return False
  return True


def read_skeleton(path: str | os.PathLike) -> np.ndarray:
  """The x, y, z of up to two bodies of a `.skeleton` file, read line by line.

  The file: the frame count; per frame the body count; per body a line of 10 values
  (bodyID ... trackingState), the joint count (25) and 25 lines of 12 values (x y z
  depthX depthY colorX colorY orientationW X Y Z trackingState). Bodies after the
  second are read and dropped; NaN becomes 0 (as `np.nan_to_num`); lines after the
  last frame are ignored.

  Returns:
    float32 `[3, T, 25, 2]`; a body absent from a frame is 0.
  Raises:
    BadExample: an unreadable, truncated or malformed file (names the line).
  """
  path = pathlib.Path(path)
  try:
    with open(path, "r", encoding="ascii") as f:
      lines = _Lines(f, path)
      num_frames = lines.count("the frame count")
      xyz = np.zeros((3, num_frames, JOINTS, BODIES), np.float32)
      for t in range(num_frames):
        for body in range(lines.count(f"the body count of frame {t}")):
          lines.numbers(f"10 body values (frame {t}, body {body})", 10)
          joints = lines.count(f"the joint count (frame {t}, body {body})")
          if joints != JOINTS:
            raise BadExample(os.fspath(path), f"line {lines.n}: {joints} joints (frame {t}, "
                                              f"body {body}), expected {JOINTS}")
          for j in range(JOINTS):
            values = lines.numbers(f"12 joint values (frame {t}, body {body}, joint {j})", 12)
            if body < BODIES:
              xyz[:, t, j, body] = values[:3]
  except (OSError, UnicodeDecodeError) as e:
    raise BadExample(os.fspath(path), f"unreadable ({e})") from e
  return np.nan_to_num(xyz)


def centre_skeleton(xyz: np.ndarray) -> np.ndarray:
  """The release's centring: joint 1 of body 0 subtracted from every joint of every body.

  Args:
    xyz: `[3, T, 25, M]`.
  Returns:
    `[3, T, 25, M]`, the same dtype: `xyz[:, t, j, m] - xyz[:, t, 1, 0]` (an absent
    body slot, 0, becomes minus the origin, as in the release).
  """
  return xyz - xyz[:, :, 1:2, 0:1]


def interpole(x: np.ndarray, length: int) -> np.ndarray:
  """Time resized as the release's `interpole`: PyTorch bilinear, align_corners=False.

  Output step d reads the input at s = max((d + 0.5) T / length - 0.5, 0) and mixes
  frames floor(s) and min(floor(s) + 1, T - 1) with weights 1 - (s - floor(s)) and
  s - floor(s), in float32 as PyTorch does on float32.

  Args:
    x: `[C, T, V, M]`, T >= 1.
    length: the output length.
  Returns:
    float32 `[C, length, V, M]`.
  """
  x = np.asarray(x, np.float32)
  t = x.shape[1]
  scale = np.float32(t) / np.float32(length)
  src = scale * (np.arange(length, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
  src = np.maximum(src, np.float32(0))
  i0 = np.minimum(src.astype(np.int64), t - 1)
  i1 = np.minimum(i0 + 1, t - 1)
  w1 = (src - i0.astype(np.float32))[None, :, None, None]
  return ((np.float32(1) - w1) * x[:, i0] + w1 * x[:, i1]).astype(np.float32)


def skeleton_crop(num_frames: int, p: float, u: float) -> tuple[int, int]:
  """`AugCrop`'s skeleton crop: `(start, length)`.

  Args:
    num_frames: T.
    p: the kept fraction, in [0.5, 1).
    u: in [0, 1), picks the start uniformly among the T - length + 1 possible.
  Returns:
    length `min(max(floor(T p), 64), T)` and a start in `[0, T - length]`.
  """
  length = min(max(int(math.floor(num_frames * p)), MIN_SKELETON_CROP), num_frames)
  return min(int(u * (num_frames - length + 1)), num_frames - length), length


# ------------------------------------------------------------------ videos

def release_frame_indices(num_frames: int, ratio: float | None = None) -> np.ndarray:
  """The frames the release's `load_video` + (`AugCrop`) + `NormalizeLen` give the network.

  Args:
    num_frames: N, the video header's frame count.
    ratio: `AugCrop`'s ratio in (0.5, 1], or None (validation and test).
  Returns:
    int64 `[8]`: the frame index of each frame, -1 where the frame is blank (zeros;
    e.g. `[0, 5, 10, 15, 22, 27, 33, -1]` for N = 40).
  """
  taken = np.linspace(0, num_frames, RELEASE_SLOTS).astype(int)
  filled = np.unique(taken[taken < num_frames])            # read in frame order
  slots = np.full(RELEASE_SLOTS, -1, np.int64)
  slots[:filled.size] = filled
  if ratio is not None:
    begin = (RELEASE_SLOTS - int(RELEASE_SLOTS * ratio)) // 2
    slots = slots[begin:RELEASE_SLOTS - begin]
  return slots[np.linspace(0, slots.size - 1, VIDEO_FRAMES).astype(int)]


def even_frame_indices(num_frames: int, ratio: float | None = None) -> np.ndarray:
  """8 real frames evenly spaced, `round(linspace(begin, N - 1 - begin, 8))`.

  Args:
    num_frames: N >= 1.
    ratio: a view's crop ratio in (0.5, 1] (begin `(N - int(N ratio)) // 2`), or None
      (begin 0).
  Returns:
    int64 `[8]` frame indices in `[0, N)`.
  """
  begin = 0 if ratio is None else (num_frames - int(num_frames * ratio)) // 2
  return np.round(np.linspace(begin, num_frames - 1 - begin, VIDEO_FRAMES)).astype(np.int64)


def _frame_count(container, stream) -> int:
  """The header's frame count, as cv2's CAP_PROP_FRAME_COUNT: nb_frames, else
  round(duration x frame rate)."""
  if stream.frames:
    return int(stream.frames)
  seconds = container.duration / 1e6 if container.duration else 0.0
  if seconds <= 0 and stream.duration and stream.time_base:
    seconds = float(stream.duration * stream.time_base)
  rate = stream.guessed_rate or stream.average_rate
  return int(math.floor(seconds * float(rate) + 0.5)) if rate else 0


def read_video(path: str | os.PathLike, fidelity: str = "paper", ratio: float | None = None,
               size: int = FRAME_SIZE) -> np.ndarray:
  """8 frames of a video, BGR, `size` x `size`, decoded only up to the last one needed.

  Args:
    path: the video file.
    fidelity: `reference` (`release_frame_indices`) or `paper` (`even_frame_indices`).
    ratio: a view's crop ratio (see the module docstring), None for view 0.
    size: the frame side; other sizes are resized (swscale bicubic, aspect squashed).
  Returns:
    uint8 `[8, size, size, 3]`, BGR; a blank frame (reference) is 0.
  Raises:
    BadExample: unreadable, no video stream, no frames, or fewer frames than the header says.
  """
  import av                                    # only the NTU reader needs PyAV
  path = os.fspath(path)
  try:
    with av.open(path) as container:
      if not container.streams.video:
        raise BadExample(path, "no video stream")
      stream = container.streams.video[0]
      stream.thread_type = "AUTO"
      num_frames = _frame_count(container, stream)
      if num_frames <= 0:
        raise BadExample(path, "the video has no frames (header frame count 0)")
      index = (release_frame_indices(num_frames, ratio) if fidelity == "reference"
               else even_frame_indices(num_frames, ratio))
      wanted = set(int(i) for i in index if i >= 0)
      last = max(wanted)
      frames: dict[int, np.ndarray] = {}
      decoded = 0
      for k, frame in enumerate(container.decode(stream)):
        decoded = k + 1
        if k in wanted:
          if (frame.width, frame.height) != (size, size):
            frame = frame.reformat(width=size, height=size, interpolation="BICUBIC")
          frames[k] = frame.to_ndarray(format="bgr24")
        if k >= last:
          break
  except av.FFmpegError as e:
    raise BadExample(path, f"cannot decode ({e})") from e
  if last not in frames:
    raise BadExample(path, f"only {decoded} frame(s) decode, the header says {num_frames} "
                           f"(frame {last} is needed)")
  out = np.zeros((VIDEO_FRAMES, size, size, 3), np.uint8)
  for slot, i in enumerate(index):
    if i >= 0:
      out[slot] = frames[int(i)]
  return out


# ------------------------------------------------------------------ samples and splits

@dataclasses.dataclass(frozen=True)
class Sample:
  """One sample: its name, subject, label (A - 1), and its two files (None if absent)."""
  name: str
  subject: int
  label: int
  video: pathlib.Path | None
  skeleton: pathlib.Path | None

  @property
  def key(self) -> tuple[int, ...]:
    """The name's five numbers (setup, camera, subject, replication, action)."""
    return tuple(int(v) for v in NAME.fullmatch(self.name).groups())


class NtuSplit:
  """The samples of some subjects, read one example at a time.

  `Video` is uint8 `[8, 256, 256, 3]` BGR (0..255; the backbone normalises),
  `Skeleton` float32 `[3, 32, 25, 2]` (centred); labels are ints in `[0, 60)`.
  """

  def __init__(self, samples: Sequence[Sample], video_dir: pathlib.Path,
               skeleton_dir: pathlib.Path, fidelity: str = "paper", size: int = FRAME_SIZE):
    self.samples = list(samples)
    self.video_dir, self.skeleton_dir = video_dir, skeleton_dir
    self.fidelity, self.size = fidelity, int(size)
    self.labels = np.asarray([s.label for s in self.samples], np.int64)

  def __len__(self) -> int:
    return len(self.samples)

  @property
  def names(self) -> list[str]:
    return [s.name for s in self.samples]

  def file(self, i: int) -> str:
    s = self.samples[i]
    return f"{self._video_path(s)} + {self._skeleton_path(s)}"

  def _video_path(self, s: Sample) -> pathlib.Path:
    return s.video or self.video_dir / f"{s.name}{VIDEO_SUFFIX}"

  def _skeleton_path(self, s: Sample) -> pathlib.Path:
    return s.skeleton or self.skeleton_dir / f"{s.name}{SKELETON_SUFFIX}"

  def example(self, i: int, modalities: Sequence[str] = MODALITIES, view: int = 0) -> Example:
    """Example `i` with the named modalities' inputs.

    Args:
      i: the sample's index in this split.
      modalities: a subset of `('Video', 'Skeleton')`.
      view: 0 for the deterministic (validation/test) input; k >= 1 for the k-th
        training view (the release's `AugCrop`), the same every time it is read.
    Raises:
      BadExample: a sample missing its video or skeleton (names the missing file), or
        a file that cannot be read.
    """
    s = self.samples[i]
    for path, kind, other in ((s.video, "video", s.skeleton), (s.skeleton, "skeleton", s.video)):
      if path is None:
        missing = (self._video_path(s) if kind == "video" else self._skeleton_path(s))
        raise BadExample(os.fspath(missing), f"sample {s.name} has no {kind} file (only "
                                             f"{other})")
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown:
      raise DataError(f"NTU RGB+D has modalities {MODALITIES}, not {unknown}")
    ratio = p = u = None
    if view:
      rng = np.random.default_rng((*s.key, int(view)))
      ratio = 1.0 - 0.5 * rng.random()          # in (0.5, 1]
      p = 0.5 + 0.5 * rng.random()              # in [0.5, 1)
      u = rng.random()
    inputs = {}
    if "Video" in modalities:
      inputs["Video"] = read_video(s.video, self.fidelity, ratio, self.size)
    if "Skeleton" in modalities:
      xyz = read_skeleton(s.skeleton)
      if xyz.shape[1] == 0:
        raise BadExample(os.fspath(s.skeleton), "line 1: the skeleton has 0 frames")
      xyz = centre_skeleton(xyz)
      if view:
        start, length = skeleton_crop(xyz.shape[1], p, u)
        xyz = xyz[:, start:start + length]
      inputs["Skeleton"] = interpole(xyz, SKELETON_FRAMES)
    return Example(inputs, s.label)

  def __getitem__(self, i: int) -> Example:
    return self.example(i)


# ------------------------------------------------------------------ listing

def _list(folder: pathlib.Path, suffix: str, h) -> dict[str, pathlib.Path]:
  """name -> file for the files of `folder` ending in `suffix`; their names, sizes and
  modification times go into the hash `h`."""
  found = {}
  with os.scandir(folder) as it:
    entries = sorted((e for e in it if e.name.endswith(suffix)), key=lambda e: e.name)
  for e in entries:
    name = e.name[:-len(suffix)]
    if not NAME.fullmatch(name):
      raise DataError(f"{folder / e.name}: not an NTU RGB+D sample name "
                      f"(SsssCcccPpppRrrrAaaa{suffix})")
    label = int(name[17:20])
    if not 1 <= label <= NUM_CLASSES:
      raise DataError(f"{folder / e.name}: action A{label:03d} is not one of NTU RGB+D's "
                      f"A001..A{NUM_CLASSES:03d} (an NTU RGB+D 120 sample?)")
    st = e.stat()
    h.update(f"{e.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    found[name] = pathlib.Path(e.path)
  return found


def _exclusions(spec: str, root: pathlib.Path) -> tuple[pathlib.Path | None, set[str]]:
  """The sample names the file `config.data.exclude_list` names (one a line; blank lines
  and lines starting with '#' skipped; a `.skeleton` or `_rgb.avi` suffix allowed)."""
  if not spec:
    return None, set()
  path = pathlib.Path(spec).expanduser()
  if not path.is_absolute():
    path = root / path if (root / path).is_file() else path
  if not path.is_file():
    raise ConfigError(f"config.data.exclude_list={spec!r}: {path.absolute()} is not a file "
                      f"(a relative path is looked up in config.data.root, then here)")
  names = set()
  for n, line in enumerate(path.read_text().splitlines(), 1):
    name = line.strip()
    if not name or name.startswith("#"):
      continue
    for suffix in (SKELETON_SUFFIX, VIDEO_SUFFIX):
      name = name[:-len(suffix)] if name.endswith(suffix) else name
    if not NAME.fullmatch(name):
      raise DataError(f"{path}: line {n}: {line.strip()[:60]!r} is not an NTU RGB+D sample "
                      f"name (SsssCcccPpppRrrrAaaa)")
    names.add(name)
  return path.absolute(), names


def _subjects(config) -> dict[str, tuple[int, ...]]:
  """Subjects per split: `config.data.subjects` if given, else `SPLITS[config.data.split]`."""
  given = config.data.get("subjects", None)
  if given:
    given = dict(given)
    if not {"train", "val", "test"} <= set(given):
      raise ConfigError(f"config.data.subjects has keys {sorted(given)}; give 'train', 'val' "
                        f"and 'test' (and any further training splits)")
    key, subjects = "config.data.subjects", {k: tuple(int(v) for v in given[k]) for k in given}
  else:
    split = str(config.data.get("split", "search"))
    if split not in SPLITS:
      raise ConfigError(f"config.data.split={split!r}; valid: {', '.join(SPLITS)}")
    key, subjects = f"config.data.split={split!r}", SPLITS[split]
  for name, values in subjects.items():
    if not values or any(not 1 <= v <= 40 for v in values):
      raise ConfigError(f"{key}: {name} subjects {values} must be a non-empty list of 1..40")
  for a, b in itertools.combinations(sorted(subjects), 2):
    both = sorted(set(subjects[a]) & set(subjects[b]))
    if both:
      raise ConfigError(f"{key}: subjects {both} are in both {a} and {b}")
  return subjects


def _video_dir(root: pathlib.Path, spec: str) -> pathlib.Path:
  if spec:
    path = pathlib.Path(spec).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.is_dir():
      raise DataError(f"{path}: not a folder (config.data.video_folder={spec!r})")
    return path
  for name in (REENCODED_VIDEO_DIR, VIDEO_DIR):
    if (root / name).is_dir():
      return root / name
  raise DataError(f"{root}: holds neither {REENCODED_VIDEO_DIR}/ nor {VIDEO_DIR}/ "
                  f"(config.data.root)")


def get_dataset(config) -> Dataset:
  """NTU RGB+D from `config.data.root` (`config.data.source='ntu'`).

  Keys:
    config.data.root: the folder with `nturgb+d_skeletons/` and the videos.
    config.data.video_folder: '' (default) takes `nturgb+d_rgb_256x256_30/` (the
      release's re-encoding) when present, else `nturgb+d_rgb/` (the originals,
      resized when read); or a folder, relative to the root or absolute.
    config.data.split: which subjects form train / val / test:
      `search` (default; the release's search, its 'train_exp' 1, 8, 15, 17, 19, 27,
      31, 35 / 'dev' 2, 5, 9, 14 / 'test' 3, 6, 7, 10, 11, 12, 20, 21, 22, 23, 24, 26,
      29, 30, 32, 33, 36, 37, 39, 40, plus a split `retrain` with the rest of the
      release's retraining subjects, 4, 13, 16, 18, 25, 28, 34, 38: train + val +
      retrain is its 'train_val', the 20 cross-subject training subjects, so one run
      searches and retrains as the release does, with config.evaluate.train_splits =
      ('train', 'val', 'retrain')); `evaluate` (train = the release's 'train' 1, 4,
      8, 13, 15, 16, 17, 18, 19, 25, 27, 28, 31, 34, 35, 38 and val = 'dev': train +
      val is 'train_val'; test the same); `paper_search` (the paper's text, which
      conflicts with the release's code: search training on 1, 4, 8, 13, 15, 17, 19;
      val and test as `search`).
    config.data.subjects: optional `{'train': [...], 'val': [...], 'test': [...]}` (and
      any further training splits), overriding `split`.
    config.data.exclude_list: optional text file of sample names to leave out (e.g.
      the dataset's list of 302 samples with missing skeletons), one a line.
    config.data.frame_size: the frame side (default 256).
    config.fidelity: `reference` samples video frames as the release (8th frame
      blank in view 0); otherwise 8 real frames evenly (module docstring).

  Returns:
    Modalities `Video` (uint8 `[8, 256, 256, 3]` BGR) and `Skeleton` (float32
    `[3, 32, 25, 2]`), 60 classes; each split ordered by sample name, read lazily.
  """
  root_spec = str(config.data.get("root", "") or "")
  if not root_spec:
    raise ConfigError(f"config.data.root is empty: set it to the folder holding "
                      f"{SKELETON_DIR}/ and {VIDEO_DIR}/ (or {REENCODED_VIDEO_DIR}/)")
  root = pathlib.Path(root_spec).expanduser().absolute()
  skeleton_dir = root / SKELETON_DIR
  if not skeleton_dir.is_dir():
    raise DataError(f"{skeleton_dir}: not found (config.data.root={root_spec!r} must hold "
                    f"{SKELETON_DIR}/)")
  video_dir = _video_dir(root, str(config.data.get("video_folder", "") or ""))
  fidelity = str(config.get("fidelity", "paper"))
  if fidelity not in FIDELITIES:
    raise ConfigError(f"config.fidelity={fidelity!r}; valid: {', '.join(FIDELITIES)}")
  size = config.data.get("frame_size", FRAME_SIZE)
  if not isinstance(size, int) or isinstance(size, bool) or size < 1:
    raise ConfigError(f"config.data.frame_size={size!r} must be a positive int")
  subjects = _subjects(config)
  exclude_path, excluded = _exclusions(str(config.data.get("exclude_list", "") or ""), root)

  h = hashlib.sha256()
  videos = _list(video_dir, VIDEO_SUFFIX, h)
  skeletons = _list(skeleton_dir, SKELETON_SUFFIX, h)
  names = sorted((set(videos) | set(skeletons)) - excluded)
  splits = {}
  for split, subs in subjects.items():
    chosen = [n for n in names if int(n[9:12]) in subs]
    samples = [Sample(n, int(n[9:12]), int(n[17:20]) - 1, videos.get(n), skeletons.get(n))
               for n in chosen]
    splits[split] = NtuSplit(samples, video_dir, skeleton_dir, fidelity, size)
  fingerprint: dict[str, Any] = {
      "files": "sha256:" + h.hexdigest(), "video_dir": os.fspath(video_dir),
      "skeleton_dir": os.fspath(skeleton_dir), "subjects": subjects, "fidelity": fidelity,
      "frame_size": size, "excluded": sorted(excluded),
      "exclude_list": os.fspath(exclude_path) if exclude_path else ""}
  return Dataset(splits, NUM_CLASSES, "single", CLASS_NAMES,
                 fingerprint=json.dumps(fingerprint, sort_keys=True),
                 description=f"NTU RGB+D 60 cross-subject ({video_dir.name}, "
                             f"{'/'.join(str(len(s)) for s in splits.values())} "
                             f"train/val/test)")


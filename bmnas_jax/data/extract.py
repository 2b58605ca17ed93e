"""Feature extraction: backbone taps pooled to fixed `[C_in, L_in]`, gathered into a FeatureSet."""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bmnas_jax.data.backbones import fixed_batches
from bmnas_jax.data.feature_set import SPLITS, FeatureSet, NodeSpec, Split


def adaptive_bins(size: int, out: int) -> list[tuple[int, int]]:
  """The `[start, end)` input ranges of `out` adaptive-pooling bins over `size` positions.

  Bin i covers `[floor(i * size / out), ceil((i + 1) * size / out))`, as in
  PyTorch's adaptive pooling: bins may overlap when `out` does not divide
  `size`, and every bin holds at least one position.
  """
  return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def adaptive_max_pool(x: jax.Array, grid: int) -> jax.Array:
  """Adaptive spatial max-pooling of an image tap to a `grid x grid` grid.

  Args:
    x: `[n, H, W, C]`.
    grid: p, the pooled grid side.

  Returns:
    `[n, C, p * p]`: position `l = i * p + j` is the maximum over row bin i
    (top to bottom) and column bin j (left to right), i.e. the grid flattened
    row-major.
  """
  _, h, w, _ = x.shape
  cells = [jnp.max(x[:, r0:r1, c0:c1, :], axis=(1, 2))
           for r0, r1 in adaptive_bins(h, grid) for c0, c1 in adaptive_bins(w, grid)]
  return jnp.stack(cells, axis=-1)


def pool_tap(x: jax.Array, grid: int) -> jax.Array:
  """One tap to `[n, C_in, L_in]`.

  Args:
    x: an image tap `[n, H, W, C]` (pooled by `adaptive_max_pool`, L_in =
      grid * grid) or a vector tap `[n, C]` (L_in = 1).
    grid: p for image taps.

  Returns:
    `[n, C, L_in]`.
  """
  if x.ndim == 4:
    return adaptive_max_pool(x, grid)
  if x.ndim == 2:
    return x[:, :, None]
  raise ValueError(f"a tap must be an image [n, H, W, C] or a vector [n, C], got shape "
                   f"{x.shape}")


def pooled_shape(tap_shape: Sequence[int], grid: int) -> tuple[int, int]:
  """`(C_in, L_in)` of a tap whose per-example shape is `[H, W, C]` or `[C]`."""
  if len(tap_shape) == 3:
    return int(tap_shape[-1]), grid * grid
  if len(tap_shape) == 1:
    return int(tap_shape[0]), 1
  raise ValueError(f"a tap must be [H, W, C] or [C] per example, got {list(tap_shape)}")


@functools.lru_cache(maxsize=16)
def _extract_fn(module: nn.Module, grid: int) -> Callable:
  """Compiled `(params, x [b, ...]) -> (logits [b, K], {tap: [b, C_in, L_in]})`."""

  @jax.jit
  def fn(params, x):
    logits, taps = module.apply({"params": params}, x)
    return logits, {k: pool_tap(v, grid) for k, v in taps.items()}

  return fn


def run_backbone(module: nn.Module, params, inputs: np.ndarray, grid: int,
                 batch_size: int = 500) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Runs a backbone over `inputs` in fixed-size batches (one compiled shape).

  Args:
    module: the backbone.
    params: its `params`.
    inputs: float32 `[n, *input_shape]`.
    grid: p, the pooled grid side of image taps.
    batch_size: examples per call; the last batch is zero-padded.

  Returns:
    `(logits float32 [n, K], {tap: float32 [n, C_in, L_in]})`, taps in the
    backbone's order.
  """
  fn = _extract_fn(module, int(grid))
  inputs = np.asarray(inputs, np.float32)
  logits, taps = [], []
  for batch, size in fixed_batches(inputs, batch_size):
    out_logits, out_taps = jax.device_get(fn(params, batch))
    logits.append(out_logits[:size])
    taps.append({k: v[:size] for k, v in out_taps.items()})
  return (np.concatenate(logits),
          {k: np.concatenate([t[k] for t in taps]) for k in taps[0]})


def extract_features(backbones: Mapping[str, tuple[nn.Module, Any]],
                     inputs: Mapping[str, Mapping[str, np.ndarray]],
                     labels: Mapping[str, np.ndarray], num_classes: int,
                     class_names: Sequence[str] = (), grid: int = 2,
                     batch_size: int = 500) -> tuple[FeatureSet, dict[str, dict[str, float]]]:
  """Pooled taps of every backbone over every split, as a FeatureSet.

  Nodes are `<Modality>_<k>`, k from 1 in tap order, modalities in the order
  of `backbones`; each holds float32 `[n, C_in, L_in]` (see `pool_tap`).

  Args:
    backbones: modality -> `(module, params)`.
    inputs: modality -> split -> the backbone's input `[n, *input_shape]`;
      every modality has the same splits with the same rows.
    labels: split -> int `[n]` class ids.
    num_classes: K.
    class_names: names of the K classes.
    grid: p, the pooled grid side of image taps (L_in = p * p).
    batch_size: examples per compiled call.

  Returns:
    `(feature_set, accuracy)`: a single-label FeatureSet, and modality ->
    split -> the backbone's own (unimodal) accuracy from its logits.
  """
  splits = [s for s in SPLITS if s in labels]
  nodes, features, acc = [], {s: {} for s in splits}, {}
  for modality, (module, params) in backbones.items():
    if modality not in inputs:
      raise ValueError(f"no inputs for modality {modality!r}; have {sorted(inputs)}")
    acc[modality] = {}
    for split in splits:
      if split not in inputs[modality]:
        raise ValueError(f"modality {modality!r} has no inputs for split {split!r}")
      x = inputs[modality][split]
      y = np.asarray(labels[split])
      if x.shape[0] != y.shape[0]:
        raise ValueError(f"modality {modality!r} split {split!r}: {x.shape[0]} inputs but "
                         f"{y.shape[0]} labels")
      logits, taps = run_backbone(module, params, x, grid, batch_size)
      acc[modality][split] = float(np.mean(np.argmax(logits, -1) == y))
      for k, value in enumerate(taps.values()):
        features[split][f"{modality}_{k + 1}"] = value
    for k, value in enumerate(taps.values()):
      nodes.append(NodeSpec(f"{modality}_{k + 1}", modality, int(value.shape[1]),
                            int(value.shape[2])))
  fs = FeatureSet(nodes=tuple(nodes),
                  splits={s: Split(features[s], np.asarray(labels[s])) for s in splits},
                  label_kind="single", num_classes=int(num_classes),
                  class_names=tuple(class_names))
  fs.validate("extracted features")
  return fs, acc

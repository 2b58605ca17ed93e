"""Feature extraction: a backbone's taps over a batch of raw inputs, pooled to `[C_in, L_in]`."""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np

from bmnas_jax.data.backbones import fixed_batches
from bmnas_jax.data.pooling import pool_tap

# (tap name, L_in, pool mode) per stored feature of a modality, in node order.
TapSpec = tuple[tuple[str, int, str], ...]


@functools.lru_cache(maxsize=32)
def extraction_fn(module: nn.Module, taps: TapSpec) -> Callable:
  """Compiled `(variables, x [b, ...]) -> (logits [b, K] or None, [[b, C_in, L_in], ...])`,
  one pooled array per entry of `taps`, in that order."""

  @jax.jit
  def fn(variables, x):
    logits, out = module.apply(variables, x, train=False)
    return logits, [pool_tap(out[name], length, mode) for name, length, mode in taps]

  return fn


def extract(module: nn.Module, variables, taps: TapSpec, inputs: np.ndarray,
            batch_size: int) -> tuple[np.ndarray | None, list[np.ndarray]]:
  """Runs one backbone over `inputs` in fixed-size batches (one compiled shape).

  Args:
    module, variables: the backbone.
    taps: which taps to keep and how to pool them.
    inputs: `[m, *input_shape]`, any numeric dtype (the backbone casts).
    batch_size: examples per call; the last batch is zero-padded.

  Returns:
    `(logits float32 [m, K] or None, [float32 [m, C_in, L_in] per tap])`.
  """
  fn = extraction_fn(module, tuple(taps))
  logits, feats = [], []
  for batch, size in fixed_batches(np.asarray(inputs), batch_size):
    out_logits, out_feats = jax.device_get(fn(variables, batch))
    logits.append(None if out_logits is None else np.asarray(out_logits[:size], np.float32))
    feats.append([np.asarray(f[:size], np.float32) for f in out_feats])
  return (None if logits[0] is None else np.concatenate(logits),
          [np.concatenate([f[k] for f in feats]) for k in range(len(taps))])


def extract_all(backbones: Mapping[str, tuple[nn.Module, Any, TapSpec]],
                inputs: Mapping[str, np.ndarray], node_names: Mapping[str, Sequence[str]],
                batch_size: int) -> tuple[dict[str, np.ndarray | None], dict[str, np.ndarray]]:
  """Every modality's backbone over its inputs.

  Args:
    backbones: modality -> `(module, variables, taps)`.
    inputs: modality -> `[m, ...]` raw inputs of the same m examples.
    node_names: modality -> the node name of each tap, in tap order.

  Returns:
    `({modality: logits [m, K] or None}, {node: float32 [m, C_in, L_in]})`.
  """
  logits, features = {}, {}
  for modality, (module, variables, taps) in backbones.items():
    logits[modality], feats = extract(module, variables, taps, inputs[modality], batch_size)
    features.update(zip(node_names[modality], feats))
  return logits, features

"""Adaptive max pooling of backbone taps of any rank to the stored `[C_in, L_in]`.

A tap is channels-last, `[n, C]`, `[n, T, C]`, `[n, H, W, C]` or `[n, T, H, W, C]`.
Two modes, both with PyTorch's adaptive-pooling bins (bin i of `out` over `size`
positions covers `[floor(i * size / out), ceil((i + 1) * size / out))`, so the
stored features equal what the original release's reshape layers compute):

- `first` (the release's `ReshapeInputLayer`, NTU and EgoGesture): the first axis
  after the batch (time for video taps) is pooled to L_in and every further
  non-channel axis is max-reduced. A vector tap is one position, repeated L_in
  times.
- `grid` (the release's `ReshapeInputLayer_MMIMDB`): an `[H, W]` tap is pooled to
  a g x g grid with g = sqrt(L_in), flattened row-major (position `i * g + j`).
  A vector tap is one cell, repeated.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

POOL_MODES = ("first", "grid")


def adaptive_bins(size: int, out: int) -> list[tuple[int, int]]:
  """The `[start, end)` input ranges of `out` adaptive-pooling bins over `size` positions.

  Bin i covers `[floor(i * size / out), ceil((i + 1) * size / out))`, as in
  PyTorch's adaptive pooling: bins may overlap when `out` does not divide
  `size`, every bin holds at least one position, and `out > size` repeats
  positions.
  """
  return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def _pool_axis(x: jax.Array, axis: int, out: int) -> jax.Array:
  """Adaptive max pooling of one axis of `x` to `out` positions."""
  size = x.shape[axis]
  if size == out:
    return x
  parts = [jnp.max(jax.lax.slice_in_dim(x, a, b, axis=axis), axis=axis, keepdims=True)
           for a, b in adaptive_bins(size, out)]
  return jnp.concatenate(parts, axis=axis)


def check_tap(tap_shape: Sequence[int], length: int, mode: str) -> tuple[int, int]:
  """`(C_in, L_in)` of a tap with per-example shape `tap_shape` (channels last).

  Raises:
    ValueError: an unknown mode, L_in < 1, a tap that the mode cannot pool
      (the caller adds the config key).
  """
  if mode not in POOL_MODES:
    raise ValueError(f"pool mode {mode!r}; valid: {', '.join(POOL_MODES)}")
  if not isinstance(length, int) or length < 1:
    raise ValueError(f"L_in={length!r} must be a positive int")
  if len(tap_shape) < 1:
    raise ValueError("a tap must have a channel axis, got a scalar per example")
  if mode == "grid":
    g = math.isqrt(length)
    if g * g != length:
      raise ValueError(f"grid pooling needs a square L_in (g x g), got L_in={length}")
    if len(tap_shape) not in (1, 3):
      raise ValueError(f"grid pooling takes taps [H, W, C] or [C] per example, got "
                       f"{list(tap_shape)}; use pool 'first' for [T, C] and [T, H, W, C]")
  return int(tap_shape[-1]), int(length)


def pool_tap(x: jax.Array, length: int, mode: str) -> jax.Array:
  """One tap to `[n, C_in, L_in]`.

  Args:
    x: `[n, *positions, C]` (channels last; `positions` may be empty).
    length: L_in.
    mode: `first` or `grid` (see the module docstring).

  Returns:
    float32 `[n, C, L_in]`.
  """
  check_tap(x.shape[1:], length, mode)
  x = jnp.asarray(x, jnp.float32)
  if mode == "first":
    if x.ndim == 2:
      x = x[:, None, :]
    if x.ndim > 3:
      x = jnp.max(x, axis=tuple(range(2, x.ndim - 1)))
    x = _pool_axis(x, 1, length)                                   # [n, L, C]
  else:
    g = math.isqrt(length)
    if x.ndim == 2:
      x = x[:, None, None, :]
    x = _pool_axis(_pool_axis(x, 1, g), 2, g)                       # [n, g, g, C]
    x = x.reshape(x.shape[0], g * g, x.shape[-1])
  return jnp.transpose(x, (0, 2, 1))

"""Input reshape layers: pooled features `[N, C_in, L_in]` -> channels-last states `[N, L, C]`."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bmnas_jax import layers


def resize_nearest(x: jax.Array, length: int, axis: int = -1) -> jax.Array:
  """Nearest-neighbour resize of one axis (PyTorch `F.interpolate` default).

  Args: x with L_in positions on `axis` (`[N, C, L_in]` by default). Returns x with
  `length` there, position i taken from floor(i * L_in / length).
  """
  l_in = x.shape[axis]
  if l_in == length:
    return x
  idx = np.floor(np.arange(length) * (l_in / length)).astype(np.int32)
  return jnp.take(x, jnp.asarray(np.minimum(idx, l_in - 1)), axis=axis)


class ReshapeInput(nn.Module):
  """Resize to L, 1x1 conv C_in -> C, BatchNorm, ReLU, Dropout.

  Spatial pooling happens at extraction (the shards hold `[C_in, L_in]`); this
  is the learned part. Args: x `[N, C_in, L_in]` (as stored). Returns `[N, L, C]`.
  `fidelity` picks the BatchNorm's running-variance rule (`layers.batch_norm`).
  """
  C: int
  L: int
  dropout: float = 0.0
  fidelity: str = "paper"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    # A 1x1 conv commutes with the resize: convolve the shorter of the two lengths
    # (a vector stored once, L_in = 1, is convolved once, then repeated).
    x = jnp.swapaxes(x, 1, 2)                                  # [N, L_in, C_in]
    conv = layers.PointwiseConv(self.C, name="conv", transposed_input=True)
    if x.shape[1] < self.L:
      x = resize_nearest(conv(x), self.L, axis=1)
    else:
      x = conv(resize_nearest(x, self.L, axis=1))
    x = layers.batch_norm(train, name="bn", fidelity=self.fidelity)(x)
    x = nn.relu(x)
    return layers.Dropout(self.dropout, deterministic=not train)(x)

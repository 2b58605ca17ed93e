"""Small Flax backbones for the three kinds of input: each returns (logits, taps)."""

import flax.linen as nn
import jax


class TinyVideoNet(nn.Module):
  """[T, H, W, C] clips: two 3D conv blocks; taps `block1` [T, H/2, W/2, 8],
  `block2` [T, H/4, W/4, 16] and the pooled `vector` [16]."""
  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    h, taps = x, {}
    for k, width in enumerate((8, 16)):
      h = nn.relu(nn.Conv(width, (3, 3, 3), padding="SAME")(h))
      h = nn.max_pool(h, (1, 2, 2), strides=(1, 2, 2))
      taps[f"block{k + 1}"] = h
    taps["vector"] = h.mean(axis=(1, 2, 3))
    return nn.Dense(self.num_classes)(taps["vector"]), taps


class TinySeqNet(nn.Module):
  """[T, C] sequences: two 1D conv layers over time; taps `conv1` [T, 16], `conv2` [T, 16]."""
  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    h, taps = x, {}
    for k in range(2):
      h = nn.relu(nn.Conv(16, (5,), padding="SAME")(h))
      taps[f"conv{k + 1}"] = h
    return nn.Dense(self.num_classes)(h.mean(axis=1)), taps


class TinyMLP(nn.Module):
  """[D] vectors: one hidden layer; tap `hidden` [32]."""
  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    h = nn.relu(nn.Dense(32)(x))
    return nn.Dense(self.num_classes)(h), {"hidden": h}

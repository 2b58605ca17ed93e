"""VGG19 convolutional features (torchvision cfg 'E'), the MM-IMDB image backbone."""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bmnas_jax.data import torch_import

# Convs per block in torchvision's VGG19 (cfg 'E'); each block ends with a 2x2 max-pool.
BLOCK_CONVS = (2, 2, 4, 4, 4)


def torch_layers(widths: tuple[int, ...] = (64, 128, 256, 512, 512)) -> list[tuple[int, str, int]]:
  """torchvision's `features` as `(index, tap name, width)`, one per conv and pool.

  Index i is the conv's position in `features` (its ReLU is i + 1); a pool's tap is
  named `pool{b}` and its width is the block's.
  """
  layers, i = [], 0
  for b, (convs, width) in enumerate(zip(BLOCK_CONVS, widths), start=1):
    for k in range(1, convs + 1):
      layers.append((i, f"relu{b}_{k}", width))
      i += 2
    layers.append((i, f"pool{b}", width))
    i += 1
  return layers


class VGG19(nn.Module):
  """torchvision VGG19 `features`: 16 convs 3x3 (padding 1, bias) + ReLU, 5 max-pools 2x2.

  Conv `features.{i}` of the torch model is the submodule `features_{i}`. No classifier:
  logits are None.

  Taps, float32 channels last: `relu{b}_{k}` (block b from 1, conv k from 1, after its
  ReLU) `[n, H / 2^(b-1), W / 2^(b-1), C_b]` and `pool{b}` `[n, H / 2^b, W / 2^b, C_b]`
  (floored, as torch). The release's MM-IMDB taps are relu4_1, relu4_4, relu5_3 and pool5.
  """
  widths: tuple[int, ...] = (64, 128, 256, 512, 512)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    """Args: x: `[n, 3, H, W]` NCHW, any numeric dtype. Returns: None, taps."""
    del train
    if len(self.widths) != len(BLOCK_CONVS):
      raise ValueError(f"VGG19.widths={self.widths!r}: needs {len(BLOCK_CONVS)} block widths")
    if x.ndim != 4:
      raise ValueError(f"VGG19 expects [n, C, H, W] images, got shape {x.shape}")
    h = jnp.transpose(jnp.asarray(x, jnp.float32), (0, 2, 3, 1))
    taps = {}
    for index, name, width in torch_layers(self.widths):
      if name.startswith("pool"):
        h = nn.max_pool(h, (2, 2), strides=(2, 2), padding="VALID")
      else:
        h = nn.relu(nn.Conv(width, (3, 3), padding=((1, 1), (1, 1)),
                            name=f"features_{index}")(h))
      taps[name] = h
    return None, taps

  @staticmethod
  def variables_from_torch(state_dict: Mapping[str, np.ndarray], like: Mapping[str, Any],
                           source: str = "<state dict>") -> dict[str, Any]:
    """Variables from a torchvision VGG19 state dict (e.g. `vgg19-dcbb9e9d.pth`).

    Maps `features.{i}.weight|bias` onto `features_{i}`; `classifier.*` is ignored.
    A missing, extra or mis-shaped key (other widths) raises a DataError listing it.
    """
    rules = [(f"features_{i}", f"features.{i}", "conv")
             for i, name, _ in torch_layers() if name.startswith("relu")]
    return torch_import.to_variables(state_dict, rules, like, ignore=("classifier.",),
                                     source=source)

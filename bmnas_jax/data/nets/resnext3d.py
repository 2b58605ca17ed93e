"""The release's 3-D ResNeXt-101 (Real-time-GesRec's), the EgoGesture RGB and depth backbone."""

from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bmnas_jax.data import torch_import
from bmnas_jax.layers import TorchBatchNorm
from bmnas_jax.data.nets.resnet3d import block_rules

EXPANSION = 2          # ResNeXtBottleneck.expansion: a block's output has 2 x its mid width
# The release's first convs (models/central/ego.py, `modify_kernels`): name -> (input
# channels, kernel, padding); both have 64 filters, stride (1, 2, 2) and no bias.
#   rgb: `_modify_first_conv_layer(model, 3, 3)`, Conv3d(3, 64, (3, 7, 7), padding (1, 3, 3)).
#   depth: `_construct_depth_model`, the base Conv3d(1, 64, 7, padding 3) (kernel 7 x 7 x 7).
STEMS: dict[str, tuple[int, tuple[int, int, int], tuple[int, int, int]]] = {
    "rgb": (3, (3, 7, 7), (1, 3, 3)),
    "depth": (1, (7, 7, 7), (3, 3, 3)),
}
# The EgoGesture loaders' `Normalize(opt.mean, [1, 1, 1])` on 0-255 frames (`norm_value`
# 1): the RGB mean, and for depth (one 'L' channel, so only the first entry applies).
RGB_MEAN = (114.7748, 107.7354, 99.475)
DEPTH_MEAN = (114.7748,)


def _conv(features: int, kernel: tuple[int, int, int], stride: int | tuple[int, int, int],
          padding: tuple[int, int, int], name: str, groups: int = 1) -> nn.Conv:
  """A bias-free 3-D conv with torch's explicit symmetric zero padding per axis."""
  stride = (stride,) * 3 if isinstance(stride, int) else stride
  return nn.Conv(features, kernel, strides=stride, padding=tuple((p, p) for p in padding),
                 feature_group_count=groups, use_bias=False, name=name)


class ResNeXtBottleneck3D(nn.Module):
  """The release's ResNeXtBottleneck: conv 1x1x1 to `mid` (`conv1`) -> BN -> ReLU ->
  conv 3x3x3 stride s padding 1 in `cardinality` groups (`conv2`) -> BN -> ReLU ->
  conv 1x1x1 to 2 x mid (`conv3`) -> BN, plus the shortcut, then ReLU. No conv has a bias.

  The stride s acts on time, height and width alike. The shortcut is the input, or with
  `downsample` (shortcut type B) a conv 1x1x1 stride s (`downsample_0`) + BN
  (`downsample_1`), torch's `downsample.0`/`.1`.
  """
  mid: int
  cardinality: int
  stride: int = 1
  downsample: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Args: x: `[n, T, H, W, C]`. Returns: `[n, T/s, H/s, W/s, 2 mid]` (each rounded up)."""
    out = self.mid * EXPANSION
    h = _conv(self.mid, (1, 1, 1), 1, (0, 0, 0), "conv1")(x)
    h = nn.relu(TorchBatchNorm(name="bn1")(h, train))
    h = _conv(self.mid, (3, 3, 3), self.stride, (1, 1, 1), "conv2", self.cardinality)(h)
    h = nn.relu(TorchBatchNorm(name="bn2")(h, train))
    h = _conv(out, (1, 1, 1), 1, (0, 0, 0), "conv3")(h)
    h = TorchBatchNorm(name="bn3")(h, train)
    residual = x
    if self.downsample:
      residual = _conv(out, (1, 1, 1), self.stride, (0, 0, 0), "downsample_0")(x)
      residual = TorchBatchNorm(name="downsample_1")(residual, train)
    return nn.relu(h + residual)


def pool_window(sample_duration: int, sample_size: int) -> tuple[int, int, int]:
  """The release's `AvgPool3d` kernel: `(ceil(sample_duration / 16), ceil(sample_size / 32)`
  twice); (2, 4, 4) for its 32 frames of 112 x 112."""
  return (math.ceil(sample_duration / 16), math.ceil(sample_size / 32),
          math.ceil(sample_size / 32))


class ResNeXt3D(nn.Module):
  """The release's `ResNeXt` (models/central/ego.py) with an RGB or depth first conv.

  Stem: conv (`conv1`, `stem_width` filters, kernel and padding per `STEMS[stem]`, stride
  (1, 2, 2), no bias) -> BN (`bn1`) -> ReLU -> max-pool 3x3x3 stride 2 padding 1 (time
  is halved too). Then four stages `layer{i}` of `blocks[i]` ResNeXtBottleneck3D blocks
  (`layer{i}_{j}`, torch's `layer{i}.{j}`) with mid width `widths[i]` in `cardinality`
  groups and output 2 x widths[i]; stages 2-4 stride 2 (time, height, width) in their
  first block. A block has the downsample shortcut when it strides or its input width
  differs from its output (so every stage's first block, at the release's widths). Then
  `pooled` (the release's AvgPool3d, see `__call__`) and `fc` (linear to `num_classes`).

  The release sets mid = cardinality x int(planes / 32) and output 2 x planes for planes
  128, 256, 512, 1024; with its cardinality 32 mid = planes, which is how `widths` is
  read here for any cardinality (smaller test nets give mid widths directly).

  BatchNorm is `TorchBatchNorm`: running stats with `train=False` (the release keeps the
  backbones in eval mode); batch stats (updates with `mutable=['batch_stats']`) with
  `train=True`.

  Taps, float32 channels last, for clips `[n, T, H, W, C]` (each stride-2 step rounds
  up, so T' = ceil(T / 2^k)):
    layer1 `[n, T/2, H/4, W/4, 2 w0]`, layer2 `[n, T/4, H/8, W/8, 2 w1]`,
    layer3 `[n, T/8, H/16, W/16, 2 w2]`, layer4 `[n, T/16, H/32, W/32, 2 w3]`: the
      stages' outputs (the release's forward returns x2, x3, x4 = layer2..4);
    pooled `[n, 2 w3]`: the release's x5, its AvgPool3d output `[n, C, 1, 1, 1]`.
  At the release's size (32 frames of 112 x 112): layer2 [8, 14, 14, 512], layer3
  [4, 7, 7, 1024], layer4 [2, 4, 4, 2048], pooled [2048]; BM-NAS uses layer2, layer3,
  layer4 and pooled of each modality.
  """
  blocks: tuple[int, ...] = (3, 4, 23, 3)
  cardinality: int = 32
  widths: tuple[int, ...] = (128, 256, 512, 1024)
  stem: str = "rgb"
  stem_width: int = 64
  num_classes: int = 83
  # The release's `sample_duration` and `sample_size`, from which it builds its AvgPool3d
  # (`pool_window`); 32 frames of 112 x 112 for both EgoGesture checkpoints.
  sample_duration: int = 32
  sample_size: int = 112
  # Input normalisation `(x * scale - mean[c]) / std[c]` by channel (none when `mean` is
  # empty; std 1 when `std` is empty). The release subtracts the mean in its data loader
  # (`RGB_MEAN`, `DEPTH_MEAN` on 0-255 values, std 1), so a dataset giving raw uint8
  # clips sets `mean` to one of those.
  scale: float = 1.0
  mean: tuple[float, ...] = ()
  std: tuple[float, ...] = ()

  def _check(self, x: jax.Array) -> None:
    if self.stem not in STEMS:
      raise ValueError(f"ResNeXt3D: stem={self.stem!r}; valid stems: {', '.join(STEMS)}")
    if len(self.widths) != 4 or len(self.blocks) != 4 or min(self.blocks) < 1:
      raise ValueError(f"ResNeXt3D: widths={self.widths!r} and blocks={self.blocks!r} need "
                       "4 entries each, blocks at least 1")
    if self.cardinality < 1 or any(w % self.cardinality for w in self.widths):
      raise ValueError(f"ResNeXt3D: widths={self.widths!r} must be multiples of "
                       f"cardinality={self.cardinality} (the grouped conv2)")
    channels = STEMS[self.stem][0]
    if x.ndim != 5 or x.shape[-1] != channels:
      raise ValueError(f"ResNeXt3D(stem={self.stem!r}) expects clips [n, T, H, W, {channels}], "
                       f"got shape {x.shape}")
    for what, values in (("mean", self.mean), ("std", self.std)):
      if values and len(values) != channels:
        raise ValueError(f"ResNeXt3D(stem={self.stem!r}): {what}={values!r} needs {channels} "
                         "entries (one per channel) or none")
    if self.std and not self.mean:
      raise ValueError("ResNeXt3D: std is given without mean")

  def pool(self, layer4: jax.Array) -> jax.Array:
    """The release's `AvgPool3d(pool_window(...), stride=1)` + `view(n, -1)` on layer4.

    The release builds the kernel from `sample_duration` and `sample_size` and feeds the
    flattened result to `fc` (2 x widths[3] inputs), so it works only when the kernel
    fits layer4 exactly once: a map of exactly the kernel's size, when the pool is the
    mean over every position. Clips of T frames of H x W give that map for any T, H, W
    with ceil(T / 16), ceil(H / 32), ceil(W / 32) equal to the kernel (17-32 frames of
    97-128 pixels for the release's (2, 4, 4)). A larger map gives several windows (the
    release's fc fails on the longer vector), a smaller one none (its pool fails).

    Args:
      layer4: `[n, T, H, W, C]`.
    Returns:
      `[n, C]`.
    Raises:
      ValueError: the map differs from the kernel.
    """
    window = pool_window(self.sample_duration, self.sample_size)
    if tuple(layer4.shape[1:4]) != window:
      t, h, w = layer4.shape[1:4]
      raise ValueError(
          f"ResNeXt3D: layer4's map is {t} x {h} x {w} (T x H x W), but the release's "
          f"AvgPool3d({window}, stride 1) for sample_duration={self.sample_duration}, "
          f"sample_size={self.sample_size} gives one vector per clip only on a map of "
          f"exactly that size: clips whose ceil(T / 16), ceil(H / 32), ceil(W / 32) are "
          f"{window} (set sample_duration and sample_size to the clip's size)")
    return jnp.mean(layer4, axis=(1, 2, 3))

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    """Args: x: `[n, T, H, W, C]` clips, C = 3 (rgb) or 1 (depth), channels last (the
    release's model takes `[n, C, T, H, W]`); any numeric dtype, cast to float32, then
    normalised as the fields say.
    Returns: logits `[n, num_classes]`, taps."""
    self._check(x)
    h = jnp.asarray(x, jnp.float32)
    if self.mean:
      std = self.std or (1.0,) * len(self.mean)
      h = (h * self.scale - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    _, kernel, padding = STEMS[self.stem]
    h = _conv(self.stem_width, kernel, (1, 2, 2), padding, "conv1")(h)
    h = nn.relu(TorchBatchNorm(name="bn1")(h, train))
    h = nn.max_pool(h, (3, 3, 3), strides=(2, 2, 2), padding=((1, 1),) * 3)
    taps = {}
    channels = self.stem_width
    for i, (mid, count) in enumerate(zip(self.widths, self.blocks), start=1):
      for j in range(count):
        stride = 2 if i > 1 and j == 0 else 1
        h = ResNeXtBottleneck3D(mid, self.cardinality, stride,
                                downsample=stride != 1 or channels != mid * EXPANSION,
                                name=f"layer{i}_{j}")(h, train)
        channels = mid * EXPANSION
      taps[f"layer{i}"] = h
    taps["pooled"] = self.pool(h)
    logits = nn.Dense(self.num_classes, name="fc")(taps["pooled"])
    return logits, taps

  @staticmethod
  def variables_from_torch(state_dict: Mapping[str, np.ndarray], like: Mapping[str, Any],
                           source: str = "<state dict>") -> dict[str, Any]:
    """Variables from the release's ResNeXt state dict (either stem, e.g.
    `egogesture_resnext_1.0x_RGB_32_acc_94.01245.pth` or `..._Depth_32_acc_93.61060.pth`).

    Maps `conv1` (3-D, OIDHW -> DHWIO), `bn1`, `layer{i}.{j}.conv{k}` / `.bn{k}` /
    `.downsample.{0,1}` (conv2's grouped weight `[O, I / groups, 3, 3, 3]` becomes the
    Flax kernel `[3, 3, 3, I / groups, O]` by the same transpose) and `fc`, for the blocks
    that `like` (the module's abstract variables) has. A missing, extra or mis-shaped key
    (e.g. an RGB checkpoint for the depth stem) raises a DataError listing it.
    """
    rules = [("conv1", "conv1", "conv"), ("bn1", "bn1", "bn"),
             ("fc", "fc", "linear")] + block_rules(like["params"])
    return torch_import.to_variables(state_dict, rules, like, source=source)

"""The release's ResNet-50 inflated to 3-D (I3D-R50), the NTU RGB+D video backbone."""

from __future__ import annotations

import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bmnas_jax.data import torch_import
from bmnas_jax.layers import TorchBatchNorm

EXPANSION = 4          # Bottleneck3D.expansion: a block's output has 4 x its base width
POOL_WINDOW = 7        # the release's AvgPool3d((8, 7, 7)): 7 x 7 in space, all 8 frames
_BLOCK = re.compile(r"layer([1-9])_(\d+)")


def _conv(features: int, kernel: tuple[int, ...], stride: tuple[int, ...], pad: int,
          name: str) -> nn.Conv:
  """A bias-free conv with torch's explicit symmetric zero padding `pad` on every axis."""
  return nn.Conv(features, kernel, strides=stride, padding=((pad, pad),) * len(kernel),
                 use_bias=False, name=name)


class Bottleneck3D(nn.Module):
  """The release's Bottleneck3D: conv 1x1x1 (`conv1`) -> BN -> ReLU -> conv 3x3x3
  stride (1, s, s) padding 1 (`conv2`) -> BN -> ReLU -> conv 1x1x1 to 4 x planes
  (`conv3`) -> BN, plus the shortcut, then ReLU. No conv has a bias.

  The shortcut is the input, or with `downsample` a conv 1x1x1 stride (1, s, s)
  (`downsample_0`) + BN (`downsample_1`), torch's `downsample.0`/`.1`.
  """
  planes: int
  stride: int = 1
  downsample: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Args: x: `[n, T, H, W, C]`. Returns: `[n, T, H / s, W / s, 4 planes]` (ceil)."""
    s = (1, self.stride, self.stride)
    h = _conv(self.planes, (1, 1, 1), (1, 1, 1), 0, "conv1")(x)
    h = nn.relu(TorchBatchNorm(name="bn1")(h, train))
    h = _conv(self.planes, (3, 3, 3), s, 1, "conv2")(h)
    h = nn.relu(TorchBatchNorm(name="bn2")(h, train))
    h = _conv(self.planes * EXPANSION, (1, 1, 1), (1, 1, 1), 0, "conv3")(h)
    h = TorchBatchNorm(name="bn3")(h, train)
    residual = x
    if self.downsample:
      residual = _conv(self.planes * EXPANSION, (1, 1, 1), s, 0, "downsample_0")(x)
      residual = TorchBatchNorm(name="downsample_1")(residual, train)
    return nn.relu(h + residual)


def pool_window(layer4: jax.Array) -> jax.Array:
  """The release's `AvgPool3d((8, 7, 7))` + `view(B, 2048)` on layer4, for any frame count.

  The mean over all T frames and the top-left 7 x 7 positions: `layer4[:, :, :7, :7]`.
  The release pools with kernel = stride = (8, 7, 7), valid, and then views the result
  as one vector per clip, which works only when that gives one window: an 8-frame map
  7 to 13 positions high and wide, of which only the window at the origin counts (its
  256 x 256 frames give 8 x 8: the last row and column are dropped). Here the temporal
  window is the whole clip (T = 8 is the release's), so reduced test clips work too.

  Args:
    layer4: `[n, T, H, W, C]`, 7 <= H, W <= 13.
  Returns:
    `[n, C]`.
  Raises:
    ValueError: H or W outside 7..13 (the release's pooling fails there too).
  """
  _, _, h, w, _ = layer4.shape
  if not (POOL_WINDOW <= h < 2 * POOL_WINDOW and POOL_WINDOW <= w < 2 * POOL_WINDOW):
    raise ValueError(
        f"InflatedResNet50: layer4's map is {h} x {w}; the release's AvgPool3d((T, 7, 7)) "
        f"gives one vector per clip only for maps {POOL_WINDOW}..{2 * POOL_WINDOW - 1} "
        f"high and wide (frames of 193..416 pixels; 256 x 256 gives 8 x 8)")
  return jnp.mean(layer4[:, :, :POOL_WINDOW, :POOL_WINDOW, :], axis=(1, 2, 3))


class InflatedResNet50(nn.Module):
  """The release's `Visual`: ResNet-50 inflated to 3-D (`cnn`) + temporal pooling + linear.

  Stem, per frame: conv 7x7 stride 2 padding 3 (`conv1`, 2-D, no bias) -> BN (`bn1`)
  -> ReLU -> max-pool 3x3 stride 2 padding 1. Then four stages `layer{i}` of
  `blocks[i]` Bottleneck3D blocks (`layer{i}_{j}`, torch's `cnn.layer{i}.{j}`) of base
  width `widths[i]` (output 4 x widths[i]); stage i > 1 has spatial stride 2 in its
  first block, nothing is strided in time, and every stage's first block has the
  downsample shortcut (the release builds one whenever the stride is a tuple, i.e.
  always). The stem has `widths[0]` channels (the release's `inplanes` = 64). Then
  `pooled` (`pool_window`) and `classifier` (linear to `num_classes`).

  BatchNorm is `TorchBatchNorm`: running stats with `train=False`; batch stats (and
  running-stat updates, `mutable=['batch_stats']`) with `train=True`.

  Taps, float32 channels last, for clips `[n, T, H, W, 3]` (H, W multiples of 32;
  else each stride-2 step rounds up):
    layer1 `[n, T, H/4, W/4, 4 w0]`, layer2 `[n, T, H/8, W/8, 4 w1]`,
    layer3 `[n, T, H/16, W/16, 4 w2]`, layer4 `[n, T, H/32, W/32, 4 w3]`: the release's
      `get_feature_maps` outputs (after each stage's last ReLU);
    pooled `[n, 4 w3]`: the release's `temporal_pooling` output (`out_5`).
  At the release's size (8 frames of 256 x 256, widths 64..512): layer2 [8, 32, 32, 512],
  layer3 [8, 16, 16, 1024], layer4 [8, 8, 8, 2048], pooled [2048]; BM-NAS uses layer2,
  layer3, layer4 and pooled.
  """
  widths: tuple[int, ...] = (64, 128, 256, 512)
  blocks: tuple[int, ...] = (3, 4, 6, 3)
  num_classes: int = 60
  # Input normalisation `(x * scale - mean[c]) / std[c]` by channel position (none when
  # `mean` is empty). The NTU reader gives uint8 BGR frames; the release divides by 255
  # and applies ImageNet's RGB mean/std to the B, G, R channels in that order (a blank
  # frame, zeros, becomes the constant -mean / std, as in the release).
  scale: float = 1.0
  mean: tuple[float, ...] = ()
  std: tuple[float, ...] = ()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    """Args: x: `[n, T, H, W, 3]` clips as the release's `Visual` takes them (channels
    last; any numeric dtype, cast to float32, then normalised as the fields say).
    Returns: logits `[n, num_classes]`, taps."""
    if len(self.widths) != 4 or len(self.blocks) != 4 or min(self.blocks) < 1:
      raise ValueError(f"InflatedResNet50: widths={self.widths!r} and blocks={self.blocks!r} "
                       "need 4 entries each, blocks at least 1")
    if x.ndim != 5:
      raise ValueError(f"InflatedResNet50 expects clips [n, T, H, W, C], got shape {x.shape}")
    n, t, height, width, c = x.shape
    h = jnp.asarray(x, jnp.float32)
    if self.mean:
      h = (h * self.scale - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std,
                                                                              jnp.float32)
    h = h.reshape(n * t, height, width, c)
    h = nn.Conv(self.widths[0], (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)),
                use_bias=False, name="conv1")(h)
    h = nn.relu(TorchBatchNorm(name="bn1")(h, train))
    h = nn.max_pool(h, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    h = h.reshape(n, t, *h.shape[1:])
    taps = {}
    for i, (planes, count) in enumerate(zip(self.widths, self.blocks), start=1):
      for j in range(count):
        h = Bottleneck3D(planes, stride=2 if i > 1 and j == 0 else 1, downsample=j == 0,
                         name=f"layer{i}_{j}")(h, train)
      taps[f"layer{i}"] = h
    taps["pooled"] = pool_window(h)
    logits = nn.Dense(self.num_classes, name="classifier")(taps["pooled"])
    return logits, taps

  @staticmethod
  def variables_from_torch(state_dict: Mapping[str, np.ndarray], like: Mapping[str, Any],
                           source: str = "<state dict>") -> dict[str, Any]:
    """Variables from the release's `Visual` state dict (`rgb_8frames_83.91.checkpoint`).

    Maps `cnn.conv1` (2-D, OIHW -> HWIO), `cnn.bn1`, `cnn.layer{i}.{j}.conv{k}` /
    `.bn{k}` / `.downsample.{0,1}` (3-D convs OIDHW -> DHWIO) and `classifier`, for the
    blocks that `like` (the module's abstract variables) has. A missing, extra or
    mis-shaped key raises a DataError listing it.
    """
    rules = [("conv1", "cnn.conv1", "conv"), ("bn1", "cnn.bn1", "bn"),
             ("classifier", "classifier", "linear")] + block_rules(like["params"], "cnn.")
    return torch_import.to_variables(state_dict, rules, like, source=source)


def block_rules(params: Mapping[str, Any], torch_prefix: str = "") -> list[tuple[str, str, str]]:
  """`torch_import` rules of the bottleneck blocks `layer{i}_{j}` in `params`: conv1..3,
  bn1..3 and the downsample conv + BN where a block has one, onto torch's
  `{torch_prefix}layer{i}.{j}.*` (shared by the 3D ResNet and ResNeXt)."""
  rules = []
  for name in params:
    match = _BLOCK.fullmatch(name)
    if not match:
      continue
    torch_name = f"{torch_prefix}layer{match[1]}.{match[2]}"
    for k in (1, 2, 3):
      rules += [(f"{name}/conv{k}", f"{torch_name}.conv{k}", "conv"),
                (f"{name}/bn{k}", f"{torch_name}.bn{k}", "bn")]
    if "downsample_0" in params[name]:
      rules += [(f"{name}/downsample_0", f"{torch_name}.downsample.0", "conv"),
                (f"{name}/downsample_1", f"{torch_name}.downsample.1", "bn")]
  return rules

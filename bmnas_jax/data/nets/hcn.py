"""The release's HCN (hierarchical co-occurrence network), the NTU RGB+D skeleton backbone."""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bmnas_jax.data import torch_import

# (Flax submodule, torch layer prefix); `fc*` are linear layers, the others 2-D convs.
TORCH_LAYERS = (("conv1", "conv1.0"), ("conv2", "conv2"), ("conv3", "conv3.0"),
                ("conv4", "conv4.0"), ("conv1m", "conv1m.0"), ("conv2m", "conv2m"),
                ("conv3m", "conv3m.0"), ("conv4m", "conv4m.0"), ("conv5", "conv5.0"),
                ("conv6", "conv6.0"), ("fc7", "fc7.0"), ("fc8", "fc8"))


def resize_time(x: jax.Array, size: int, axis: int) -> jax.Array:
  """Linear resampling of `axis` to `size` with PyTorch's `F.interpolate(mode='bilinear',
  align_corners=False)` rule: source position `(i + 0.5) * in / size - 0.5`, clamped at
  0, between neighbours (the last one repeated at the end)."""
  n_in = x.shape[axis]
  src = np.maximum((np.arange(size) + 0.5) * (n_in / size) - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int32), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  shape = [1] * x.ndim
  shape[axis] = size
  frac = jnp.asarray((src - lo).astype(np.float32).reshape(shape))
  return jnp.take(x, lo, axis=axis) * (1 - frac) + jnp.take(x, hi, axis=axis) * frac


def _pool(h: jax.Array) -> jax.Array:
  """torch's MaxPool2d(2): 2 x 2 windows, stride 2, odd remainders dropped."""
  return nn.max_pool(h, (2, 2), strides=(2, 2), padding="VALID")


def _conv(features: int, kernel: tuple[int, int], name: str) -> nn.Conv:
  """Conv2d with a bias and torch's 'same' padding for odd kernels (k // 2 each side)."""
  return nn.Conv(features, kernel, padding=tuple((k // 2, k // 2) for k in kernel), name=name)


def _stream(h: jax.Array, suffix: str, channels: int, window: int, drop2d: nn.Module
            ) -> jax.Array:
  """One of HCN's two streams (position: suffix '', motion: 'm') on `[b, T, V, C_in]`.

  conv1 1x1 -> ReLU -> conv2 (3, 1) to `window` channels -> swap joints and channels
  (torch's permute(0, 3, 2, 1): the joints become the channels, conv2's channels the
  second spatial axis) -> conv3 3x3 -> max-pool -> conv4 3x3 -> Dropout2d -> max-pool.
  Returns `[b, T / 4, window / 4, channels]`.
  """
  h = nn.relu(_conv(channels, (1, 1), f"conv1{suffix}")(h))
  h = _conv(window, (3, 1), f"conv2{suffix}")(h)
  h = jnp.swapaxes(h, 2, 3)
  h = _pool(_conv(channels // 2, (3, 3), f"conv3{suffix}")(h))
  return _pool(drop2d(_conv(channels, (3, 3), f"conv4{suffix}")(h)))


class HCN(nn.Module):
  """The release's `Skeleton` (HCN, Li et al. 2018) at its size, or smaller for tests.

  Per person, a position stream on the joints and a motion stream on their frame
  differences (T - 1 differences resized linearly back to T frames, as the release's
  `F.interpolate`), each `conv1`..`conv4` (motion: `conv1m`..`conv4m`); their outputs
  concatenated (position first) -> `conv5` 3x3 -> ReLU -> Dropout2d -> max-pool (none
  when window is 8) -> `conv6` 3x3 -> ReLU -> Dropout2d -> max-pool. The persons are
  merged by element-wise max, flattened in torch's NCHW order -> `fc7` -> ReLU ->
  dropout -> `fc8` to classes. `channels` is the release's `out_channel` (64): conv4
  has `channels`, conv5 2 x, conv6 4 x; `hidden` is fc7's width (the release's 512).

  Dropout (rate `dropout`, the release's `--drpt` default 0.2) is active only with
  `train=True` (rng 'dropout'); Dropout2d zeroes whole channels per example and
  person; on fc7's `[n, 512]` output the release's Dropout2d drops single values (there
  are no spatial axes to share a mask over), so plain dropout here.

  Taps, float32 channels last, spatial axes (time, conv2's channel axis) as torch's
  (H, W), each the max over the persons:
    conv5 `[n, window / 8, window / 8, 2 channels]` ([4, 4, 128] at the release's size;
      window / 4 for window 8),
    conv6 `[n, window / 16, window / 16, 4 channels]` ([2, 2, 256]),
    flat `[n, 4 channels (window / 16)^2]` ([1024]): conv6 flattened channel-major, as
      torch's `view(N, -1)` of NCHW (fc7's input),
    fc7 `[n, hidden]` ([512]): after its ReLU (and dropout).
  They are the release's `hidden[-4:]` (out5, out6, out7, out8), BM-NAS's skeleton nodes.
  """
  in_channels: int = 3
  joints: int = 25
  persons: int = 2
  window: int = 32
  channels: int = 64
  hidden: int = 512
  num_classes: int = 60
  dropout: float = 0.2

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    """Args: x: `[n, in_channels, window, joints, persons]` (torch's N, C, T, V, M), any
    numeric dtype. Returns: logits `[n, num_classes]`, taps."""
    want = (self.in_channels, self.window, self.joints, self.persons)
    if x.ndim != 5 or tuple(x.shape[1:]) != want:
      raise ValueError(f"HCN expects skeletons [n, C, T, V, M] = [n, {', '.join(map(str, want))}] "
                       f"(fields in_channels, window, joints, persons), got shape {x.shape}")
    n, c, t, v, m = x.shape
    x = jnp.asarray(x, jnp.float32)
    motion = resize_time(x[:, :, 1:] - x[:, :, :-1], t, axis=2)
    drop2d = nn.Dropout(self.dropout, broadcast_dims=(1, 2), deterministic=not train)

    def per_person(a):                       # [n, C, T, V, M] -> [n M, T, V, C]
      return jnp.transpose(a, (0, 4, 2, 3, 1)).reshape(n * m, t, v, c)

    h = jnp.concatenate([_stream(per_person(x), "", self.channels, self.window, drop2d),
                         _stream(per_person(motion), "m", self.channels, self.window, drop2d)],
                        axis=-1)
    h = drop2d(nn.relu(_conv(2 * self.channels, (3, 3), "conv5")(h)))
    out5 = h if self.window == 8 else _pool(h)
    out6 = _pool(drop2d(nn.relu(_conv(4 * self.channels, (3, 3), "conv6")(out5))))
    merge = lambda a: a.reshape(n, m, *a.shape[1:]).max(axis=1)
    conv5, conv6 = merge(out5), merge(out6)
    flat = jnp.transpose(conv6, (0, 3, 1, 2)).reshape(n, -1)
    fc7 = nn.relu(nn.Dense(self.hidden, name="fc7")(flat))
    fc7 = nn.Dropout(self.dropout, deterministic=not train)(fc7)
    logits = nn.Dense(self.num_classes, name="fc8")(fc7)
    return logits, {"conv5": conv5, "conv6": conv6, "flat": flat, "fc7": fc7}

  @staticmethod
  def variables_from_torch(state_dict: Mapping[str, np.ndarray], like: Mapping[str, Any],
                           source: str = "<state dict>") -> dict[str, Any]:
    """Variables from the release's `Skeleton` state dict
    (`skeleton_32frames_85.24.checkpoint`): `conv1.0`, `conv2`, `conv3.0`, `conv4.0`,
    their motion twins `conv1m.0` .. `conv4m.0`, `conv5.0`, `conv6.0` (OIHW -> HWIO),
    `fc7.0`, `fc8` (transposed). A missing, extra or mis-shaped key raises a DataError
    listing it."""
    rules = [(flax_name, torch_name, "linear" if flax_name.startswith("fc") else "conv")
             for flax_name, torch_name in TORCH_LAYERS]
    return torch_import.to_variables(state_dict, rules, like, source=source)

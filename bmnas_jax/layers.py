"""Shared building blocks on [N, C, L] tensors: 1x1 conv, BatchNorm, LayerNorm, Linear."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def torch_uniform(fan_in: int):
  """PyTorch's default Conv/Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class PointwiseConv(nn.Module):
  """1x1 Conv1d over channels: `[N, C_in, L] -> [N, features, L]` (with bias)."""
  features: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c_in = x.shape[1]
    kernel = self.param("kernel", torch_uniform(c_in), (c_in, self.features))
    # [N, L, C_in] @ [C_in, D]: one plain matmul (faster on CPU than contracting
    # the middle axis in place); the transposes are cheap next to it.
    y = jnp.swapaxes(jnp.swapaxes(x, 1, 2) @ kernel, 1, 2)
    if self.use_bias:
      bias = self.param("bias", torch_uniform(c_in), (self.features,))
      y = y + bias[None, :, None]
    return y


class Linear(nn.Module):
  """Dense layer with PyTorch's default init: `[N, D_in] -> [N, features]`."""
  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d_in = x.shape[-1]
    return nn.Dense(self.features, kernel_init=torch_uniform(d_in),
                    bias_init=torch_uniform(d_in))(x)


def _fmix32(x: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finalizer: a bijective avalanche mix of uint32."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def hash_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """uint32 `shape` pseudo-random bits: a counter hash of (key, element index).

  Each element depends only on the key and its own flat index, so the bits are
  the same however the array is sharded, and cost a few integer ops each (the
  threefry path is ~10x slower on CPU, and dropout masks need no more than this).
  """
  kd = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  kd = kd.reshape(-1).astype(jnp.uint32)
  idx = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
  return _fmix32(_fmix32(idx ^ kd[0]) + kd[-1] * jnp.uint32(0x9E3779B9))


class Dropout(nn.Module):
  """Inverted dropout with a counter-hash mask (`hash_bits`); rng stream 'dropout'."""
  rate: float
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    threshold = jnp.uint32(min(int(keep * 2.0**32), 2**32 - 1))
    mask = hash_bits(self.make_rng("dropout"), x.shape) < threshold
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


def batch_norm(train: bool, name: str | None = None) -> nn.BatchNorm:
  """BatchNorm1d over the channel axis of `[N, C, L]` (PyTorch momentum 0.1, eps 1e-5)."""
  return nn.BatchNorm(use_running_average=not train, axis=1, momentum=0.9,
                      epsilon=1e-5, name=name)


def layer_norm_cl(name: str | None = None) -> nn.LayerNorm:
  """LayerNorm over (C, L) of `[N, C, L]`, with a scale and bias per element."""
  return nn.LayerNorm(epsilon=1e-5, reduction_axes=(-2, -1), feature_axes=(-2, -1),
                      name=name)


class CellTail(nn.Module):
  """A Cell's output: concat of chosen steps (+ conv/BN/ReLU/dropout when more
  than one), plus the residual x, then LayerNorm over (C, L).

  Args: outs: list of `[N, C, L]` step outputs; x `[N, C, L]`. Returns `[N, C, L]`.
  """
  dropout: float = 0.0

  @nn.compact
  def __call__(self, outs, x, train: bool = False):
    c = x.shape[1]
    out = jnp.concatenate(outs, axis=1)
    if len(outs) > 1:
      out = PointwiseConv(c, name="out_conv")(out)
      out = batch_norm(train, name="out_bn")(out)
      out = nn.relu(out)
      out = Dropout(self.dropout, deterministic=not train)(out)
    return layer_norm_cl(name="ln")(out + x)


class FusionHead(nn.Module):
  """Concat of the fused states -> LayerNorm -> ReLU -> flatten -> Linear.

  Args: states: list of `[N, C, L]`. Returns logits `[N, num_classes]`.
  """
  num_classes: int

  @nn.compact
  def __call__(self, states):
    out = jnp.concatenate(states, axis=1)
    out = nn.relu(layer_norm_cl(name="ln")(out))
    return Linear(self.num_classes, name="classifier")(out.reshape(out.shape[0], -1))

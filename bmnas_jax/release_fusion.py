"""The original release's whole-Cell fusions of the Table 7 ablation, on (x, y) `[N, L, C]`.

In the release a Table 7 strategy replaces the whole fused Cell (its inner steps
and its tail: no residual, no LayerNorm over (C, L)); the Cell's inputs, the
reshape layers and the head stay as the genotype says. The layers are the
release's step ops (`ops`, `reference` fidelity: attention with Dropout(0.1) and
LayerNorm([C, L]), BatchNorm with PyTorch's running statistics). Submodules are
named after the release's attributes.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from bmnas_jax import layers, ops


def _check(x: jax.Array, y: jax.Array) -> None:
  if x.ndim != 3 or x.shape != y.shape:
    raise ValueError(f"fusion inputs must both be [N, L, C], got {x.shape} and {y.shape}")


def _conv_bn_relu(out: jax.Array, c: int, dropout: float, train: bool) -> jax.Array:
  """Conv1d(C_in -> c, 1x1) `conv`, BatchNorm(c) `bn`, ReLU, Dropout: `[N, L, C_in] -> [N, L, c]`.

  Called inside a compact method: the layers belong to the calling module.
  """
  out = layers.PointwiseConv(c, name="conv")(out)
  out = layers.batch_norm(train, name="bn", fidelity="reference")(out)
  out = nn.relu(out)
  return layers.Dropout(dropout, deterministic=not train)(out)


class SumFusion(nn.Module):
  """DARTS' summation (release `Found_DARTS_FusionNode`): x + y, no weights.

  Args (call): x, y `[N, L, C]`. Returns `[N, L, C]`.
  """
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array, train: bool = False) -> jax.Array:
    del train
    _check(x, y)
    return x + y


class ConcatFCFusion(nn.Module):
  """MFAS' concatenation + FC (release `Found_MFAS_FusionNode`).

  concat(x, y) over channels `[N, L, 2C]` -> Conv1d(2C -> C) `conv` -> BatchNorm(C)
  `bn` -> ReLU -> Dropout. Args (call): x, y `[N, L, C]`. Returns `[N, L, C]`.
  """
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array, train: bool = False) -> jax.Array:
    _check(x, y)
    return _conv_bn_relu(jnp.concatenate([x, y], axis=-1), x.shape[-1], self.dropout, train)


class MHAFusion(nn.Module):
  """Multi-head attention as the release builds it (`Found_TwoHeadAttn_FusionNode`).

  Each of `heads` heads (`scale_dot_attn1`, `scale_dot_attn2`, ...) is the
  release's ScaledDotAttn on (x, y): softmax(x^T y / sqrt(C)) applied to y, then
  Dropout(0.1) and its own LayerNorm([C, L]); there are no query/key/value
  projections, so the heads differ only by their LayerNorm affines (and dropout
  masks). The heads are concatenated over channels `[N, L, heads*C]` and projected
  back by Conv1d(heads*C -> C) `conv` -> BatchNorm(C) `bn` -> ReLU -> Dropout. The
  release uses two heads.

  Args (call): x, y `[N, L, C]`. Returns `[N, L, C]`.
  """
  dropout: float = 0.0
  heads: int = 2

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array, train: bool = False) -> jax.Array:
    _check(x, y)
    outs = [ops.ScaleDotAttn("reference", name=f"scale_dot_attn{h + 1}")(x, y, train)
            for h in range(self.heads)]
    return _conv_bn_relu(jnp.concatenate(outs, axis=-1), x.shape[-1], self.dropout, train)


class AoAFusion(nn.Module):
  """Attention on attention (release `Found_AOA_FusionNode`).

  v = ScaledDotAttn(x, y) `scale_dot_attn` (attention, Dropout(0.1), LayerNorm([C, L]));
  then the release's LinearGLU on (x, v) `cat_conv_glu`: z = BatchNorm(2C)(Conv1d(2C
  -> 2C)(concat(x, v))), out = Dropout(z[..., :C] * sigmoid(z[..., C:])), i.e. AoA's
  information i = W_i[x; v] + b_i gated by sigmoid(W_g[x; v] + b_g), with BatchNorm.

  Args (call): x, y `[N, L, C]`. Returns `[N, L, C]`.
  """
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array, train: bool = False) -> jax.Array:
    _check(x, y)
    v = ops.ScaleDotAttn("reference", name="scale_dot_attn")(x, y, train)
    return ops.LinearGLU("reference", self.dropout, name="cat_conv_glu")(x, v, train)


RELEASE_FUSIONS: dict[str, Callable[..., nn.Module]] = {
    "Sum": SumFusion,
    "ConcatFC": ConcatFCFusion,
    "MHA": MHAFusion,
    "AoA": AoAFusion,
}


def make_fusion(fusion: str, dropout: float = 0.0, name: str | None = None) -> nn.Module:
  """Builds a release whole-Cell fusion by name; an unknown name lists the valid ones."""
  if fusion not in RELEASE_FUSIONS:
    raise KeyError(f"unknown fusion {fusion!r}; valid: {', '.join(RELEASE_FUSIONS)}")
  return RELEASE_FUSIONS[fusion](dropout, name=name)

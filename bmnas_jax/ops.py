"""Primitive fusion operations on (x, y) -> z, all channels-last `[N, L, C]`, and their registry."""

from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from bmnas_jax import layers

FIDELITIES = ("paper", "reference")
EDGE_OPS = ("Zero", "Identity")          # upper-level and inner edges (alpha, beta)
IDENTITY = EDGE_OPS.index("Identity")
STEP_OPS = ("Sum", "ScaleDotAttn", "LinearGLU", "ConcatFC")
REFERENCE_ATTN_DROPOUT = 0.1             # fixed in the original release


def check_fidelity(fidelity: str) -> str:
  if fidelity not in FIDELITIES:
    raise ValueError(f"unknown fidelity {fidelity!r}; valid: {', '.join(FIDELITIES)}")
  return fidelity


def step_op_pool(fidelity: str) -> tuple[str, ...]:
  """The ops mixed by gamma at an inner step.

  The paper's pool (Eq. 4-8) contains Zero; the original release mixes only the
  four non-Zero ops. Zero is never chosen at derivation (it is never a step op of
  a genotype).
  """
  return ("Zero",) + STEP_OPS if check_fidelity(fidelity) == "paper" else STEP_OPS


@jax.custom_vjp
def scaled_dot_attention(x: jax.Array, y: jax.Array) -> jax.Array:
  """softmax(x^T y / sqrt(C)) applied to y (paper Eq. 6).

  Queries come from x's L positions, keys and values from y's; channels are the
  embedding. Args: x, y `[N, L, C]`. Returns `[N, L, C]`.

  The gradient is written out (the same values as JAX's own to rounding): y's two
  terms as one batched product `[p; ds]^T @ [g; x]`, each product with its operands
  in the layout the CPU's matmul reads directly (XLA's own form of these small
  batched products ran several times slower).
  """
  return _attention_fwd(x, y)[0]


def _attention_fwd(x, y):
  scores = jnp.einsum("nqc,nkc->nqk", x, y) * (1 / math.sqrt(x.shape[-1]))  # [N, Lq, Lk]
  p = jax.nn.softmax(scores, axis=-1)
  return p @ y, (x, y, p)


def _attention_bwd(res, g):
  x, y, p = res
  dp = jnp.einsum("nqc,nkc->nqk", g, y)
  ds = p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True)) * (1 / math.sqrt(x.shape[-1]))
  pt = jnp.swapaxes(jnp.concatenate([p, ds], axis=1), 1, 2)         # [N, Lk, 2 Lq]
  return ds @ y, pt @ jnp.concatenate([g, x], axis=1)


scaled_dot_attention.defvjp(_attention_fwd, _attention_bwd)


class Zero(nn.Module):
  """Zero(x, y) = 0 (paper Eq. 4)."""
  @nn.compact
  def __call__(self, x, y, train: bool = False):
    del y, train
    return jnp.zeros_like(x)


class Sum(nn.Module):
  """Sum(x, y) = x + y (paper Eq. 5)."""
  @nn.compact
  def __call__(self, x, y, train: bool = False):
    del train
    return x + y


class ScaleDotAttn(nn.Module):
  """Attention(x, y) (Eq. 6); `reference` adds Dropout(0.1) and LayerNorm([C, L])."""
  fidelity: str = "paper"

  @nn.compact
  def __call__(self, x, y, train: bool = False):
    out = scaled_dot_attention(x, y)
    if self.fidelity == "reference":
      out = layers.Dropout(REFERENCE_ATTN_DROPOUT, deterministic=not train)(out)
      out = layers.layer_norm_cl(name="ln")(out)
    return out


class LinearGLU(nn.Module):
  """Paper Eq. 7: (x W1) * sigmoid(y W2) over channels, W1, W2 `[C, C]`.

  `reference`: Conv1d(2C -> 2C) on concat(x, y), BatchNorm(2C) (PyTorch's
  unbiased running variance), GLU over channels, Dropout.
  """
  fidelity: str = "paper"
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, y, train: bool = False):
    c = x.shape[-1]
    if self.fidelity == "paper":
      a = layers.PointwiseConv(c, use_bias=False, name="w1")(x)
      b = layers.PointwiseConv(c, use_bias=False, name="w2")(y)
      return a * jax.nn.sigmoid(b)
    out = layers.PointwiseConv(2 * c, name="conv")(x, y)
    out = layers.batch_norm(train, name="bn", fidelity=self.fidelity)(out)
    out = layers.glu(out)
    return layers.Dropout(self.dropout, deterministic=not train)(out)


class ConcatFC(nn.Module):
  """Paper Eq. 8: ReLU(concat(x, y) W + b), 2C -> C.

  `reference`: Conv1d(2C -> C), BatchNorm(C) (PyTorch's unbiased running
  variance), ReLU, Dropout.
  """
  fidelity: str = "paper"
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, y, train: bool = False):
    c = x.shape[-1]
    out = layers.PointwiseConv(c, name="conv")(x, y)
    if self.fidelity == "reference":
      out = layers.batch_norm(train, name="bn", fidelity=self.fidelity)(out)
      out = nn.relu(out)
      return layers.Dropout(self.dropout, deterministic=not train)(out)
    return nn.relu(out)


_OPS: dict[str, Callable[..., nn.Module]] = {
    "Zero": lambda fidelity, dropout, name: Zero(name=name),
    "Sum": lambda fidelity, dropout, name: Sum(name=name),
    "ScaleDotAttn": lambda fidelity, dropout, name: ScaleDotAttn(fidelity, name=name),
    "LinearGLU": lambda fidelity, dropout, name: LinearGLU(fidelity, dropout, name=name),
    "ConcatFC": lambda fidelity, dropout, name: ConcatFC(fidelity, dropout, name=name),
}


def make_op(op: str, fidelity: str = "paper", dropout: float = 0.0,
            name: str | None = None) -> nn.Module:
  """Builds a primitive op by name; unknown names list the valid ones."""
  check_fidelity(fidelity)
  if op not in _OPS:
    raise KeyError(f"unknown op {op!r}; valid ops: {', '.join(_OPS)}")
  return _OPS[op](fidelity, dropout, name)

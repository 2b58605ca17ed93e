"""Shared building blocks on channels-last `[N, L, C]` tensors: 1x1 conv, BatchNorm,
LayerNorm, Linear.

Inside the fusion network a state of C channels at L positions is stored `[N, L, C]`
(channels minor): a 1x1 convolution is then one plain `[N*L, C_in] @ [C_in, D]`
product with no transposes around it, on CPU and on accelerators alike. Parameters
keep the release's shapes (LayerNorm `[C, L]`, the classifier's `(C, L)` flattening).

`materialize_grad`, `matmul`, `glu`, `batch_norm_rows` and `scale_shift` have custom
gradients: the same values as JAX's own, computed in a form XLA runs faster on CPU (each
says why; measured in the README's Performance section).
"""

from __future__ import annotations

import functools
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


@jax.custom_vjp
def materialize_grad(x: jax.Array) -> jax.Array:
  """The identity; its gradient is computed once, into a buffer of its own.

  A search Cell's mixed states are read by several candidate ops and their gradients
  summed; XLA's CPU fusion otherwise recomputes such a shared gradient inside each
  fusion that consumes it (on the search step pair at the MM-IMDB shape, about a
  seventh of its time); here it is written once (`_written_once`) and read by each.
  """
  return x


def _materialize_fwd(x):
  return x, None


def _materialize_bwd(_, g):
  return (_written_once(g),)


def _written_once(g: jax.Array) -> jax.Array:
  """`g`, through a loop XLA cannot count (its trip count is 0 for any data): XLA
  writes `g` once into the loop's buffer instead of recomputing it in each reader.
  On CPU only: an accelerator's XLA fuses differently, and there a loop of unknown
  trip count costs a round trip to the host."""
  if jax.default_backend() != "cpu":
    return g
  start = jnp.isnan(g.ravel()[0]).astype(jnp.int32)            # 0 or 1: never < 0
  _, g = jax.lax.while_loop(lambda c: c[0] < 0, lambda c: (c[0] + 1, 2 * c[1]), (start, g))
  return g


materialize_grad.defvjp(_materialize_fwd, _materialize_bwd)


class PointwiseConv(nn.Module):
  """1x1 Conv1d over channels: `[N, L, C_in] -> [N, L, features]` (with bias)."""
  features: int
  use_bias: bool = True
  transposed_input: bool = False

  @nn.compact
  def __call__(self, *parts: jax.Array) -> jax.Array:
    """The convolution of the channel concatenation of `parts` (each `[N, L, C_k]`).

    `transposed_input`: the input is a transposed view of a stored array (see
    `matmul`). When every part is the same array (a search step whose two inputs are
    one mixed state), `concat(x, x) @ kernel` is computed as `x @ (sum of the kernel's
    row blocks)`: the same product at a fraction of the cost.
    """
    c_in = sum(p.shape[-1] for p in parts)
    kernel = self.param("kernel", torch_uniform(c_in), (c_in, self.features))
    if len(parts) > 1 and all(p is parts[0] for p in parts):
      c = parts[0].shape[-1]
      summed = kernel[:c]
      for k in range(1, len(parts)):
        summed = summed + kernel[k * c:(k + 1) * c]
      y = matmul(parts[0], summed, self.transposed_input)
    else:
      x = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)
      y = matmul(x, kernel, self.transposed_input)
    if self.use_bias:
      y = y + self.param("bias", torch_uniform(c_in), (self.features,))
    return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def matmul(x: jax.Array, kernel: jax.Array, transposed_input: bool = False,
           narrow_output: bool = False) -> jax.Array:
  """`x @ kernel` for `x` `[..., K]`, `kernel` `[K, D]`, with the kernel's gradient
  written in the kernel's own layout.

  XLA on CPU otherwise computes that gradient transposed, and each optimizer update
  then reads it transposed (about half the optimizer's time at the NTU shape). The
  gradient is `x[M, K].T @ g[M, D]`; with `transposed_input` (x a transposed view of a
  stored array, as the reshape layers' features) that product is slow, and the
  gradient is `(g.T @ x).T`, transposed once into a buffer of its own.
  `narrow_output` (a classifier: D small next to K): x's gradient is `(kernel @ g.T).T`,
  which reads the kernel as stored (`g @ kernel.T` repacks it for a few rows; at the
  MM-IMDB shape 0.25 ms where this takes 0.08).
  """
  return x @ kernel


def _matmul_fwd(x, kernel, transposed_input, narrow_output):
  return x @ kernel, (x, kernel)


def _matmul_bwd(transposed_input, narrow_output, res, g):
  x, kernel = res
  x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  dk = _written_once((_written_once(g2).T @ x2).T) if transposed_input else x2.T @ g2
  dx = (kernel @ g2.T).T.reshape(x.shape) if narrow_output else g @ kernel.T
  return dx, dk


matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Linear(nn.Module):
  """Dense layer with PyTorch's default init: `[N, D_in] -> [N, features]`.
  `narrow_output`: a classifier (few outputs from many inputs; see `matmul`)."""
  features: int
  narrow_output: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d_in = x.shape[-1]
    return nn.Dense(self.features, kernel_init=torch_uniform(d_in),
                    bias_init=torch_uniform(d_in),
                    dot_general=_narrow_dot if self.narrow_output else None)(x)


def _narrow_dot(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """nn.Dense's `[..., K] @ [K, D]` as `matmul(..., narrow_output=True)`."""
  del dimension_numbers, precision, preferred_element_type     # Dense's: last axis x K
  return matmul(lhs, rhs, False, True)


@jax.custom_vjp
def glu(z: jax.Array) -> jax.Array:
  """GLU over the last axis: `z[..., :c] * sigmoid(z[..., c:])` for `z` `[..., 2c]`.

  The same values and gradient as the plain expression; the gradient is written as one
  concatenation of the two halves' gradients (XLA on CPU otherwise pads each half to
  `2c` and adds the two, three passes over `[..., 2c]`).
  """
  c = z.shape[-1] // 2
  return z[..., :c] * jax.nn.sigmoid(z[..., c:])


def _glu_fwd(z):
  c = z.shape[-1] // 2
  a, s = z[..., :c], jax.nn.sigmoid(z[..., c:])
  return a * s, (a, s)


def _glu_bwd(res, g):
  a, s = res
  return (jnp.concatenate([g * s, g * a * s * (1 - s)], axis=-1),)


glu.defvjp(_glu_fwd, _glu_bwd)


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


class TorchBatchNorm(nn.Module):
  """BatchNorm over one feature axis (`axis`, default the last) with PyTorch's semantics.

  Statistics are taken over every other axis (batch and spatial/length axes, as
  torch's BatchNorm1d/2d/3d over `[n, C, ...]` inputs). Train mode normalises with
  the batch mean and biased variance and, unless initialising, updates the running
  stats with the batch mean and the UNBIASED variance (`m / (m - 1)`, m values per
  channel), as torch does: `running = momentum * running + (1 - momentum) * batch`
  (Flax momentum 0.9 is torch's 0.1); `unbiased_running_var=False` takes the biased
  variance there instead (Flax's `nn.BatchNorm`). Train mode normalises through
  `batch_norm_rows`. Eval mode uses the running stats. Variables (the names and shapes
  of `nn.BatchNorm`): params `scale`, `bias`; batch_stats `mean`, `var`, each `[C]`.

  The mode is the call's `train` argument or, when that is None, `not
  use_running_average`.
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  axis: int = -1
  use_running_average: bool | None = None
  unbiased_running_var: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
    """Args: x: `[n, ..., C, ...]` with C at `axis`. Returns: the same shape."""
    if train is None:
      if self.use_running_average is None:
        raise ValueError("TorchBatchNorm: pass train= or set use_running_average")
      train = not self.use_running_average
    axis = self.axis % x.ndim
    c = x.shape[axis]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    if train:
      n = math.prod(x.shape) // c
      if n < 2:
        raise ValueError(f"TorchBatchNorm in train mode needs more than 1 example per "
                         f"channel, got input shape {x.shape}")
      rows = jnp.moveaxis(x, axis, -1)
      y, mean, var = batch_norm_rows(rows.reshape(n, c), scale, bias, self.epsilon)
      if not self.is_initializing():
        m = self.momentum
        unbias = n / (n - 1) if self.unbiased_running_var else 1.0
        ra_mean.value = m * ra_mean.value + (1 - m) * jax.lax.stop_gradient(mean)
        ra_var.value = m * ra_var.value + (1 - m) * jax.lax.stop_gradient(var) * unbias
      return jnp.moveaxis(y.reshape(rows.shape), -1, axis)
    shape = [1] * x.ndim
    shape[axis] = c
    mean, var, scale, bias = (v.reshape(shape)
                              for v in (ra_mean.value, ra_var.value, scale, bias))
    return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_rows(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode BatchNorm of `x` `[M, C]` over its M rows: `(y, mean, var)`, with
  `y = (x - mean) / sqrt(var + epsilon) * scale + bias` and the biased batch variance.

  Sums over the rows are `ones[M] @ a[M, C]` products, forward and backward (XLA on CPU
  reduces over a leading axis several times slower than the matmul does), and the
  gradient is the textbook closed form: the same values as JAX's own to rounding.
  `mean` and `var` carry no gradient (they only feed the running statistics).
  """
  return _batch_norm_rows_fwd(x, scale, bias, epsilon)[0]


def _row_sum(a: jax.Array) -> jax.Array:
  """The sum of `a` `[N, ...]` over its leading axis as `ones[N] @ a[N, -1]` (XLA on CPU
  reduces over a leading axis several times slower than this product)."""
  n = a.shape[0]
  return (jnp.ones((n,), a.dtype) @ a.reshape(n, -1)).reshape(a.shape[1:])


def _row_mean(a: jax.Array) -> jax.Array:
  return _row_sum(a) / a.shape[0]


def _batch_norm_rows_fwd(x, scale, bias, epsilon):
  mean = _row_mean(x)
  xc = x - mean
  var = _row_mean(xc * xc)
  rstd = jax.lax.rsqrt(var + epsilon)
  xhat = xc * rstd
  return (xhat * scale + bias, mean, var), (xhat, rstd, scale)


def _batch_norm_rows_bwd(epsilon, res, cotangents):
  del epsilon
  xhat, rstd, scale = res
  g = cotangents[0]                    # mean and var carry no gradient
  g_mean, gx_mean = _row_mean(g), _row_mean(g * xhat)
  dx = (scale * rstd) * (g - g_mean - xhat * gx_mean)
  m = g.shape[0]
  return dx, m * gx_mean, m * g_mean


batch_norm_rows.defvjp(_batch_norm_rows_fwd, _batch_norm_rows_bwd)


def batch_norm(train: bool, name: str | None = None,
               fidelity: str = "paper") -> TorchBatchNorm:
  """BatchNorm1d over the channel axis of `[N, L, C]` (PyTorch momentum 0.1, eps 1e-5).

  `paper`: the running variance takes the biased batch variance (as Flax's
  `nn.BatchNorm`). `reference`: the unbiased one (`n / (n - 1)`, n = N * L), as
  PyTorch's. The variables are `nn.BatchNorm`'s either way. Call the result on `x`
  alone: the mode is fixed here by `train`.
  """
  return TorchBatchNorm(momentum=0.9, epsilon=1e-5, axis=-1, use_running_average=not train,
                        unbiased_running_var=fidelity == "reference", name=name)


class LayerNormCL(nn.Module):
  """PyTorch's `LayerNorm([C, L])` on a channels-last `[N, L, C]` state: statistics
  over (L, C), a scale and a bias per element, stored `[C, L]` as the release's."""
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    l, c = x.shape[-2:]
    x = materialize_grad(x)
    scale = self.param("scale", nn.initializers.ones, (c, l), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c, l), jnp.float32)
    mean = jnp.mean(x, axis=(-2, -1), keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=(-2, -1), keepdims=True)
    return scale_shift((x - mean) * jax.lax.rsqrt(var + self.epsilon), scale.T, bias.T)


@jax.custom_vjp
def scale_shift(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
  """`x * scale + bias` for `x` `[N, ...]` and `scale`, `bias` `x.shape[1:]`.

  The same values and gradients as the plain expression; the parameter gradients'
  sums over N are `_row_sum` products (XLA on CPU reduces over a leading axis at these
  shapes about ten times slower than the matmul does).
  """
  return x * scale + bias


def _scale_shift_fwd(x, scale, bias):
  return x * scale + bias, (x, scale)


def _scale_shift_bwd(res, g):
  x, scale = res
  return g * scale, _row_sum(g * x), _row_sum(g)


scale_shift.defvjp(_scale_shift_fwd, _scale_shift_bwd)


def layer_norm_cl(name: str | None = None) -> LayerNormCL:
  """LayerNorm over (C, L) of `[N, L, C]`, with a scale and bias `[C, L]`."""
  return LayerNormCL(name=name)


def flatten_cl(x: jax.Array) -> jax.Array:
  """`[N, L, C] -> [N, C * L]` in the release's (C, L) order (index c * L + l)."""
  return jnp.swapaxes(x, 1, 2).reshape(x.shape[0], -1)


class CellTail(nn.Module):
  """A Cell's output: concat of chosen steps (+ conv/BN/ReLU/dropout when more
  than one), plus the residual x, then LayerNorm over (C, L).

  Args: outs: list of `[N, L, C]` step outputs; x `[N, L, C]`. Returns `[N, L, C]`.
  `fidelity` picks the BatchNorm's running-variance rule (`batch_norm`).
  """
  dropout: float = 0.0
  fidelity: str = "paper"

  @nn.compact
  def __call__(self, outs, x, train: bool = False):
    c = x.shape[-1]
    out = jnp.concatenate(outs, axis=-1)
    if len(outs) > 1:
      out = PointwiseConv(c, name="out_conv")(out)
      out = batch_norm(train, name="out_bn", fidelity=self.fidelity)(out)
      out = nn.relu(out)
      out = Dropout(self.dropout, deterministic=not train)(out)
    return layer_norm_cl(name="ln")(out + x)


class FusionHead(nn.Module):
  """Concat of the fused states -> LayerNorm -> ReLU -> flatten -> Linear.

  Args: states: list of `[N, L, C]`. Returns logits `[N, num_classes]`.
  """
  num_classes: int

  @nn.compact
  def __call__(self, states):
    out = jnp.concatenate(states, axis=-1)
    out = nn.relu(materialize_grad(layer_norm_cl(name="ln")(out)))
    return Linear(self.num_classes, narrow_output=True, name="classifier")(flatten_cl(out))

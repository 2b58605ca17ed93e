"""Primitive ops and layers: shapes in both fidelities and hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmnas_jax import layers, ops
from tests.conftest import swap_cl as T

X = np.array([[[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]]], np.float32)     # [1, C=2, L=3]
Y = np.array([[[1.0, 2.0, 0.5], [3.0, 4.0, -2.0]]], np.float32)


def _init_apply(op, x, y, train=False, params=None):
  """Runs `op` on channels-first x, y `[N, C, L]`; returns its output channels-first."""
  x, y = T(x), T(y)
  v = op.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x, y)
  if params is not None:
    v = {**v, "params": params}
  out = op.apply(v, x, y, train, rngs={"dropout": jax.random.key(2)},
                 mutable=["batch_stats"] if train else False)
  return T(out[0] if train else out), v


def _attention_by_hand(x, y):
  c, l = x.shape[1], x.shape[2]
  out = np.zeros_like(x)
  for q in range(l):
    scores = np.array([sum(x[0, ch, q] * y[0, ch, k] for ch in range(c)) / math.sqrt(c)
                       for k in range(l)])
    w = np.exp(scores - scores.max())
    w /= w.sum()
    for ch in range(c):
      out[0, ch, q] = sum(w[k] * y[0, ch, k] for k in range(l))
  return out


def _layer_norm_cl(z, scale=1.0, bias=0.0, eps=1e-5):
  mu, var = z.mean(axis=(1, 2), keepdims=True), z.var(axis=(1, 2), keepdims=True)
  return (z - mu) / np.sqrt(var + eps) * scale + bias


@pytest.mark.parametrize("fidelity", ops.FIDELITIES)
@pytest.mark.parametrize("name", ops.STEP_OPS + ("Zero",))
def test_shapes(fidelity, name):
  x = jnp.ones((3, 4, 5))
  out, _ = _init_apply(ops.make_op(name, fidelity, 0.2), x, 2 * x, train=True)
  assert out.shape == (3, 4, 5)


def test_zero_and_sum():
  for fid in ops.FIDELITIES:
    np.testing.assert_array_equal(_init_apply(ops.make_op("Zero", fid), X, Y)[0], 0 * X)
    np.testing.assert_array_equal(_init_apply(ops.make_op("Sum", fid), X, Y)[0], X + Y)


def test_attention_paper_by_hand():
  out, v = _init_apply(ops.make_op("ScaleDotAttn", "paper"), X, Y)
  assert v == {}
  np.testing.assert_allclose(out, _attention_by_hand(X, Y), rtol=1e-6)


def test_attention_reference_adds_layer_norm():
  out, v = _init_apply(ops.make_op("ScaleDotAttn", "reference", 0.5), X, Y)
  assert jax.tree.map(np.shape, v["params"]) == {"ln": {"scale": (2, 3), "bias": (2, 3)}}
  np.testing.assert_allclose(out, _layer_norm_cl(_attention_by_hand(X, Y)), rtol=1e-5,
                             atol=1e-6)


def test_linear_glu_paper_eq7():
  w1 = np.array([[1.0, 2.0], [0.5, -1.0]], np.float32)   # [C_in, C_out]
  w2 = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)
  params = {"w1": {"kernel": w1}, "w2": {"kernel": w2}}
  out, _ = _init_apply(ops.make_op("LinearGLU", "paper"), X, Y, params=params)
  want = np.zeros_like(X)
  for d in range(2):
    for l in range(3):
      a = sum(X[0, c, l] * w1[c, d] for c in range(2))
      b = sum(Y[0, c, l] * w2[c, d] for c in range(2))
      want[0, d, l] = a / (1 + math.exp(-b))
  np.testing.assert_allclose(out, want, rtol=1e-6)


def test_concat_fc_paper_eq8():
  w = np.arange(8, dtype=np.float32).reshape(4, 2) / 4 - 1    # [2C, C]
  b = np.array([0.1, -0.2], np.float32)
  out, _ = _init_apply(ops.make_op("ConcatFC", "paper"), X, Y,
                       params={"conv": {"kernel": w, "bias": b}})
  cat = np.concatenate([X, Y], axis=1)[0]                    # [2C, L]
  want = np.maximum(w.T @ cat + b[:, None], 0)[None]
  np.testing.assert_allclose(out, want, rtol=1e-6)


def test_linear_glu_reference_conv_bn_glu():
  op = ops.make_op("LinearGLU", "reference", 0.3)
  v = op.init(jax.random.key(0), T(X), T(Y))
  assert jax.tree.map(np.shape, v["params"]) == {
      "conv": {"kernel": (4, 4), "bias": (4,)}, "bn": {"scale": (4,), "bias": (4,)}}
  k, b = np.asarray(v["params"]["conv"]["kernel"]), np.asarray(v["params"]["conv"]["bias"])
  z = k.T @ np.concatenate([X, Y], axis=1)[0] + b[:, None]         # [2C, L]
  z = z / np.sqrt(1 + 1e-5)                                         # eval BN, fresh stats
  want = (z[:2] / (1 + np.exp(-z[2:])))[None]
  np.testing.assert_allclose(T(op.apply(v, T(X), T(Y), False)), want, rtol=1e-5, atol=1e-6)
  # train mode: BatchNorm uses the batch statistics over (N, L) per channel
  xb = np.concatenate([X, Y, X * 2], axis=0)
  yb = np.concatenate([Y, X, -Y], axis=0)
  out, upd = op.apply(v, T(xb), T(yb), True, rngs={"dropout": jax.random.key(0)},
                      mutable=["batch_stats"])
  out = T(out)
  z = np.einsum("cd,ncl->ndl", k, np.concatenate([xb, yb], axis=1)) + b[None, :, None]
  mu, var = z.mean(axis=(0, 2), keepdims=True), z.var(axis=(0, 2), keepdims=True)
  z = (z - mu) / np.sqrt(var + 1e-5)
  glu = z[:, :2] / (1 + np.exp(-z[:, 2:]))
  kept = np.asarray(out) != 0                                       # dropout zeroes some
  np.testing.assert_allclose(np.asarray(out)[kept], (glu / 0.7)[kept], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(upd["batch_stats"]["bn"]["mean"], 0.1 * mu.ravel(), rtol=1e-5)


def test_concat_fc_reference_has_bn():
  op = ops.make_op("ConcatFC", "reference", 0.0)
  v = op.init(jax.random.key(0), T(X), T(Y))
  k, b = np.asarray(v["params"]["conv"]["kernel"]), np.asarray(v["params"]["conv"]["bias"])
  want = np.maximum((k.T @ np.concatenate([X, Y], axis=1)[0] + b[:, None])
                    / np.sqrt(1 + 1e-5), 0)[None]
  np.testing.assert_allclose(T(op.apply(v, T(X), T(Y), False)), want, rtol=1e-5, atol=1e-6)


def test_registry_errors():
  with pytest.raises(KeyError, match="valid ops: Zero, Sum, ScaleDotAttn"):
    ops.make_op("Conv3x3")
  with pytest.raises(ValueError, match="unknown fidelity 'pytorch'"):
    ops.make_op("Sum", "pytorch")
  assert ops.step_op_pool("paper") == ("Zero",) + ops.STEP_OPS
  assert ops.step_op_pool("reference") == ops.STEP_OPS


def test_hash_dropout_rate_scale_and_determinism():
  from bmnas_jax import layers
  x = jnp.ones((64, 32, 16))
  drop = layers.Dropout(0.25, deterministic=False)
  out = jax.jit(lambda k: drop.apply({}, x, rngs={"dropout": k}))(jax.random.PRNGKey(3))
  kept = np.asarray(out) != 0
  assert abs(kept.mean() - 0.75) < 0.01
  np.testing.assert_allclose(np.asarray(out)[kept], 1 / 0.75, rtol=1e-6)
  again = drop.apply({}, x, rngs={"dropout": jax.random.PRNGKey(3)})
  other = drop.apply({}, x, rngs={"dropout": jax.random.PRNGKey(4)})
  np.testing.assert_array_equal(out, again)
  assert (np.asarray(other) != 0).mean() != kept.mean() or not np.array_equal(other, out)
  # neighbouring elements are independent: no correlation between adjacent masks
  flat = kept.reshape(-1).astype(float)
  assert abs(np.corrcoef(flat[:-1], flat[1:])[0, 1]) < 0.02
  np.testing.assert_array_equal(layers.Dropout(0.25).apply({}, x), x)     # deterministic


def test_materialize_grad_is_the_identity_and_its_loop_stays():
  """Value and gradient are the identity's (also for a non-finite gradient); the loop
  that makes XLA write the gradient once is still in the compiled program."""
  x = jax.random.normal(jax.random.key(0), (3, 4, 5))
  w = jax.random.normal(jax.random.key(1), (3, 4, 5))

  def loss(x, w, wrap):
    y = layers.materialize_grad(x) if wrap else x
    return jnp.sum(jnp.sin(y) * w) + jnp.sum(y * y)

  np.testing.assert_array_equal(layers.materialize_grad(x), x)
  grad = jax.jit(jax.grad(loss), static_argnums=2)
  np.testing.assert_array_equal(grad(x, w, True), grad(x, w, False))
  w_nan = w.at[0, 0, 0].set(jnp.nan)
  np.testing.assert_array_equal(grad(x, w_nan, True), grad(x, w_nan, False))
  seeds = jax.jit(jax.vmap(jax.grad(loss), in_axes=(0, 0, None)), static_argnums=2)
  np.testing.assert_array_equal(seeds(jnp.stack([x, -x]), jnp.stack([w, w_nan]), True),
                                seeds(jnp.stack([x, -x]), jnp.stack([w, w_nan]), False))
  hlo = jax.jit(jax.grad(loss), static_argnums=2).lower(x, w, True).compile().as_text()
  assert " while(" in hlo


def _same_values_and_vjps(f, plain, args, g):
  """`f` and `plain` agree on `args` in value and in their VJPs of cotangent `g`."""
  np.testing.assert_allclose(f(*args), plain(*args), rtol=1e-6, atol=1e-6)
  _, vjp = jax.vjp(f, *args)
  _, vjp_plain = jax.vjp(plain, *args)
  for got, want in zip(jax.tree.leaves(vjp(g)), jax.tree.leaves(vjp_plain(g)), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_scale_shift_values_and_gradients_are_the_plain_expressions():
  x, g = (jax.random.normal(jax.random.key(k), (6, 4, 5)) for k in (0, 1))
  scale, bias = (jax.random.normal(jax.random.key(k), (4, 5)) for k in (2, 3))
  _same_values_and_vjps(layers.scale_shift, lambda x, s, b: x * s + b, (x, scale, bias), g)


@pytest.mark.parametrize("transposed_input,narrow_output", [(False, False), (True, False),
                                                            (False, True)])
def test_matmul_values_and_gradients_are_the_plain_product(transposed_input, narrow_output):
  x, g = (jax.random.normal(jax.random.key(k), s) for k, s in ((0, (3, 4, 6)), (1, (3, 4, 5))))
  kernel = jax.random.normal(jax.random.key(2), (6, 5))
  _same_values_and_vjps(lambda a, b: layers.matmul(a, b, transposed_input, narrow_output),
                        lambda a, b: a @ b, (x, kernel), g)


def test_glu_values_and_gradients_are_the_plain_expression():
  z, g = (jax.random.normal(jax.random.key(k), s) for k, s in ((0, (3, 4, 10)), (1, (3, 4, 5))))
  _same_values_and_vjps(layers.glu, lambda z: z[..., :5] * jax.nn.sigmoid(z[..., 5:]), (z,), g)


def test_batch_norm_rows_values_and_gradients_are_the_plain_expression():
  x = 3 * jax.random.normal(jax.random.key(0), (40, 6)) + 1
  g = jax.random.normal(jax.random.key(1), (40, 6))
  scale, bias = (jax.random.normal(jax.random.key(k), (6,)) for k in (2, 3))

  def plain(x, s, b):
    return (x - x.mean(0)) * jax.lax.rsqrt(x.var(0) + 1e-5) * s + b

  _same_values_and_vjps(lambda x, s, b: layers.batch_norm_rows(x, s, b, 1e-5)[0], plain,
                        (x, scale, bias), g)
  _, mean, var = layers.batch_norm_rows(x, scale, bias, 1e-5)
  np.testing.assert_allclose(mean, np.asarray(x).mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(var, np.asarray(x).var(0), rtol=1e-5)


def test_attention_values_and_gradients_are_the_plain_expression():
  x, y, g = (jax.random.normal(jax.random.key(k), (3, 5, 8)) for k in (0, 1, 2))

  def plain(x, y):
    return jax.nn.softmax(jnp.einsum("nqc,nkc->nqk", x, y) / np.sqrt(8), axis=-1) @ y

  _same_values_and_vjps(ops.scaled_dot_attention, plain, (x, y), g)


def test_conv_of_one_array_twice_is_the_conv_of_the_concatenation():
  """`PointwiseConv(x, x)` sums the kernel's halves instead of concatenating x with
  itself: the same values and gradients (parameters and x) as the concatenation."""
  conv = layers.PointwiseConv(5)
  x, g = (jax.random.normal(jax.random.key(k), s) for k, s in ((0, (2, 3, 4)), (1, (2, 3, 5))))
  params = conv.init(jax.random.key(2), x, x)
  assert params["params"]["kernel"].shape == (8, 5)
  twice = lambda p, x: conv.apply(p, x, x)
  concat = lambda p, x: conv.apply(p, jnp.concatenate([x, x], axis=-1))
  _same_values_and_vjps(twice, concat, (params, x), g)

"""Tests for bmnas_jax.optim: the release's schedule, PyTorch Adam parity, config errors."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from bmnas_jax import optim

ETA_MAX, ETA_MIN = 1e-3, 1e-6


class ReleaseRule:
  """The release's per-batch rule, restated: call `next()` once before each update."""

  def __init__(self, eta_max, eta_min, t_i, t_mult, nbpe):
    self.eta_max, self.eta_min = eta_max, eta_min
    self.t_i, self.t_mult, self.nbpe = t_i, t_mult, nbpe
    self.counter = 0

  def next(self):
    t_cur = self.counter / self.nbpe
    self.counter += 1
    cosine = math.cos(math.pi * t_cur / self.t_i)
    eta = self.eta_min + 0.5 * (self.eta_max - self.eta_min) * (1 + cosine)
    if eta <= self.eta_min + 1e-10:
      self.t_i *= self.t_mult
      self.counter = 0
    return eta


def release_lrs(n, **kw):
  rule = ReleaseRule(**kw)
  return np.array([rule.next() for _ in range(n)])


def schedule_values(schedule, n):
  return np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(n)))


@pytest.mark.parametrize("nbpe,t_i,t_mult,n", [
    (4, 1, 2, 40),  # integer batches per epoch, several restarts
    (1944.0, 1, 2, 6000),  # MM-IMDB search: 15552 / 8
    (2.5, 1, 2, 30),  # non-integer: never reaches the floor
    (16000 / 96, 1, 2, 1200),  # non-integer: restarts only at t = 3 T
    (14416 / 96, 5, 2, 2000),  # EgoGesture: never restarts
    (7, 2, 1, 50),  # t_mult 1: equal cycles
])
def test_schedule_matches_release_rule(nbpe, t_i, t_mult, n):
  want = release_lrs(n, eta_max=ETA_MAX, eta_min=ETA_MIN, t_i=t_i, t_mult=t_mult, nbpe=nbpe)
  table = optim.cosine_warm_restarts_table(ETA_MAX, ETA_MIN, t_i, t_mult, nbpe, n)
  np.testing.assert_allclose(table, want, rtol=1e-12, atol=0)
  np.testing.assert_array_equal(table <= ETA_MIN + 1e-10, want <= ETA_MIN + 1e-10)
  got = schedule_values(optim.cosine_warm_restarts(ETA_MAX, ETA_MIN, t_i, t_mult, nbpe, n), n)
  np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-6)


def test_schedule_hand_checked_restarts():
  """nbpe 4, T 1 then 2: the floor is hit at counts 4 and 4 + 1 + 8."""
  lrs = schedule_values(optim.cosine_warm_restarts(ETA_MAX, ETA_MIN, 1, 2, 4, 20), 20)
  np.testing.assert_allclose(lrs[0], ETA_MAX, rtol=1e-6)  # the first update uses eta_max
  np.testing.assert_allclose(lrs[2], 0.5 * (ETA_MAX + ETA_MIN), rtol=1e-6)
  np.testing.assert_allclose(lrs[[4, 13]], ETA_MIN, rtol=1e-6)
  np.testing.assert_allclose(lrs[[5, 14]], ETA_MAX, rtol=1e-6)
  np.testing.assert_allclose(lrs[9], 0.5 * (ETA_MAX + ETA_MIN), rtol=1e-6)  # mid second cycle


def test_schedule_non_integer_nbpe_climbs_back():
  lrs = optim.cosine_warm_restarts_table(ETA_MAX, ETA_MIN, 1, 2, 2.5, 12)
  assert np.all(lrs > ETA_MIN + 1e-10)
  assert lrs[4] > lrs[3]  # past t = 1 the rate rises again
  np.testing.assert_allclose(lrs[5], ETA_MAX)  # t = 2: back at the top, same cycle


def test_schedule_clamps_past_the_end():
  schedule = optim.cosine_warm_restarts(ETA_MAX, ETA_MIN, 1, 2, 4, 10)
  assert float(schedule(25)) == float(schedule(9))
  assert float(jax.jit(schedule)(jnp.int32(3))) == float(schedule(3))


def torch_adam_l2_numpy(params, grads_seq, lrs, b1, b2, wd, eps=1e-8):
  """PyTorch Adam(weight_decay=wd), one parameter array, written out."""
  p = params.astype(np.float64)
  m = np.zeros_like(p)
  v = np.zeros_like(p)
  for step, (g, lr) in enumerate(zip(grads_seq, lrs), start=1):
    g = g + wd * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    denom = np.sqrt(v) / math.sqrt(1 - b2 ** step) + eps
    p = p - (lr / (1 - b1 ** step)) * m / denom
  return p


def test_torch_adam_l2_matches_pytorch_rule():
  rng = np.random.default_rng(1)
  draw = lambda shape: rng.normal(size=shape).astype(np.float32)
  params = {"w": draw((3, 4)), "b": draw((4,))}
  grads = [{k: draw(v.shape) for k, v in params.items()} for _ in range(3)]
  lrs = [1e-2, 5e-3, 2e-3]
  b1, b2, wd = 0.5, 0.999, 1e-2
  tx = optim.torch_adam_l2(lambda c: jnp.asarray(lrs)[c], b1=b1, b2=b2, weight_decay=wd)
  state = tx.init(params)
  p = params
  for g in grads:
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)
  for k in params:
    want = torch_adam_l2_numpy(params[k], [g[k] for g in grads], lrs, b1, b2, wd)
    np.testing.assert_allclose(p[k], want, rtol=1e-5, atol=1e-7, err_msg=k)


def weight_cfg(**overrides):
  return ml_collections.ConfigDict(
      dict(dict(lr_max=1e-3, lr_min=1e-6, weight_decay=1e-4, t_i=1, t_mult=2), **overrides))


def test_optimizers_from_config_step():
  params = {"w": jnp.ones((2,))}
  grads = {"w": jnp.full((2,), 0.5)}
  for tx in (optim.weight_optimizer(weight_cfg(), 4.0, 8),
             optim.arch_optimizer(ml_collections.ConfigDict()), optim.arch_optimizer()):
    updates, _ = tx.update(grads, tx.init(params), params)
    assert np.all(np.asarray(updates["w"]) < 0)
  # The first weight update moves by about lr_max (Adam's first step is lr * sign).
  tx = optim.weight_optimizer(weight_cfg(weight_decay=0.0), 4.0, 8)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -1e-3, rtol=1e-4)


@pytest.mark.parametrize("key,value", [
    ("lr_max", -1e-3), ("lr_max", 0.0), ("lr_min", -1.0), ("lr_min", 1.0), ("t_i", 0),
    ("t_mult", 0.5), ("weight_decay", -1e-4), ("b1", 1.0), ("b2", -0.1), ("lr_max", "big"),
])
def test_weight_config_invalid_value_names_key(key, value):
  with pytest.raises(ValueError, match=f"'{key}'"):
    optim.weight_optimizer(weight_cfg(**{key: value}), 4.0, 8)


@pytest.mark.parametrize("key", ["lr_max", "lr_min", "weight_decay", "t_i", "t_mult"])
def test_weight_config_missing_key_named(key):
  cfg = weight_cfg().to_dict()
  del cfg[key]
  with pytest.raises(ValueError, match=f"'{key}' is missing"):
    optim.weight_optimizer(ml_collections.ConfigDict(cfg), 4.0, 8)


@pytest.mark.parametrize("key,value", [
    ("lr", -3e-4), ("b1", 1.5), ("b2", 1.0), ("weight_decay", -1.0)])
def test_arch_config_invalid_value_names_key(key, value):
  with pytest.raises(ValueError, match=f"'{key}'"):
    optim.arch_optimizer(ml_collections.ConfigDict({key: value}))


def test_schedule_arguments_checked():
  with pytest.raises(ValueError, match="batches_per_epoch"):
    optim.weight_optimizer(weight_cfg(), 0.0, 8)
  with pytest.raises(ValueError, match="total_steps"):
    optim.weight_optimizer(weight_cfg(), 4.0, 0)


def test_release_epoch_accounting_realigns_the_schedule():
  """The release also trains on the last, partial batch (ceil(n / B) scheduler steps per
  epoch); with full batches only, update s of epoch e takes its batch e * ceil + s."""
  n, b, epochs = 1000, 96, 3                  # 10.42 batches: 10 full, 11 with the partial
  table = optim.cosine_warm_restarts_table(1e-3, 1e-6, 1, 2, n / b, epochs * 11)
  sched = optim.cosine_warm_restarts(1e-3, 1e-6, 1, 2, n / b, epochs * 10, steps_per_epoch=10)
  counts = np.arange(epochs * 10)
  want = table[(counts // 10) * 11 + counts % 10]
  np.testing.assert_allclose(jax.vmap(sched)(jnp.asarray(counts)), want, rtol=1e-6)
  plain = optim.cosine_warm_restarts(1e-3, 1e-6, 1, 2, n / b, epochs * 10)
  assert float(plain(10)) == pytest.approx(table[10]) != pytest.approx(table[11])
  # An integer number of batches per epoch: both accountings agree.
  exact = optim.cosine_warm_restarts(1e-3, 1e-6, 1, 2, 10.0, 30, steps_per_epoch=10)
  np.testing.assert_array_equal(jax.vmap(exact)(jnp.arange(30)),
                                jax.vmap(optim.cosine_warm_restarts(1e-3, 1e-6, 1, 2, 10.0, 30))(
                                    jnp.arange(30)))
  # Through the trainers' constructor: Adam on a constant gradient steps by the rate.
  opt = ml_collections.ConfigDict(dict(lr_max=1e-3, lr_min=1e-6, weight_decay=0.0, t_i=1,
                                       t_mult=2))
  for fidelity, used in (("reference", [*range(10), 11]), ("paper", list(range(11)))):
    c = ml_collections.ConfigDict({"fidelity": fidelity})
    tx = optim.weight_optimizer_from_config(c, opt, n, b, epochs)
    params = {"w": jnp.zeros(())}
    state = tx.init(params)
    for _ in range(11):                      # the 11th update is epoch 1's first
      updates, state = tx.update({"w": jnp.ones(())}, state, params)
      params = optax.apply_updates(params, updates)
    assert float(params["w"]) == pytest.approx(-table[used].sum(), rel=1e-4)


def test_freeze_keeps_the_selected_parameters_at_their_init():
  tx = optim.freeze(optim.torch_adam_l2(0.1, weight_decay=0.01),
                    lambda path: path[0].startswith("reshape_"))
  params = {"reshape_A_1": {"kernel": jnp.ones((2, 2))}, "cell_0": {"w": jnp.ones((3,))}}
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(params["reshape_A_1"]["kernel"], 1.0)
  assert np.all(np.asarray(params["cell_0"]["w"]) < 0.8)


def test_reference_settings_apply_only_under_reference_fidelity():
  from bmnas_jax.pipeline import with_fidelity
  from bmnas_jax.errors import ConfigError
  from experiments.configs import ntu
  c = ntu.get_config()
  assert with_fidelity(c) is c and c.search.train_reshape
  c.fidelity = "reference"
  r = with_fidelity(c)
  assert not r.search.train_reshape and r.evaluate.weight_opt.weight_decay == 1e-4
  assert c.evaluate.weight_opt.weight_decay == 3e-4 and "reference" not in r
  c.reference = {"search": {"epoch": 3}}
  with pytest.raises(ConfigError, match="config.search.epoch is not a config key"):
    with_fidelity(c)

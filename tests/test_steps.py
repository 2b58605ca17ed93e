"""Pure steps: each changes only its own collection; NaN guards name the quantity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmnas_jax import loop, optim
from bmnas_jax.data.planted import planted_features
from bmnas_jax.search import run_search
from bmnas_jax.search_space import hypernet_from_config
from bmnas_jax.steps import Steps, TrainState
from tests.conftest import planted_config, small_run_config


@pytest.fixture(scope="module")
def setup():
  c = planted_config()
  fs = planted_features(c)
  model = hypernet_from_config(c, fs.nodes)
  steps = Steps(model, "single", optim.torch_adam_l2(1e-2, weight_decay=1e-4),
                optim.arch_optimizer(c.search.arch_opt))
  split = fs.splits["train"]
  batch = {"x": {k: jnp.asarray(v[:16]) for k, v in split.features.items()},
           "y": jnp.asarray(split.labels[:16])}
  v = jax.jit(lambda k: model.init(k, batch["x"]))(jax.random.key(0))
  state = TrainState(v["params"], v["arch"], v["batch_stats"], steps.w_tx.init(v["params"]),
                     steps.a_tx.init(v["arch"]), jax.random.PRNGKey(0))
  return c, fs, steps, state, batch


def _same(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_weight_step_leaves_arch_and_arch_step_leaves_params(setup):
  _, _, steps, state, batch = setup
  new, out = jax.jit(steps.weight_step)(state, batch, jax.random.key(1))
  assert int(out["bad"]) == 0 and np.isfinite(out["loss"])
  assert _same(new.arch, state.arch) and _same(new.a_opt, state.a_opt)
  assert not _same(new.params, state.params)
  assert not _same(new.batch_stats, state.batch_stats)
  new, out = jax.jit(steps.arch_step)(state, batch, jax.random.key(1))
  assert _same(new.params, state.params) and _same(new.w_opt, state.w_opt)
  assert _same(new.batch_stats, state.batch_stats)
  assert not _same(new.arch, state.arch)


def test_eval_step_masks_padding(setup):
  _, _, steps, state, batch = setup
  full = steps.eval_step(state, {**batch, "mask": jnp.ones(16, bool)})
  half = steps.eval_step(state, {**batch, "mask": jnp.arange(16) < 8})
  first = steps.eval_step(state, {"x": jax.tree.map(lambda a: a[:8], batch["x"]),
                                  "y": batch["y"][:8], "mask": jnp.ones(8, bool)})
  assert int(full["n"]) == 16 and int(half["n"]) == 8
  np.testing.assert_allclose(half["loss_sum"], first["loss_sum"], rtol=1e-5)
  assert int(half["counts"]["correct"]) == int(first["counts"]["correct"])


def test_nan_guard_names_the_quantity(setup):
  _, _, steps, state, batch = setup
  poisoned = {**batch, "x": {**batch["x"], "A_1": batch["x"]["A_1"].at[3, 0, 0].set(jnp.nan)}}
  _, out = jax.jit(steps.weight_step)(state, poisoned, jax.random.key(1))
  assert int(out["bad"]) == 1                      # the loss is the first non-finite quantity
  with pytest.raises(FloatingPointError, match=r"epoch 4, step 7 \(seed 3\): non-finite loss"):
    loop.describe_bad("search weight step", 4, [2, 3], np.array([-1, 7]), np.array([0, 1]))


def test_search_stops_on_a_poisoned_batch(tmp_path):
  c = small_run_config()             # the finished small run's program (compiled once)
  fs = planted_features(c)
  fs.splits["train"].features["B_2"][5, 1, 1] = np.inf       # every epoch reaches row 5
  fs.validate = lambda where="": None                        # bypass the input check
  with pytest.raises(FloatingPointError, match=r"search weight step at epoch 0, step \d+ "
                                               r"\(seed 0\): non-finite loss"):
    run_search(c, fs, str(tmp_path))
  assert not (tmp_path / "search" / "best_genotype.json").exists()

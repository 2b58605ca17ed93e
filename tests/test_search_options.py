"""Search options beyond the defaults: genotype selection rules, the arch rate scaled to
the arch steps per epoch, the entropy term, and the study's settings."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bmnas_jax import optim, search, steps as steps_lib, study
from bmnas_jax.errors import ConfigError
from experiments.configs import mfeat


def kept_epochs(select, metric, val_metric, val_loss):
  """The epoch a seed keeps over a history, with search.py's rules."""
  best, kept = -np.inf, -1
  for epoch, (m, l) in enumerate(zip(val_metric, val_loss)):
    score = search.selection_score(select, m, l, epoch)
    if search.keeps(select, metric, best, score, kept < 0):
      best, kept = score, epoch
  return kept


@pytest.mark.parametrize("select,metric,want", [
    ("val", "accuracy", 1),          # first of the tied best val metric
    ("release", "accuracy", 3),      # the release's NTU/EgoGesture `>=`: the later tie
    ("release", "f1_weighted", 1),   # its MM-IMDB `>`: the earlier tie
    ("val_loss", "accuracy", 2),     # lowest val loss
    ("last", "accuracy", 4)])
def test_selection_rules(select, metric, want):
  val_metric = [0.5, 0.9, 0.8, 0.9, 0.7]
  val_loss = [1.0, 0.5, 0.3, 0.4, 0.6]
  assert kept_epochs(select, metric, val_metric, val_loss) == want


def test_arch_lr_scaled_to_the_steps_per_epoch():
  """Adam's first step moves each weight by the rate: 3e-4 * 326 / 6 with lr_for_steps."""
  g = {"a": jnp.ones((3,))}
  for cfg, steps, rate in (({"lr": 3e-4}, 6, 3e-4),
                           ({"lr": 3e-4, "lr_for_steps": 326}, 6, 3e-4 * 326 / 6)):
    tx = optim.arch_optimizer(dict(cfg, weight_decay=0.0), steps)
    upd, _ = tx.update(g, tx.init(g), g)
    np.testing.assert_allclose(upd["a"], -rate, rtol=1e-5)
  with pytest.raises(ConfigError, match="lr_for_steps"):
    optim.arch_optimizer({"lr_for_steps": -1}, 6)


def test_mean_entropy_ratio_against_numpy():
  rng = np.random.default_rng(0)
  arch = {"cell_0": {"alpha": rng.normal(size=(5, 2)), "gamma": rng.normal(size=(2, 4))}}
  rows = []
  for a in (arch["cell_0"]["alpha"], arch["cell_0"]["gamma"]):
    p = np.exp(a) / np.exp(a).sum(-1, keepdims=True)
    rows += list(-(p * np.log(p)).sum(-1) / np.log(a.shape[-1]))
  got = steps_lib.mean_entropy_ratio(jax.tree.map(jnp.asarray, arch))
  np.testing.assert_allclose(got, np.mean(rows), rtol=1e-5)
  assert float(steps_lib.mean_entropy_ratio({"a": jnp.zeros((3, 4))})) == pytest.approx(1.0)


def test_entropy_term_moves_arch_towards_a_decision():
  """With the loss independent of arch, only the entropy term drives the arch step: its
  gradient equals the entropy ratio's, and the reported loss is the task loss."""
  import flax.linen as nn

  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      self.variable("arch", "w", lambda: jnp.array([[0.3, -0.2], [0.1, 0.4]]))
      return nn.Dense(2)(x["n"].reshape(x["n"].shape[0], -1))

  x = {"n": jnp.ones((4, 2, 1))}
  batch = {"x": x, "y": jnp.array([0, 1, 0, 1])}
  tx = optax.sgd(1.0)
  s = steps_lib.Steps(Tiny(), "single", optax.sgd(0.1), tx, arch_entropy=0.5)
  state = s.init_state(jax.random.PRNGKey(0), x)
  new, out = s.arch_step(state, batch, jax.random.PRNGKey(1))
  want = state.arch["w"] - 0.5 * jax.grad(steps_lib.mean_entropy_ratio)(state.arch)["w"]
  np.testing.assert_allclose(new.arch["w"], want, rtol=1e-5)
  assert steps_lib.mean_entropy_ratio(new.arch) < steps_lib.mean_entropy_ratio(state.arch)
  plain = steps_lib.Steps(Tiny(), "single", optax.sgd(0.1), tx)
  _, out_plain = plain.arch_step(state, batch, jax.random.PRNGKey(1))
  assert float(out["loss"]) == pytest.approx(float(out_plain["loss"]))


def test_study_settings_apply_to_the_config():
  c = mfeat.get_config()
  table = study.settings(c)
  assert "config" in table and table["config"] == {}
  for name, overrides in table.items():
    got = study.apply_overrides(c, overrides)
    for key, value in overrides.items():
      node = got
      for part in key.split("."):
        node = node[part]
      assert node == value, (name, key)
  assert c.search.epochs == mfeat.get_config().search.epochs   # the original is not changed
  with pytest.raises(ConfigError, match="config.search.epoch is not"):
    study.apply_overrides(c, {"search.epoch": 3})


def test_arch_warmup_holds_the_arch_still():
  """warmup_epochs=2 with 3 arch steps an epoch: six zero updates, then the rate."""
  g = {"a": jnp.ones((2,))}
  tx = optim.arch_optimizer({"lr": 1e-2, "weight_decay": 0.0, "warmup_epochs": 2}, 3)
  state = tx.init(g)
  moves = []
  for _ in range(7):
    upd, state = tx.update(g, state, g)
    moves.append(float(jnp.abs(upd["a"]).max()))
  assert moves[:6] == [0.0] * 6 and moves[6] == pytest.approx(1e-2, rel=1e-4)


def test_compile_cache_location(tmp_path, monkeypatch):
  """config.compile_cache: a folder (made), '' off; the environment's choice wins."""
  from bmnas_jax import loop
  old = jax.config.jax_compilation_cache_dir
  c = mfeat.get_config()
  assert c.compile_cache == "default"
  try:
    assert loop.configure_compile_cache(c) == old            # the tests' own, from the env
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    c.compile_cache = str(tmp_path / "xla")
    assert loop.configure_compile_cache(c) == str(tmp_path / "xla")
    assert (tmp_path / "xla").is_dir()
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
    c.compile_cache = ""
    assert loop.configure_compile_cache(c) == ""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home"))
    assert loop.default_compile_cache() == str(tmp_path / "home" / "bmnas-jax" / "xla")
  finally:
    jax.config.update("jax_compilation_cache_dir", old)


def test_bench_flop_count_and_random_features():
  """The benchmark's flop count is XLA's (2 n^3 for an n x n matmul); random features
  have the config's node shapes."""
  from bmnas_jax import bench
  x = jnp.ones((64, 64), jnp.float32)
  assert bench.lowered_flops(jax.jit(lambda a: a @ a).lower(x)) == 2 * 64 ** 3
  assert bench.matmul_rate(n=64, repeats=1) > 0
  fs = bench.random_feature_set(mfeat.get_config(), (6, 4, 2))
  assert fs.node_names == ("Image_1", "Image_2", "Shape_1", "Shape_2")
  assert fs.splits["train"].features["Image_2"].shape == (6, 32, 4)
  assert fs.splits["test"].labels.shape == (2,)


def test_disk_errors_name_the_file(tmp_path):
  """A full disk while writing, as orbax reports it (a message, no errno) or as an
  OSError, becomes a DataError naming the file being written."""
  import errno
  from bmnas_jax import checkpoint
  from bmnas_jax.errors import DataError
  target = tmp_path / "search" / "checkpoints" / "3"
  with pytest.raises(DataError, match=f"{target}: cannot write: No space left on device"):
    with checkpoint.disk_errors(target):
      raise ValueError("tensorstore write failed: [OS error: No space left on device]")
  with pytest.raises(DataError, match="x.json: cannot write: Read-only file system"):
    with checkpoint.disk_errors(tmp_path / "x.json"):
      raise OSError(errno.EROFS, os.strerror(errno.EROFS))
  with pytest.raises(KeyError):                     # anything else is a bug: unchanged
    with checkpoint.disk_errors(target):
      raise KeyError("state")

"""The hypernet: collections, arch shapes, relaxation semantics, one compile."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmnas_jax import genotype as G
from bmnas_jax.data.feature_set import nodes_from_config
from bmnas_jax.fixed_net import FixedCell
from bmnas_jax.reshape import ReshapeInput
from bmnas_jax.search_space import SearchCell, hypernet_from_config
from experiments.configs import ego, mmimdb, ntu
from tests.conftest import jit_init, random_features, swap_cl, tiny_config

# (num_cells, nodes, steps, pool size) -> expected shapes per cell
EXPECTED = {
    "mmimdb": (6, 1, 2),
    "ntu": (8, 2, 2),
    "ego": (8, 3, 3),
}


@pytest.mark.parametrize("fidelity", ["paper", "reference"])
@pytest.mark.parametrize("mod", [mmimdb, ntu, ego], ids=["mmimdb", "ntu", "ego"])
def test_release_configs_collections_and_arch_shapes(mod, fidelity):
  c = mod.get_config()
  c.fidelity = fidelity
  nodes = nodes_from_config(c.data)
  net = hypernet_from_config(c, nodes)
  feats = {n.name: jnp.zeros((2, n.channels, n.length)) for n in nodes}
  v = jax.eval_shape(lambda: net.init(jax.random.key(0), feats))
  assert set(v) == {"params", "arch", "batch_stats"}
  n_nodes, steps, _ = EXPECTED[c.name]
  pool = 5 if fidelity == "paper" else 4
  edges = sum(2 + i for i in range(steps))
  assert jax.tree.map(lambda a: a.shape, v["arch"]) == {
      f"cell_{k}": {"alpha": (n_nodes + k, 2), "beta": (edges, 2), "gamma": (steps, pool)}
      for k in range(2)}
  flat_params = jax.tree_util.keystr(v["params"])
  for name in ("alpha", "beta", "gamma"):
    assert name not in flat_params


def test_arch_init_scale_and_two_slot_shapes():
  c = tiny_config(two_slot=True)
  nodes = nodes_from_config(c.data)
  v = jit_init(hypernet_from_config(c, nodes), random_features(nodes))
  a = v["arch"]["cell_1"]
  assert a["alpha"].shape == (2, 6, 2) and a["beta"].shape == (2, 5, 2)
  assert a["gamma"].shape == (2, 5)
  leaves = np.concatenate([np.ravel(x) for x in jax.tree.leaves(v["arch"])])
  assert 0 < np.std(leaves) < 3e-3          # 1e-3 * N(0, 1)


def test_forward_compiles_once_and_uses_all_collections(tiny):
  nodes = nodes_from_config(tiny.data)
  net = hypernet_from_config(tiny, nodes)
  v = jit_init(net, random_features(nodes))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def forward(variables, feats):
    logits, upd = net.apply(variables, feats, True, rngs={"dropout": jax.random.key(1)},
                            mutable=["batch_stats"])
    return logits, upd

  for seed in range(3):
    logits, upd = forward(v, random_features(nodes, seed=seed))
    assert logits.shape == (4, 3) and np.all(np.isfinite(logits))
  assert set(upd) == {"batch_stats"}
  # The arch weights change the output.
  arch2 = jax.tree.map(lambda a: a + 1.0 * jnp.arange(a.size).reshape(a.shape) % 3, v["arch"])
  apply = jax.jit(lambda variables, feats: net.apply(variables, feats))
  l1 = apply(v, random_features(nodes))
  l2 = apply({**v, "arch": arch2}, random_features(nodes))
  assert not np.allclose(l1, l2)


@pytest.mark.parametrize("fidelity", ["paper", "reference"])
def test_two_slot_search_cell_equals_fixed_cell_when_one_hot(fidelity):
  """With saturated arch weights the two-slot relaxation is the derived Cell."""
  preds = jax.random.normal(jax.random.key(0), (4, 3, 8, 4))        # [P, N, C, L]
  cell = SearchCell(steps=2, node_multiplier=2, fidelity=fidelity, two_slot=True)
  v = jit_init(cell, preds, seed=1)
  big = 40.0
  pool = ("Zero",) * (fidelity == "paper") + ("Sum", "ScaleDotAttn", "LinearGLU", "ConcatFC")

  def one_hot_edges(n, picks):            # Identity on the picked index per slot
    a = np.zeros((2, n, 2), np.float32)
    a[..., 0] = big
    for slot, i in enumerate(picks):
      a[slot, i] = [-big, big]
    return a

  beta = np.concatenate([one_hot_edges(2, (1, 0)), one_hot_edges(3, (2, 0))], axis=1)
  gamma = np.full((2, len(pool)), -big, np.float32)
  gamma[0, pool.index("LinearGLU")] = big
  gamma[1, pool.index("ConcatFC")] = big
  arch = {"alpha": one_hot_edges(4, (3, 1)), "beta": beta, "gamma": gamma}
  out_search = jax.jit(cell.apply)({**v, "arch": arch}, preds)

  g = G.derive({"cell_0": arch}, ["a", "b", "c", "d"], num_cells=1, steps=2, multiplier=1,
               node_multiplier=2, fidelity=fidelity, two_slot=True)
  gene = g.cells[0]
  assert gene.inputs == (3, 1)
  assert gene.steps == (G.StepGene("LinearGLU", (1, 0)), G.StepGene("ConcatFC", (2, 0)))
  fixed = FixedCell(gene, fidelity)
  fv = jit_init(fixed, preds[3], preds[1], seed=2)
  params = {k: v["params"][k] for k in fv["params"]}                # transplant weights
  stats = {k: v["batch_stats"][k] for k in fv.get("batch_stats", {})}
  out_fixed = jax.jit(fixed.apply)({"params": params, "batch_stats": stats}, preds[3],
                                   preds[1])
  np.testing.assert_allclose(out_search, out_fixed, rtol=1e-5, atol=1e-5)


def test_config_errors_name_the_key():
  c = tiny_config(multiplier=3)
  with pytest.raises(ValueError, match=r"config.model.multiplier=3"):
    hypernet_from_config(c, nodes_from_config(c.data))
  c = tiny_config()
  c.fidelity = "torch"
  with pytest.raises(ValueError, match=r"config.fidelity='torch'"):
    hypernet_from_config(c, nodes_from_config(c.data))


@pytest.mark.parametrize("l_in", [1, 3, 8])
def test_reshape_input_equals_conv_of_the_resized_input(l_in):
  """ReshapeInput (train mode) = ReLU(BN_batch(conv(nearest-resize(x)))) computed here in
  numpy: convolving a short input before repeating it changes nothing, the running
  statistics included."""
  C, L = 6, 4
  x = np.random.default_rng(0).standard_normal((5, 7, l_in)).astype(np.float32)
  m = ReshapeInput(C, L, 0.0, "reference")
  v = m.init(jax.random.key(0), x)
  y, upd = m.apply(v, x, True, mutable=["batch_stats"])
  idx = np.minimum(np.floor(np.arange(L) * l_in / L).astype(int), l_in - 1)
  xr = x[:, :, idx]
  p = v["params"]
  z = np.einsum("ncl,cd->ndl", xr, np.asarray(p["conv"]["kernel"])) + \
      np.asarray(p["conv"]["bias"])[None, :, None]
  mean, var = z.mean(axis=(0, 2)), z.var(axis=(0, 2))
  want = np.maximum((z - mean[None, :, None]) / np.sqrt(var[None, :, None] + 1e-5)
                    * np.asarray(p["bn"]["scale"])[None, :, None]
                    + np.asarray(p["bn"]["bias"])[None, :, None], 0)
  np.testing.assert_allclose(swap_cl(y), want, rtol=1e-4, atol=1e-5)
  n = z.shape[0] * L
  np.testing.assert_allclose(upd["batch_stats"]["bn"]["var"],
                             0.9 + 0.1 * var * n / (n - 1), rtol=1e-5)
  np.testing.assert_allclose(upd["batch_stats"]["bn"]["mean"], 0.1 * mean, rtol=1e-5,
                             atol=1e-7)

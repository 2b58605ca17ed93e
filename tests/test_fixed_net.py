"""Fixed networks from genotypes: used reshapes only, Fig. 2 cells, one compile."""

import chex
import jax
import numpy as np
import pytest

from bmnas_jax import genotype as G
from bmnas_jax.data.feature_set import nodes_from_config
from bmnas_jax.fixed_net import fixed_net_from_config
from tests.conftest import jit_init, random_features, tiny_config

NODES = ("A_1", "A_2", "B_1", "B_2", "B_3")


def fig2_genotype():
  """Four Cells, one of each Fig. 2 kind; features A_2 and B_2 unused."""
  cells = (G.fusion_cell("Sum", (0, 2)), G.fusion_cell("ConcatFC", (5, 4)),
           G.fusion_cell("MHA", (6, 0)), G.fusion_cell("AoA", (7, 5)))
  return G.validate(G.Genotype(NODES, cells, (7, 8)))


@pytest.mark.parametrize("fidelity", ["paper", "reference"])
def test_fig2_cells_run_and_reshape_only_used_nodes(fidelity):
  c = tiny_config(fidelity)
  nodes = nodes_from_config(c.data)
  net = fixed_net_from_config(c, nodes, fig2_genotype())
  v = jit_init(net, random_features(nodes))
  assert set(v["params"]) == {"reshape_A_1", "reshape_B_1", "reshape_B_3", "cell_0", "cell_1",
                              "cell_2", "cell_3", "head"}
  assert "arch" not in v
  assert set(v["params"]["cell_3"]) == {"step0_ScaleDotAttn", "step1_LinearGLU", "tail"} - (
      {"step0_ScaleDotAttn"} if fidelity == "paper" else set())
  assert "out_conv" in v["params"]["cell_2"]["tail"]          # MHA concatenates two heads

  @jax.jit
  @chex.assert_max_traces(n=1)
  def forward(variables, feats, key):
    return net.apply(variables, feats, True, rngs={"dropout": key}, mutable=["batch_stats"])

  for seed in range(2):
    logits, _ = forward(v, random_features(nodes, seed=seed), jax.random.key(seed))
    assert logits.shape == (4, 3) and np.all(np.isfinite(logits))


def test_genotype_must_match_the_nodes():
  c = tiny_config()
  nodes = nodes_from_config(c.data)
  g = G.Genotype(("A_1", "B_1"), (G.fusion_cell("Sum", (0, 1)),), (2,))
  with pytest.raises(G.GenotypeError, match=r"nodes: genotype has \['A_1', 'B_1'\]"):
    fixed_net_from_config(c, nodes, g)


def test_dynamic_inputs_compute_the_static_networks():
  """Networks that differ only in their Cells' inputs as one program: with the inputs in
  the `arch` collection, each equals its static network on the parameters they share,
  and the same compiled forward serves both selections."""
  c = tiny_config()
  nodes = nodes_from_config(c.data)
  g = fig2_genotype()
  other = G.random_selection(g, np.random.default_rng(3))
  assert other.cells[0].inputs != g.cells[0].inputs
  dynamic = fixed_net_from_config(c, nodes, g, dynamic_inputs=True)
  v = jit_init(dynamic, random_features(nodes))
  assert {f"reshape_{n}" for n in NODES} <= set(v["params"])        # every feature reshaped
  np.testing.assert_array_equal(v["arch"]["inputs"], [c_.inputs for c_ in g.cells])
  feats = random_features(nodes, seed=1)
  forward = jax.jit(chex.assert_max_traces(n=1)(
      lambda variables, x: dynamic.apply(variables, x, False)))
  for genotype in (g, other):
    static = fixed_net_from_config(c, nodes, genotype)
    own = jit_init(static, feats)
    shared = {col: {k: p for k, p in v[col].items() if k in own[col]}
              for col in ("params", "batch_stats")}
    want = jax.jit(lambda variables, x: static.apply(variables, x, False))(shared, feats)
    inputs = np.asarray([c_.inputs for c_ in genotype.cells], np.int32)
    got = forward({**v, "arch": {"inputs": inputs}}, feats)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

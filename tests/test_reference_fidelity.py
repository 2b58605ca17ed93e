"""The original release's behaviour under `fidelity='reference'`: PyTorch BatchNorm
running statistics, whole-Cell Table 7 fusions, val batches in the arch step."""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmnas_jax import ablate, layers, ops, optim, release_fusion
from bmnas_jax import genotype as G
from bmnas_jax.data.feature_set import nodes_from_config
from bmnas_jax.errors import ConfigError
from bmnas_jax.fixed_net import fixed_net_from_config
from bmnas_jax.reshape import ReshapeInput
from bmnas_jax.steps import Steps
from tests.conftest import random_features, swap_cl as T, tiny_config

N, C, L = 4, 8, 3
EPS = 1e-5
_rng = np.random.default_rng(0)
X = _rng.normal(size=(N, C, L)).astype(np.float32)
Y = _rng.normal(size=(N, C, L)).astype(np.float32)


def _randomized(variables, seed=1):
  """Every leaf replaced by random values (variances kept positive)."""
  leaves, tree = jax.tree.flatten_with_path(variables)
  rng = np.random.default_rng(seed)
  out = []
  for path, leaf in leaves:
    v = rng.normal(size=np.shape(leaf)).astype(np.float32) * 0.5
    if path[-1].key == "var":
      v = np.abs(v) + 0.5
    out.append(v)
  return jax.tree.unflatten(tree, out)


# ---------------------------------------------------------------- BatchNorm


@pytest.mark.parametrize("fidelity,ddof", [("paper", 0), ("reference", 1)])
def test_batch_norm_running_variance(fidelity, ddof):
  bn = layers.batch_norm(True, fidelity=fidelity)
  assert bn.unbiased_running_var == (fidelity == "reference")
  v = bn.init(jax.random.key(0), T(X))
  assert jax.tree.map(np.shape, v) == {"params": {"scale": (C,), "bias": (C,)},
                                       "batch_stats": {"mean": (C,), "var": (C,)}}
  out, upd = bn.apply(v, T(X), mutable=["batch_stats"])
  mu, var = X.mean(axis=(0, 2)), X.var(axis=(0, 2))
  np.testing.assert_allclose(T(out), (X - mu[:, None]) / np.sqrt(var[:, None] + EPS),
                             rtol=1e-4, atol=1e-5)
  stats = upd["batch_stats"]
  np.testing.assert_allclose(stats["mean"], 0.1 * mu, rtol=1e-5, atol=1e-7)
  want = 0.9 * 1.0 + 0.1 * X.transpose(1, 0, 2).reshape(C, -1).var(axis=1, ddof=ddof)
  np.testing.assert_allclose(stats["var"], want, rtol=1e-5)
  # eval mode uses the running statistics
  ev = layers.batch_norm(False, fidelity=fidelity).apply({**v, "batch_stats": stats}, T(X))
  np.testing.assert_allclose(
      T(ev), (X - stats["mean"][:, None]) / np.sqrt(np.asarray(stats["var"])[:, None] + EPS),
      rtol=1e-4, atol=1e-5)


def _unbiased_blend(z):
  """0.9 * 1 + 0.1 * var(ddof=1) per channel of `[N, C', L]` activations."""
  z = np.asarray(z)
  return 0.9 + 0.1 * z.transpose(1, 0, 2).reshape(z.shape[1], -1).var(axis=1, ddof=1)


@pytest.mark.parametrize("case", ["reshape", "tail", "LinearGLU", "ConcatFC"])
def test_fusion_batch_norms_follow_the_fidelity(case):
  """The BatchNorm inside each layer gets PyTorch's running variance under reference
  (checked against the captured conv output), and flax's under paper."""
  if case == "reshape":
    make = lambda f: ReshapeInput(C, L, 0.0, f)                       # noqa: E731
    args, conv, bn = (X[:, :5],), "conv", "bn"
  elif case == "tail":
    make = lambda f: layers.CellTail(0.0, f)                          # noqa: E731
    args, conv, bn = ([T(X), T(Y)], T(X)), "out_conv", "out_bn"
  else:
    make = lambda f: ops.make_op(case, f, 0.0) if f == "reference" else None  # noqa: E731
    args, conv, bn = (T(X), T(Y)), "conv", "bn"
  for fidelity in ("reference", "paper"):
    m = make(fidelity)
    if m is None:
      continue
    v = m.init(jax.random.key(0), *args)
    (_, state) = m.apply(v, *args, True, mutable=["batch_stats", "intermediates"],
                         capture_intermediates=True)
    z = T(state["intermediates"][conv]["__call__"][0])            # [N, C', L]
    got = np.asarray(state["batch_stats"][bn]["var"])
    want = _unbiased_blend(z)
    if fidelity == "reference":
      np.testing.assert_allclose(got, want, rtol=1e-5)
    else:
      n = z.shape[0] * z.shape[2]
      np.testing.assert_allclose(got, 0.9 + (want - 0.9) * (n - 1) / n, rtol=1e-5)


# ---------------------------------------------------- release whole-Cell fusions


def _attn(x, y):
  s = np.einsum("ncq,nck->nqk", x, y) / np.sqrt(x.shape[1])
  w = np.exp(s - s.max(axis=-1, keepdims=True))
  w /= w.sum(axis=-1, keepdims=True)
  return np.einsum("nqk,nck->ncq", w, y)


def _ln(z, p):
  mu, var = z.mean(axis=(1, 2), keepdims=True), z.var(axis=(1, 2), keepdims=True)
  return (z - mu) / np.sqrt(var + EPS) * p["scale"] + p["bias"]


def _conv(z, p):
  return np.einsum("ncl,cd->ndl", z, p["kernel"]) + p["bias"][None, :, None]


def _bn_eval(z, p, s):
  return ((z - s["mean"][:, None]) / np.sqrt(s["var"][:, None] + EPS) * p["scale"][:, None]
          + p["bias"][:, None])


def _fusion(name):
  m = release_fusion.make_fusion(name, 0.2)
  v = _randomized(m.init(jax.random.key(0), T(X), T(Y)))
  p, s = jax.tree.map(np.asarray, (v.get("params", {}), v.get("batch_stats", {})))
  return m, v, p, s


def test_sum_and_concat_fc_fusions():
  m, v, p, s = _fusion("Sum")
  assert v == {} and np.allclose(T(m.apply(v, T(X), T(Y))), X + Y)
  m, v, p, s = _fusion("ConcatFC")
  assert jax.tree.map(np.shape, p) == {"conv": {"kernel": (2 * C, C), "bias": (C,)},
                                       "bn": {"scale": (C,), "bias": (C,)}}
  want = np.maximum(_bn_eval(_conv(np.concatenate([X, Y], 1), p["conv"]), p["bn"], s["bn"]), 0)
  np.testing.assert_allclose(T(m.apply(v, T(X), T(Y))), want, rtol=1e-4, atol=1e-5)


def test_mha_fusion_is_two_attention_heads_with_a_projection():
  m, v, p, s = _fusion("MHA")
  assert jax.tree.map(np.shape, p) == {
      "scale_dot_attn1": {"ln": {"scale": (C, L), "bias": (C, L)}},
      "scale_dot_attn2": {"ln": {"scale": (C, L), "bias": (C, L)}},
      "conv": {"kernel": (2 * C, C), "bias": (C,)}, "bn": {"scale": (C,), "bias": (C,)}}
  a = _attn(X, Y)
  heads = np.concatenate([_ln(a, p["scale_dot_attn1"]["ln"]),
                          _ln(a, p["scale_dot_attn2"]["ln"])], axis=1)
  want = np.maximum(_bn_eval(_conv(heads, p["conv"]), p["bn"], s["bn"]), 0)
  np.testing.assert_allclose(T(m.apply(v, T(X), T(Y))), want, rtol=1e-4, atol=1e-5)


def test_aoa_fusion_gates_attention_by_the_query():
  m, v, p, s = _fusion("AoA")
  assert jax.tree.map(np.shape, p) == {
      "scale_dot_attn": {"ln": {"scale": (C, L), "bias": (C, L)}},
      "cat_conv_glu": {"conv": {"kernel": (2 * C, 2 * C), "bias": (2 * C,)},
                       "bn": {"scale": (2 * C,), "bias": (2 * C,)}}}
  attended = _ln(_attn(X, Y), p["scale_dot_attn"]["ln"])
  g = p["cat_conv_glu"]
  z = _bn_eval(_conv(np.concatenate([X, attended], 1), g["conv"]), g["bn"],
               s["cat_conv_glu"]["bn"])
  want = z[:, :C] / (1 + np.exp(-z[:, C:]))                        # i * sigmoid(g)
  np.testing.assert_allclose(T(m.apply(v, T(X), T(Y))), want, rtol=1e-4, atol=1e-5)


def _searched():
  nodes = ("A_1", "A_2", "B_1", "B_2", "B_3")
  cells = (G.CellGene((0, 2), (G.StepGene("ConcatFC", (0, 1)), G.StepGene("Sum", (2, 0))),
                      (2, 3)),
           G.CellGene((5, 4), (G.StepGene("LinearGLU", (1, 0)), G.StepGene("Sum", (2, 1))),
                      (2, 3)))
  return G.validate(G.Genotype(nodes, cells, (5, 6)))


def test_reference_table7_model_replaces_whole_cells():
  c = tiny_config("reference")
  nodes = nodes_from_config(c.data)
  fs = types.SimpleNamespace(nodes=nodes)
  feats = random_features(nodes)
  for table, name, g in ablate.ablation_genotypes(_searched(), 0, random_trials=1):
    model = ablate.release_fusion_model(c, fs, table, name, g)
    if table != "fusion":
      assert model is None
      continue
    assert model.fusion_cells == name and model.genotype == g
    v = jax.eval_shape(lambda k: model.init(k, feats), jax.random.key(0))["params"]
    cells = set() if name == "Sum" else {"cell_0", "cell_1"}         # Sum has no weights
    assert set(v) == {"reshape_A_1", "reshape_B_1", "reshape_B_3", "head"} | cells
    for k in ("cell_0", "cell_1"):
      cell = v.get(k, {})
      assert "tail" not in cell and "ln" not in cell                # no CellTail
      if name == "MHA":
        assert cell["conv"]["kernel"].shape == (2 * C, C)
        assert {"scale_dot_attn1", "scale_dot_attn2"} <= set(cell)
    logits = jax.eval_shape(lambda k: model.apply(model.init(k, feats), feats, True,
                                                  rngs={"dropout": k}, mutable=["batch_stats"]),
                            jax.random.key(0))[0]
    assert logits.shape == (4, 3)


def test_paper_ablation_is_unchanged():
  c = tiny_config("paper")
  fs = types.SimpleNamespace(nodes=nodes_from_config(c.data))
  searched = _searched()
  fusion = [(n, g) for t, n, g in ablate.ablation_genotypes(searched, 0, 1) if t == "fusion"]
  assert [n for n, _ in fusion] == ["Sum", "ConcatFC", "MHA", "AoA"]
  want = {"Sum": ((G.StepGene("Sum", (0, 1)),), (2,)),
          "ConcatFC": ((G.StepGene("ConcatFC", (0, 1)),), (2,)),
          "MHA": ((G.StepGene("ScaleDotAttn", (0, 1)), G.StepGene("ScaleDotAttn", (0, 1))),
                  (2, 3)),
          "AoA": ((G.StepGene("ScaleDotAttn", (0, 1)), G.StepGene("LinearGLU", (2, 0))), (3,))}
  for name, g in fusion:
    assert g.concat == searched.concat
    assert [cell.inputs for cell in g.cells] == [cell.inputs for cell in searched.cells]
    assert all((cell.steps, cell.concat) == want[name] for cell in g.cells)
    assert ablate.release_fusion_model(c, fs, "fusion", name, g) is None
  with pytest.raises(ConfigError, match="needs config.fidelity='reference'"):
    fixed_net_from_config(c, fs.nodes, fusion[0][1], fusion_cells="Sum")
  with pytest.raises(ConfigError, match="valid: Sum, ConcatFC, MHA, AoA"):
    fixed_net_from_config(tiny_config("reference"), fs.nodes, fusion[0][1],
                          fusion_cells="GatedSum")


# ----------------------------------------------------------------- arch step


class _ArchBN(nn.Module):
  """The smallest model with arch weights and a fusion BatchNorm: channels-last states
  A `[N, L, C]`, B `[N, L, C]` -> logits `[N, 3]`."""
  fidelity: str

  @nn.compact
  def __call__(self, x, train: bool = False):
    a = self.variable("arch", "w", lambda: jnp.array([0.3, -0.2])).value
    h = layers.batch_norm(train, name="bn", fidelity=self.fidelity)(a[0] * x["A"] + a[1] * x["B"])
    return layers.Linear(3, name="head")(h.reshape(h.shape[0], -1))


@pytest.mark.parametrize("fidelity", ["paper", "reference"])
def test_arch_step_batch_stats(fidelity):
  c = tiny_config(fidelity)
  model = _ArchBN(fidelity)
  steps = Steps.from_config(model, "single", optim.torch_adam_l2(1e-2),
                            optim.arch_optimizer(c.search.arch_opt), c)
  assert steps.arch_updates_batch_stats == (fidelity == "reference")
  batch = {"x": {"A": T(X), "B": T(Y)}, "y": np.array([0, 1, 2, 1])}
  state = steps.init_state(jax.random.PRNGKey(0), batch["x"])
  new, out = jax.jit(steps.arch_step)(state, batch, jax.random.key(5))
  assert int(out["bad"]) == 0
  assert not np.array_equal(new.arch["w"], state.arch["w"])
  assert jax.tree.all(jax.tree.map(np.array_equal, new.params, state.params))
  bs, bs0 = new.batch_stats["bn"], state.batch_stats["bn"]
  if fidelity == "paper":
    assert np.array_equal(bs["mean"], bs0["mean"]) and np.array_equal(bs["var"], bs0["var"])
  else:                  # the val batch folded in with the arch before the step, as torch does
    z = 0.3 * X - 0.2 * Y
    np.testing.assert_allclose(bs["mean"], 0.1 * z.mean(axis=(0, 2)), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(bs["var"], _unbiased_blend(z), rtol=1e-5)

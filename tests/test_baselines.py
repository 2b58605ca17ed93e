"""The trained baselines: which features each one reads, and the MLP's numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmnas_jax import baselines
from bmnas_jax.errors import ConfigError
from experiments.configs import mfeat

NODES = ("Image_1", "Image_2", "Shape_1", "Shape_2")


def test_specs_read_the_right_features():
  c = mfeat.get_config()
  specs = {s["name"]: s for s in baselines.baseline_specs(c, NODES)}
  assert list(specs) == ["unimodal_Image", "unimodal_Shape", "concat_mlp",
                         "late_fusion_release", "late_fusion"]
  assert specs["unimodal_Image"]["model"].nodes == ("Image_2",)
  assert specs["unimodal_Shape"]["model"].nodes == ("Shape_2",)
  assert specs["concat_mlp"]["model"].nodes == NODES and not specs["concat_mlp"]["model"].reshape
  assert specs["late_fusion_release"]["model"].nodes == ("Image_2", "Shape_2")
  assert specs["late_fusion"]["genotype"].cells[0].inputs == (1, 3)
  c.evaluate.baselines = ("unimodal", "ensemble")
  with pytest.raises(ConfigError, match="config.evaluate.baselines.*'ensemble'"):
    baselines.baseline_specs(c, NODES)


def test_mlp_against_numpy():
  """Eval mode: flatten, concat, Linear, ReLU, BatchNorm (running stats), Linear."""
  rng = np.random.default_rng(0)
  x = {"a": rng.normal(size=(3, 2, 4)).astype(np.float32),
       "b": rng.normal(size=(3, 5, 1)).astype(np.float32)}
  net = baselines.MLPBaseline(("a", "b"), False, C=8, L=4, hidden=6, num_classes=3)
  v = net.init(jax.random.PRNGKey(0), x)
  stats = {"mean": rng.normal(size=6).astype(np.float32),
           "var": rng.uniform(0.5, 2.0, size=6).astype(np.float32)}
  v = {"params": v["params"], "batch_stats": {"bn": stats}}
  v["params"]["bn"] = {"scale": jnp.asarray(rng.normal(size=6), jnp.float32),
                       "bias": jnp.asarray(rng.normal(size=6), jnp.float32)}
  got = net.apply(v, x, False)
  p = jax.tree.map(np.asarray, v["params"])
  flat = np.concatenate([x["a"].reshape(3, -1), x["b"].reshape(3, -1)], axis=1)
  h = np.maximum(flat @ p["fc1"]["Dense_0"]["kernel"] + p["fc1"]["Dense_0"]["bias"], 0)
  h = (h - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * p["bn"]["scale"] + p["bn"]["bias"]
  want = h @ p["fc2"]["Dense_0"]["kernel"] + p["fc2"]["Dense_0"]["bias"]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

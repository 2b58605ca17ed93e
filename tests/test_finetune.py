"""Evaluation with backbone fine-tuning: features at init, frozen backbones, seeds under vmap."""

import functools
import json
import os

import jax
import numpy as np
import optax
import pytest
from sklearn.metrics import accuracy_score

from bmnas_jax import finetune, loop
from bmnas_jax.checkpoint import Checkpointer
from bmnas_jax.data import prepare
from bmnas_jax.errors import ConfigError, DataError
from bmnas_jax.genotype import CellGene, Genotype, StepGene, validate
from bmnas_jax.search import seed_keys
from tests import test_prepare

NODES = ("Img_1", "Img_2", "Vec_1", "Vec_2")
# Two Cells reading every node: (Img_1, Vec_2) and (Img_2, Vec_1).
EVERY_NODE = validate(Genotype(NODES, (
    CellGene((0, 3), (StepGene("ConcatFC", (0, 1)),), (2,)),
    CellGene((1, 2), (StepGene("Sum", (0, 1)),), (2,))), (4, 5)))
VEC_ONLY = validate(Genotype(NODES, (CellGene((2, 3), (StepGene("Sum", (0, 1)),), (2,)),), (4,)))


def _config(**evaluate):
  """The quadrants dataset of test_prepare: a CNN (Img) and an MLP (Vec), both with
  weights; both exported at their seeded init (no backbone training, no probes)."""
  c = test_prepare.config()
  c.backbones.Img.weights = "init"
  c.prepare.probe_examples = 0
  c.seeds = 2
  c.evaluate.epochs, c.evaluate.batch_size = 2, 16
  c.evaluate.finetune_backbones = True
  c.evaluate.update(evaluate)
  return c


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("finetune"))
  c = _config()
  prepare.run_prepare(c, wd)
  return c, wd


@functools.partial(jax.jit, static_argnums=0)
@functools.partial(jax.vmap, in_axes=(None, 0, 0, None, None))
def _forward(model, params, batch_stats, x, stored_x):
  """Per seed: the pooled backbone features, the model's logits, and the fusion net's
  logits on the stored features (`[S, ...]`)."""
  feats = model.backbones.apply({"params": params["backbones"]}, x, False)
  logits = model.apply({"params": params, "batch_stats": batch_stats}, x, False)
  ref = model.fusion.apply({"params": params["fusion"], "batch_stats": batch_stats["fusion"]},
                           stored_x, False)
  return feats, logits, ref


@pytest.fixture(scope="module")
def frozen_run(prepared):
  """Two seeds, two epochs, backbone learning rate 0; the initial and the final states."""
  _, wd = prepared
  c = _config(backbone_lr_mult=0.0)
  out = finetune.run_finetune(c, wd, EVERY_NODE, stage="ft_frozen")
  ft = finetune.build_finetune(c, wd, EVERY_NODE)
  mesh = loop.mesh_from_config(c)
  with jax.set_mesh(mesh):        # as run_finetune makes them (the same compiled program)
    sample = loop.replicate(jax.tree.map(lambda a: a[:2], ft.data.splits["train"].features), mesh)
    keys = loop.shard_seeds(seed_keys(out["seeds"], 1), mesh)
  init = loop.SeedInit(lambda k: ft.init_state(k, sample), (keys,), mesh)()
  ckpt = Checkpointer(os.path.join(wd, "ft_frozen", "checkpoints"))
  try:
    final = ckpt.restore_state(ckpt.latest(), init)
  finally:
    ckpt.close()
  return c, wd, out, ft, init, final


def test_features_at_init_equal_the_stored_ones(prepared, frozen_run):
  c, wd = prepared
  _, _, _, ft, init, _ = frozen_run
  stored = prepare.load_features(c, wd).splits["test"].features
  params = init.params
  assert set(params) == {"backbones", "fusion"} and set(params["backbones"]) == {"Img", "Vec"}
  feats, logits, ref = _forward(ft.model, params, init.batch_stats,
                                ft.data.splits["test"].features, stored)
  assert sorted(feats) == sorted(NODES)
  for node in NODES:
    for s in range(2):
      np.testing.assert_allclose(feats[node][s], stored[node], rtol=1e-5, atol=1e-6,
                                 err_msg=node)
  # The whole model gives the fixed net's logits on the stored features.
  np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-5)


def test_only_the_used_modalities_get_backbones(prepared):
  c, wd = prepared
  ft = finetune.build_finetune(c, wd, VEC_ONLY)
  assert set(ft.exported) == {"Vec"} and set(ft.data.splits["train"].features) == {"Vec"}
  sample = jax.tree.map(lambda a: a[:2], ft.data.splits["train"].features)
  shapes = jax.eval_shape(ft.init_state, jax.random.PRNGKey(0), sample)
  assert set(shapes.params["backbones"]) == {"Vec"}


def test_frozen_backbones_stay_and_the_fusion_net_learns(frozen_run):
  c, wd, out, ft, init, final = frozen_run
  for s in range(2):
    for m, exported in ft.exported.items():
      jax.tree.map(lambda a, b, s=s: np.testing.assert_array_equal(a[s], b),
                   final.params["backbones"][m], exported["params"])
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                                       final.params["fusion"], init.params["fusion"]))
  assert max(moved) > 1e-4

  # Seeds under vmap: per-seed results, the metric is scikit-learn's accuracy of the
  # final state's predictions.
  assert out["seeds"] == [0, 1] and out["epochs"] == 2 and out["epoch_traces"] == 1
  assert len(out["final_test"]["values"]) == 2 and out["backbone_lr_mult"] == 0.0
  assert out["val_selected"]["val_held_out"] is False
  assert out["genotype"] == EVERY_NODE.to_json_dict()
  test = ft.data.splits["test"]
  _, logits, _ = _forward(ft.model, final.params, final.batch_stats, test.features,
                          prepare.load_features(c, wd).splits["test"].features)
  last = [json.loads(line) for line in open(os.path.join(wd, "ft_frozen", "metrics.jsonl"))][-1]
  for s in range(2):
    acc = accuracy_score(test.labels, np.argmax(np.asarray(logits[s]), -1))
    assert last["test_metric"][s] == pytest.approx(acc, abs=1e-6)
    assert out["final_test"]["values"][s] == pytest.approx(acc, abs=1e-6)
  with open(os.path.join(wd, "ft_frozen", "metrics.json")) as f:
    assert json.load(f)["final_test"] == out["final_test"]

  # A re-run reuses the finished stage (resumed from its last checkpoint).
  again = finetune.run_finetune(c, wd, EVERY_NODE, stage="ft_frozen")
  assert again["final_test"] == out["final_test"] and again["epoch_traces"] == 0


def test_backbone_updates_are_the_fusion_updates_scaled():
  """Labels by the top-level entry: `backbones` gets the same transform times the
  multiplier (its own moments), everything else the transform itself; 0 freezes."""
  params = {"backbones": {"Img": {"w": np.ones(3, np.float32)}},
            "fusion": {"cell_0": {"w": np.ones(3, np.float32)},
                       "backbones_x": {"w": np.ones(2, np.float32)}}}
  grads = jax.tree.map(lambda a: np.linspace(1, 2, a.size, dtype=np.float32), params)
  base = optax.adam(1e-2)
  for mult in (0.1, 0.0):
    tx = finetune.finetune_optimizer(base, mult)
    upd, _ = tx.update(grads, tx.init(params), params)
    ref, _ = base.update(grads, base.init(params), params)
    np.testing.assert_allclose(upd["backbones"]["Img"]["w"], mult * ref["backbones"]["Img"]["w"],
                               rtol=1e-6)
    for k in ("cell_0", "backbones_x"):
      np.testing.assert_allclose(upd["fusion"][k]["w"], ref["fusion"][k]["w"], rtol=1e-6)


def test_errors_name_the_config_key(prepared, tmp_path):
  c, wd = prepared
  with pytest.raises(ConfigError, match="config.evaluate.backbone_lr_mult"):
    finetune.build_finetune(_config(backbone_lr_mult=-1.0), wd, EVERY_NODE)
  with pytest.raises(DataError, match="run it first"):
    finetune.build_finetune(c, str(tmp_path), EVERY_NODE)

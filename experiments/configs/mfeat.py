"""UCI Multiple Features (embedded): digit image + shape descriptors, 10 classes, CPU-sized."""

import ml_collections

from experiments.configs import common


def backbone(name: str, epochs: int, batch_size: int, lr: float,
             seed: int = 0) -> ml_collections.ConfigDict:
  """One unimodal backbone (a key of `bmnas_jax.data.backbones.BACKBONES`) and its training."""
  return ml_collections.ConfigDict(dict(name=name, epochs=epochs, batch_size=batch_size, lr=lr,
                                        seed=seed))


def get_config():
  c = common.base_config()
  c.name = "mfeat"
  c.data.source = "mfeat"
  c.data.modalities = ("Image", "Shape")
  c.data.split_seed = 0             # mfeat.split_indices: 1200/400/400, stratified
  c.data.pool_grid = 2              # image taps max-pooled to 2x2 positions (L_in = 4)
  # digit_cnn taps conv1 [8, 7, 16], conv2 [4, 3, 32]; shape_mlp taps hidden1 [128], hidden2 [64].
  c.data.channels = {"Image": (16, 32), "Shape": (128, 64)}
  c.data.length = 4
  c.data.lengths = {"Shape": (1, 1)}

  c.backbones = ml_collections.ConfigDict()
  c.backbones.Image = backbone("digit_cnn", epochs=15, batch_size=64, lr=3e-3)
  c.backbones.Shape = backbone("shape_mlp", epochs=15, batch_size=64, lr=1e-3)

  c.model.C, c.model.L = 32, 4
  c.model.num_cells, c.model.multiplier = 2, 2
  c.model.steps, c.model.node_multiplier = 2, 2
  c.model.num_classes = 10
  c.model.dropout = 0.1
  c.metric.name = "accuracy"
  c.seeds = 5
  c.stages = "search,evaluate,ablate,report"
  c.search.epochs, c.search.batch_size = 10, 64
  c.search.weight_opt = common.weight_opt(3e-3, 1e-4, t_i=10, t_mult=2)
  c.search.arch_opt.lr = 3e-3
  c.evaluate.epochs, c.evaluate.batch_size = 10, 64
  c.evaluate.dropout = 0.1
  c.evaluate.weight_opt = common.weight_opt(3e-3, 1e-4, t_i=10, t_mult=2)
  return c

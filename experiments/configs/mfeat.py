"""UCI Multiple Features (embedded): digit image + shape descriptors, 10 classes, CPU-sized."""

from experiments.configs import common


def get_config():
  c = common.base_config()
  c.name = "mfeat"
  c.data.source = "mfeat"           # bmnas_jax/data/mfeat.py: get_dataset
  c.data.modalities = ("Image", "Shape")
  c.data.split_seed = 0             # mfeat.split_indices: 1200/400/400, stratified
  # digit_cnn taps conv1 [8, 7, 16], conv2 [4, 3, 32] (grid-pooled to 2x2: L_in = 4);
  # shape_mlp taps hidden1 [128], hidden2 [64] (vectors: L_in = 1).
  c.data.channels = {"Image": (16, 32), "Shape": (128, 64)}
  c.data.length = 4
  c.data.lengths = {"Shape": (1, 1)}

  c.backbones.Image = common.backbone(
      "digit_cnn", {"num_classes": 10, "features": (16, 32)}, taps=("conv1", "conv2"),
      pool="grid", epochs=15, batch_size=64, lr=3e-3)
  c.backbones.Shape = common.backbone(
      "shape_mlp", {"num_classes": 10, "hidden": (128, 64)}, taps=("hidden1", "hidden2"),
      pool="first", epochs=15, batch_size=64, lr=1e-3)

  c.model.C, c.model.L = 32, 4
  c.model.num_cells, c.model.multiplier = 2, 2
  c.model.steps, c.model.node_multiplier = 2, 2
  c.model.num_classes = 10
  c.model.dropout = 0.1
  c.metric.name = "accuracy"
  c.seeds = 5
  c.stages = "prepare,search,evaluate,ablate,report"
  c.search.epochs, c.search.batch_size = 10, 64
  c.search.weight_opt = common.weight_opt(3e-3, 1e-4, t_i=10, t_mult=2)
  # The search study (README "Making the search decide"): alternating every batch with a
  # 10x arch rate makes 83 % of the choices clear (3 % with one epoch of each at 3e-3).
  c.search.alternation = "step"
  c.search.arch_opt.lr = 3e-2
  c.evaluate.epochs, c.evaluate.batch_size = 10, 64
  c.evaluate.dropout = 0.1
  c.evaluate.weight_opt = common.weight_opt(3e-3, 1e-4, t_i=10, t_mult=2)
  return c

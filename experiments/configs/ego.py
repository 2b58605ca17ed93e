"""EgoGesture (RGB + depth video, 83 gestures, cross-subject): the original release's settings."""

from experiments.configs import common


def get_config():
  c = common.base_config()
  c.name = "ego"
  c.data.modalities = ("RGB", "Depth")
  # ResNeXt-101-3D layer2..4 + pooled, per modality.
  c.data.channels = {"RGB": (512, 1024, 2048, 2048), "Depth": (512, 1024, 2048, 2048)}
  c.data.length = 8
  c.model.C, c.model.L = 128, 8
  c.model.num_cells, c.model.multiplier = 2, 2
  c.model.steps, c.model.node_multiplier = 3, 3
  c.model.num_classes = 83
  c.model.dropout = 0.0
  c.search.epochs, c.search.batch_size = 30, 96
  c.search.weight_opt = common.weight_opt(3e-3, 1e-4, t_i=5, t_mult=2)
  c.evaluate.epochs, c.evaluate.batch_size, c.evaluate.dropout = 50, 96, 0.2
  c.evaluate.weight_opt = common.weight_opt(3e-3, 1e-4, t_i=5, t_mult=2)
  return c

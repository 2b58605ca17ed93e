"""NTU RGB-D (video + skeleton, 60 actions, cross-subject): the original release's settings."""

from experiments.configs import common


def get_config():
  c = common.base_config()
  c.name = "ntu"
  c.data.modalities = ("Video", "Skeleton")
  # I3D-R50 layer2..4 + pooled; HCN taps.
  c.data.channels = {"Video": (512, 1024, 2048, 2048), "Skeleton": (128, 256, 1024, 512)}
  c.data.length = 8
  c.model.C, c.model.L = 128, 8
  c.model.num_cells, c.model.multiplier = 2, 2
  c.model.steps, c.model.node_multiplier = 2, 2
  c.model.num_classes = 60
  c.model.dropout = 0.2
  c.search.epochs, c.search.batch_size = 30, 96
  c.search.weight_opt = common.weight_opt(1e-3, 3e-4, t_i=1, t_mult=2)
  c.evaluate.epochs, c.evaluate.batch_size, c.evaluate.dropout = 50, 96, 0.2
  c.evaluate.weight_opt = common.weight_opt(3e-4, 3e-4, t_i=5, t_mult=2)
  return c

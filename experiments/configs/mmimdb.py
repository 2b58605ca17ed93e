"""MM-IMDB (poster + plot, 23 genres, multi-label): the original release's settings."""

from experiments.configs import common


def get_config():
  c = common.base_config()
  c.name = "mmimdb"
  c.data.modalities = ("Image", "Text")
  # VGG19 relu4_1, relu4_4, relu5_3, pool5; Maxout-MLP hidden layers.
  c.data.channels = {"Image": (512, 512, 512, 512), "Text": (64, 128)}
  c.data.length = 16
  c.data.label_kind = "multi"
  c.model.C, c.model.L = 192, 16
  c.model.num_cells, c.model.multiplier = 2, 2
  c.model.steps, c.model.node_multiplier = 1, 1
  c.model.num_classes = 23
  c.model.dropout = 0.1
  c.metric.name, c.metric.threshold = "f1_weighted", 0.3
  c.search.epochs, c.search.batch_size = 30, 8
  c.search.weight_opt = common.weight_opt(1e-3, 1e-4, t_i=1, t_mult=2)
  c.evaluate.epochs, c.evaluate.batch_size, c.evaluate.dropout = 30, 8, 0.1
  c.evaluate.weight_opt = common.weight_opt(1e-3, 1e-4, t_i=1, t_mult=2)
  return c

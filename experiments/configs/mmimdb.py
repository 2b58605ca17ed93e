"""MM-IMDB (poster + plot, 23 genres, multi-label): the original release's settings.

  python -m experiments.main --config=experiments/configs/mmimdb.py \
      --config.data.root=DIR --workdir=runs/mmimdb

DIR holds multimodal_imdb.hdf5, optionally mmimdb_split.json, and torchvision's
vgg19-dcbb9e9d.pth (config.backbones.Image.checkpoint may name another path).
"""

from experiments.configs import common


def get_config():
  c = common.base_config()
  c.name = "mmimdb"
  c.data.source = "mmimdb"          # bmnas_jax/data/mmimdb.py
  c.data.split_counts = (15552, 2608, 7799)   # rows of train/dev/test without a split file
  c.data.image_layout = "auto"
  c.data.modalities = ("Image", "Text")
  # VGG19 relu4_1, relu4_4, relu5_3, pool5, grid-pooled to 4x4 (the release's
  # ReshapeInputLayer_MMIMDB); Maxout-MLP o1, o3 stored once (L_in = 1): the reshape
  # layer repeats them to L = 16, as the release's 4x4 pool of a vector does.
  c.data.channels = {"Image": (512, 512, 512, 512), "Text": (64, 128)}
  c.data.length = 16
  c.data.lengths = {"Text": (1, 1)}
  c.data.label_kind = "multi"
  c.backbones.Image = common.backbone(
      "vgg19", taps=("relu4_1", "relu4_4", "relu5_3", "pool5"), pool="grid",
      weights="torch", checkpoint="vgg19-dcbb9e9d.pth")
  # The release never loads weights for the text backbone (it stays at its random
  # init, weights="init"); here it is trained on the train split, selected on val.
  c.backbones.Text = common.backbone(
      "maxout_mlp", {"num_classes": 23}, taps=("maxout1", "maxout2"), pool="first",
      weights="train", epochs=20, batch_size=128, lr=1e-3)
  c.prepare.batch_size, c.prepare.chunk_size = 64, 1024
  c.model.C, c.model.L = 192, 16
  c.model.num_cells, c.model.multiplier = 2, 2
  c.model.steps, c.model.node_multiplier = 1, 1
  c.model.num_classes = 23
  c.model.dropout = 0.1
  c.metric.name, c.metric.threshold = "f1_weighted", 0.3
  c.stages = "prepare,search,evaluate,ablate,report"
  c.search.epochs, c.search.batch_size = 30, 8
  c.search.weight_opt = common.weight_opt(1e-3, 1e-4, t_i=1, t_mult=2)
  c.evaluate.epochs, c.evaluate.batch_size, c.evaluate.dropout = 30, 8, 0.1
  c.evaluate.weight_opt = common.weight_opt(1e-3, 1e-4, t_i=1, t_mult=2)
  return c

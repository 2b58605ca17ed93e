"""Your own data: a dataset module and backbones outside the package, one config.

  python -m experiments.main --config=experiments/own_data/config.py --workdir=runs/own_data
"""

from experiments.configs import common


def get_config():
  c = common.base_config()
  c.name = "own_data"
  c.data.source = "experiments.own_data.dataset:get_dataset"
  c.data.modalities = ("Video", "Sound", "Meta")
  # One node per tap: C_in is the tap's channels, L_in the length it is pooled to.
  c.data.channels = {"Video": (8, 16, 16), "Sound": (16, 16), "Meta": (32,)}
  c.data.length = 4
  c.data.lengths = {"Video": (4, 4, 1), "Meta": (1,)}

  net = "experiments.own_data.backbones:"
  c.backbones.Video = common.backbone(net + "TinyVideoNet", {"num_classes": 6},
                                      taps=("block1", "block2", "vector"), pool="first",
                                      epochs=8, batch_size=50, lr=3e-3)
  c.backbones.Sound = common.backbone(net + "TinySeqNet", {"num_classes": 6}, pool="first",
                                      epochs=8, batch_size=50, lr=3e-3)
  c.backbones.Meta = common.backbone(net + "TinyMLP", {"num_classes": 6}, epochs=8,
                                     batch_size=50, lr=3e-3)

  c.model.C, c.model.L = 16, 4
  c.model.num_cells, c.model.multiplier = 2, 2
  c.model.steps, c.model.node_multiplier = 1, 1
  c.model.num_classes = 6
  c.seeds = 3
  c.stages = "prepare,search,evaluate,report"
  c.search.epochs, c.search.batch_size = 8, 50
  c.search.weight_opt = common.weight_opt(3e-3, 1e-4, t_i=8, t_mult=2)
  c.search.arch_opt.lr = 3e-3
  c.evaluate.epochs, c.evaluate.batch_size = 8, 50
  c.evaluate.weight_opt = common.weight_opt(3e-3, 1e-4, t_i=8, t_mult=2)
  return c

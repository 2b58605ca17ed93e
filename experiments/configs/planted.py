"""A planted synthetic task: two modalities, three features each; the label depends
only on the cross-modal pair (A_2, B_3). The search should find that pair."""

from experiments.configs import common


def get_config():
  c = common.base_config()
  c.name = "planted"
  c.data.source = "planted"
  c.data.modalities = ("A", "B")
  c.data.channels = {"A": (8, 8, 8), "B": (8, 8, 8)}
  c.data.length = 4
  c.data.sizes = (1024, 512, 512)
  c.data.planted = ("A_2", "B_3")
  c.data.snr = 3.0
  c.data.planted_seed = 0
  # Each modality's input stacks its three features [3, L, C]; tap f<k> is feature k.
  for m in c.data.modalities:
    c.backbones[m] = common.backbone("stacked_features", weights="init")
  c.model.C, c.model.L = 8, 4
  c.model.num_cells, c.model.multiplier = 1, 1
  c.model.steps, c.model.node_multiplier = 1, 1
  c.model.num_classes = 4
  c.model.dropout = 0.0
  c.seeds = 5
  c.stages = "prepare,search,evaluate,report"
  c.prepare.probe_examples = 0
  c.search.epochs, c.search.batch_size = 10, 64
  c.search.weight_opt = common.weight_opt(3e-3, 1e-4, t_i=1, t_mult=2)
  # As the embedded default (the search study): every choice clear, all seeds agree.
  c.search.alternation = "step"
  c.search.arch_opt.lr = 3e-2
  c.evaluate.epochs, c.evaluate.batch_size = 10, 64
  c.evaluate.weight_opt = common.weight_opt(3e-3, 1e-4, t_i=10, t_mult=2)
  return c

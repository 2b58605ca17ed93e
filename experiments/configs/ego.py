"""EgoGesture (RGB + depth video, 83 gestures, cross-subject): the original release's settings.

  python -m experiments.main --config=experiments/configs/ego.py \
      --config.data.root=DIR --workdir=runs/ego

DIR holds the frame folders SubjectXX/SceneY/{Color,Depth}/..., the annotations
(labels-final-revised1/ or egogestureall_but_None.json) and the release's backbone
checkpoints egogesture_resnext_1.0x_{RGB_32_acc_94.01245,Depth_32_acc_93.61060}.pth.
"""

from bmnas_jax.data.nets.resnext3d import DEPTH_MEAN, RGB_MEAN
from experiments.configs import common


def get_config():
  c = common.base_config()
  c.name = "ego"
  c.data.source = "ego"             # bmnas_jax/data/ego.py
  c.data.sample_duration, c.data.sample_size = 32, 112   # clips of 32 frames of 112x112
  c.data.modalities = ("RGB", "Depth")
  # 3D ResNeXt-101 layer2..4 + pooled, per modality: time pooled to L_in = 8 and space
  # max-reduced (the release's ReshapeInputLayer); the pooled vector stored once and
  # repeated to L = 8 by the reshape layer.
  c.data.channels = {"RGB": (512, 1024, 2048, 2048), "Depth": (512, 1024, 2048, 2048)}
  c.data.length = 8
  c.data.lengths = {"RGB": (8, 8, 8, 1), "Depth": (8, 8, 8, 1)}
  taps = ("layer2", "layer3", "layer4", "pooled")
  net = dict(blocks=(3, 4, 23, 3), cardinality=32, widths=(128, 256, 512, 1024),
             num_classes=83)           # 3D ResNeXt-101 (every field overridable here)
  c.backbones.RGB = common.backbone(
      "resnext3d", dict(net, stem="rgb", mean=RGB_MEAN), taps=taps, pool="first",
      weights="torch", checkpoint="egogesture_resnext_1.0x_RGB_32_acc_94.01245.pth")
  c.backbones.Depth = common.backbone(
      "resnext3d", dict(net, stem="depth", mean=DEPTH_MEAN), taps=taps, pool="first",
      weights="torch", checkpoint="egogesture_resnext_1.0x_Depth_32_acc_93.61060.pth")
  c.prepare.batch_size, c.prepare.chunk_size = 32, 512
  c.model.C, c.model.L = 128, 8
  c.model.num_cells, c.model.multiplier = 2, 2
  c.model.steps, c.model.node_multiplier = 3, 3
  c.model.num_classes = 83
  c.model.dropout = 0.0
  c.stages = "prepare,search,evaluate,ablate,report"
  c.search.epochs, c.search.batch_size = 30, 96
  c.search.weight_opt = common.weight_opt(3e-3, 1e-4, t_i=5, t_mult=2)
  c.evaluate.epochs, c.evaluate.batch_size, c.evaluate.dropout = 50, 96, 0.2
  c.evaluate.weight_opt = common.weight_opt(3e-3, 1e-4, t_i=5, t_mult=2)
  return c

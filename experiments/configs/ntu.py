"""NTU RGB+D (video + skeleton, 60 actions, cross-subject): the original release's settings.

  python -m experiments.main --config=experiments/configs/ntu.py \
      --config.data.root=DIR --workdir=runs/ntu

DIR holds nturgb+d_skeletons/, the videos (nturgb+d_rgb/ or the release's re-encoded
nturgb+d_rgb_256x256_30/) and the release's backbone checkpoints
rgb_8frames_83.91.checkpoint and skeleton_32frames_85.24.checkpoint.
"""

from experiments.configs import common

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def get_config():
  c = common.base_config()
  c.name = "ntu"
  c.data.source = "ntu"             # bmnas_jax/data/ntu.py
  # The release's subjects: search on train_exp / dev, retrain on train + val + retrain
  # (its train_val, the 20 cross-subject training subjects), test on the other 20.
  c.data.split = "search"
  c.data.exclude_list = ""          # e.g. the dataset's list of samples with missing skeletons
  c.data.modalities = ("Video", "Skeleton")
  # Inflated ResNet-50 layer2..4 + pooled; HCN conv5, conv6, flattened, fc7. The first
  # axis (time) is pooled to L_in = 8 and the rest max-reduced, the release's
  # ReshapeInputLayer; vectors are stored once (L_in = 1) and repeated to L = 8 by the
  # reshape layer, as the release's pool does.
  c.data.channels = {"Video": (512, 1024, 2048, 2048), "Skeleton": (128, 256, 1024, 512)}
  c.data.length = 8
  c.data.lengths = {"Video": (8, 8, 8, 1), "Skeleton": (8, 8, 1, 1)}
  c.backbones.Video = common.backbone(
      "inflated_resnet50",
      {"widths": (64, 128, 256, 512), "blocks": (3, 4, 6, 3), "num_classes": 60,
       "scale": 1 / 255, "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
      taps=("layer2", "layer3", "layer4", "pooled"), pool="first", weights="torch",
      checkpoint="rgb_8frames_83.91.checkpoint")
  c.backbones.Skeleton = common.backbone(
      "hcn", {"channels": 64, "hidden": 512, "num_classes": 60},
      taps=("conv5", "conv6", "flat", "fc7"), pool="first",
      weights="torch", checkpoint="skeleton_32frames_85.24.checkpoint")
  c.prepare.batch_size, c.prepare.chunk_size = 16, 256
  c.model.C, c.model.L = 128, 8
  c.model.num_cells, c.model.multiplier = 2, 2
  c.model.steps, c.model.node_multiplier = 2, 2
  c.model.num_classes = 60
  c.model.dropout = 0.2
  c.stages = "prepare,search,evaluate,ablate,report"
  c.search.epochs, c.search.batch_size = 30, 96
  c.search.weight_opt = common.weight_opt(1e-3, 3e-4, t_i=1, t_mult=2)
  c.evaluate.epochs, c.evaluate.batch_size, c.evaluate.dropout = 50, 96, 0.2
  c.evaluate.train_splits = ("train", "val", "retrain")
  c.evaluate.weight_opt = common.weight_opt(3e-4, 3e-4, t_i=5, t_mult=2)
  # The release's hard-coded settings, applied under --config.fidelity=reference: its
  # NTU search trains only the fusion network and the classifier (the reshape layers
  # keep their random init), and its retraining uses weight decay 1e-4.
  c.reference = {"search": {"train_reshape": False},
                 "evaluate": {"weight_opt": {"weight_decay": 1e-4}}}
  return c

"""Shared defaults for every experiment config (the original release's shared settings)."""

import ml_collections


def weight_opt(lr_max: float, weight_decay: float, t_i: float = 1, t_mult: float = 2,
               lr_min: float = 1e-6) -> ml_collections.ConfigDict:
  """Adam with L2 (PyTorch style) and cosine warm restarts stepped per batch."""
  return ml_collections.ConfigDict(dict(
      lr_max=lr_max, lr_min=lr_min, weight_decay=weight_decay, t_i=t_i, t_mult=t_mult,
      b1=0.9, b2=0.999))


def backbone(name: str, kwargs: dict | None = None, taps: tuple[str, ...] = (),
             pool: str | tuple[str, ...] = "first", weights: str = "train",
             checkpoint: str = "", epochs: int = 10, batch_size: int = 64, lr: float = 1e-3,
             seed: int = 0) -> ml_collections.ConfigDict:
  """One modality's backbone for the prepare stage.

  Args:
    name: a key of `bmnas_jax.data.backbones.BACKBONES` or `package.module:Class`.
    kwargs: its constructor arguments.
    taps: the taps to store, in node order (empty: all, in the backbone's order).
    pool: `first` or `grid` (`bmnas_jax.data.pooling`), for all taps or one per tap.
    weights: `train` (on the train split, selected on val; `epochs`, `batch_size`,
      `lr`, `seed`), `init` (seeded initialization, `seed`), `orbax` (a checkpoint
      directory at `checkpoint`) or `torch` (a PyTorch file at `checkpoint`).
  """
  return ml_collections.ConfigDict(dict(
      name=name, kwargs=dict(kwargs or {}), taps=tuple(taps), pool=pool, weights=weights,
      checkpoint=checkpoint, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed))


def base_config() -> ml_collections.ConfigDict:
  """Keys every experiment has; dataset configs fill in shapes and hyperparameters."""
  c = ml_collections.ConfigDict()
  c.name = ""
  c.fidelity = "paper"              # 'paper' or 'reference' (the original release's ops)
  c.seed = 0
  c.seeds = 1                       # seeds trained together under vmap
  c.stages = "prepare,search,evaluate"
  c.devices = 0                     # devices in the mesh (0: all visible)
  c.seed_shards = 1                 # mesh axis for seeds (must divide the devices)
  c.distributed = False             # jax.distributed.initialize() (multi-host); on clusters
                                    # JAX detects (TPU, SLURM, ...) nothing else is needed,
  c.coordinator_address = ""        # else process 0's 'host:port',
  c.num_processes = 0               # the number of processes
  c.process_id = -1                 # and this process's index
  c.compile_cache = "default"       # persistent XLA cache folder ('default':
                                    # ~/.cache/bmnas-jax/xla; '': off)

  c.data = ml_collections.ConfigDict()
  c.data.source = ""                # a name in bmnas_jax.data.datasets.DATASETS or
                                    # an import path 'package.module:function'
  c.data.root = ""                  # the dataset's files (for datasets read from disk)
  c.data.skip_bad = False           # leave bad examples out (listed) instead of stopping
  c.data.train_views = 1            # augmented views stored per training example (K > 1:
                                    # the dataset's views 1..K; each epoch draws one)
  c.data.modalities = ()
  c.data.channels = ml_collections.ConfigDict()   # modality -> C_in per tapped feature
  c.data.length = 8                 # L_in of the stored (pooled) features
  c.data.lengths = ml_collections.ConfigDict()    # optional modality -> per-node L_in
  c.data.label_kind = "single"      # 'single' (CE) or 'multi' (BCE)
  c.data.in_memory = True           # whole splits on the devices; False: stream the shards
  c.data.stream_block = 16          # batches per streamed block (one compiled call each)

  c.backbones = ml_collections.ConfigDict()       # modality -> backbone(...)
  c.prepare = ml_collections.ConfigDict(dict(
      batch_size=256,               # examples per compiled backbone call
      chunk_size=4096,              # examples per resumable chunk (a multiple of batch_size)
      probe_examples=5000,          # train/val examples per linear probe (0: no probes)
      read_workers=4))              # threads reading examples

  c.model = ml_collections.ConfigDict()
  c.model.C = 128
  c.model.L = 8
  c.model.num_cells = 2             # Cells in the upper level
  c.model.multiplier = 2            # last Cells concatenated for the head
  c.model.steps = 2                 # inner steps per Cell
  c.model.node_multiplier = 2       # last steps concatenated in a Cell
  c.model.num_classes = 2
  c.model.dropout = 0.0
  c.model.two_slot = False          # separate x / y input weights during search
  c.model.cell_inputs = "all"       # 'all' (paper) or 'features_only' (release parser)

  c.metric = ml_collections.ConfigDict(dict(name="accuracy", threshold=0.3))

  c.search = ml_collections.ConfigDict()
  c.search.epochs = 30
  c.search.batch_size = 96
  c.search.alternation = "epoch"    # 'epoch' (release) or 'step' (DARTS)
  c.search.select = "val"           # the epoch a seed's genotype comes from: 'val' (best val
                                    # metric), 'val_loss', 'last', 'release' (search.py)
  c.search.weight_opt = weight_opt(1e-3, 3e-4)
  c.search.arch_opt = ml_collections.ConfigDict(dict(
      lr=3e-4, b1=0.5, b2=0.999, weight_decay=1e-3,
      lr_for_steps=0,               # > 0: lr is meant for this many arch steps an epoch and
                                    # is scaled to the actual count (beyond the paper)
      warmup_epochs=0))             # epochs before the arch weights move (beyond the paper)
  c.search.arch_entropy = 0.0       # > 0: weight of a mean-entropy term in the arch loss
                                    # (beyond the paper; it pushes each softmax to commit)
  c.search.train_reshape = True     # False: the reshape layers keep their init (NTU release)

  c.evaluate = ml_collections.ConfigDict()
  c.evaluate.epochs = 50
  c.evaluate.batch_size = 96
  c.evaluate.dropout = 0.0
  c.evaluate.train_splits = ("train", "val")
  c.evaluate.genotype = ""          # genotype file; default: the search's best_genotype.json
  c.evaluate.finetune_backbones = False  # True: the used backbones trained jointly with the
                                    # fixed net from raw inputs (paper 3.4; bmnas_jax.finetune)
  c.evaluate.backbone_lr_mult = 0.1  # backbones' learning rate / the fusion net's (0: frozen)
  # baselines retrained like the searched network (bmnas_jax/baselines.py): each modality
  # alone, all features concatenated into an MLP, the release's late fusion, Table 6's
  c.evaluate.baselines = ("unimodal", "concat_mlp", "late_fusion_release", "late_fusion")

  c.ablate = ml_collections.ConfigDict()
  c.ablate.random_trials = 5        # random feature selections (Table 6)
  c.evaluate.weight_opt = weight_opt(1e-3, 3e-4)
  return c

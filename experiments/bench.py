"""Benchmarks; each prints one JSON line.

  python -m experiments.bench --config=experiments/configs/mmimdb.py [--seeds=S] [--steps=K]
      the search's step pair (a weight step and an arch step) on random features;
  python -m experiments.bench --config=experiments/configs/ego.py --backbone=RGB \
      --input_shape=32,112,112,3 --input_dtype=uint8 [--batch=B]
      the prepare stage's extraction call of one modality's backbone on random inputs.
"""

import json

from absl import flags, logging

from bmnas_jax.bench import backbone_benchmark, benchmark
from experiments import cli

_CONFIG = cli.define_config(None)
_SEEDS = flags.DEFINE_integer("seeds", 1, "Seeds under vmap.")
_STEPS = flags.DEFINE_integer("steps", 20, "Step pairs per timed call.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls (the median is reported).")
_BACKBONE = flags.DEFINE_string("backbone", "", "A modality: time its backbone's extraction.")
_INPUT_SHAPE = flags.DEFINE_list("input_shape", [], "The backbone's input per example.")
_INPUT_DTYPE = flags.DEFINE_string("input_dtype", "float32", "The input's dtype.")
_BATCH = flags.DEFINE_integer("batch", 0, "Examples per extraction call (0: "
                                           "config.prepare.batch_size).")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  if _BACKBONE.value:
    if not _INPUT_SHAPE.value:
      raise cli.usage_error("--backbone needs --input_shape (e.g. 32,112,112,3)")
    result = backbone_benchmark(config, _BACKBONE.value,
                                tuple(int(d) for d in _INPUT_SHAPE.value), _INPUT_DTYPE.value,
                                _BATCH.value or int(config.prepare.batch_size), _REPEATS.value)
  else:
    result = benchmark(config, _SEEDS.value, _STEPS.value, _REPEATS.value)
  print(json.dumps(result))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  cli.run(main)

"""Search step-pair benchmark; prints one JSON line.

  python -m experiments.bench --config=experiments/configs/mmimdb.py [--seeds=S] [--steps=K]
"""

import json

from absl import flags, logging

from bmnas_jax.bench import benchmark
from experiments import cli

_CONFIG = cli.define_config(None)
_SEEDS = flags.DEFINE_integer("seeds", 1, "Seeds under vmap.")
_STEPS = flags.DEFINE_integer("steps", 20, "Step pairs per timed call.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls (the median is reported).")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  print(json.dumps(benchmark(_CONFIG.value, _SEEDS.value, _STEPS.value, _REPEATS.value)))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  cli.run(main)

"""Prints one JSON object describing a config's search hypernet or a genotype's fixed network.

  python -m experiments.summary --config experiments/configs/ntu.py \
      [--genotype FILE] [--config.fidelity=reference]
"""

import json

from absl import flags

from bmnas_jax import genotype as genotype_lib
from bmnas_jax.summary import describe
from experiments import cli

_CONFIG = cli.define_config(None)
_GENOTYPE = flags.DEFINE_string("genotype", None, "Genotype JSON: describe the fixed network.")


def main(argv):
  del argv
  g = genotype_lib.load(_GENOTYPE.value) if _GENOTYPE.value else None
  print(json.dumps(describe(_CONFIG.value, genotype=g)))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  cli.run(main)

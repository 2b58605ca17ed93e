"""Checks a dataset before any backbone runs:
`python -m experiments.check_data --config=CONFIG [--config.data.root=DIR]`.

Prints one JSON object (examples per split, label counts, input shape and dtype per
modality, every bad example with its file and reason); exits 1 when an example is
bad, unless `--config.data.skip_bad=True` (the prepare stage then leaves them out).
"""

import json

from absl import flags

from bmnas_jax.data.check import check_data
from experiments import cli

_CONFIG = cli.define_config(None)
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  config = _CONFIG.value
  result = check_data(config, workers=int(config.prepare.read_workers))
  print(json.dumps(result))
  if result["bad"] and not config.data.get("skip_bad", False):
    cli.fail(f"{len(result['bad'])} bad example(s); config.data.skip_bad=True leaves them out")


if __name__ == "__main__":
  cli.run(main)

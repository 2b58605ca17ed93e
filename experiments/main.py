"""Runs an experiment: `python -m experiments.main [--config=CONFIG] [--workdir=DIR]`.

Without flags: the embedded default (UCI Multiple Features) into `runs/mfeat`.
"""

import json
import os

from absl import flags, logging

from bmnas_jax import loop, pipeline
from experiments import cli

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "mfeat.py")
_CONFIG = cli.define_config(_DEFAULT_CONFIG)
_WORKDIR = flags.DEFINE_string("workdir", os.path.join("runs", "mfeat"),
                               "Run directory (resumes if it has checkpoints).")


def main(argv):
  del argv
  config = _CONFIG.value
  logging.set_verbosity(logging.WARNING)     # orbax logs every save at INFO
  loop.maybe_initialize_distributed(config)
  loop.configure_compile_cache(config)
  try:
    results = pipeline.run(config, _WORKDIR.value)
  except FloatingPointError as e:        # divergence: the message names epoch, step, seed
    cli.fail(f"{type(e).__name__}: {e}")
  if "evaluate" in results:
    ev = results["evaluate"]
    print(json.dumps({"metric": ev["metric"], "final_test": ev["final_test"],
                      "val_selected_test": ev["val_selected"]["test"]}))
  if "report" in results:
    print(f"report: {results['report']}")


if __name__ == "__main__":
  cli.run(main)

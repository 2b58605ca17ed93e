"""Runs an experiment: `python -m experiments.main --config=CONFIG --workdir=DIR`."""

import json

from absl import app, flags, logging
from ml_collections import config_flags

from bmnas_jax import loop, pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (resumes if it has checkpoints).")


def main(argv):
  del argv
  config = _CONFIG.value
  logging.set_verbosity(logging.WARNING)     # orbax logs every save at INFO
  loop.maybe_initialize_distributed(config)
  results = pipeline.run(config, _WORKDIR.value)
  if "evaluate" in results:
    ev = results["evaluate"]
    print(json.dumps({"metric": ev["metric"], "final_test": ev["final_test"],
                      "val_selected_test": ev["val_selected"]["test"]}))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)

"""The search study: `python -m experiments.study [--config=CONFIG] [--workdir=DIR]
[--settings=NAME,NAME] [--pairs]`.

Without flags: the embedded default into `runs/study_mfeat`. Prints the study's table
(also in `DIR/study/study.md`, rows in `DIR/study/results.json`).
"""

import os

from absl import flags, logging

from bmnas_jax import loop
from bmnas_jax.study import run_study
from experiments import cli

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "mfeat.py")
_CONFIG = cli.define_config(_DEFAULT_CONFIG)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default runs/study_<name>).")
_SETTINGS = flags.DEFINE_list("settings", [], "Settings to run (default: all).")
_PAIRS = flags.DEFINE_bool("pairs", False, "Also retrain every feature pair as one Cell.")


def main(argv):
  del argv
  config = _CONFIG.value
  logging.set_verbosity(logging.WARNING)
  loop.maybe_initialize_distributed(config)
  loop.configure_compile_cache(config)
  workdir = _WORKDIR.value or os.path.join("runs", f"study_{config.name}")
  run_study(config, workdir, tuple(_SETTINGS.value), _PAIRS.value)
  with open(os.path.join(workdir, "study", "study.md")) as f:
    print(f.read())


if __name__ == "__main__":
  cli.run(main)

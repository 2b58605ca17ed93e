"""The accelerator check: `python -m experiments.gpu_check [--config=CONFIG] [--workdir=DIR]
[--epochs=30] [--seeds=1,8] [--sizes=15552,2608,7799]`.

Runs the step-pair benchmark and, on random features at the config's shapes (MM-IMDB by
default: its split sizes, batch 8), a whole search of `--epochs` epochs for each seed
count in `--seeds` (compile included), then prints one JSON line: the device, the
benchmark record and each search's wall seconds, with the many-seed / one-seed ratio.
"""

import json
import os
import tempfile

import jax
from absl import flags, logging

from bmnas_jax.bench import benchmark, search_benchmark
from experiments import cli

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "mmimdb.py")
_CONFIG = cli.define_config(_DEFAULT_CONFIG)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the searches write (default: a "
                                                "temporary folder).")
_EPOCHS = flags.DEFINE_integer("epochs", 30, "Search epochs.")
_SEEDS = flags.DEFINE_list("seeds", ["1", "8"], "Seed counts to time.")
_SIZES = flags.DEFINE_list("sizes", ["15552", "2608", "7799"], "train, val, test examples.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  sizes = tuple(int(s) for s in _SIZES.value)
  if len(sizes) != 3:
    raise cli.usage_error(f"--sizes needs three numbers (train, val, test), got {sizes}")
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="bmnas-gpu-check-")
  out = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
         "bench": benchmark(config, 1, 20, 5),
         "search": [search_benchmark(config, workdir, int(s), _EPOCHS.value, sizes)
                    for s in _SEEDS.value]}
  if len(out["search"]) > 1:
    out["many_over_one_seed"] = round(out["search"][-1]["wall_s"] / out["search"][0]["wall_s"],
                                      2)
  print(json.dumps(out))


if __name__ == "__main__":
  cli.run(main)

"""One process of a two-process `jax.distributed` run, for tests/test_trainers.py.

`python -m tests.multiprocess_worker PROCESS_ID PORT WORKDIR OUT CONFIG_JSON`: two fake
CPU devices, gloo collectives, a coordinator on localhost:PORT, `pipeline.run` of
`small_run_config(**CONFIG_JSON)` in WORKDIR. Every write it attempts under WORKDIR
(Python audit events) is appended to OUT.writes as it happens (a killed run leaves them
too); at the end OUT gets the results and the shape of every block of rows it read from
the shards.
"""

import json
import os
import sys

from tests.conftest import TEST_XLA_FLAGS  # the backend starts later, with these flags

os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count=2 {TEST_XLA_FLAGS}"
os.environ["JAX_PLATFORMS"] = "cpu"

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_EVENTS = ("os.mkdir", "os.remove", "os.rmdir", "os.rename", "os.replace", "os.truncate",
                "os.chmod", "shutil.rmtree", "os.symlink", "os.link", "os.utime")


def watch_writes(root: str, log_path: str) -> None:
  """Appends a line to `log_path` for every Python-level write under `root` (opened
  for writing, made, renamed, removed)."""
  root = os.path.abspath(root)
  log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

  def under(path) -> bool:
    try:
      return os.path.abspath(os.fsdecode(path)).startswith(root)
    except TypeError:
      return False

  def record(what: str) -> None:
    os.write(log, (what + "\n").encode())

  def hook(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
      mode, flags = args[1], args[2] if len(args) > 2 else 0
      writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
          isinstance(flags, int) and flags & _WRITE_FLAGS)
      if writing and under(args[0]):
        record(f"open {os.fsdecode(args[0])}")
    elif event in _PATH_EVENTS and args and under(args[0]):
      record(f"{event} {os.fsdecode(args[0])}")

  sys.addaudithook(hook)


def main(process_id: int, port: int, workdir: str, out: str, overrides: dict) -> None:
  reads = []
  watch_writes(workdir, out + ".writes")
  from bmnas_jax import loop, pipeline
  from tests.conftest import small_run_config
  read = loop.RowReader.__call__

  def counted(self, rows):
    reads.append(list(rows.shape))
    return read(self, rows)
  loop.RowReader.__call__ = counted

  config = small_run_config(**overrides)
  config.distributed = True
  config.coordinator_address = f"localhost:{port}"
  config.num_processes, config.process_id = 2, process_id
  loop.maybe_initialize_distributed(config)
  results = pipeline.run(config, workdir)
  with open(out, "w") as f:
    json.dump({"genotypes": [g.to_json_dict() for g in results["search"].best_genotypes],
               "history": [{k: r[k] for k in ("val_metric", "val_loss", "train_loss",
                                              "arch_loss")}
                           for r in results["search"].history],
               "final_test": results["evaluate"]["final_test"]["values"], "reads": reads}, f)


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], json.loads(sys.argv[5]))

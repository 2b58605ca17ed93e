"""Shared tiny configs and inputs for the tests."""

import os

# Four fake CPU devices; cheap LLVM optimisation, the older fusion emitters, one codegen
# thread per program (the xdist workers fill the cores) and no expensive LLVM passes
# (tiny shapes: compile time dominates; these compile about 40 % faster).
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false "
                  "--xla_cpu_parallel_codegen_split_count=1 "
                  "--xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=4 {TEST_XLA_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile  # noqa: E402

import jax  # noqa: E402

# One XLA cache for the session, its xdist workers and the subprocesses they start
# (through the environment): trainers built again for the same shapes reuse the
# compiled programs.
_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                               tempfile.mkdtemp(prefix="bmnas-xla-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)   # trainers, not ops
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from experiments.configs import common  # noqa: E402


def tiny_config(fidelity: str = "paper", **model) -> ml_collections.ConfigDict:
  """Two modalities, five features of mixed C_in and L_in, C=8, L=4."""
  c = common.base_config()
  c.name = "tiny"
  c.fidelity = fidelity
  c.data.modalities = ("A", "B")
  c.data.channels = {"A": (6, 5), "B": (4, 3, 7)}
  c.data.length = 4
  c.data.lengths = {"A": (4, 6), "B": (4, 2, 4)}
  c.model.C, c.model.L = 8, 4
  c.model.num_cells, c.model.multiplier = 2, 2
  c.model.steps, c.model.node_multiplier = 2, 2
  c.model.num_classes = 3
  c.model.dropout = 0.1
  c.model.update(model)
  return c


def random_features(nodes, batch: int = 4, seed: int = 0):
  keys = jax.random.split(jax.random.key(seed), len(nodes))
  return {n.name: jax.random.normal(k, (batch, n.channels, n.length))
          for k, n in zip(keys, nodes)}


@pytest.fixture
def tiny():
  return tiny_config()


def swap_cl(a):
  """`[N, C, L] <-> [N, L, C]`, as numpy: expected values in the tests are written
  channels first; the fusion layers take and return channels-last states."""
  return np.swapaxes(np.asarray(a), 1, 2)


def jit_init(module, *args, seed: int = 0):
  """`module.init` as one compiled program (eager init compiles op by op)."""
  return jax.jit(lambda key, *a: module.init(key, *a))(jax.random.key(seed), *args)


@pytest.fixture(autouse=True)
def _fresh_trace_counter():
  """chex counts traces per function body; parametrized tests reuse bodies."""
  import chex
  chex.clear_trace_counter()
  yield


def tiny_run(c, batch_size: int | None = None, cells: int = 1, steps: int = 1):
  """A paper config shrunk for an end-to-end test: C=8, one device and seed, `cells`
  Cells of `steps` steps, one epoch of search and evaluation, no baselines,
  prepare -> search -> evaluate (add `,report` to `c.stages` for the report)."""
  c.model.C, c.devices, c.seeds = 8, 1, 1
  c.model.num_cells = c.model.multiplier = cells
  c.model.steps = c.model.node_multiplier = steps
  c.search.epochs = c.evaluate.epochs = 1
  if batch_size is not None:
    c.search.batch_size = c.evaluate.batch_size = batch_size
  c.evaluate.baselines = ()
  c.stages = "prepare,search,evaluate"
  return c


def assert_trainers_accept(c, workdir) -> None:
  """The stored features of a prepared `workdir` are what `c`'s search and evaluation
  take (nodes, shapes, classes, label kind, splits, views, batch sizes), checked as the
  trainers check them before compiling anything: a dataset's prepare test need not
  train (the trainers are tested end to end on generic features)."""
  from bmnas_jax import evaluate, loop
  from bmnas_jax.data.prepare import load_features
  from bmnas_jax.search import check_data_against_config
  fs = load_features(c, workdir)
  check_data_against_config(c, fs)
  ec = evaluate.check_evaluate_config(c)
  for splits, batch, key in ((("train",), c.search.batch_size, "config.search.batch_size"),
                             (("val",), c.search.batch_size, "config.search.batch_size"),
                             (tuple(ec.train_splits), ec.batch_size,
                              "config.evaluate.batch_size")):
    loop.num_batches(loop.ViewRows(fs, splits, key).examples, batch, key)
  loop.rows_of(fs, ("val", "test"), "the evaluation")


def planted_config(**overrides):
  """The planted task, shrunk for tests (one device unless asked)."""
  from experiments.configs import planted
  c = planted.get_config()
  c.devices = 1
  c.seeds = 2
  c.data.sizes = (256, 128, 128)
  c.search.epochs, c.search.batch_size = 3, 32
  c.evaluate.epochs, c.evaluate.batch_size = 2, 32
  c.evaluate.baselines = ()
  c.stages = "prepare,search,evaluate"        # the report is tested on its own and end to end
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def small_planted_config(**overrides):
  """`planted_config` at the smallest shapes (four nodes of [4, 2], C=4, L=2), one seed,
  128/64/64 examples: runs that exist to be resumed, damaged or streamed compile fast,
  and the same shapes across modules share compiled programs through the cache."""
  return planted_config(**{
      "data.channels": {"A": (4, 4), "B": (4, 4)}, "data.length": 2,
      "data.planted": ("A_2", "B_1"), "model.C": 4, "model.L": 2, "seeds": 1,
      "data.sizes": (128, 64, 64), **overrides})


def tree_state(root) -> dict:
  """Every path under `root` with its size and mtime: equal before and after = untouched."""
  out = {}
  for folder, dirs, files in os.walk(root):
    for name in dirs + files:
      st = os.stat(os.path.join(folder, name))
      out[os.path.relpath(os.path.join(folder, name), root)] = (st.st_size, st.st_mtime_ns)
  return out


SMALL_RUN_EPOCHS = 4


def small_run_config(**overrides):
  """The config of `finished_small_run`: `small_planted_config` with two seeds (the
  multi-process test shards them) and a 4-epoch search, plus `overrides`."""
  return small_planted_config(**{"seeds": 2, "search.epochs": SMALL_RUN_EPOCHS, **overrides})


@pytest.fixture(scope="session")
def finished_small_run(tmp_path_factory):
  """A finished `small_run_config` run (prepare, a 4-epoch search of two seeds, a 2-epoch
  evaluation) for the modules that copy, resume or damage one (never changed in place):
  built once per session, by the first xdist worker that asks (the others wait for it)."""
  import fcntl
  from bmnas_jax import pipeline
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent                    # the folder the workers' temp folders share
  workdir, done = root / "finished_small_run", root / "finished_small_run.done"
  with open(root / "finished_small_run.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      pipeline.run(small_run_config(), str(workdir))
      done.touch()
  return str(workdir)


class Killed(Exception):
  """Raised by `die_after_checkpoint`: the run stopped as if killed."""


@pytest.fixture
def die_after_checkpoint(monkeypatch):
  """`die_after_checkpoint(step)`: every trainer raises `Killed` right after saving
  checkpoint `step`; `die_after_checkpoint(None)` restores normal saving."""
  from bmnas_jax import checkpoint
  real_save = checkpoint.Checkpointer.save

  def arm(step):
    def save_then_die(self, s, state, meta):
      real_save(self, s, state, meta)
      if s == step:
        raise Killed()
    monkeypatch.setattr(checkpoint.Checkpointer, "save",
                        real_save if step is None else save_then_die)

  return arm


# The slowest modules first (each runs whole on one xdist worker: --dist loadscope), so
# that the two workers finish together.
_SLOW_FIRST = ("test_trainers", "test_default_pipeline", "test_planted", "test_prepare",
               "test_own_data", "test_mmimdb", "test_streaming", "test_reuse",
               "test_bad_workdir", "test_ntu", "test_ego", "test_steps", "test_finetune")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1],
                                       len(_SLOW_FIRST)))

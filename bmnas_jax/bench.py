"""Throughput: the search's step pair on random features, and a backbone's extraction."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from bmnas_jax import loop, optim
from bmnas_jax.data.feature_set import nodes_from_config
from bmnas_jax.search import alternation_step, seed_keys
from bmnas_jax.search_space import hypernet_from_config
from bmnas_jax.steps import Steps
from bmnas_jax.summary import count


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
  """The machine's dense float32 matmul rate in GFLOP/s: the median of `repeats` timed
  jitted `[n, n] @ [n, n]` products (2 n^3 flops each) on the default device."""
  x = jax.device_put(np.random.default_rng(0).standard_normal((n, n), np.float32))
  f = jax.jit(lambda a: a @ a)
  jax.block_until_ready(f(x))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(x))
    times.append(time.perf_counter() - t0)
  return 2 * n ** 3 / statistics.median(times) / 1e9


def lowered_flops(lowered) -> float | None:
  """XLA's flop count of a lowered program (None when the backend gives none). A loop's
  body counts once, so lower a single step, not the loop."""
  try:
    cost = lowered.cost_analysis()
  except Exception:                     # noqa: BLE001 -- not every backend implements it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def benchmark(config, seeds: int = 1, steps: int = 20, repeats: int = 5,
              pool_batches: int = 4) -> dict:
  """Times `steps` step pairs per compiled call, `repeats` calls after a warm-up.

  The data are random features at the config's node shapes, `pool_batches`
  batches of train and of val (the steps cycle through them), on the device.
  Returns the JSON-able record the bench entry point prints.
  """
  nodes = nodes_from_config(config.data)
  mesh = loop.mesh_from_config(config)
  batch = config.search.batch_size
  loop.check_batch_divides(batch, mesh, "config.search.batch_size")
  model = hypernet_from_config(config, nodes)
  n = batch * pool_batches
  kind = config.data.label_kind
  fs = random_feature_set(config, (n, n, 1))
  data = {s: loop.replicate({"x": fs.splits[s].features, "y": fs.splits[s].labels}, mesh)
          for s in ("train", "val")}
  w_tx = optim.weight_optimizer(config.search.weight_opt, pool_batches, 10 * steps)
  a_tx = optim.arch_optimizer(config.search.arch_opt)
  metric = config.metric.name
  st = Steps(model, kind, w_tx, a_tx, metric, config.metric.threshold)
  idx = jnp.asarray(np.arange(steps * batch).reshape(steps, batch) % n)
  sample = jax.tree.map(lambda a: a[:2], data["train"]["x"])

  step = alternation_step(st)

  def run_one(state, data):
    def fetch(j):
      return {s: loop.take_batch(data[s], idx[j], mesh) for s in ("train", "val")}
    state, acc = loop.fold_steps(step, state, loop.zero_acc(("w", "a")), fetch, steps,
                                 state.key)
    return state, (acc["w"]["loss_sum"] + acc["a"]["loss_sum"]) / steps

  with jax.set_mesh(mesh):
    keys = loop.shard_seeds(seed_keys(list(range(seeds)), 0), mesh)
    states = jax.jit(jax.vmap(lambda k: st.init_state(k, sample)))(keys)
    fn = jax.jit(jax.vmap(run_one, in_axes=(0, None), spmd_axis_name=loop.SEED))
    t0 = time.perf_counter()
    compiled = fn.lower(states, data).compile()
    compile_s = time.perf_counter() - t0
    states, loss = compiled(states, data)                     # warm-up
    jax.block_until_ready(loss)
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      states, loss = compiled(states, data)
      jax.block_until_ready(loss)
      times.append(time.perf_counter() - t0)
  ms = statistics.median(times) / steps * 1e3
  params = count(jax.tree.map(lambda a: a[0], states.params))
  one_pair = jax.jit(jax.vmap(
      lambda s, d: step(s, {k: loop.take_batch(d[k], idx[0], mesh) for k in ("train", "val")},
                        s.key)[0], in_axes=(0, None)))
  with jax.set_mesh(mesh):
    flops = lowered_flops(one_pair.lower(states, data))
    flops = None if flops is None else flops * steps      # per timed call
  machine = matmul_rate()
  achieved = None if flops is None else flops / statistics.median(times) / 1e9
  return {"config": config.name, "fidelity": config.fidelity, "batch": batch, "seeds": seeds,
          "devices": int(np.prod(list(mesh.shape.values()))),
          "backend": jax.default_backend(), "params": params,
          "compile_s": round(compile_s, 2), "ms_per_step_pair": round(ms, 3),
          "samples_per_s": round(2 * batch * seeds / (ms / 1e3), 1),
          "gflop_per_step_pair": None if flops is None else round(flops / steps / 1e9, 4),
          "achieved_gflops": None if achieved is None else round(achieved, 2),
          "matmul_gflops": round(machine, 2),
          "fraction_of_matmul": None if achieved is None else round(achieved / machine, 3),
          "finite": bool(np.all(np.isfinite(np.asarray(loss))))}


def random_feature_set(config, sizes: tuple[int, int, int], seed: int = 0):
  """A FeatureSet of standard-normal features at `config.data`'s node shapes, with
  random labels of `config.data.label_kind`, `sizes` = (train, val, test) examples."""
  from bmnas_jax.data.feature_set import FeatureSet, Split
  nodes = tuple(nodes_from_config(config.data))
  rng = np.random.default_rng(seed)
  k, kind = config.model.num_classes, config.data.label_kind
  splits = {}
  for name, n in zip(("train", "val", "test"), sizes):
    feats = {nd.name: rng.standard_normal((n, nd.channels, nd.length), np.float32)
             for nd in nodes}
    y = (rng.integers(0, 2, (n, k)).astype(np.float32) if kind == "multi"
         else rng.integers(0, k, n).astype(np.int32))
    splits[name] = Split(feats, y)
  return FeatureSet(nodes, splits, kind, k)


def search_benchmark(config, workdir: str, seeds: int, epochs: int,
                     sizes: tuple[int, int, int]) -> dict:
  """Wall seconds of a whole search (compile included) of `epochs` epochs and `seeds`
  seeds under vmap on random features at the config's shapes (`random_feature_set`),
  in `workdir/search_<seeds>`; returns a JSON-able record."""
  import os
  from bmnas_jax.search import run_search
  c = config.copy_and_resolve_references()
  c.seeds, c.search.epochs = seeds, epochs
  fs = random_feature_set(c, sizes)
  t0 = time.perf_counter()
  res = run_search(c, fs, os.path.join(workdir, f"search_{seeds}"))
  wall = time.perf_counter() - t0
  return {"seeds": seeds, "epochs": epochs, "examples": list(sizes),
          "wall_s": round(wall, 2), "epoch_s": round(res.seconds / epochs, 3),
          "epoch_traces": res.epoch_traces}


def backbone_benchmark(config, modality: str, input_shape: tuple[int, ...], dtype: str,
                       batch: int, repeats: int = 5) -> dict:
  """Extraction throughput of `config.backbones.<modality>` on random inputs.

  Times the prepare stage's compiled call (the backbone in inference mode and its
  configured taps pooled to the nodes' `[C_in, L_in]`) on `batch` random inputs of
  `input_shape` (without the batch axis), `repeats` calls after a warm-up, with the
  backbone at its seeded initialization (the weights do not change the cost).
  """
  from bmnas_jax.data import backbones as bb
  from bmnas_jax.data import extract
  from bmnas_jax.data.source import InputSpec
  b = config.backbones[modality]
  module = bb.make_backbone(b.name, dict(b.kwargs), f"config.backbones.{modality}")
  spec = InputSpec(tuple(int(d) for d in input_shape), str(dtype))
  nodes = [n for n in nodes_from_config(config.data) if n.modality == modality]
  taps = tuple(b.taps) or tuple(bb.output_shapes(module, spec)[1])
  pools = (b.pool,) * len(taps) if isinstance(b.pool, str) else tuple(b.pool)
  fn = extract.extraction_fn(module, tuple(zip(taps, (n.length for n in nodes), pools)))
  variables = bb.init_variables(module, spec)
  rng = np.random.default_rng(0)
  x = (rng.integers(0, 256, (batch, *spec.shape)) if np.dtype(dtype).kind in "ui"
       else rng.standard_normal((batch, *spec.shape))).astype(dtype)
  t0 = time.perf_counter()
  jax.block_until_ready(fn(variables, x))                     # compile + warm-up
  first_s = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(variables, x))
    times.append(time.perf_counter() - t0)
  sec = statistics.median(times)
  return {"config": config.name, "modality": modality, "backbone": b.name,
          "kwargs": json_ready(dict(b.kwargs)), "input": list(spec.shape), "dtype": dtype,
          "batch": batch, "backend": jax.default_backend(),
          "params": count(variables.get("params", {})), "first_call_s": round(first_s, 2),
          "ms_per_batch": round(sec * 1e3, 2), "examples_per_s": round(batch / sec, 2)}


def json_ready(obj):
  """Tuples to lists, recursively (config values for a JSON line)."""
  if isinstance(obj, dict):
    return {k: json_ready(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [json_ready(v) for v in obj]
  return obj

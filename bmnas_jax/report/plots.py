"""Learning curves of search and evaluation, and architecture weights over epochs (Agg)."""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from bmnas_jax import ops

DPI = 110


def new_figure(width: float, height: float) -> Figure:
  """A pyplot-free figure drawn by the Agg canvas (no global backend state)."""
  fig = Figure(figsize=(width, height), dpi=DPI)
  FigureCanvasAgg(fig)
  return fig


def save(fig: Figure, path: str | os.PathLike) -> str:
  """Writes `fig` as PNG to `path` (its folder must exist); returns the path.

  Epoch axes (x labels containing "epoch") get integer ticks.
  """
  for ax in fig.axes:
    if "epoch" in ax.get_xlabel():
      ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  path = os.fspath(path)
  fig.savefig(path, format="png", dpi=DPI, bbox_inches="tight")
  return path


def _seed_color(i: int):
  return f"C{i % 10}"


def _column(records: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
  """`[epochs, S]` array of a per-seed list field of the metrics.jsonl records."""
  return np.asarray([r[key] for r in records], np.float64).reshape(len(records), -1)


def _epochs(records: Sequence[Mapping[str, Any]]) -> np.ndarray:
  return np.asarray([r.get("epoch", i) for i, r in enumerate(records)])


def _seeds(records: Sequence[Mapping[str, Any]], n: int) -> list:
  seeds = records[0].get("seeds") if records else None
  return list(seeds) if seeds and len(seeds) == n else list(range(n))


def search_metric_curves(records: Sequence[Mapping[str, Any]], path: str,
                         metric_label: str = "metric") -> str:
  """Search validation metric (%) per epoch, one line per seed; dotted: best so far.

  Args:
    records: the lines of `search/metrics.jsonl`.
    path: PNG path.
    metric_label: y-axis name (`Acc`, `F1-W`).
  """
  ep = _epochs(records)
  val = 100 * _column(records, "val_metric")
  seeds = _seeds(records, val.shape[1])
  fig = new_figure(6.0, 3.6)
  ax = fig.add_subplot(1, 1, 1)
  for s in range(val.shape[1]):
    ax.plot(ep, val[:, s], "-o", ms=3, color=_seed_color(s), label=f"seed {seeds[s]}")
    if all("best_val_metric" in r for r in records):
      best = 100 * _column(records, "best_val_metric")[:, s]
      ax.plot(ep, best, ":", color=_seed_color(s), lw=1)
  ax.set_xlabel("search epoch")
  ax.set_ylabel(f"val {metric_label} (%)")
  ax.set_title("Search: validation metric (dotted: best so far)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  return save(fig, path)


def search_loss_curves(records: Sequence[Mapping[str, Any]], path: str,
                       max_entropy: float | None = None) -> str:
  """Search losses per epoch: weight (train), arch (val batches), val; a line per seed.

  A fourth panel shows the mean entropy of the softmaxed architecture weights
  (`arch_entropy`) when the records have it, with `max_entropy` (uniform weights:
  nothing decided) as a dashed line.
  """
  ep = _epochs(records)
  keys = [("train_loss", "train loss (weight steps)"), ("arch_loss", "arch loss (arch steps)"),
          ("val_loss", "val loss (evaluation)")]
  if all("arch_entropy" in r for r in records):
    keys.append(("arch_entropy", "arch weights: mean entropy (nats)"))
  fig = new_figure(4.0 * len(keys), 3.4)
  for i, (key, title) in enumerate(keys):
    ax = fig.add_subplot(1, len(keys), i + 1)
    if all(key in r for r in records):
      v = _column(records, key)
      seeds = _seeds(records, v.shape[1])
      for s in range(v.shape[1]):
        ax.plot(ep, v[:, s], "-", color=_seed_color(s), label=f"seed {seeds[s]}")
      if key == "arch_entropy" and max_entropy is not None:
        ax.axhline(max_entropy, color="k", ls="--", lw=1, label="uniform (maximum)")
      ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("search epoch")
    ax.grid(alpha=0.3)
  return save(fig, path)


def inner_name(v: int) -> str:
  """Inner node index -> `x`, `y`, `S1`, `S2`, ..."""
  return ("x", "y")[v] if v < 2 else f"S{v - 1}"


def inner_edge_names(steps: int) -> list[str]:
  """Names of the E inner edges, in the beta order (`x→S1`, `y→S1`, `x→S2`, ...)."""
  return [f"{inner_name(v)}→S{i + 1}" for i in range(steps) for v in range(2 + i)]


def _edge_lines(ax, ep, w: np.ndarray, names: Sequence[str]) -> None:
  """w `[epochs, (slots,) edges]` Identity weights; two slots: x solid, y dashed."""
  if w.ndim == 3:
    for e in range(w.shape[2]):
      ax.plot(ep, w[:, 0, e], "-", color=f"C{e % 10}", label=f"{names[e]} (x)")
      ax.plot(ep, w[:, 1, e], "--", color=f"C{e % 10}", label=f"{names[e]} (y)")
  else:
    for e in range(w.shape[1]):
      ax.plot(ep, w[:, e], "-", color=f"C{e % 10}", label=names[e])


def arch_weight_curves(history: Mapping[str, Any], path: str, upper_names: Sequence[str],
                       pool: Sequence[str], seed_index: int = 0) -> str:
  """Softmaxed architecture weights over search epochs, for one seed.

  One row per Cell: the Identity weight of each alpha edge (predecessor -> Cell),
  the Identity weight of each beta edge (inner node -> step), and per step the
  gamma weight of each op. With two slots, x-slot lines are solid, y-slot dashed.

  Args:
    history: `search/arch_history.json` (`epochs`, `seeds`, `softmax[epoch][seed]`).
    path: PNG path.
    upper_names: names of the upper nodes (features, then `Cell_1`, ...).
    pool: the gamma op order, `ops.step_op_pool(fidelity)`.
    seed_index: which seed (position in `history['seeds']`).
  """
  ep = np.asarray(history["epochs"])
  per_epoch = [e[seed_index] for e in history["softmax"]]
  cells = sorted(per_epoch[0], key=lambda k: int(k.split("_")[-1]))
  steps = max(np.asarray(per_epoch[0][c]["gamma"]).shape[0] for c in cells)
  ncols = 2 + steps
  fig = new_figure(3.3 * ncols, 2.8 * len(cells))
  for r, cell in enumerate(cells):
    k = int(cell.split("_")[-1])
    alpha = np.asarray([e[cell]["alpha"] for e in per_epoch])[..., ops.IDENTITY]
    beta = np.asarray([e[cell]["beta"] for e in per_epoch])[..., ops.IDENTITY]
    gamma = np.asarray([e[cell]["gamma"] for e in per_epoch])          # [epochs, steps, F]
    n_alpha = alpha.shape[-1]
    names = [upper_names[u] if u < len(upper_names) else f"in_{u}" for u in range(n_alpha)]
    # colours follow the edge / op index, so one legend per kind is enough: alpha's in
    # every row (later Cells have more predecessors), beta's and gamma's in the first
    ax = fig.add_subplot(len(cells), ncols, r * ncols + 1)
    _edge_lines(ax, ep, alpha, names)
    ax.set_title(f"Cell_{k + 1}: alpha (Identity)", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    ax = fig.add_subplot(len(cells), ncols, r * ncols + 2)
    _edge_lines(ax, ep, beta, inner_edge_names(gamma.shape[1]))
    ax.set_title(f"Cell_{k + 1}: beta (Identity)", fontsize=9)
    if r == 0:
      ax.legend(fontsize=6, ncol=2)
    for j in range(gamma.shape[1]):
      ax = fig.add_subplot(len(cells), ncols, r * ncols + 3 + j)
      for f in range(gamma.shape[2]):
        ax.plot(ep, gamma[:, j, f], "-", color=f"C{f % 10}",
                label=pool[f] if f < len(pool) else f"op_{f}")
      ax.set_title(f"Cell_{k + 1}: gamma, step {j + 1}", fontsize=9)
      if r == 0 and j == 0:
        ax.legend(fontsize=6)
    for ax in fig.axes[r * ncols:]:
      ax.grid(alpha=0.3)
      ax.tick_params(labelsize=7)
  for ax in fig.axes:
    ax.set_xlabel("search epoch", fontsize=7)
  seeds = history.get("seeds") or []
  seed = seeds[seed_index] if seed_index < len(seeds) else seed_index
  fig.suptitle(f"Architecture weights (softmax) over search epochs, seed {seed}", fontsize=11)
  fig.subplots_adjust(hspace=0.45, wspace=0.22, top=1 - 0.5 / fig.get_figheight())
  return save(fig, path)


def evaluate_curves(records: Sequence[Mapping[str, Any]], path: str, title: str,
                    metric_label: str = "metric", val_trained: bool = False) -> str:
  """Evaluation curves per epoch: val (solid) and test (dashed) metric per seed; losses.

  Args:
    records: the lines of `evaluate/metrics.jsonl` (or a baseline's `baselines/<name>/metrics.jsonl`).
    path: PNG path.
    title: figure title.
    metric_label: y-axis name.
    val_trained: val is among the training splits (its curve is labelled so).
  """
  val_name = "val (trained on)" if val_trained else "val"
  ep = _epochs(records)
  fig = new_figure(12.0, 3.6)
  ax = fig.add_subplot(1, 2, 1)
  val = 100 * _column(records, "val_metric")
  test = 100 * _column(records, "test_metric")
  seeds = _seeds(records, val.shape[1])
  for s in range(val.shape[1]):
    ax.plot(ep, val[:, s], "-", color=_seed_color(s), label=f"{val_name}, seed {seeds[s]}")
    ax.plot(ep, test[:, s], "--", color=_seed_color(s), label=f"test, seed {seeds[s]}")
  ax.set_xlabel("epoch")
  ax.set_ylabel(f"{metric_label} (%)")
  ax.set_title(f"metric: {val_name} (solid), test (dashed)", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=6, ncol=2)
  ax = fig.add_subplot(1, 2, 2)
  for i, key in enumerate(("train_loss", "val_loss", "test_loss")):
    if not all(key in r for r in records):
      continue
    v = _column(records, key)
    label = key.replace("_", " ") + (" (trained on)" if key == "val_loss" and val_trained
                                     else "")
    for s in range(v.shape[1]):
      ax.plot(ep, v[:, s], "-", color=f"C{i}", alpha=0.8, lw=1, label=label if s == 0 else None)
  ax.set_xlabel("epoch")
  ax.set_title("losses (a line per seed)", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.suptitle(title, fontsize=11)
  return save(fig, path)

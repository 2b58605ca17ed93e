"""Did the search decide? Margins of every choice the derivation made, and arch entropy.

For each seed the genotype comes from the architecture weights of its best (val) epoch.
Per Cell: the chosen input pair's score (product of the two edges' Identity weights,
paper Eq. 3) against the runner-up pair the derivation rule allowed, as a relative
margin `(s1 - s2) / s1`; per step the chosen op's softmax weight against the next
op's, as a difference. Entropy is the mean over every softmax of the architecture
weights of `H / log(size)` (1: uniform, nothing decided).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from bmnas_jax import genotype as genotype_lib

# A choice counts as made when the chosen pair's score is at least this much (relative)
# above the runner-up's, and the chosen op's weight this much above the next op's.
PAIR_MARGIN = 0.05
OP_MARGIN = 0.02


def _rows(softmax: Mapping[str, Any]):
  """Every softmax row (of 2 or more entries) of one seed's architecture weights."""
  for cell in softmax.values():
    for probs in cell.values():
      p = np.asarray(probs, np.float64)
      p = p.reshape(-1, p.shape[-1])
      if p.shape[-1] >= 2:
        yield p


def max_entropy(softmax: Mapping[str, Any]) -> float:
  """The mean entropy (nats) uniform weights would have: `arch_entropy`'s ceiling."""
  sizes = [np.log(p.shape[-1]) for p in _rows(softmax) for _ in range(p.shape[0])]
  return float(np.mean(sizes)) if sizes else 0.0


def entropy_ratio(softmax: Mapping[str, Any]) -> float:
  """Mean `H / log(size)` over every softmax row of one seed's architecture weights."""
  ratios = []
  for p in _rows(softmax):
    h = -(p * np.log(np.maximum(p, 1e-12))).sum(-1)
    ratios.extend(h / np.log(p.shape[-1]))
  return float(np.mean(ratios)) if ratios else 0.0


def search_decisions(arch_history: Mapping[str, Any], summary: Mapping[str, Any],
                     node_names: Sequence[str], config) -> dict[str, Any]:
  """Per seed and Cell the margins of the derivation at the seed's best epoch.

  Args:
    arch_history: `search/arch_history.json` (softmax of alpha/beta/gamma per epoch, seed).
    summary: `search/summary.json` (`best_epoch` per seed).
    node_names: the input nodes.
    config: the experiment config (model shapes, fidelity, cell_inputs, two_slot).

  Returns:
    `{'seeds': [{'seed', 'epoch', 'entropy_ratio', 'cells': [{'pair', 'runner_up',
    'pair_margin', 'steps': [{'op', 'next_op', 'op_margin'}]}]}], 'undecided': n,
    'choices': m, 'decided': bool, 'thresholds': {...}}`; a choice is one Cell's pair
    or one step's op.
  """
  epochs = list(arch_history.get("epochs", []))
  seeds = list(arch_history.get("seeds", []))
  out, undecided, choices = [], 0, 0
  for s, seed in enumerate(seeds):
    best = summary.get("best_epoch", [])
    epoch = best[s] if s < len(best) and best[s] in epochs else epochs[-1]
    softmax = arch_history["softmax"][epochs.index(epoch)][s]
    logits = {k: {n: np.log(np.maximum(np.asarray(v, np.float64), 1e-12))
                  for n, v in cell.items()} for k, cell in softmax.items()}
    record: list = []
    g = genotype_lib.derive_from_config(logits, node_names, config, record=record)
    cells = []
    for r in record:
      name = g.upper_name
      margin = (r["score"] - r["runner_up_score"]) / r["score"] if r["score"] > 0 else 0.0
      steps = [{"op": st["op"], "next_op": st["next_op"],
                "op_margin": st["weight"] - st["next_weight"]} for st in r["steps"]]
      undecided += (margin < PAIR_MARGIN) + sum(st["op_margin"] < OP_MARGIN for st in steps)
      choices += 1 + len(steps)
      cells.append({"pair": [name(u) for u in r["pair"]],
                    "runner_up": [name(u) for u in r["runner_up"]] if r["runner_up"] else None,
                    "pair_margin": margin, "steps": steps})
    out.append({"seed": seed, "epoch": epoch, "entropy_ratio": entropy_ratio(softmax),
                "cells": cells})
  return {"seeds": out, "undecided": undecided, "choices": choices,
          "decided": choices > 0 and undecided == 0,
          "thresholds": {"pair_margin": PAIR_MARGIN, "op_margin": OP_MARGIN}}

"""Search diagnostics: the margins of the derivation's choices and the arch entropy."""

import numpy as np
import pytest

from bmnas_jax import diagnostics
from tests.conftest import tiny_config


def _history(alpha0_identity, gamma_rows):
  """One seed, one epoch: Cell 0 over 5 features, Cell 1 over 6 (tiny_config's nodes)."""
  c = tiny_config()
  sm = {}
  for k in range(c.model.num_cells):
    n = 5 + k
    ident = np.full(n, 0.5)
    if k == 0:
      ident[:len(alpha0_identity)] = alpha0_identity
    alpha = np.stack([1 - ident, ident], -1)                       # (Zero, Identity)
    beta = np.full((5, 2), 0.5)
    gamma = np.asarray(gamma_rows)
    sm[f"cell_{k}"] = {"alpha": alpha.tolist(), "beta": beta.tolist(), "gamma": gamma.tolist()}
  return c, {"seeds": [7], "epochs": [0], "softmax": [[sm]]}


def test_margins_and_verdict():
  # Cell 0: features 0 and 1 clearly best (0.9 * 0.8 vs 0.9 * 0.5); ops: Sum clearly ahead.
  c, hist = _history([0.9, 0.8], [[0.0, 0.7, 0.1, 0.1, 0.1], [0.0, 0.1, 0.1, 0.1, 0.7]])
  out = diagnostics.search_decisions(hist, {"best_epoch": [0]}, ["A_1", "A_2", "B_1", "B_2",
                                                                 "B_3"], c)
  cell0 = out["seeds"][0]["cells"][0]
  assert cell0["pair"] == ["A_1", "A_2"] and cell0["runner_up"] == ["A_1", "B_1"]
  assert cell0["pair_margin"] == pytest.approx((0.72 - 0.45) / 0.72)
  assert [s["op"] for s in cell0["steps"]] == ["Sum", "ConcatFC"]
  assert cell0["steps"][0]["op_margin"] == pytest.approx(0.6)
  # Cell 1 sees only ties (0.5 everywhere): undecided, as the verdict says.
  assert out["seeds"][0]["cells"][1]["pair_margin"] == pytest.approx(0.0)
  assert out["undecided"] == 1 and out["choices"] == 6 and not out["decided"]


def test_entropy_ratio_is_one_when_uniform_and_zero_when_one_hot():
  assert diagnostics.entropy_ratio({"c": {"a": [[0.5, 0.5]], "g": [[0.2] * 5]}}) == \
      pytest.approx(1.0)
  assert diagnostics.entropy_ratio({"c": {"a": [[1.0, 0.0]], "g": [[0, 0, 1, 0, 0]]}}) == \
      pytest.approx(0.0, abs=1e-9)

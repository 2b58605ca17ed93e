"""The release's MaxOut_MLP on mean word2vec vectors, the MM-IMDB text backbone."""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bmnas_jax.data import torch_import
from bmnas_jax.layers import TorchBatchNorm


class Maxout(nn.Module):
  """`Linear(D, features * pieces)` (submodule `lin`), viewed as `[..., features, pieces]`
  (unit o takes outputs o*pieces .. o*pieces + pieces - 1), max over the pieces."""
  features: int
  pieces: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x: `[..., D]`. Returns: `[..., features]`."""
    h = nn.Dense(self.features * self.pieces, name="lin")(x)
    return h.reshape(*h.shape[:-1], self.features, self.pieces).max(axis=-1)


class MaxoutMLP(nn.Module):
  """The release's MaxOut_MLP: Maxout(D -> hidden) `op1` -> BN `op2` -> Dropout ->
  Maxout(hidden -> 2 hidden) `op3` -> BN `op4` -> Dropout -> Linear `hid2val` to classes.

  Submodules are named as the torch attributes (`op2`/`op4` are torch's `op2.0`/`op4.0`).
  Dropout is active only with `train=True` (rng 'dropout'); BatchNorm as `TorchBatchNorm`.

  Taps, float32: `maxout1` `[n, hidden]` (op1's output) and `maxout2` `[n, 2 hidden]`
  (op3's output), each before its own BatchNorm, as the release's o1 and o3.
  """
  num_classes: int = 23
  hidden: int = 64
  pieces: int = 5
  dropout: float = 0.5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    """Args: x: `[n, D]`. Returns: logits `[n, num_classes]`, taps."""
    if x.ndim != 2:
      raise ValueError(f"MaxoutMLP expects [n, D] vectors, got shape {x.shape}")
    o1 = Maxout(self.hidden, self.pieces, name="op1")(jnp.asarray(x, jnp.float32))
    h = TorchBatchNorm(name="op2")(o1, train)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    o3 = Maxout(2 * self.hidden, self.pieces, name="op3")(h)
    h = TorchBatchNorm(name="op4")(o3, train)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    logits = nn.Dense(self.num_classes, name="hid2val")(h)
    return logits, {"maxout1": o1, "maxout2": o3}

  @staticmethod
  def variables_from_torch(state_dict: Mapping[str, np.ndarray], like: Mapping[str, Any],
                           source: str = "<state dict>") -> dict[str, Any]:
    """Variables from a MaxOut_MLP state dict: `op1.lin`, `op2.0` (BN), `op3.lin`,
    `op4.0` (BN), `hid2val`; a missing, extra or mis-shaped key raises a DataError."""
    rules = [("op1/lin", "op1.lin", "linear"), ("op2", "op2.0", "bn"),
             ("op3/lin", "op3.lin", "linear"), ("op4", "op4.0", "bn"),
             ("hid2val", "hid2val", "linear")]
    return torch_import.to_variables(state_dict, rules, like, source=source)

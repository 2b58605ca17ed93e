"""Genotypes: dataclasses, derivation from arch weights (Eq. 3, Eq. 11), JSON I/O.

JSON form (`bmnas-genotype/1`)::

  {"format": "bmnas-genotype/1",
   "nodes": ["Video_1", ...],                 # input feature names, in order
   "cells": [{"inputs": [2, 7],               # upper indices: features, then Cells
              "steps": [{"op": "LinearGLU", "inputs": [1, 0]}, ...],
              "concat": [2, 3]}, ...],        # inner indices: 0 = x, 1 = y, 2+ = steps
   "concat": [8, 9]}                          # upper indices fed to the head

Upper index u < len(nodes) is feature `nodes[u]`; u = len(nodes) + i is Cell i.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import tempfile
from typing import Any, Mapping, Sequence

import numpy as np

from bmnas_jax import ops
from bmnas_jax.errors import ConfigError, DataError

FORMAT = "bmnas-genotype/1"
CELL_INPUT_MODES = ("all", "features_only")


class GenotypeError(DataError):
  """An invalid genotype; the message names the offending field."""


@dataclasses.dataclass(frozen=True)
class StepGene:
  """One inner step: `op(inputs[0], inputs[1])` over inner node indices."""
  op: str
  inputs: tuple[int, int]


@dataclasses.dataclass(frozen=True)
class CellGene:
  """One Cell: its two upper-level inputs (x, y), inner steps, inner concat."""
  inputs: tuple[int, int]
  steps: tuple[StepGene, ...]
  concat: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Genotype:
  """A whole fusion network: input node names, Cells, upper indices to the head."""
  nodes: tuple[str, ...]
  cells: tuple[CellGene, ...]
  concat: tuple[int, ...]

  def used_nodes(self) -> tuple[str, ...]:
    """Input features the network reads (in node order)."""
    used = {u for c in self.cells for u in c.inputs} | set(self.concat)
    return tuple(n for u, n in enumerate(self.nodes) if u in used)

  def upper_name(self, u: int) -> str:
    """`Video_2` for a feature index, `Cell_1` (1-based) for a Cell index."""
    n = len(self.nodes)
    return self.nodes[u] if u < n else f"Cell_{u - n + 1}"

  def to_json_dict(self) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "nodes": list(self.nodes),
        "cells": [{"inputs": list(c.inputs),
                   "steps": [{"op": s.op, "inputs": list(s.inputs)} for s in c.steps],
                   "concat": list(c.concat)} for c in self.cells],
        "concat": list(self.concat),
    }

  def to_json(self) -> str:
    return json.dumps(self.to_json_dict(), indent=1)


# ---------------------------------------------------------------- validation

def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _int_list(v, field: str, arity: int | None = None) -> tuple[int, ...]:
  if not isinstance(v, (list, tuple)) or not all(_is_int(i) for i in v):
    raise GenotypeError(f"{field}: expected a list of ints, got {v!r}")
  if arity is not None and len(v) != arity:
    raise GenotypeError(f"{field}: expected exactly {arity} inputs, got {len(v)} ({list(v)})")
  if not v:
    raise GenotypeError(f"{field}: must not be empty")
  return tuple(int(i) for i in v)


def _keys(d, field: str, required: Sequence[str]) -> None:
  if not isinstance(d, Mapping):
    raise GenotypeError(f"{field}: expected an object, got {type(d).__name__}")
  missing = [k for k in required if k not in d]
  if missing:
    raise GenotypeError(f"{field}: missing key(s) {missing}")
  extra = sorted(set(d) - set(required))
  if extra:
    raise GenotypeError(f"{field}: unknown key(s) {extra}; allowed: {list(required)}")


def validate(g: Genotype) -> Genotype:
  """Checks ops, arity, index ranges and acyclicity; returns g or raises GenotypeError."""
  if not g.nodes or not all(isinstance(n, str) and n for n in g.nodes):
    raise GenotypeError(f"nodes: expected a non-empty list of names, got {list(g.nodes)!r}")
  if len(set(g.nodes)) != len(g.nodes):
    raise GenotypeError(f"nodes: duplicate names in {list(g.nodes)}")
  if not g.cells:
    raise GenotypeError("cells: a genotype needs at least one Cell")
  n = len(g.nodes)
  for i, cell in enumerate(g.cells):
    f = f"cells[{i}]"
    _int_list(cell.inputs, f"{f}.inputs", 2)
    for u in cell.inputs:
      if u < 0 or u >= n + len(g.cells):
        raise GenotypeError(f"{f}.inputs: index {u} out of range [0, {n + len(g.cells)})")
      if u >= n + i:
        raise GenotypeError(f"{f}.inputs: index {u} is Cell {u - n} which is not an earlier "
                            f"Cell (a cycle); Cell {i} may read indices < {n + i}")
    if not cell.steps:
      raise GenotypeError(f"{f}.steps: a Cell needs at least one step")
    for j, step in enumerate(cell.steps):
      fs = f"{f}.steps[{j}]"
      if step.op not in ops.STEP_OPS:
        raise GenotypeError(f"{fs}.op: unknown op {step.op!r}; valid: {', '.join(ops.STEP_OPS)}")
      _int_list(step.inputs, f"{fs}.inputs", 2)
      for v in step.inputs:
        if v < 0:
          raise GenotypeError(f"{fs}.inputs: index {v} out of range [0, {2 + j})")
        if v >= 2 + j:
          raise GenotypeError(f"{fs}.inputs: index {v} is not an earlier inner node "
                              f"(a cycle or out of range); step {j} may read indices < {2 + j}")
    _int_list(cell.concat, f"{f}.concat")
    for v in cell.concat:
      if not 2 <= v < 2 + len(cell.steps):
        raise GenotypeError(f"{f}.concat: index {v} out of range [2, {2 + len(cell.steps)})")
  _int_list(g.concat, "concat")
  for u in g.concat:
    if not 0 <= u < n + len(g.cells):
      raise GenotypeError(f"concat: index {u} out of range [0, {n + len(g.cells)})")
  return g


def from_json_dict(d: Mapping[str, Any]) -> Genotype:
  """Parses and validates the JSON object form; errors name the field."""
  _keys(d, "genotype", ("format", "nodes", "cells", "concat"))
  if d["format"] != FORMAT:
    raise GenotypeError(f"format: expected {FORMAT!r}, got {d['format']!r}")
  if not isinstance(d["nodes"], list):
    raise GenotypeError(f"nodes: expected a list of names, got {d['nodes']!r}")
  if not isinstance(d["cells"], list):
    raise GenotypeError(f"cells: expected a list, got {type(d['cells']).__name__}")
  cells = []
  for i, c in enumerate(d["cells"]):
    _keys(c, f"cells[{i}]", ("inputs", "steps", "concat"))
    if not isinstance(c["steps"], list):
      raise GenotypeError(f"cells[{i}].steps: expected a list")
    steps = []
    for j, s in enumerate(c["steps"]):
      _keys(s, f"cells[{i}].steps[{j}]", ("op", "inputs"))
      steps.append(StepGene(s["op"], _int_list(s["inputs"], f"cells[{i}].steps[{j}].inputs", 2)))
    cells.append(CellGene(_int_list(c["inputs"], f"cells[{i}].inputs", 2), tuple(steps),
                          _int_list(c["concat"], f"cells[{i}].concat")))
  g = Genotype(tuple(d["nodes"]), tuple(cells), _int_list(d["concat"], "concat"))
  return validate(g)


def from_json(text: str) -> Genotype:
  try:
    d = json.loads(text)
  except json.JSONDecodeError as e:
    raise GenotypeError(f"not valid JSON: {e}") from e
  return from_json_dict(d)


def load(path: str | os.PathLike) -> Genotype:
  """Reads a genotype file; errors name the file and the field."""
  try:
    with open(path) as f:
      return from_json(f.read())
  except GenotypeError as e:
    raise GenotypeError(f"{os.fspath(path)}: {e}") from e
  except IsADirectoryError as e:
    raise GenotypeError(f"{os.fspath(path)}: is a folder, not a genotype file") from e
  except (OSError, UnicodeDecodeError) as e:
    raise GenotypeError(f"{os.fspath(path)}: cannot read: {e}") from e


def save(g: Genotype, path: str | os.PathLike) -> None:
  """Writes atomically (temporary file, then rename)."""
  validate(g)
  path = os.fspath(path)
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix=".genotype-", suffix=".tmp")
  with os.fdopen(fd, "w") as f:
    f.write(g.to_json() + "\n")
  mask = os.umask(0)
  os.umask(mask)
  os.chmod(tmp, 0o666 & ~mask)          # mkstemp makes it private; honour the umask
  os.replace(tmp, path)


# ---------------------------------------------------------------- derivation

def _softmax(a: np.ndarray) -> np.ndarray:
  a = np.asarray(a, np.float64)
  e = np.exp(a - a.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _ranked_pairs(wx: np.ndarray, wy: np.ndarray, candidates, allowed,
                  ordered: bool) -> list[tuple[float, tuple[int, int]]]:
  """`(wx[i] * wy[j], (i, j))` of the candidate pairs `allowed` accepts, best first.

  Unordered (one mixed slot): pairs i < j. Ordered (two slots): i != j. Ties
  go to the first pair in lexicographic order.
  """
  pairs = (itertools.permutations(candidates, 2) if ordered
           else itertools.combinations(candidates, 2))
  scored = [(float(wx[i] * wy[j]), (i, j)) for i, j in pairs if allowed(i, j)]
  return sorted(scored, key=lambda sp: -sp[0])          # stable: ties keep the order


def _best_pair(wx: np.ndarray, wy: np.ndarray, candidates, allowed, ordered: bool):
  """Argmax of wx[i] * wy[j] over candidate pairs that `allowed` accepts (or None)."""
  ranked = _ranked_pairs(wx, wy, candidates, allowed, ordered)
  return ranked[0][1] if ranked else None


def _derive_steps(beta: np.ndarray, gamma: np.ndarray, pool: Sequence[str],
                  steps: int, two_slot: bool, record: list | None = None
                  ) -> tuple[StepGene, ...]:
  """Inner steps: top-2 inner edges by Identity weight, op by argmax gamma (no Zero).
  `record` (if given) gets per step the chosen op's softmax weight and the next one's."""
  beta_w = _softmax(beta)[..., ops.IDENTITY]
  gamma_w = _softmax(gamma)
  genes, offset = [], 0
  for i in range(steps):
    n_in = 2 + i
    w = beta_w[..., offset:offset + n_in]
    if two_slot:
      pair = _best_pair(w[0], w[1], range(n_in), lambda a, b: True, ordered=True)
    else:
      order = sorted(range(n_in), key=lambda j: -w[j])      # stable: ties to the lower index
      pair = (order[0], order[1])
    allowed = sorted((f for f, name in enumerate(pool) if name != "Zero"),
                     key=lambda f: (-gamma_w[i, f], f))
    op = pool[allowed[0]]
    if record is not None:
      record.append({"op": op, "weight": float(gamma_w[i, allowed[0]]),
                     "next_op": pool[allowed[1]] if len(allowed) > 1 else None,
                     "next_weight": float(gamma_w[i, allowed[1]]) if len(allowed) > 1
                     else 0.0})
    genes.append(StepGene(op, pair))
    offset += n_in
  return tuple(genes)


def derive(arch: Mapping[str, Any], node_names: Sequence[str], *, num_cells: int,
           steps: int, multiplier: int, node_multiplier: int, fidelity: str = "paper",
           cell_inputs: str = "all", two_slot: bool = False,
           record: list | None = None) -> Genotype:
  """Derives the genotype from architecture weights (paper Eq. 3 and Eq. 11).

  Upper level: Cell k takes the pair (i, j) maximizing the product of the two
  edges' Identity weights. `cell_inputs='all'` (the paper): candidates are the
  features and earlier Cells, and no two Cells take the same pair (footnote 1).
  `cell_inputs='features_only'` (the original release's parser): candidates are
  the features only, and each Cell's pair must contain a feature that no earlier
  Cell took (once every feature is taken: a pair no earlier Cell took). Lower level: each step takes its two strongest inner edges (the
  same input may feed several steps) and its strongest non-Zero op.

  Args:
    arch: the `arch` collection, `arch['cell_k'] = {'alpha', 'beta', 'gamma'}`.
    node_names: the input feature names, in order.
    record: if given, gets one dict per Cell: the chosen pair and its score, the
      runner-up pair and its score (the candidates the rule allowed), and per step the
      chosen op's weight and the next op's (how clearly each choice was made).
  Returns:
    A validated Genotype.
  """
  if cell_inputs not in CELL_INPUT_MODES:
    raise ConfigError(f"config.model.cell_inputs={cell_inputs!r}; valid: "
                      f"{', '.join(CELL_INPUT_MODES)}")
  pool = ops.step_op_pool(fidelity)
  n = len(node_names)
  cells, used_pairs, used_nodes = [], set(), set()
  for k in range(num_cells):
    a = arch[f"cell_{k}"]
    w = _softmax(np.asarray(a["alpha"]))[..., ops.IDENTITY]
    wx, wy = (w[0], w[1]) if two_slot else (w, w)
    new_pair = lambda i, j: frozenset((i, j)) not in used_pairs
    if cell_inputs == "all":
      ranked = _ranked_pairs(wx, wy, range(n + k), new_pair, ordered=two_slot)
    else:
      new_node = lambda i, j: i not in used_nodes or j not in used_nodes
      ranked = (_ranked_pairs(wx, wy, range(n), new_node, ordered=two_slot)
                # once every feature is used, fall back to "no repeated pair"
                or _ranked_pairs(wx, wy, range(n), new_pair, ordered=two_slot))
    pair = ranked[0][1] if ranked else None
    if pair is None:
      raise ConfigError(f"config.model.num_cells: cannot derive Cell {k}: every pair of the "
                        f"{n} features is taken (cell_inputs={cell_inputs!r}: more Cells "
                        f"than feature pairs)")
    used_pairs.add(frozenset(pair))
    used_nodes.update(pair)
    step_record = [] if record is not None else None
    cell_steps = _derive_steps(np.asarray(a["beta"]), np.asarray(a["gamma"]), pool, steps,
                               two_slot, step_record)
    if record is not None:
      record.append({"pair": list(pair), "score": ranked[0][0],
                     "runner_up": list(ranked[1][1]) if len(ranked) > 1 else None,
                     "runner_up_score": ranked[1][0] if len(ranked) > 1 else 0.0,
                     "steps": step_record})
    cells.append(CellGene(pair, cell_steps,
                          tuple(range(2 + steps - node_multiplier, 2 + steps))))
  return validate(Genotype(tuple(node_names), tuple(cells),
                           tuple(range(n + num_cells - multiplier, n + num_cells))))


def derive_from_config(arch: Mapping[str, Any], node_names: Sequence[str], config,
                       record: list | None = None) -> Genotype:
  """`derive` with the shapes and options of `config.model` / `config.fidelity`."""
  m = config.model
  return derive(arch, node_names, num_cells=m.num_cells, steps=m.steps,
                multiplier=m.multiplier, node_multiplier=m.node_multiplier,
                fidelity=config.fidelity, cell_inputs=m.cell_inputs, two_slot=m.two_slot,
                record=record)


# ------------------------------------------------- the fusion cells of Fig. 2

FUSION_CELLS: dict[str, tuple[tuple[StepGene, ...], tuple[int, ...]]] = {
    # (a) DARTS: summation.
    "Sum": ((StepGene("Sum", (0, 1)),), (2,)),
    # (b) MFAS: concatenation + FC.
    "ConcatFC": ((StepGene("ConcatFC", (0, 1)),), (2,)),
    # (d) Transformer: two attention heads on the same (x, y), concatenated.
    "MHA": ((StepGene("ScaleDotAttn", (0, 1)), StepGene("ScaleDotAttn", (0, 1))), (2, 3)),
    # (c) AoANet: attention, then a GLU of the attended value gated by the query x.
    "AoA": ((StepGene("ScaleDotAttn", (0, 1)), StepGene("LinearGLU", (2, 0))), (3,)),
}


def fusion_cell(name: str, inputs: tuple[int, int]) -> CellGene:
  """A named Fig. 2 fusion Cell reading upper indices `inputs`."""
  if name not in FUSION_CELLS:
    raise KeyError(f"unknown fusion cell {name!r}; valid: {', '.join(FUSION_CELLS)}")
  steps, concat = FUSION_CELLS[name]
  return CellGene(tuple(inputs), steps, concat)


def with_fusion_cells(g: Genotype, name: str) -> Genotype:
  """The same feature selection with every Cell's inside replaced by `name`."""
  return validate(dataclasses.replace(
      g, cells=tuple(fusion_cell(name, c.inputs) for c in g.cells)))


# ------------------------------------------------------- baseline genotypes

def modality_of(node_name: str) -> str:
  """`Video_3` -> `Video` (node names are `<Modality>_<k>`)."""
  return node_name.rsplit("_", 1)[0]


def late_fusion(node_names: Sequence[str]) -> Genotype:
  """Late fusion: the last feature of each modality, fused by ConcatFC Cells.

  Two modalities give one Cell ConcatFC(A_last, B_last) (the paper's Table 6
  baseline concatenates (Video_4, Skeleton_4)); more modalities chain Cells.
  """
  last: dict[str, int] = {}
  for u, name in enumerate(node_names):
    last[modality_of(name)] = u
  if len(last) < 2:
    raise ConfigError(f"late fusion needs two modalities (config.data.modalities); nodes are "
                      f"{list(node_names)}")
  n = len(node_names)
  lasts = list(last.values())
  cells = [fusion_cell("ConcatFC", (lasts[0], lasts[1]))]
  for u in lasts[2:]:
    cells.append(fusion_cell("ConcatFC", (n + len(cells) - 1, u)))
  return validate(Genotype(tuple(node_names), tuple(cells), (n + len(cells) - 1,)))


def random_selection(g: Genotype, rng: np.random.Generator) -> Genotype:
  """Random feature selection and Cell connections, each Cell's inside kept (Table 6).

  Cell k takes a uniformly random pair of distinct predecessors (features and
  earlier Cells) that no earlier Cell took; the head reads the same Cells.
  """
  n = len(g.nodes)
  used, cells = set(), []
  for k, cell in enumerate(g.cells):
    pairs = [p for p in itertools.combinations(range(n + k), 2) if frozenset(p) not in used]
    pair = pairs[int(rng.integers(len(pairs)))]
    used.add(frozenset(pair))
    cells.append(dataclasses.replace(cell, inputs=pair))
  return validate(dataclasses.replace(g, cells=tuple(cells)))

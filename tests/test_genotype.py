"""Genotype derivation (Eq. 3, Eq. 11), JSON I/O and validation."""

import json

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from bmnas_jax import genotype as G

NAMES = ["A_1", "A_2", "B_1", "B_2"]


def _edges(identity_logits):
  """alpha/beta rows with Zero logit 0 and the given Identity logits."""
  return np.stack([np.zeros(len(identity_logits)), identity_logits], axis=1)


def _hand_arch(pool_size):
  beta = _edges([0.0, 1.0, 0.2, -1.0, 0.7])          # step 0: {x, y}; step 1: {x, y, s0}
  gamma = np.zeros((2, pool_size))
  off = pool_size - 4                                 # paper pool starts with Zero
  if off:
    gamma[0, 0] = 5.0                                 # Zero is strongest but never chosen
  gamma[0, off + 2] = 1.0                             # LinearGLU
  gamma[1, off + 1] = 2.0                             # ScaleDotAttn
  return {
      "cell_0": {"alpha": _edges([2.0, 0.0, 1.0, 0.0]), "beta": beta, "gamma": gamma},
      "cell_1": {"alpha": _edges([2.0, 0.0, 1.0, 0.3, 0.5]), "beta": beta, "gamma": gamma},
  }


STEPS = (G.StepGene("LinearGLU", (1, 0)), G.StepGene("ScaleDotAttn", (2, 0)))


@pytest.mark.parametrize("fidelity,pool", [("paper", 5), ("reference", 4)])
def test_hand_derived_genotype_both_cell_input_modes(fidelity, pool):
  kw = dict(num_cells=2, steps=2, multiplier=2, node_multiplier=2, fidelity=fidelity)
  # Identity weights sigmoid(l): cell_0 -> (A_1, B_1) = 0.881 * 0.731.
  # cell_1, all: (A_1, B_1) taken; best is (A_1, Cell_1) = 0.881 * 0.622.
  g = G.derive(_hand_arch(pool), NAMES, cell_inputs="all", **kw)
  assert g == G.Genotype(tuple(NAMES), (G.CellGene((0, 2), STEPS, (2, 3)),
                                        G.CellGene((0, 4), STEPS, (2, 3))), (4, 5))
  # features_only: candidates are features, and a pair needs a not-yet-used feature:
  # (A_1, B_2) = 0.881 * 0.574 beats (A_1, A_2) = 0.881 * 0.5.
  g = G.derive(_hand_arch(pool), NAMES, cell_inputs="features_only", **kw)
  assert [c.inputs for c in g.cells] == [(0, 2), (0, 3)]


def test_two_slot_derivation_is_ordered():
  arch = {"cell_0": {
      "alpha": np.stack([_edges([0.0, 0.0, 3.0]), _edges([3.0, 0.0, 0.0])]),     # x: 2, y: 0
      "beta": np.stack([_edges([0.0, 2.0]), _edges([2.0, 0.0])]),               # x: 1, y: 0
      "gamma": np.array([[0.0, 1.0, 0.0, 0.0]])}}
  g = G.derive(arch, ["a", "b", "c"], num_cells=1, steps=1, multiplier=1, node_multiplier=1,
               fidelity="reference", two_slot=True)
  assert g.cells[0].inputs == (2, 0)
  assert g.cells[0].steps == (G.StepGene("ScaleDotAttn", (1, 0)),)


def test_features_only_falls_back_to_new_pairs_when_every_feature_is_used():
  arch = {f"cell_{k}": {"alpha": _edges(np.array([3.0, 2.0, 1.0, 0.0, 0.0, 0.0][:4 + k])),
                        "beta": np.zeros((2, 2)), "gamma": np.zeros((1, 4))} for k in range(3)}
  g = G.derive(arch, NAMES, num_cells=3, steps=1, multiplier=1, node_multiplier=1,
               fidelity="reference", cell_inputs="features_only")
  # (0, 1) first; then a pair with a new feature: (0, 2); then (0, 3); all distinct
  assert [c.inputs for c in g.cells] == [(0, 1), (0, 2), (0, 3)]
  rows = [[0.0, 0.0, 5.0, 5.0], [4.0, 4.0, 0.0, 0.0, 0.0], [3.0, 0.0, 2.0, 0.0, 0.0, 0.0]]
  arch = {f"cell_{k}": {"alpha": _edges(np.array(rows[k])), "beta": np.zeros((2, 2)),
                        "gamma": np.zeros((1, 4))} for k in range(3)}
  g = G.derive(arch, NAMES, num_cells=3, steps=1, multiplier=1, node_multiplier=1,
               fidelity="reference", cell_inputs="features_only")
  # (2, 3), then (0, 1): every feature is used, so Cell 3 takes the best unused pair (0, 2)
  assert [c.inputs for c in g.cells] == [(2, 3), (0, 1), (0, 2)]


def test_features_only_runs_out_of_pairs():
  arch = {f"cell_{k}": {"alpha": np.zeros((2 + k, 2)), "beta": np.zeros((2, 2)),
                        "gamma": np.zeros((1, 4))} for k in range(2)}
  with pytest.raises(ValueError, match="cannot derive Cell 1"):
    G.derive(arch, ["a", "b"], num_cells=2, steps=1, multiplier=1, node_multiplier=1,
             fidelity="reference", cell_inputs="features_only")


@st.composite
def _random_setup(draw):
  n = draw(st.integers(2, 5))
  cells = draw(st.integers(1, 3))
  steps = draw(st.integers(1, 3))
  two_slot = draw(st.booleans())
  fidelity = draw(st.sampled_from(["paper", "reference"]))
  mode = draw(st.sampled_from(["all", "features_only"]))
  if mode == "features_only":
    cells = min(cells, n * (n - 1) // 2)
  slot = (2,) if two_slot else ()
  floats = st.floats(-4, 4, width=32)
  pool = 5 if fidelity == "paper" else 4
  arch = {f"cell_{k}": {
      "alpha": draw(hnp.arrays(np.float32, slot + (n + k, 2), elements=floats)),
      "beta": draw(hnp.arrays(np.float32, slot + (sum(2 + i for i in range(steps)), 2),
                              elements=floats)),
      "gamma": draw(hnp.arrays(np.float32, (steps, pool), elements=floats))}
      for k in range(cells)}
  kw = dict(num_cells=cells, steps=steps, multiplier=draw(st.integers(1, cells)),
            node_multiplier=draw(st.integers(1, steps)), fidelity=fidelity,
            cell_inputs=mode, two_slot=two_slot)
  return arch, [f"M_{i}" for i in range(n)], kw


@settings(max_examples=150, deadline=None)
@given(_random_setup())
def test_any_arch_derives_a_valid_genotype(setup):
  arch, names, kw = setup
  g = G.derive(arch, names, **kw)
  G.validate(g)
  n = len(names)
  pairs = [frozenset(c.inputs) for c in g.cells]
  assert len(set(pairs)) == len(pairs)                           # distinct predecessors
  for k, c in enumerate(g.cells):
    assert c.inputs[0] != c.inputs[1]
    assert max(c.inputs) < (n if kw["cell_inputs"] == "features_only" else n + k)
    assert all(s.op != "Zero" for s in c.steps)
  assert G.from_json(g.to_json()) == g


def test_json_round_trip_and_file_io(tmp_path):
  g = G.Genotype(tuple(NAMES), (G.CellGene((0, 2), STEPS, (2, 3)),
                                G.CellGene((4, 1), STEPS, (3,))), (4, 5))
  d = json.loads(g.to_json())
  assert d["format"] == "bmnas-genotype/1" and d["cells"][1]["inputs"] == [4, 1]
  path = tmp_path / "g.json"
  G.save(g, path)
  assert G.load(path) == g
  assert g.used_nodes() == ("A_1", "A_2", "B_1")
  assert g.upper_name(5) == "Cell_2"


def _valid():
  return G.Genotype(tuple(NAMES), (G.CellGene((0, 2), STEPS, (2, 3)),), (4,)).to_json_dict()


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d["cells"][0]["steps"][0].update(op="Conv"), r"cells\[0\]\.steps\[0\]\.op: unknown op 'Conv'"),
    (lambda d: d["cells"][0]["steps"][0].update(op="Zero"), r"cells\[0\]\.steps\[0\]\.op: unknown op 'Zero'"),
    (lambda d: d["cells"][0].update(inputs=[0, 9]), r"cells\[0\]\.inputs: index 9 out of range"),
    (lambda d: d["cells"][0].update(inputs=[0, 4]), r"cells\[0\]\.inputs: index 4 is Cell 0 .*cycle"),
    (lambda d: d["cells"][0]["steps"][0].update(inputs=[2, 0]), r"cells\[0\]\.steps\[0\]\.inputs: index 2 .*cycle"),
    (lambda d: d["cells"][0].update(inputs=[0, 1, 2]), r"cells\[0\]\.inputs: expected exactly 2 inputs"),
    (lambda d: d["cells"][0]["steps"][1].update(inputs=[1]), r"cells\[0\]\.steps\[1\]\.inputs: expected exactly 2"),
    (lambda d: d["cells"][0].update(concat=[1]), r"cells\[0\]\.concat: index 1 out of range"),
    (lambda d: d.update(concat=[7]), r"^concat: index 7 out of range"),
    (lambda d: d.update(format="bmnas-genotype/0"), r"format: expected 'bmnas-genotype/1'"),
    (lambda d: d["cells"][0].pop("steps"), r"cells\[0\]: missing key\(s\) \['steps'\]"),
    (lambda d: d["cells"][0].update(extra=1), r"cells\[0\]: unknown key\(s\) \['extra'\]"),
    (lambda d: d.update(nodes=["A_1", "A_1", "B_1", "B_2"]), r"nodes: duplicate names"),
])
def test_invalid_genotypes_name_the_field(mutate, message):
  d = _valid()
  G.from_json_dict(d)
  mutate(d)
  with pytest.raises(G.GenotypeError, match=message):
    G.from_json_dict(d)


def test_load_names_the_file(tmp_path):
  path = tmp_path / "bad.json"
  path.write_text("{not json")
  with pytest.raises(G.GenotypeError, match="bad.json: not valid JSON"):
    G.load(path)


def test_fusion_cells():
  assert set(G.FUSION_CELLS) == {"Sum", "ConcatFC", "MHA", "AoA"}
  g = G.Genotype(tuple(NAMES), (G.CellGene((0, 2), STEPS, (2, 3)),
                                G.CellGene((1, 4), STEPS, (2, 3))), (4, 5))
  mha = G.with_fusion_cells(g, "MHA")
  assert [c.inputs for c in mha.cells] == [(0, 2), (1, 4)]
  assert [s.op for s in mha.cells[0].steps] == ["ScaleDotAttn", "ScaleDotAttn"]
  with pytest.raises(KeyError, match="valid: Sum, ConcatFC, MHA, AoA"):
    G.fusion_cell("GMU", (0, 1))


def test_late_fusion_takes_the_last_feature_of_each_modality():
  g = G.late_fusion(["V_1", "V_2", "V_3", "S_1", "S_2"])
  assert g.cells == (G.fusion_cell("ConcatFC", (2, 4)),) and g.concat == (5,)
  g = G.late_fusion(["V_1", "S_1", "S_2", "D_1", "D_2"])
  assert [c.inputs for c in g.cells] == [(0, 2), (5, 4)] and g.concat == (6,)
  with pytest.raises(ValueError, match="two modalities"):
    G.late_fusion(["V_1", "V_2"])


def test_random_selection_keeps_cells_and_is_seeded():
  g = G.Genotype(tuple(NAMES), (G.CellGene((0, 2), STEPS, (2, 3)),
                                G.CellGene((0, 4), STEPS, (2, 3))), (4, 5))
  draws = [G.random_selection(g, np.random.default_rng(s)) for s in range(20)]
  for r in draws:
    assert [c.steps for c in r.cells] == [c.steps for c in g.cells] and r.concat == g.concat
    assert r.cells[0].inputs[1] < 4 and r.cells[1].inputs[1] < 5
    assert frozenset(r.cells[0].inputs) != frozenset(r.cells[1].inputs)
  assert len({r.to_json() for r in draws}) > 5
  assert G.random_selection(g, np.random.default_rng(3)) == draws[3]

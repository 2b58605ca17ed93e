"""Parameter counts agree with the original release's layer definitions."""

import json
import subprocess
import sys

import pytest

from bmnas_jax import genotype as G
from bmnas_jax.summary import describe
from experiments.configs import ego, mmimdb, ntu


def reshape_count(c_in, C):       # Conv1d(C_in -> C) + BN(C)
  return c_in * C + C + 2 * C


def reference_step_ops(C, L):     # one instance of every step op
  attn = 2 * C * L                                     # LayerNorm([C, L])
  glu = 2 * C * 2 * C + 2 * C + 2 * 2 * C              # Conv1d(2C -> 2C) + BN(2C)
  concat_fc = 2 * C * C + C + 2 * C                    # Conv1d(2C -> C) + BN(C)
  return {"Sum": 0, "ScaleDotAttn": attn, "LinearGLU": glu, "ConcatFC": concat_fc}


def tail_count(C, L, nm):
  conv = nm * C * C + C + 2 * C if nm > 1 else 0
  return conv + 2 * C * L


def head_count(C, L, m, K):
  return 2 * C * m * L + C * L * m * K + K


def release_hypernet_count(cfg):
  m = cfg.model
  c_ins = [c for mod in cfg.data.modalities for c in cfg.data.channels[mod]]
  cell = m.steps * sum(reference_step_ops(m.C, m.L).values()) + tail_count(m.C, m.L,
                                                                           m.node_multiplier)
  return (sum(reshape_count(c, m.C) for c in c_ins) + m.num_cells * cell
          + head_count(m.C, m.L, m.multiplier, m.num_classes))


@pytest.mark.parametrize("mod", [mmimdb, ntu, ego], ids=["mmimdb", "ntu", "ego"])
def test_reference_hypernet_counts_match_release(mod):
  cfg = mod.get_config()
  cfg.fidelity = "reference"
  d = describe(cfg)
  assert d["params_total"] == release_hypernet_count(cfg)
  assert sum(d["params_per_part"].values()) == d["params_total"]


def test_ntu_reference_numbers():
  cfg = ntu.get_config()
  cfg.fidelity = "reference"
  d = describe(cfg)
  assert d["params_total"] == 1_573_180
  assert d["params_per_part"] == {"reshape": 969_728, "fusion": 476_416, "head": 127_036}


def test_reference_fixed_net_count():
  cfg = ntu.get_config()
  cfg.fidelity = "reference"
  names = tuple(f"Video_{i}" for i in range(1, 5)) + tuple(f"Skeleton_{i}" for i in range(1, 5))
  steps = (G.StepGene("ConcatFC", (0, 1)), G.StepGene("LinearGLU", (2, 1)))
  g = G.Genotype(names, (G.CellGene((3, 7), steps, (2, 3)), G.CellGene((1, 8), steps, (2, 3))),
                 (8, 9))
  d = describe(cfg, genotype=g)
  C, L = 128, 8
  ops = reference_step_ops(C, L)
  cell = ops["ConcatFC"] + ops["LinearGLU"] + tail_count(C, L, 2)
  want = (reshape_count(2048, C) + reshape_count(512, C) + reshape_count(1024, C)
          + 2 * cell + head_count(C, L, 2, 60))
  assert d["model"] == "fixed" and d["arch_shapes"] == {}
  assert d["params_total"] == want
  assert d["nodes"] == ["Video_2", "Video_4", "Skeleton_4"]


def test_summary_cli(tmp_path):
  g = G.Genotype(("Image_1", "Image_2", "Image_3", "Image_4", "Text_1", "Text_2"),
                 (G.fusion_cell("AoA", (3, 5)), G.fusion_cell("Sum", (6, 4))), (6, 7))
  G.save(g, tmp_path / "g.json")
  out = subprocess.run(
      [sys.executable, "-m", "experiments.summary", "--config", "experiments/configs/mmimdb.py",
       "--config.fidelity=reference", "--genotype", str(tmp_path / "g.json")],
      capture_output=True, text=True, check=True)
  d = json.loads(out.stdout.strip().splitlines()[-1])
  assert d["config"] == "mmimdb" and d["fidelity"] == "reference" and d["model"] == "fixed"
  assert d["nodes"] == ["Image_4", "Text_1", "Text_2"]

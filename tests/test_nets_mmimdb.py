"""Tests for the MM-IMDB backbones (VGG19, MaxoutMLP) against PyTorch's own outputs."""


import jax
import numpy as np
import pytest

from bmnas_jax.data import backbones as bb
from bmnas_jax.data.nets.maxout import MaxoutMLP
from bmnas_jax.data.nets.vgg import VGG19
from bmnas_jax.data.source import InputSpec
from bmnas_jax.data.torch_import import load_state_dict
from tests.parity import FIXTURES, assert_close, fixture
from bmnas_jax.errors import DataError

VGG_WIDTHS = (4, 4, 8, 8, 8)                           # as tests/make_torch_fixtures.py
VGG_TAPS = ("relu4_1", "relu4_4", "relu5_3", "pool5")
MAXOUT = dict(num_classes=3, hidden=4, pieces=5)       # in 12 -> 4 -> 8 -> 3


def _like(module, spec: InputSpec):
  return bb.abstract_variables(module, spec)


@pytest.fixture(scope="module")
def vgg():
  """`(module, variables, fixture arrays)` for the torch VGG19 fixture."""
  data = fixture("vgg19")
  module = VGG19(widths=VGG_WIDTHS)
  path = FIXTURES / "vgg19_legacy.pth"
  like = _like(module, InputSpec.of(data["x"][0]))
  return module, VGG19.variables_from_torch(load_state_dict(path), like, str(path)), data


@pytest.fixture(scope="module")
def maxout():
  """`(module, variables, fixture arrays)` for the torch MaxOut_MLP fixture."""
  data = fixture("maxout")
  module = MaxoutMLP(**MAXOUT)
  path = FIXTURES / "maxout_zip.pth"
  like = _like(module, InputSpec.of(data["x"][0]))
  return module, MaxoutMLP.variables_from_torch(load_state_dict(path), like, str(path)), data


# ------------------------------------------------------------------ VGG19

def test_vgg19_taps_match_torch(vgg):
  module, variables, data = vgg
  assert data["x"].dtype == np.int16                  # integer images, cast inside
  logits, taps = jax.jit(lambda v, x: module.apply(v, x))(variables, data["x"])
  assert logits is None
  names = [f"relu{b}_{k}" for b, n in enumerate((2, 2, 4, 4, 4), 1) for k in range(1, n + 1)]
  assert set(taps) == set(names) | {f"pool{b}" for b in range(1, 6)}
  for name in VGG_TAPS:                               # torch NCHW -> channels last
    assert_close(taps[name], np.moveaxis(data[name], 1, -1), name)
  assert taps["pool5"].shape == (2, 3, 2, 8)          # 96 x 64 halved five times


def test_vgg19_release_shapes():
  module = bb.make_backbone("vgg19")
  assert isinstance(module, VGG19) and bb.BACKBONES["vgg19"] is VGG19
  logits, taps = bb.output_shapes(module, InputSpec((3, 256, 160), "int32"))
  assert logits is None
  assert {k: taps[k] for k in VGG_TAPS} == {
      "relu4_1": [32, 20, 512], "relu4_4": [32, 20, 512], "relu5_3": [16, 10, 512],
      "pool5": [8, 5, 512]}
  params = _like(module, InputSpec((3, 32, 32), "float32"))["params"]
  assert sorted(params, key=lambda n: int(n.split("_")[1])) == [
      f"features_{i}" for i in (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34)]
  assert params["features_34"]["kernel"].shape == (3, 3, 512, 512)


def test_vgg19_wrong_architecture_lists_the_keys(vgg):
  _, _, data = vgg
  sd = load_state_dict(FIXTURES / "vgg19_legacy.pth")
  assert any(k.startswith("classifier.") for k in sd)  # present and ignored
  like = _like(VGG19(widths=VGG_WIDTHS), InputSpec.of(data["x"][0]))
  del sd["features.34.bias"]
  with pytest.raises(DataError,
                     match=r"(?s)^ck\.pth: .*missing torch keys \(1\): features\.34\.bias"):
    VGG19.variables_from_torch(sd, like, "ck.pth")
  sd = load_state_dict(FIXTURES / "vgg19_legacy.pth")
  wide = _like(VGG19(widths=(4, 4, 8, 8, 16)), InputSpec.of(data["x"][0]))
  with pytest.raises(DataError) as e:
    VGG19.variables_from_torch(sd, wide, "ck.pth")
  msg = str(e.value)
  assert "mis-shaped (8)" in msg
  assert "features.28.weight [8, 8, 3, 3] vs params/features_28/kernel [3, 3, 8, 16]" in msg
  assert "features.34.bias [8] vs params/features_34/bias [16]" in msg


# ------------------------------------------------------------------ MaxoutMLP

def test_maxout_eval_matches_torch(maxout):
  module, variables, data = maxout
  logits, taps = module.apply(variables, data["x"])
  assert set(taps) == {"maxout1", "maxout2"}
  assert_close(taps["maxout1"], data["o1"], "maxout1")
  assert_close(taps["maxout2"], data["o3"], "maxout2")
  assert_close(logits, data["o5"], "logits")
  again = module.apply(variables, data["x"], rngs={"dropout": jax.random.key(1)})
  np.testing.assert_array_equal(again[0], logits)     # eval: no dropout, deterministic


def test_maxout_train_mode_matches_torch_without_dropout(maxout):
  _, variables, data = maxout
  module = MaxoutMLP(**MAXOUT, dropout=0.0)
  (logits, taps), updated = module.apply(variables, data["x"], train=True,
                                         mutable=["batch_stats"])
  assert_close(taps["maxout1"], data["train_o1"], "train maxout1")
  assert_close(taps["maxout2"], data["train_o3"], "train maxout2")
  assert_close(logits, data["train_o5"], "train logits")
  for flax_name, torch_name in (("op2", "op2.0"), ("op4", "op4.0")):
    stats = updated["batch_stats"][flax_name]
    assert_close(stats["mean"], data[f"train_{torch_name}.running_mean"], f"{flax_name} mean")
    assert_close(stats["var"], data[f"train_{torch_name}.running_var"], f"{flax_name} var")


def test_maxout_train_mode_uses_dropout_and_updates_stats(maxout):
  module, variables, data = maxout
  x = data["x"]

  def train(seed):
    return module.apply(variables, x, train=True, rngs={"dropout": jax.random.key(seed)},
                        mutable=["batch_stats"])

  (logits_a, taps_a), upd_a = train(0)
  (logits_b, taps_b), _ = train(1)
  assert not np.allclose(logits_a, logits_b)          # different dropout masks
  np.testing.assert_array_equal(taps_a["maxout1"], taps_b["maxout1"])   # before any dropout
  (logits_c, _), _ = train(0)
  np.testing.assert_array_equal(logits_a, logits_c)
  # running = 0.9 running + 0.1 batch (torch momentum 0.1), unbiased batch variance
  for name, tap in (("op2", "maxout1"), ("op4", "maxout2")):
    old, new = variables["batch_stats"][name], upd_a["batch_stats"][name]
    h = np.asarray(taps_a[tap], np.float64)
    np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * h.mean(0), rtol=1e-5)
    np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * h.var(0, ddof=1),
                               rtol=1e-5)
  assert jax.tree.structure(upd_a) == jax.tree.structure(
      {"batch_stats": variables["batch_stats"]})
  with pytest.raises(ValueError, match="more than 1 example"):
    module.apply(variables, x[:1], train=True, rngs={"dropout": jax.random.key(0)},
                 mutable=["batch_stats"])


def test_maxout_release_shapes():
  module = bb.make_backbone("maxout_mlp")
  assert isinstance(module, MaxoutMLP) and bb.BACKBONES["maxout_mlp"] is MaxoutMLP
  logits, taps = bb.output_shapes(module, InputSpec((300,), "float32"))
  assert logits == [23] and taps == {"maxout1": [64], "maxout2": [128]}
  variables = _like(module, InputSpec((300,), "float32"))
  assert variables["params"]["op1"]["lin"]["kernel"].shape == (300, 320)
  assert variables["params"]["op3"]["lin"]["kernel"].shape == (64, 640)
  assert variables["batch_stats"]["op4"]["var"].shape == (128,)


def test_maxout_wrong_architecture_lists_the_keys(maxout):
  _, _, data = maxout
  like = _like(MaxoutMLP(**MAXOUT), InputSpec.of(data["x"][0]))
  sd = load_state_dict(FIXTURES / "maxout_zip.pth")
  del sd["op4.0.running_var"]
  sd["op5.lin.weight"] = np.zeros((2, 2), np.float32)
  with pytest.raises(DataError) as e:
    MaxoutMLP.variables_from_torch(sd, like, "ck.pth")
  msg = str(e.value)
  assert "missing torch keys (1): op4.0.running_var" in msg
  assert "unexpected torch keys (1): op5.lin.weight" in msg
  sd = load_state_dict(FIXTURES / "maxout_zip.pth")
  wide = _like(MaxoutMLP(**{**MAXOUT, "hidden": 5}), InputSpec.of(data["x"][0]))
  with pytest.raises(DataError, match=r"op1\.lin\.weight \[20, 12\] vs params/op1/lin/kernel"):
    MaxoutMLP.variables_from_torch(sd, wide, "ck.pth")

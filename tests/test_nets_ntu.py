"""Tests for the NTU RGB+D backbones (inflated ResNet-50, HCN) against PyTorch's own outputs."""

import hashlib

import jax
import numpy as np
import pytest

from bmnas_jax.data import backbones as bb
from bmnas_jax.data.nets.hcn import HCN
from bmnas_jax.data.nets.resnet3d import InflatedResNet50
from bmnas_jax.data.source import InputSpec
from bmnas_jax.data.torch_import import load_state_dict
from tests.parity import FIXTURES, assert_close, fixture, splitmix_bytes
from bmnas_jax.errors import DataError

# As tests/make_torch_fixtures.py (part `ntu`).
I3D = dict(widths=(2, 2, 4, 4), blocks=(1, 1, 1, 1), num_classes=5)
I3D_INPUT = (2, 2, 264, 232, 3)
HCN_SIZES = dict(channels=8, hidden=16, num_classes=5)


def ntu_frames(shape):
  """The fixture script's int8 clip: splitmix64's top byte, as a signed byte."""
  return (splitmix_bytes(shape).astype(np.int16) - 128).astype(np.int8)


def _flax_path(torch_bn: str) -> tuple[str, ...]:
  """`cnn.layer1.0.downsample.1` -> ('layer1_0', 'downsample_1'); `cnn.bn1` -> ('bn1',)."""
  parts = torch_bn.removeprefix("cnn.").split(".")
  if parts[0].startswith("layer"):
    return (f"{parts[0]}_{parts[1]}", "_".join(parts[2:]))
  return tuple(parts)


@pytest.fixture(scope="module")
def i3d():
  """`(module, variables, clip, fixture arrays)` for the torch `Visual` fixture."""
  data = fixture("inflated_resnet")
  x = ntu_frames(I3D_INPUT)
  assert hashlib.sha256(x.tobytes()).hexdigest() == str(data["x_sha256"])
  module = InflatedResNet50(**I3D)
  path = FIXTURES / "inflated_resnet_legacy.pth"
  like = bb.abstract_variables(module, InputSpec.of(x[0]))
  return module, InflatedResNet50.variables_from_torch(load_state_dict(path), like, str(path)), \
      x, data


@pytest.fixture(scope="module")
def hcn():
  """`(module, variables, fixture arrays)` for the torch `Skeleton` fixture."""
  data = fixture("hcn")
  module = HCN(**HCN_SIZES)
  path = FIXTURES / "hcn_zip.pth"
  like = bb.abstract_variables(module, InputSpec.of(data["x"][0]))
  return module, HCN.variables_from_torch(load_state_dict(path), like, str(path)), data


# ------------------------------------------------------------------ inflated ResNet-50

def test_i3d_taps_match_torch(i3d):
  module, variables, x, data = i3d
  assert x.dtype == np.int8                           # integer clip, cast inside
  logits, taps = jax.jit(lambda v, x: module.apply(v, x))(variables, x)
  assert set(taps) == {"layer1", "layer2", "layer3", "layer4", "pooled"}
  assert taps["layer4"].shape == (2, 2, 9, 8, 16)     # 264 x 232 frames: 9 x 8
  to_last = lambda a: np.moveaxis(a, 1, -1)           # torch [B, C, T, H, W] -> [B, T, H, W, C]
  assert_close(taps["layer1"][:, :, ::4, ::4], to_last(data["layer1"]), "layer1 (::4)")
  for name in ("layer2", "layer3", "layer4"):
    assert_close(taps[name], to_last(data[name]), name)
  assert_close(taps["pooled"], data["pooled"], "pooled")
  np.testing.assert_allclose(taps["pooled"], np.mean(taps["layer4"][:, :, :7, :7], axis=(1, 2, 3)),
                             rtol=1e-6)               # top-left 7 x 7 of the 9 x 8 map
  assert_close(logits, data["logits"], "logits")


def test_i3d_train_mode_batch_stats_match_torch(i3d):
  module, variables, x, data = i3d
  (logits, taps), updated = jax.jit(lambda v, x: module.apply(
      v, x, train=True, mutable=["batch_stats"]))(variables, x)
  assert_close(taps["pooled"], data["train_pooled"], "train pooled")
  assert_close(logits, data["train_logits"], "train logits")
  names = sorted(k[len("train_"):-len(".running_mean")] for k in data
                 if k.endswith(".running_mean"))
  assert len(names) == 1 + 4 * 4                      # stem + 3 per block + downsample
  for name in names:
    stats = updated["batch_stats"]
    for part in _flax_path(name):
      stats = stats[part]
    assert_close(stats["mean"], data[f"train_{name}.running_mean"], f"{name} mean")
    assert_close(stats["var"], data[f"train_{name}.running_var"], f"{name} var")


def test_i3d_release_shapes():
  module = bb.make_backbone("inflated_resnet50")
  assert isinstance(module, InflatedResNet50)
  assert bb.BACKBONES["inflated_resnet50"] is InflatedResNet50
  spec = InputSpec((8, 256, 256, 3), "float32")
  logits, taps = bb.output_shapes(module, spec)
  assert logits == [60]
  assert {k: taps[k] for k in ("layer2", "layer3", "layer4", "pooled")} == {
      "layer2": [8, 32, 32, 512], "layer3": [8, 16, 16, 1024], "layer4": [8, 8, 8, 2048],
      "pooled": [2048]}
  assert taps["layer1"] == [8, 64, 64, 256]
  params = bb.abstract_variables(module, spec)["params"]
  assert sorted(k for k in params if k.startswith("layer")) == sorted(
      f"layer{i}_{j}" for i, n in enumerate((3, 4, 6, 3), 1) for j in range(n))
  assert params["conv1"]["kernel"].shape == (7, 7, 3, 64)
  assert params["layer1_0"]["conv2"]["kernel"].shape == (3, 3, 3, 64, 64)
  assert params["layer4_0"]["downsample_0"]["kernel"].shape == (1, 1, 1, 1024, 2048)
  assert "downsample_0" not in params["layer4_1"]
  assert params["classifier"]["kernel"].shape == (2048, 60)
  with pytest.raises(ValueError, match=r"layer4's map is 2 x 2"):
    bb.output_shapes(module, InputSpec((8, 64, 64, 3), "float32"))


def test_i3d_wrong_architecture_lists_the_keys(i3d):
  module, _, x, _ = i3d
  like = bb.abstract_variables(module, InputSpec.of(x[0]))
  sd = load_state_dict(FIXTURES / "inflated_resnet_legacy.pth")
  assert "cnn.layer1.0.conv2.weight" in sd and sd["cnn.conv1.weight"].shape == (2, 3, 7, 7)
  del sd["cnn.layer4.0.downsample.1.running_var"]
  sd["cnn.layer4.1.conv1.weight"] = np.zeros((4, 16, 1, 1, 1), np.float32)
  with pytest.raises(DataError) as e:
    InflatedResNet50.variables_from_torch(sd, like, "ck.pth")
  msg = str(e.value)
  assert msg.startswith("ck.pth: ")
  assert "missing torch keys (1): cnn.layer4.0.downsample.1.running_var" in msg
  assert "unexpected torch keys (1): cnn.layer4.1.conv1.weight" in msg
  sd = load_state_dict(FIXTURES / "inflated_resnet_legacy.pth")
  deeper = bb.abstract_variables(InflatedResNet50(**{**I3D, "blocks": (1, 1, 1, 2)}),
                                 InputSpec.of(x[0]))
  with pytest.raises(DataError,                      # 3 convs + 3 BatchNorms x 4 tensors
                     match=r"missing torch keys \(15\): cnn\.layer4\.1\.conv1\.weight"):
    InflatedResNet50.variables_from_torch(sd, deeper, "ck.pth")


# ------------------------------------------------------------------ HCN

def test_hcn_taps_match_torch(hcn):
  module, variables, data = hcn
  logits, taps = jax.jit(lambda v, x: module.apply(v, x))(variables, data["x"])
  assert set(taps) == {"conv5", "conv6", "flat", "fc7"}
  for name in ("conv5", "conv6"):                     # torch NCHW -> channels last
    assert_close(taps[name], np.moveaxis(data[name], 1, -1), name)
  assert_close(taps["flat"], data["flat"], "flat")   # torch's NCHW flattening order
  assert_close(taps["fc7"], data["fc7"], "fc7")
  assert_close(logits, data["logits"], "logits")


def test_hcn_dropout_only_in_train_mode(hcn):
  _, variables, data = hcn
  x = data["x"]
  same, _ = HCN(**HCN_SIZES, dropout=0.0).apply(variables, x, train=True)
  assert_close(same, data["logits"], "train logits without dropout")
  module = HCN(**HCN_SIZES, dropout=0.5)
  run = jax.jit(lambda seed: module.apply(variables, x, train=True,
                                          rngs={"dropout": jax.random.key(seed)})[0])
  a, b = run(0), run(1)
  assert not np.allclose(a, data["logits"]) and not np.allclose(a, b)
  np.testing.assert_array_equal(run(0), a)


def test_hcn_release_shapes():
  module = bb.make_backbone("hcn")
  assert isinstance(module, HCN) and bb.BACKBONES["hcn"] is HCN and module.dropout == 0.2
  spec = InputSpec((3, 32, 25, 2), "float32")
  logits, taps = bb.output_shapes(module, spec)
  assert logits == [60]
  assert taps == {"conv5": [4, 4, 128], "conv6": [2, 2, 256], "flat": [1024], "fc7": [512]}
  params = bb.abstract_variables(module, spec)["params"]
  assert params["conv2"]["kernel"].shape == (3, 1, 64, 32)
  assert params["conv3m"]["kernel"].shape == (3, 3, 25, 32)
  assert params["fc7"]["kernel"].shape == (1024, 512)
  with pytest.raises(ValueError, match=r"HCN expects skeletons .*\[n, 3, 32, 25, 2\]"):
    bb.output_shapes(module, InputSpec((3, 64, 25, 2), "float32"))


def test_hcn_wrong_architecture_lists_the_keys(hcn):
  module, _, data = hcn
  like = bb.abstract_variables(module, InputSpec.of(data["x"][0]))
  sd = load_state_dict(FIXTURES / "hcn_zip.pth")
  del sd["conv2m.bias"]
  sd["fc7.weight"] = sd.pop("fc7.0.weight")
  with pytest.raises(DataError) as e:
    HCN.variables_from_torch(sd, like, "ck.pth")
  msg = str(e.value)
  assert "missing torch keys (2): conv2m.bias, fc7.0.weight" in msg
  assert "unexpected torch keys (1): fc7.weight" in msg
  sd = load_state_dict(FIXTURES / "hcn_zip.pth")
  wide = bb.abstract_variables(HCN(**{**HCN_SIZES, "channels": 16}),
                               InputSpec.of(data["x"][0]))
  with pytest.raises(DataError, match=r"conv1\.0\.weight \[8, 3, 1, 1\] vs params/conv1/kernel"):
    HCN.variables_from_torch(sd, wide, "ck.pth")


def test_input_normalisation_of_uint8_bgr_frames():
  """The NTU reader's uint8 BGR frames, normalised as the release does: /255, then
  ImageNet's RGB mean/std applied to channels B, G, R in that order."""
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  small = dict(widths=(2, 2, 4, 4), blocks=(1, 1, 1, 1), num_classes=5)
  raw = InflatedResNet50(**small)
  norm = InflatedResNet50(**small, scale=1 / 255, mean=mean, std=std)
  x = np.random.default_rng(0).integers(0, 256, (1, 2, 224, 224, 3)).astype(np.uint8)
  x[0, 1] = 0                                              # a blank frame
  variables = jax.jit(raw.init)(jax.random.key(0), x)
  want = (x / 255.0 - np.asarray(mean)) / np.asarray(std)
  np.testing.assert_allclose(norm.apply(variables, x)[0],
                             raw.apply(variables, want.astype(np.float32))[0], rtol=1e-5,
                             atol=1e-5)

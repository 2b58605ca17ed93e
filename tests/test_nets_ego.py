"""Tests for the EgoGesture backbone (3-D ResNeXt, RGB and depth stems) against PyTorch."""

import hashlib

import jax
import numpy as np
import pytest

from bmnas_jax.data import backbones as bb
from bmnas_jax.data.nets import resnext3d
from bmnas_jax.data.nets.resnext3d import ResNeXt3D
from bmnas_jax.data.source import InputSpec
from bmnas_jax.data.torch_import import load_state_dict
from tests.parity import FIXTURES, assert_close, splitmix_bytes
from bmnas_jax.errors import DataError

# As tests/make_torch_fixtures.py (part `ego`).
SMALL = dict(blocks=(1, 1, 1, 2), cardinality=2, widths=(4, 4, 8, 8), stem_width=4,
             num_classes=5, sample_duration=20, sample_size=60)
STEMS = {  # stem -> (checkpoint, input shape, salt, mean)
    "rgb": ("resnext_rgb_legacy.pth", (2, 20, 60, 44, 3), 1, resnext3d.RGB_MEAN),
    "depth": ("resnext_depth_zip.pth", (2, 20, 60, 44, 1), 2, resnext3d.DEPTH_MEAN),
}


@pytest.fixture(scope="module", params=sorted(STEMS))
def small(request):
  """`(stem, module, variables, raw uint8 clip, fixture arrays)` per torch fixture net."""
  stem = request.param
  checkpoint, shape, salt, mean = STEMS[stem]
  with np.load(FIXTURES / f"resnext_{stem}.npz") as z:
    data = {k: z[k] for k in z.files}
  x = splitmix_bytes(shape, salt)
  assert hashlib.sha256(x.tobytes()).hexdigest() == str(data["x_sha256"])
  module = ResNeXt3D(**SMALL, stem=stem, mean=mean)
  path = FIXTURES / checkpoint
  like = bb.abstract_variables(module, InputSpec.of(x[0]))
  return stem, module, ResNeXt3D.variables_from_torch(load_state_dict(path), like, str(path)), \
      x, data


def test_taps_match_torch(small):
  stem, module, variables, x, data = small
  logits, taps = jax.jit(lambda v, x: module.apply(v, x))(variables, x)
  assert set(taps) == {"layer1", "layer2", "layer3", "layer4", "pooled"}
  assert taps["layer4"].shape == (2, 2, 2, 2, 16)     # 20 x 60 x 44 clips: 2 x 2 x 2
  to_last = lambda a: np.moveaxis(a, 1, -1)           # torch [B, C, T, H, W] -> [B, T, H, W, C]
  for name in ("layer1", "layer2", "layer3", "layer4"):
    assert_close(taps[name], to_last(data[name]), f"{stem} {name}")
  assert_close(taps["pooled"], data["pooled"], f"{stem} pooled")
  assert_close(logits, data["logits"], f"{stem} logits")
  assert_close(taps["pooled"], np.mean(taps["layer4"], axis=(1, 2, 3)), "pooled: layer4's mean")


def test_release_shapes():
  for stem, channels in (("rgb", 3), ("depth", 1)):
    module = bb.make_backbone("resnext3d", {"stem": stem})
    assert isinstance(module, ResNeXt3D) and bb.BACKBONES["resnext3d"] is ResNeXt3D
    spec = InputSpec((32, 112, 112, channels), "uint8")
    logits, taps = bb.output_shapes(module, spec)
    assert logits == [83]
    assert taps == {"layer1": [16, 28, 28, 256], "layer2": [8, 14, 14, 512],
                    "layer3": [4, 7, 7, 1024], "layer4": [2, 4, 4, 2048], "pooled": [2048]}
    variables = bb.abstract_variables(module, spec)
    params = variables["params"]
    assert sorted(k for k in params if k.startswith("layer")) == sorted(
        f"layer{i}_{j}" for i, n in enumerate((3, 4, 23, 3), 1) for j in range(n))
    assert params["conv1"]["kernel"].shape == ((3, 7, 7, 3, 64) if stem == "rgb"
                                               else (7, 7, 7, 1, 64))
    # torch layer1.0.conv2.weight [128, 4, 3, 3, 3]: 32 groups of 4 input channels
    assert params["layer1_0"]["conv2"]["kernel"].shape == (3, 3, 3, 4, 128)
    assert params["layer1_0"]["downsample_0"]["kernel"].shape == (1, 1, 1, 64, 256)
    assert params["layer4_0"]["downsample_0"]["kernel"].shape == (1, 1, 1, 1024, 2048)
    assert all("downsample_0" not in params[f"layer{i}_1"] for i in range(1, 5))
    assert params["fc"]["kernel"].shape == (2048, 83)
    leaves = len(jax.tree.leaves(variables))
    batch_norms = len(jax.tree.leaves(variables["batch_stats"])) // 2
    assert leaves + batch_norms == 626                # + num_batches_tracked: the checkpoints' keys


def test_pool_applies_where_the_releases_does():
  """The release's AvgPool3d((ceil(D / 16), ceil(S / 32), ceil(S / 32)), stride 1) + fc
  needs layer4's map to be exactly the kernel (shallow nets: the same map sizes)."""
  module = ResNeXt3D(blocks=(1, 1, 1, 1))
  for shape in ((16, 112, 112, 3), (32, 160, 160, 3)):   # layer4 1 x 4 x 4, 2 x 5 x 5
    with pytest.raises(ValueError, match=r"layer4's map is .* AvgPool3d\(\(2, 4, 4\)"):
      bb.output_shapes(module, InputSpec(shape, "uint8"))
  logits, taps = bb.output_shapes(module, InputSpec((17, 128, 97, 3), "uint8"))
  assert taps["layer4"] == [2, 4, 4, 2048] and logits == [83]   # same ceil(T/16), ceil(H/32)
  logits, taps = bb.output_shapes(
      ResNeXt3D(blocks=(1, 1, 1, 1), sample_duration=16, sample_size=64),
      InputSpec((16, 64, 64, 3), "uint8"))
  assert taps["layer4"] == [1, 2, 2, 2048] and taps["pooled"] == [2048]


def test_bad_config_and_inputs_raise():
  spec = InputSpec((20, 60, 44, 3), "uint8")
  for kwargs, message in (
      ({"stem": "flow"}, r"stem='flow'; valid stems: rgb, depth"),
      ({"stem": "depth"}, r"expects clips \[n, T, H, W, 1\], got shape \(1, 20, 60, 44, 3\)"),
      ({"mean": resnext3d.DEPTH_MEAN}, r"mean=\(114.7748,\) needs 3 entries"),
      ({"widths": (4, 4, 8, 9)}, r"multiples of cardinality=2"),
      ({"blocks": (1, 1, 1)}, r"need 4 entries each")):
    with pytest.raises(ValueError, match=message):
      bb.output_shapes(ResNeXt3D(**{**SMALL, **kwargs}), spec)


def test_mean_and_std_fields():
  """`(x * scale - mean) / std` before the first conv: the scaled input gives the same
  outputs as the float input normalised by hand (a net whose pool is not needed)."""
  tiny = {**SMALL, "blocks": (1, 1, 1, 1), "sample_duration": 16, "sample_size": 32}
  module = ResNeXt3D(**tiny, stem="depth", scale=2.0, mean=(100.0,), std=(4.0,))
  raw = ResNeXt3D(**tiny, stem="depth")
  x = splitmix_bytes((1, 16, 32, 32, 1), 5)
  hand = ((x * 2.0 - 100.0) / 4.0).astype(np.float32)

  @jax.jit
  def both(key):
    variables = raw.init(key, hand)
    return module.apply(variables, x)[0], raw.apply(variables, hand)[0]

  got, want = both(jax.random.key(0))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_wrong_keys_are_listed():
  like = bb.abstract_variables(ResNeXt3D(**SMALL, stem="rgb"), InputSpec((20, 60, 44, 3),
                                                                        "uint8"))
  sd = load_state_dict(FIXTURES / "resnext_rgb_legacy.pth")
  assert sd["layer1.0.conv2.weight"].shape == (4, 2, 3, 3, 3)     # grouped: I / 2
  assert "layer4.1.conv1.weight" in sd and "layer4.1.downsample.0.weight" not in sd
  del sd["layer2.0.downsample.1.running_var"]
  sd["layer4.1.downsample.0.weight"] = np.zeros((16, 16, 1, 1, 1), np.float32)
  with pytest.raises(DataError) as e:
    ResNeXt3D.variables_from_torch(sd, like, "ck.pth")
  msg = str(e.value)
  assert msg.startswith("ck.pth: ")
  assert "missing torch keys (1): layer2.0.downsample.1.running_var" in msg
  assert "unexpected torch keys (1): layer4.1.downsample.0.weight" in msg
  depth = load_state_dict(FIXTURES / "resnext_depth_zip.pth")    # `module.` prefix stripped
  assert all(not k.startswith("module.") for k in depth)
  with pytest.raises(DataError, match=r"conv1\.weight \[4, 1, 7, 7, 7\] vs params/conv1/kernel"):
    ResNeXt3D.variables_from_torch(depth, like, "depth.pth")      # a depth checkpoint, RGB net

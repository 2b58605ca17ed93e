"""Tests for reading PyTorch checkpoints without torch and mapping them onto Flax variables."""

import os
import pathlib
import pickle
import re
import struct
import zipfile

import flax.linen as nn
import jax
import numpy as np
import pytest

from bmnas_jax.data import torch_import
from bmnas_jax.data.torch_import import load_state_dict, load_variables, to_variables
from bmnas_jax.errors import DataError

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "torch"


def _expected(name: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """A fixture's expected arrays (bit patterns for bfloat16/float8) and dtype names."""
  with np.load(FIXTURES / f"{name}.npz") as npz:
    dtypes = dict(entry.split(":") for entry in npz["__dtypes__"])
    return {k: npz[k] for k in dtypes}, dtypes


def _assert_matches(loaded: dict[str, np.ndarray], name: str) -> None:
  arrays, dtypes = _expected(name)
  assert list(loaded) == list(arrays)                 # file order
  for key, want in arrays.items():
    got = loaded[key]
    assert got.dtype.name == dtypes[key], key
    assert got.shape == want.shape, key
    assert got.flags.c_contiguous and got.flags.writeable, key
    np.testing.assert_array_equal(got.view(want.dtype) if got.dtype != want.dtype else got,
                                  want, err_msg=key)


# Checkpoints written opcode by opcode, in the layouts `_read_zip`/`_read_legacy` describe.

def _s(text: str) -> bytes:
  raw = text.encode()
  return b"X" + struct.pack("<I", len(raw)) + raw


def _i(n: int) -> bytes:
  return b"J" + struct.pack("<i", n)


def _tuple(*items: bytes) -> bytes:
  return b"(" + b"".join(items) + b"t"


def _global(module: str, name: str) -> bytes:
  return b"c" + f"{module}\n{name}\n".encode()


_ODICT = _global("collections", "OrderedDict") + b")R"


def _tensor(storage_type: str, key: str, numel: int, offset: int, size, stride, *,
            legacy: bool = False, view=None, rebuild: str = "_rebuild_tensor_v2") -> bytes:
  pid = [_s("storage"), _global("torch", storage_type), _s(key), _s("cpu"), _i(numel)]
  if legacy:
    pid.append(b"N" if view is None else _tuple(_s(view[0]), _i(view[1]), _i(view[2])))
  args = [_tuple(*pid) + b"Q", _i(offset), _tuple(*map(_i, size)), _tuple(*map(_i, stride))]
  if rebuild == "_rebuild_tensor_v2":
    args += [b"\x89", _ODICT]                         # requires_grad=False, backward_hooks
  return _global("torch._utils", rebuild) + _tuple(*args) + b"R"


def _dict(entries: dict[str, bytes], ordered: bool = True) -> bytes:
  items = b"".join(_s(k) + v for k, v in entries.items())
  return (_ODICT if ordered else b"}") + b"(" + items + b"u"


def _pickle(body: bytes) -> bytes:
  return b"\x80\x02" + body + b"."


def _write_zip(path, pkl: bytes, records: dict[str, bytes], byteorder: str = "little"):
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pkl)
    z.writestr("archive/byteorder", byteorder)
    for key, raw in records.items():
      z.writestr(f"archive/data/{key}", raw)
    z.writestr("archive/version", "3\n")
  return path


def _write_legacy(path, pkl: bytes, records: dict[str, tuple[int, bytes]], little: bool = True,
                  magic: int = torch_import.LEGACY_MAGIC):
  """`little=False`: as a big-endian machine wrote it (native counts; data always little-endian)."""
  sys_info = {"protocol_version": 1001, "little_endian": little,
              "type_sizes": {"short": 2, "int": 4, "long": 4}}
  head = b"".join(pickle.dumps(x, protocol=2) for x in (magic, 1001, sys_info))
  tail = b"".join(struct.pack("<q" if little else ">q", n) + raw for n, raw in records.values())
  pathlib.Path(path).write_bytes(head + pkl + pickle.dumps(list(records), protocol=2) + tail)
  return path


_F4 = np.arange(4, dtype="<f4").tobytes()


@pytest.mark.parametrize("checkpoint, expected", [
    ("tensors_zip", "tensors"), ("tensors_legacy", "tensors"), ("v3_zip", "v3")])
def test_tensors_equal_torch_values_and_dtypes(checkpoint, expected):
  _assert_matches(load_state_dict(FIXTURES / f"{checkpoint}.pth"), expected)


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_views_and_shared_storages_are_independent_copies(fmt):
  sd = load_state_dict(FIXTURES / f"tensors_{fmt}.pth")
  np.testing.assert_array_equal(sd["transposed"], sd["base"].T)
  np.testing.assert_array_equal(sd["sliced"], [[5, 6], [9, 10]])
  sd["base"][0, 1] = -1                               # no aliasing between loaded arrays
  assert sd["transposed"][1, 0] == 1


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_wrapper_is_unwrapped_and_module_prefix_stripped(fmt):
  sd = load_state_dict(FIXTURES / f"wrapper_{fmt}.pth")
  assert list(sd) == ["conv.weight", "conv.bias", "fc.weight", "fc.bias"]
  _assert_matches(sd, "wrapper")


def test_numpy1_scalar_names_of_2018_checkpoints_are_admitted(tmp_path):
  raw = (FIXTURES / "wrapper_legacy.pth").read_bytes()
  assert raw.count(b"numpy._core.multiarray") == 2    # scalar and _reconstruct
  path = tmp_path / "old.pth"
  path.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
  _assert_matches(load_state_dict(path), "wrapper")


@pytest.mark.parametrize("wrapper", torch_import.WRAPPER_KEYS)
def test_wrapper_keys(tmp_path, wrapper):
  inner = _dict({"module.a": _tensor("FloatStorage", "0", 4, 0, (4,), (1,)),
                 "b": _tensor("FloatStorage", "0", 4, 2, (2,), (1,))})
  pkl = _pickle(_dict({"epoch": _i(3), wrapper: inner, "best": _i(7)}, ordered=False))
  sd = load_state_dict(_write_zip(tmp_path / "w.pth", pkl, {"0": _F4}))
  assert list(sd) == ["module.a", "b"]               # prefix kept: not on every key
  np.testing.assert_array_equal(sd["b"], [2, 3])


@pytest.mark.parametrize("little", [True, False])
def test_legacy_views_and_old_rebuild(tmp_path, little):
  """torch < 1.0 files: storage views in persistent ids, `_rebuild_tensor` (torch reads these)."""
  pkl = _pickle(_dict({
      "v": _tensor("FloatStorage", "r", 6, 1, (2,), (1,), legacy=True, view=("v1", 2, 3)),
      "old": _tensor("ShortStorage", "s", 3, 0, (3,), (1,), legacy=True,
                     rebuild="_rebuild_tensor")}))
  records = {"r": (6, np.arange(6, dtype="<f4").tobytes()),
             "s": (3, np.array([-2, 1, 300], "<i2").tobytes())}
  sd = load_state_dict(_write_legacy(tmp_path / "old.pth", pkl, records, little=little))
  np.testing.assert_array_equal(sd["v"], [3, 4])
  np.testing.assert_array_equal(sd["old"], [-2, 1, 300])
  assert sd["v"].dtype == np.float32 and sd["old"].dtype == np.int16


def test_zip_big_endian(tmp_path):
  pkl = _pickle(_dict({"c": _tensor("ComplexFloatStorage", "0", 2, 0, (2,), (1,))}))
  raw = np.array([1 + 2j, -3j], ">c8").tobytes()
  sd = load_state_dict(_write_zip(tmp_path / "be.pth", pkl, {"0": raw}, byteorder="big"))
  np.testing.assert_array_equal(sd["c"], [1 + 2j, -3j])


class ConvBN2d(nn.Module):
  """The fixture script's ConvBN2d in Flax (NHWC)."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), strides=2, padding=((1, 1), (1, 1)), name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-5, name="bn")(x)
    return nn.Dense(5, name="fc")(nn.relu(x).mean(axis=(1, 2)))


class ConvBN3d(nn.Module):
  """The fixture script's ConvBN3d in Flax (NDHWC)."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(3, (3, 3, 3), strides=(1, 2, 2), padding=((1, 1),) * 3, use_bias=False,
                name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-5, name="bn")(x)
    return nn.Dense(2, name="head")(nn.relu(x).mean(axis=(1, 2, 3)))


RULES_2D = [("conv", "conv", "conv"), ("bn", "bn", "bn"), ("fc", "fc", "linear")]
RULES_3D = [("conv", "features.0", "conv"), ("bn", "features.1", "bn"), ("head", "head", "linear")]


def _like(model, x):
  return jax.eval_shape(model.init, jax.random.key(0), x)


@pytest.mark.parametrize("checkpoint, model, rules", [
    ("convbn_zip", ConvBN2d(), RULES_2D), ("conv3d_legacy", ConvBN3d(), RULES_3D)])
def test_mapped_flax_model_reproduces_torch_output(checkpoint, model, rules):
  with np.load(FIXTURES / f"{checkpoint.split('_')[0]}.npz") as npz:
    x, y = npz["x"], npz["y"]
  x = np.moveaxis(x, 1, -1)                           # NC... -> N...C
  like = _like(model, x)
  variables = load_variables(FIXTURES / f"{checkpoint}.pth", rules, like)
  assert jax.tree.structure(variables) == jax.tree.structure(like)
  for got, want in zip(jax.tree.leaves(variables), jax.tree.leaves(like)):
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == want.shape
  np.testing.assert_allclose(model.apply(variables, x), y, rtol=1e-5, atol=1e-6)


def test_mapping_errors_are_listed_together():
  x = np.zeros((1, 6, 5, 3), np.float32)
  sd = load_state_dict(FIXTURES / "convbn_zip.pth")
  del sd["bn.running_var"]
  sd["fc.weight"] = sd["fc.weight"].T
  sd["extra.weight"] = np.zeros(2, np.float32)
  with pytest.raises(DataError) as e:
    to_variables(sd, RULES_2D + [("nowhere", "x", "ln")], _like(ConvBN2d(), x), source="ck.pth")
  msg = str(e.value)
  assert msg.startswith("ck.pth: ")
  assert "missing torch keys (1): bn.running_var" in msg
  assert "unexpected torch keys (1): extra.weight" in msg
  assert "fc.weight [4, 5] vs params/fc/kernel [4, 5] (needs torch [5, 4])" in msg
  assert "rules matching no Flax variable (1): ('nowhere', 'x', 'ln')" in msg
  with pytest.raises(DataError, match=r"Flax variables no rule fills \(2\): params/fc/bias, "
                     r"params/fc/kernel"):
    to_variables(sd, RULES_2D[:2], _like(ConvBN2d(), x), ignore=("fc.", "extra."))
  with pytest.raises(ValueError, match="unknown kind 'gru'.*conv, linear, bn"):
    to_variables(sd, [("fc", "fc", "gru")], _like(ConvBN2d(), x))


class _Payload:
  """Pickles as `fn(arg)`: what a crafted checkpoint would run on load."""

  def __init__(self, fn, arg):
    self.fn, self.arg = fn, arg

  def __reduce__(self):
    return self.fn, (self.arg,)


def _payload(kind: str, marker: pathlib.Path) -> _Payload:
  if kind == "os.system":
    return _Payload(os.system, f"touch '{marker}'")
  return _Payload(exec, f"open({str(marker)!r}, 'w').close()")


@pytest.mark.parametrize("layout", ["plain", "zip", "legacy"])
@pytest.mark.parametrize("kind", ["os.system", "builtins.exec"])
def test_code_in_a_checkpoint_is_refused_and_never_runs(tmp_path, layout, kind):
  live = tmp_path / "live"
  pickle.loads(pickle.dumps(_payload(kind, live), protocol=2))   # unsafe on purpose: payload works
  assert live.exists()
  marker = tmp_path / "marker"
  pkl = pickle.dumps({"w": _payload(kind, marker)}, protocol=2)
  path = tmp_path / f"evil_{layout}.pth"
  if layout == "plain":
    path.write_bytes(pkl)
  elif layout == "zip":
    _write_zip(path, pkl, {})
  else:
    _write_legacy(path, pkl, {})
  name = "posix.system" if kind == "os.system" else "__builtin__.exec"   # protocol-2 name
  with pytest.raises(DataError, match=f"refused global {name}") as e:
    load_state_dict(path)
  assert str(path) in str(e.value)
  assert not marker.exists()


@pytest.mark.parametrize("checkpoint", ["tensors_zip", "tensors_legacy", "wrapper_legacy"])
@pytest.mark.parametrize("keep", [0.05, 0.5, 0.97])
def test_truncated_checkpoint_is_named(tmp_path, checkpoint, keep):
  raw = (FIXTURES / f"{checkpoint}.pth").read_bytes()
  path = tmp_path / f"cut_{checkpoint}.pth"
  path.write_bytes(raw[:int(len(raw) * keep)])
  with pytest.raises(DataError, match=f"^{re.escape(str(path))}: "):
    load_state_dict(path)


_TWO = _pickle(_dict({"a": _tensor("FloatStorage", "0", 4, 0, (2, 2), (2, 1))}))


@pytest.mark.parametrize("write, message", [
    (lambda p: _write_zip(p, _TWO.replace(b"FloatStorage", b"QInt8Storage"), {"0": _F4}),
     "unsupported storage type torch.QInt8Storage"),
    (lambda p: _write_zip(p, _TWO, {}), r"missing record archive/data/0"),
    (lambda p: _write_zip(p, _TWO, {"0": _F4[:12]}), r"has 12 bytes, expected 4 x 4"),
    (lambda p: _write_zip(p, _TWO.replace(_tuple(_i(2), _i(2)), _tuple(_i(3), _i(2))),
                          {"0": _F4}), r"reaches element 5 of storage '0', which holds 4"),
    (lambda p: _write_legacy(p, _TWO, {}), r"missing storage records '0'"),
    (lambda p: _write_legacy(p, _TWO, {"0": (4, _F4)}, magic=7), "wrong magic number 7"),
    (lambda p: _write_legacy(p, _pickle(_dict({"epoch": _i(3)})), {}), "no state dict"),
    (lambda p: p.write_bytes(b"PK\x03\x04 not a zip"), "truncated or corrupt zip archive"),
    (lambda p: p.write_bytes(b""), "not a PyTorch checkpoint"),
], ids=["storage-type", "zip-record", "record-size", "bounds", "legacy-record", "magic",
        "no-tensors", "bad-zip", "empty"])
def test_malformed_checkpoints_are_named(tmp_path, write, message):
  path = tmp_path / "bad.pth"
  write(path)
  with pytest.raises(DataError, match=f"^{re.escape(str(path))}: .*{message}"):
    load_state_dict(path)


def test_unreadable_file_is_named(tmp_path):
  with pytest.raises(DataError, match=f"^{re.escape(str(tmp_path))}/absent.pth: cannot read"):
    load_state_dict(tmp_path / "absent.pth")

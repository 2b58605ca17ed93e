"""PyTorch checkpoints read without torch (restricted unpickler) and mapped onto Flax variables."""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import pickletools
import struct
import sys
import zipfile
from typing import Any, Callable, Mapping, Sequence

import ml_dtypes
import numpy as np

from bmnas_jax.errors import DataError

LEGACY_MAGIC = 0x1950a86a20f9469cfc6c    # the first pickle of a pre-1.6 `torch.save` file
LEGACY_PROTOCOL = 1001                   # its second pickle
# Keys under which training scripts store the model's state dict next to `epoch` & co.
WRAPPER_KEYS = ("state_dict", "model", "net", "model_state_dict")
MODULE_PREFIX = "module."                # added by nn.DataParallel / DistributedDataParallel

# Typed storage classes `torch.save` names in persistent ids -> element dtype.
_STORAGE_DTYPES = {
  "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
  "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
  "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
  "BoolStorage": np.bool_, "ComplexFloatStorage": np.complex64,
  "ComplexDoubleStorage": np.complex128,
}
# torch dtypes by name (`_rebuild_tensor_v3`, used for dtypes without a typed storage class).
_TORCH_DTYPES = {
  "float32": np.float32, "float64": np.float64, "float16": np.float16,
  "bfloat16": ml_dtypes.bfloat16, "int64": np.int64, "int32": np.int32, "int16": np.int16,
  "int8": np.int8, "uint8": np.uint8, "bool": np.bool_, "complex64": np.complex64,
  "complex128": np.complex128, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
  "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
}
_ENCODINGS = ("latin1", "latin-1", "utf-8", "utf8", "ascii")


class _Bad(Exception):
  """Something in the file is wrong; `load_state_dict` reports it as a `DataError` with the path."""


class _Refused(_Bad):
  """The pickle names a global that is not on the allow-list."""


def _short(obj: Any) -> str:
  text = repr(obj)
  return text if len(text) <= 80 else text[:77] + "..."


def _int(value: Any, what: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int):
    raise _Bad(f"{what} is {_short(value)}, not an int")
  return value


def _ints(value: Any, what: str) -> tuple[int, ...]:
  if not isinstance(value, (tuple, list)):
    raise _Bad(f"{what} is {_short(value)}, not a tuple of ints")
  return tuple(_int(v, what) for v in value)


class _NoState:
  """Base of the stand-ins the unpickler hands out: a pickle cannot BUILD onto them."""
  __slots__ = ()

  def __setstate__(self, state: Any) -> None:
    raise _Bad(f"the pickle sets state on {self!r}")


class _Global(_NoState):
  """An admitted global: a name and the safe local function that stands in for it."""
  __slots__ = ("name", "fn")

  def __init__(self, name: str, fn: Callable[..., Any]):
    self.name, self.fn = name, fn

  def __call__(self, *args: Any) -> Any:
    return self.fn(*args)

  def __repr__(self) -> str:
    return self.name


class _Marker(_NoState):
  """An admitted global that is only a tag (a storage class, a dtype, numpy.ndarray)."""
  __slots__ = ("name", "dtype")

  def __init__(self, name: str, dtype: Any = None):
    self.name, self.dtype = name, None if dtype is None else np.dtype(dtype)

  def __repr__(self) -> str:
    return self.name


class _StorageRef(_NoState):
  """A storage named by a persistent id: elements `[start, start + length)` of record `key`."""
  __slots__ = ("key", "dtype", "numel", "start", "length")

  def __init__(self, key: str, dtype: np.dtype, numel: int, start: int, length: int):
    self.key, self.dtype, self.numel, self.start, self.length = key, dtype, numel, start, length

  def __repr__(self) -> str:
    return f"storage {self.key!r}"


class _Tensor(_NoState):
  """A tensor as the pickle describes it; made into an array once the storages are read."""
  __slots__ = ("storage", "dtype", "offset", "size", "stride")

  def __init__(self, storage: _StorageRef, dtype: np.dtype, offset: int,
               size: tuple[int, ...], stride: tuple[int, ...]):
    self.storage, self.dtype, self.offset, self.size, self.stride = (
        storage, dtype, offset, size, stride)

  def __repr__(self) -> str:
    return f"tensor {list(self.size)}"


def _rebuild(storage: Any, offset: Any, size: Any, stride: Any, dtype: np.dtype | None = None
             ) -> _Tensor:
  if not isinstance(storage, _StorageRef):
    raise _Bad(f"a tensor is rebuilt from {_short(storage)}, not from a storage")
  size, stride = _ints(size, "tensor size"), _ints(stride, "tensor stride")
  if len(size) != len(stride):
    raise _Bad(f"tensor size {list(size)} and stride {list(stride)} differ in length")
  return _Tensor(storage, storage.dtype if dtype is None else dtype,
                 _int(offset, "storage offset"), size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
  """Stands in for `torch._utils._rebuild_tensor` (files written before torch 0.4)."""
  return _rebuild(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  """Stands in for `torch._utils._rebuild_tensor_v2` (hooks and metadata are dropped)."""
  del requires_grad, backward_hooks, metadata
  return _rebuild(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
  """Stands in for `torch._utils._rebuild_tensor_v3` (an untyped storage and a torch dtype)."""
  del requires_grad, backward_hooks, metadata
  if not (isinstance(dtype, _Marker) and dtype.name.startswith("torch.")
          and dtype.name[len("torch."):] in _TORCH_DTYPES):
    raise _Bad(f"a tensor has dtype {_short(dtype)}, not a torch dtype")
  return _rebuild(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
  """Stands in for `torch._utils._rebuild_parameter[_with_state]`: the parameter's tensor."""
  del requires_grad, backward_hooks, state
  if not isinstance(data, _Tensor):
    raise _Bad(f"a parameter wraps {_short(data)}, not a tensor")
  return data


def _torch_size(dims=()):
  """Stands in for `torch.Size`: a tuple of ints."""
  return _ints(dims, "torch.Size")


def _codecs_encode(text, encoding="utf-8"):
  """Stands in for `_codecs.encode`, which protocol-2 pickles use to store bytes."""
  if not isinstance(text, str) or encoding not in _ENCODINGS:
    raise _Bad(f"_codecs.encode of {_short(text)} as {_short(encoding)}")
  return text.encode(encoding)


class _NumpyDType(_NoState):
  """Stands in for a pickled `numpy.dtype`: plain numeric dtypes only."""
  __slots__ = ("dtype",)

  def __init__(self, dtype: np.dtype):
    self.dtype = dtype

  def __setstate__(self, state: Any) -> None:
    # numpy's state: (version, byteorder, subdtype, names, fields, elsize, alignment, flags).
    if not (isinstance(state, tuple) and len(state) >= 5 and state[1] in "<>|="
            and state[2] is None and state[3] is None and state[4] is None):
      raise _Bad(f"numpy dtype state {_short(state)} is not a plain numeric dtype")
    if self.dtype.itemsize > 1 and state[1] in "<>":
      self.dtype = self.dtype.newbyteorder(state[1])

  def __repr__(self) -> str:
    return f"numpy.dtype({self.dtype.str!r})"


def _numpy_dtype(spec, align=False, copy=False):
  """Stands in for `numpy.dtype(spec)`, for bool, integer, float and complex dtypes."""
  del align, copy
  if not isinstance(spec, str):
    raise _Bad(f"numpy.dtype({_short(spec)})")
  try:
    dtype = np.dtype(spec)
  except TypeError:
    raise _Bad(f"numpy.dtype({spec!r}) is not a numpy dtype") from None
  if dtype.kind not in "biufc":
    raise _Bad(f"numpy.dtype({spec!r}) is not a bool, integer, float or complex dtype")
  return _NumpyDType(dtype)


def _numpy_scalar(dtype, data):
  """Stands in for `numpy.core.multiarray.scalar` (e.g. `best_prec1` in 2018 checkpoints)."""
  if not isinstance(dtype, _NumpyDType) or not isinstance(data, bytes) \
     or len(data) != dtype.dtype.itemsize:
    raise _Bad(f"numpy scalar of {_short(dtype)} from {_short(data)}")
  return np.frombuffer(data, dtype.dtype)[0]


class _NumpyArray(_NoState):
  """Stands in for a pickled numpy array: `array` is set from numeric raw bytes."""
  __slots__ = ("array",)

  def __init__(self):
    self.array = None

  def __setstate__(self, state: Any) -> None:
    if not (isinstance(state, tuple) and len(state) == 5):
      raise _Bad(f"numpy array state {_short(state)}")
    _, shape, dtype, fortran, raw = state
    shape = _ints(shape, "numpy array shape")
    if not isinstance(dtype, _NumpyDType) or not isinstance(raw, bytes) \
       or min(shape, default=0) < 0 or len(raw) != math.prod(shape) * dtype.dtype.itemsize:
      raise _Bad(f"numpy array of {_short(dtype)}, shape {list(shape)} from {len(raw)} bytes"
                 if isinstance(raw, bytes) else f"numpy array with data {_short(raw)}")
    self.array = np.frombuffer(raw, dtype.dtype).reshape(shape, order="F" if fortran else "C")

  def __repr__(self) -> str:
    return "numpy array"


def _numpy_reconstruct(subtype, shape, code):
  """Stands in for `numpy.core.multiarray._reconstruct(numpy.ndarray, ...)`."""
  del shape, code
  if not (isinstance(subtype, _Marker) and subtype.name == "numpy.ndarray"):
    raise _Bad(f"numpy _reconstruct of {_short(subtype)}")
  return _NumpyArray()


class _Namespace:
  """Stands in for `argparse.Namespace` (training arguments stored next to the weights)."""

  def __setstate__(self, state: Any) -> None:
    if not (isinstance(state, dict) and all(isinstance(k, str) for k in state)):
      raise _Bad(f"argparse.Namespace state {_short(state)}")
    self.__dict__.update(state)


def _allow_list() -> dict[tuple[str, str], Any]:
  """(module, name) -> the local stand-in the restricted unpickler returns for it."""
  allowed: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _Global("collections.OrderedDict", collections.OrderedDict),
    ("torch._utils", "_rebuild_tensor"): _Global("_rebuild_tensor", _rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v2"): _Global("_rebuild_tensor_v2", _rebuild_tensor_v2),
    ("torch._utils", "_rebuild_tensor_v3"): _Global("_rebuild_tensor_v3", _rebuild_tensor_v3),
    ("torch._utils", "_rebuild_parameter"): _Global("_rebuild_parameter", _rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"):
        _Global("_rebuild_parameter_with_state", _rebuild_parameter),
    ("torch", "Size"): _Global("torch.Size", _torch_size),
    ("torch.storage", "UntypedStorage"): _Marker("torch.storage.UntypedStorage", np.uint8),
    ("_codecs", "encode"): _Global("_codecs.encode", _codecs_encode),
    ("numpy", "dtype"): _Global("numpy.dtype", _numpy_dtype),
    ("numpy", "ndarray"): _Marker("numpy.ndarray"),
    ("argparse", "Namespace"): _Namespace,
  }
  for module in ("numpy.core.multiarray", "numpy._core.multiarray"):   # numpy 1.x / 2.x names
    allowed[(module, "scalar")] = _Global(f"{module}.scalar", _numpy_scalar)
    allowed[(module, "_reconstruct")] = _Global(f"{module}._reconstruct", _numpy_reconstruct)
  for name, dtype in _STORAGE_DTYPES.items():
    allowed[("torch", name)] = _Marker(f"torch.{name}", dtype)
  for name, dtype in _TORCH_DTYPES.items():
    allowed[("torch", name)] = _Marker(f"torch.{name}", dtype)
  return allowed


_ALLOWED = _allow_list()


class _RestrictedUnpickler(pickle.Unpickler):
  """A restricted unpickler: `find_class` admits only `admitted`, never an importable callable.

  Every global a pickle names (GLOBAL, STACK_GLOBAL, INST, OBJ and EXT opcodes all
  go through `find_class`) must be on the allow-list, which maps it to a local
  stand-in that builds plain data; anything else (`os.system`, `builtins.eval`, a
  pickled `nn.Module`) is refused before it is called. Storages named by persistent
  ids are handed to `storage` (or refused when it is None).
  """

  def __init__(self, file: Any, admitted: Mapping[tuple[str, str], Any],
               storage: Callable[[Any], _StorageRef] | None = None):
    super().__init__(file)
    self._admitted, self._storage = admitted, storage

  def find_class(self, module: str, name: str) -> Any:
    found = self._admitted.get((module, name))
    if found is not None:
      return found
    if module == "torch" and name.endswith("Storage"):
      raise _Bad(f"unsupported storage type torch.{name}")
    raise _Refused(f"refused global {module}.{name}: the restricted unpickler admits only "
                   "tensors, dicts, numbers, numpy scalars and arrays and argparse.Namespace")

  def persistent_load(self, pid: Any) -> _StorageRef:
    if self._storage is None:
      raise _Bad(f"unexpected persistent id {_short(pid)}")
    return self._storage(pid)


def _unpickle(file: Any, what: str, admitted: Mapping[tuple[str, str], Any] | None = None,
              storage: Callable[[Any], _StorageRef] | None = None) -> Any:
  """One pickle from `file` through the restricted unpickler; malformed data is `_Bad`."""
  try:
    start = file.tell()
    for _ in pickletools.genops(file):  # every length field checked before anything is allocated
      pass
    file.seek(start)
    return _RestrictedUnpickler(file, admitted or {}, storage).load()   # restricted unpickler
  except _Bad:
    raise
  except EOFError:
    raise _Bad(f"truncated: the file ends inside the {what}") from None
  except (pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError, KeyError,
          OverflowError, struct.error, UnicodeDecodeError) as e:
    raise _Bad(f"malformed {what} ({type(e).__name__}: {e})") from None
  except MemoryError:        # one allocation a corrupt length asked for, not a lack of memory
    raise _Bad(f"malformed {what} (a length field asks for more memory than there is)") from None


class _Capped:
  """A file for the unpickler whose reads stop at its end, whatever length a pickle asks for."""

  def __init__(self, file: Any, size: int):
    self._file, self._size = file, size

  def _cap(self, n: int | None) -> int:
    left = max(self._size - self._file.tell(), 0)
    return left if n is None or n < 0 else min(n, left)

  def read(self, n: int | None = -1) -> bytes:
    return self._file.read(self._cap(n))

  def readline(self, limit: int | None = -1) -> bytes:
    return self._file.readline(self._cap(limit))

  def tell(self) -> int:
    return self._file.tell()

  def seek(self, offset: int) -> int:
    return self._file.seek(offset)


class _Storages:
  """Persistent ids -> `_StorageRef`s, checking each key is always named the same way."""

  def __init__(self):
    self.seen: dict[str, tuple[np.dtype, int]] = {}

  def __call__(self, pid: Any) -> _StorageRef:
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
      raise _Bad(f"unsupported persistent id {_short(pid)}")
    stype, key, _, numel = pid[1:5]
    if not (isinstance(stype, _Marker) and stype.name.endswith("Storage")):
      raise _Bad(f"persistent id names storage type {_short(stype)}")
    if not isinstance(key, str):
      raise _Bad(f"storage key {_short(key)} is not a string")
    numel = _int(numel, f"element count of storage {key!r}")
    if self.seen.setdefault(key, (stype.dtype, numel)) != (stype.dtype, numel):
      raise _Bad(f"storage {key!r} is named as {numel} x {stype.dtype} and as "
                 f"{self.seen[key][1]} x {self.seen[key][0]}")
    if numel < 0:
      raise _Bad(f"storage {key!r} has {numel} elements")
    view = pid[5] if len(pid) == 6 else None
    if view is None:
      return _StorageRef(key, stype.dtype, numel, 0, numel)
    # Files from torch < 1.0 name a slice of a root storage: (view_key, offset, size).
    if not (isinstance(view, tuple) and len(view) == 3):
      raise _Bad(f"storage view {_short(view)}")
    start, length = _int(view[1], "storage view offset"), _int(view[2], "storage view size")
    if start < 0 or length < 0 or start + length > numel:
      raise _Bad(f"storage view [{start}, {start + length}) lies outside storage {key!r} "
                 f"of {numel} elements")
    return _StorageRef(key, stype.dtype, numel, start, length)


def _to_array(tensor: _Tensor, raw: bytes, byteorder: str, name: str) -> np.ndarray:
  """The tensor's elements, copied out of its storage's raw bytes into a C-ordered array."""
  ref, dtype = tensor.storage, tensor.dtype
  begin, nbytes = ref.start * ref.dtype.itemsize, ref.length * ref.dtype.itemsize
  if nbytes % dtype.itemsize:
    raise _Bad(f"tensor {name!r}: storage {ref.key!r} of {nbytes} bytes does not hold whole "
               f"{dtype} elements")
  count = nbytes // dtype.itemsize
  size, stride, offset = tensor.size, tensor.stride, tensor.offset
  if min(size, default=0) < 0 or min(stride, default=0) < 0 or offset < 0:
    raise _Bad(f"tensor {name!r} has offset {offset}, size {list(size)}, stride {list(stride)}")
  last = offset + sum((d - 1) * s for d, s in zip(size, stride))
  if 0 not in size and last >= count:
    raise _Bad(f"tensor {name!r} (offset {offset}, size {list(size)}, stride {list(stride)}) "
               f"reaches element {last} of storage {ref.key!r}, which holds {count}")
  try:
    if 0 in size:
      return np.zeros(size, dtype)
    # Strided over the bytes (as_strided does not take ml_dtypes), a trailing axis per element.
    item = dtype.itemsize
    elements = np.frombuffer(raw, np.uint8, count=count * item, offset=begin)
    view = np.lib.stride_tricks.as_strided(
        elements[offset * item:], shape=size + (item,),
        strides=[s * item for s in stride] + [1], writeable=False)
    array = np.array(view, order="C").view(dtype).reshape(size)   # a copy: views, shared storage
  except (ValueError, MemoryError):       # zero strides can make a huge tensor of a small storage
    raise _Bad(f"tensor {name!r} of size {list(size)} is too large to make") from None
  if byteorder != sys.byteorder and dtype.itemsize > 1:
    unit = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize
    array = array.view(f"u{unit}").byteswap().view(dtype)
  if dtype == np.bool_:
    array = array.view(np.uint8) != 0
  return array


def _select(obj: Any) -> Mapping[str, _Tensor]:
  """The state dict inside what the file holds: a dict of tensors or a wrapper around one."""
  def has_tensors(m: Any) -> bool:
    return isinstance(m, Mapping) and any(isinstance(v, _Tensor) for v in m.values())
  if isinstance(obj, Mapping):
    for key in WRAPPER_KEYS:
      if has_tensors(obj.get(key)):
        return obj[key]
    if has_tensors(obj):
      return obj
    keys = [_short(k) for k in list(obj)[:12]]
    raise _Bad(f"no state dict: a dict with keys {', '.join(keys)} holds no tensors, nor do "
               f"its entries {', '.join(WRAPPER_KEYS)}")
  raise _Bad(f"no state dict: the file holds {_short(obj)}, not a dict of tensors")


# What zipfile raises on corrupt archives (names that do not decode, unknown versions or
# compression methods, "encrypted" flags, bad CRCs, impossible offsets).
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError,
               NotImplementedError, RuntimeError, struct.error)


def _read_zip(path: str) -> tuple[Mapping[str, _Tensor], Callable[[_StorageRef], bytes], str]:
  """The state dict of a zip checkpoint, a reader of its storage records and the byte order.

  torch >= 1.6 writes a zip of `<archive>/data.pkl` (the object, pickle protocol 2,
  persistent ids `('storage', storage_type, key, location, numel)`), one record
  `<archive>/data/<key>` of raw bytes per storage, `byteorder` and `version`.
  """
  try:
    archive = zipfile.ZipFile(path)
  except _ZIP_ERRORS as e:
    raise _Bad(f"truncated or corrupt zip archive ({type(e).__name__}: {e})") from None
  with archive:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise _Bad("zip archive without exactly one <archive>/data.pkl: not a torch.save file")
    prefix = pickles[0][:-len("data.pkl")]

    def record(name: str) -> bytes:
      try:
        return archive.read(prefix + name)
      except KeyError:
        raise _Bad(f"missing record {prefix + name}") from None
      except _ZIP_ERRORS as e:
        raise _Bad(f"corrupt record {prefix + name} ({type(e).__name__}: {e})") from None

    byteorder = "little"
    if prefix + "byteorder" in archive.namelist():
      byteorder = record("byteorder").decode("ascii", "replace")
      if byteorder not in ("little", "big"):
        raise _Bad(f"byteorder record says {byteorder!r}")
    obj = _unpickle(io.BytesIO(record("data.pkl")), "pickle data.pkl", _ALLOWED, _Storages())
    state = _select(obj)
    cache: dict[str, bytes] = {}

    def storage(ref: _StorageRef) -> bytes:
      if ref.key not in cache:
        raw = record(f"data/{ref.key}")
        if len(raw) != ref.numel * ref.dtype.itemsize:
          raise _Bad(f"storage record {prefix}data/{ref.key} has {len(raw)} bytes, expected "
                     f"{ref.numel} x {ref.dtype.itemsize}")
        cache[ref.key] = raw
      return cache[ref.key]

    needed = [v.storage for v in state.values() if isinstance(v, _Tensor)]
    for ref in needed:                              # read them while the archive is open
      storage(ref)
  return state, lambda ref: cache[ref.key], byteorder


def _read_legacy(path: str) -> tuple[Mapping[str, _Tensor], Callable[[_StorageRef], bytes], str]:
  """The state dict of a pre-1.6 checkpoint, its storages' bytes and the byte order.

  The file is five pickles and the storages: the magic number, the protocol version
  (1001), a sys-info dict, the object (persistent ids `('storage', storage_type,
  root_key, location, numel, view_metadata)`), the list of storage keys; then per
  key an int64 element count and the raw little-endian bytes.
  """
  with open(path, "rb") as raw_file:
    size = os.fstat(raw_file.fileno()).st_size
    f = _Capped(raw_file, size)
    try:
      magic = _unpickle(f, "magic number")
    except _Refused:
      raise
    except _Bad as e:
      raise _Bad(f"not a PyTorch checkpoint: neither a zip archive nor the legacy format ({e})"
                 ) from None
    if magic != LEGACY_MAGIC:
      raise _Bad("not a PyTorch checkpoint: neither a zip archive nor the legacy format "
                 f"(wrong magic number {_short(magic)})")
    protocol = _unpickle(f, "protocol version")
    if protocol != LEGACY_PROTOCOL:
      raise _Bad(f"legacy protocol version {_short(protocol)}, expected {LEGACY_PROTOCOL}")
    sys_info = _unpickle(f, "sys info")
    if not isinstance(sys_info, dict) or not isinstance(sys_info.get("little_endian"), bool):
      raise _Bad(f"sys info {_short(sys_info)} has no little_endian flag")
    # torch writes legacy storage bytes little-endian whatever the machine (the flag only
    # says how old big-endian writers stored the element counts).
    writer_little = sys_info["little_endian"]
    storages = _Storages()
    state = _select(_unpickle(f, "main pickle", _ALLOWED, storages))
    keys = _unpickle(f, "storage key list")
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
      raise _Bad(f"storage key list {_short(keys)}")
    needed = {v.storage.key for v in state.values() if isinstance(v, _Tensor)}
    raw: dict[str, bytes] = {}
    for key in keys:
      if key not in storages.seen:
        raise _Bad(f"storage record {key!r} is not named in the pickle")
      dtype, numel = storages.seen[key]
      head = f.read(8)
      if len(head) != 8:
        raise _Bad(f"truncated: the file ends before storage record {key!r}")
      count = struct.unpack("<q", head)[0]
      if count != numel and not writer_little:
        count = struct.unpack(">q", head)[0]
      if count != numel:
        raise _Bad(f"storage record {key!r} holds {count} elements, the pickle says {numel}")
      nbytes = numel * dtype.itemsize
      if raw_file.tell() + nbytes > size:
        raise _Bad(f"truncated: storage record {key!r} needs {nbytes} bytes, "
                   f"{size - raw_file.tell()} left")
      if key in needed:
        raw[key] = raw_file.read(nbytes)
      else:
        raw_file.seek(nbytes, os.SEEK_CUR)
    missing = sorted(needed - set(raw))
    if missing:
      raise _Bad(f"missing storage records {', '.join(map(repr, missing))}")
  return state, lambda ref: raw[ref.key], "little"


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads the tensors of a `torch.save` file (zip or legacy format) without torch.

  The file may hold a state dict or a dict wrapping one under `state_dict`, `model`,
  `net` or `model_state_dict` (its other entries, e.g. `epoch`, are ignored); a
  `module.` prefix on every key is stripped. Nothing in the file is executed: a
  restricted unpickler admits tensors, dicts, numbers, strings, numpy scalars and
  arrays and `argparse.Namespace`, and refuses any other global.

  Args:
    path: a `.pth`/`.pt`/`.checkpoint` file.

  Returns:
    key -> array, in file order: copies with the tensor's shape, C-ordered, of the
    tensor's dtype (bfloat16 and float8 as `ml_dtypes` dtypes).

  Raises:
    DataError: naming the file, when it is unreadable, not a checkpoint, truncated,
      names a refused global or an unknown storage type, lacks a storage record or
      holds a tensor outside its storage.
  """
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      head = f.read(4)
    reader = _read_zip if head in (b"PK\x03\x04", b"PK\x05\x06") else _read_legacy
    state, storage, byteorder = reader(path)
    tensors = [(k, v) for k, v in state.items() if isinstance(v, _Tensor)]
    for key, _ in tensors:
      if not isinstance(key, str):
        raise _Bad(f"state dict key {_short(key)} is not a string")
    strip = all(k.startswith(MODULE_PREFIX) for k, _ in tensors)
    return {(k[len(MODULE_PREFIX):] if strip else k): _to_array(v, storage(v.storage), byteorder, k)
            for k, v in tensors}
  except _Bad as e:
    raise DataError(f"{path}: {e}") from None
  except OSError as e:
    raise DataError(f"{path}: cannot read the checkpoint ({e})") from None


# ---------------------------------------------------------------------------------------------
# State dict -> Flax variables.

# kind -> slots (Flax collection, Flax leaf, torch suffix, transform); see `to_variables`.
KINDS: dict[str, tuple[tuple[str, str, str, str], ...]] = {
  "conv": (("params", "kernel", "weight", "conv"), ("params", "bias", "bias", "copy")),
  "linear": (("params", "kernel", "weight", "linear"), ("params", "bias", "bias", "copy")),
  "bn": (("params", "scale", "weight", "copy"), ("params", "bias", "bias", "copy"),
         ("batch_stats", "mean", "running_mean", "copy"),
         ("batch_stats", "var", "running_var", "copy")),
  "ln": (("params", "scale", "weight", "copy"), ("params", "bias", "bias", "copy")),
  "embed": (("params", "embedding", "weight", "copy"),),
}
# torch entries a kind consumes without a Flax counterpart.
DROPPED = {"bn": ("num_batches_tracked",)}


def _permutation(transform: str, ndim: int) -> tuple[int, ...] | None:
  """Axis order taking the torch layout to the Flax one for a Flax leaf of `ndim` axes."""
  if transform == "conv":            # O I *spatial -> *spatial I O (conv1d/2d/3d)
    return tuple(range(2, ndim)) + (1, 0) if ndim >= 3 else None
  if transform == "linear":          # [out, in] -> [in, out]
    return (1, 0) if ndim == 2 else None
  return tuple(range(ndim))


def _leaves(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_leaves(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def _rebuild_tree(tree: Mapping[str, Any], filled: Mapping[tuple[str, ...], np.ndarray],
                  prefix: tuple[str, ...] = ()) -> dict[str, Any]:
  return {key: (_rebuild_tree(value, filled, prefix + (key,)) if isinstance(value, Mapping)
                else filled[prefix + (key,)]) for key, value in tree.items()}


def to_variables(state_dict: Mapping[str, np.ndarray], rules: Sequence[tuple[str, str, str]],
                 like: Mapping[str, Any], *, ignore: Sequence[str] = (),
                 source: str | os.PathLike = "<state dict>") -> dict[str, Any]:
  """Fills a Flax variables tree from a torch state dict, checking every name and shape.

  Each rule `(flax_prefix, torch_prefix, kind)` maps one torch layer onto one Flax
  module: `flax_prefix` is the module's path inside each collection ("/"-separated,
  e.g. "block1/conv"), `torch_prefix` the layer's key prefix (e.g. "features.0").
  `KINDS[kind]` lists its slots; a slot is used when `like` has its Flax leaf (so
  `use_bias=False` convs simply have no bias):
    conv: weight `[O, I, *k]` -> params kernel `[*k, I, O]` (1d/2d/3d), bias -> bias.
    linear: weight `[out, in]` -> params kernel `[in, out]`, bias -> bias.
    bn: weight -> params scale, bias -> bias, running_mean/var -> batch_stats mean/var;
      num_batches_tracked is dropped.
    ln: weight -> scale, bias -> bias. embed: weight -> embedding.

  Args:
    state_dict: torch key -> array, e.g. from `load_state_dict`.
    rules: the mapping, one `(flax_prefix, torch_prefix, kind)` per layer.
    like: the variables tree to fill, e.g. `jax.eval_shape(model.init, ...)`
      (`{'params': ..., 'batch_stats': ...}`); only its structure and shapes are used.
    ignore: torch key prefixes the model deliberately leaves unused (e.g. "classifier.").
    source: what the state dict came from, for messages (the checkpoint's path).

  Returns:
    A tree of nested dicts with exactly the structure of `like`, float32 numpy leaves
    (float16 and bfloat16 tensors are upcast exactly, float64 ones rounded).

  Raises:
    ValueError: a rule names an unknown kind or two rules fill the same Flax module.
    DataError: naming `source`, listing together every torch key a rule needs that
      is missing, every torch key no rule consumes, every mis-shaped tensor (both
      shapes), every Flax leaf no rule fills and every rule matching no Flax leaf.
  """
  leaves = {path: tuple(np.shape(leaf) if getattr(leaf, "shape", None) is None else leaf.shape)
            for path, leaf in _leaves(like).items()}
  filled: dict[tuple[str, ...], np.ndarray] = {}
  consumed: set[str] = set()
  missing, misshaped, unmatched = [], [], []
  for flax_prefix, torch_prefix, kind in rules:
    if kind not in KINDS:
      raise ValueError(f"rule {(flax_prefix, torch_prefix, kind)}: unknown kind {kind!r}; "
                       f"valid kinds: {', '.join(KINDS)}")
    module_path = tuple(p for p in flax_prefix.split("/") if p)
    matched = False
    for collection, leaf, suffix, transform in KINDS[kind]:
      target = (collection, *module_path, leaf)
      if target not in leaves:
        continue
      if target in filled:
        raise ValueError(f"two rules fill {'/'.join(target)} (the second is "
                         f"{(flax_prefix, torch_prefix, kind)})")
      matched = True
      key = f"{torch_prefix}.{suffix}" if torch_prefix else suffix
      shape = leaves[target]
      if key not in state_dict:
        missing.append(key)
        filled[target] = None
        continue
      consumed.add(key)
      value = np.asarray(state_dict[key])
      perm = _permutation(transform, len(shape))
      expected = None if perm is None else tuple(shape[perm.index(i)] for i in range(len(shape)))
      if value.shape != expected:
        misshaped.append(f"{key} {list(value.shape)} vs {'/'.join(target)} {list(shape)}"
                         + ("" if expected is None else f" (needs torch {list(expected)})"))
        filled[target] = None
        continue
      filled[target] = np.ascontiguousarray(value.transpose(perm), dtype=np.float32)
    for suffix in DROPPED.get(kind, ()):
      consumed.add(f"{torch_prefix}.{suffix}" if torch_prefix else suffix)
    if not matched:
      unmatched.append(str((flax_prefix, torch_prefix, kind)))
  unexpected = [k for k in state_dict if k not in consumed
                and not any(k == p or k.startswith(p) for p in ignore)]
  unfilled = ["/".join(p) for p in leaves if p not in filled]
  problems = [(f"missing torch keys ({len(missing)})", missing),
              (f"unexpected torch keys ({len(unexpected)})", unexpected),
              (f"mis-shaped ({len(misshaped)})", misshaped),
              (f"Flax variables no rule fills ({len(unfilled)})", unfilled),
              (f"rules matching no Flax variable ({len(unmatched)})", unmatched)]
  problems = [(title, items) for title, items in problems if items]
  if problems:
    lines = "\n".join(f"  {title}: {', '.join(items)}" for title, items in problems)
    raise DataError(f"{os.fspath(source)}: the torch state dict does not match the Flax "
                    f"variables:\n{lines}")
  return _rebuild_tree(like, filled)


def load_variables(path: str | os.PathLike, rules: Sequence[tuple[str, str, str]],
                   like: Mapping[str, Any], *, ignore: Sequence[str] = ()) -> dict[str, Any]:
  """`to_variables(load_state_dict(path), rules, like, ignore=ignore, source=path)`."""
  return to_variables(load_state_dict(path), rules, like, ignore=ignore, source=path)

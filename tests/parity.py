"""What the backbone parity tests share: the torch fixtures, the splitmix64 inputs the
fixture script also generates, and the relative-error check."""

import pathlib

import numpy as np

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "torch"
RTOL = 1e-5


def fixture(name: str) -> dict[str, np.ndarray]:
  """The arrays of `fixtures/torch/<name>.npz`."""
  with np.load(FIXTURES / f"{name}.npz") as z:
    return {k: z[k] for k in z.files}


def splitmix_bytes(shape, salt: int = 0) -> np.ndarray:
  """The top byte of splitmix64 of each flat index (offset by `salt << 32`), uint8 `shape`:
  large deterministic inputs that the fixture script makes the same way."""
  z = (np.arange(int(np.prod(shape)), dtype=np.uint64) + np.uint64(salt << 32)
       + np.uint64(0x9E3779B97F4A7C15))
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  z = z ^ (z >> np.uint64(31))
  return (z >> np.uint64(56)).astype(np.uint8).reshape(shape)


def assert_close(got, want, what: str, rtol: float = RTOL) -> float:
  """`got` equals `want` within `rtol` relative to max |want|, element by element too;
  returns that relative error."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  scale = float(np.max(np.abs(want)))
  err = float(np.max(np.abs(got - want)) / scale)
  assert err <= rtol, f"{what}: max relative error {err:.2e}"
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale, err_msg=what)
  return err

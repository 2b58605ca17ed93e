"""Writes the PyTorch fixtures of test_torch_import.py and test_nets_mmimdb.py (needs torch).

Run with a Python that has torch and numpy (torch is not a dependency of this
project; tests never import it), e.g.:

  python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch numpy
  /tmp/torchenv/bin/python tests/make_torch_fixtures.py [--only checkpoints|mmimdb]

The two parts are seeded independently: `--only mmimdb` rewrites the MM-IMDB
backbone fixtures and leaves the checkpoint fixtures' bytes alone.

Writes into tests/fixtures/torch/, each checkpoint in the zip format (`*_zip.pth`,
torch >= 1.6) and/or the legacy format (`*_legacy.pth`, `_use_new_zipfile_serialization
=False`), with the expected arrays in `.npz` files:
  tensors_{zip,legacy}.pth, tensors.npz: one OrderedDict of many dtypes, a transposed
    view, slices with storage offsets and strides, two tensors sharing a storage, a
    0-d and an empty tensor. `__dtypes__` gives each key's numpy dtype name; bfloat16
    values are stored as their int16 bit patterns.
  v3_zip.pth, v3.npz: uint16/32/64 and float8 tensors (`_rebuild_tensor_v3`, zip only:
    torch cannot write them in the legacy format); float8 as uint8 bit patterns.
  wrapper_{zip,legacy}.pth, wrapper.npz: {'epoch', 'arch', 'best_prec1' (numpy scalar),
    'history' (numpy array), 'args' (argparse.Namespace), 'state_dict' (nn.DataParallel
    keys, `module.` prefix), 'optimizer' (SGD with momentum buffers)}; the npz has the
    state dict without the prefix.
  convbn_zip.pth, convbn.npz: ConvBN2d's state dict; `x` (NCHW input), `y` (eval output).
  conv3d_legacy.pth, conv3d.npz: ConvBN3d's state dict; `x` (NCDHW input), `y`.
MM-IMDB backbones (part `mmimdb`, the release's models/central/mmimdb.py at small sizes):
  vgg19_legacy.pth, vgg19.npz: a VGG19 (`features` from cfg 'E' with block widths
    VGG_WIDTHS, plus a small `classifier` the converter must ignore); `x` int16 NCHW
    [2, 3, 96, 64] (integers, as the release's images), the taps `relu4_1`, `relu4_4`,
    `relu5_3`, `pool5` (features 20, 26, 33, 36; NCHW).
  maxout_zip.pth, maxout.npz: MaxOutMLP(3 outputs, 12 in, hidden 4, k 5); `x` [6, 12]
    and eval outputs `o1`, `o3`, `o5`; `train_o1`, `train_o3`, `train_o5`: the same
    weights with dropout 0 in train mode, and `train_<bn>.running_mean|running_var`
    (bn `op2.0`, `op4.0`) the running stats after that one forward.
"""

import argparse
import collections
import os
import pathlib

import numpy as np
import torch
from torch import nn

OUT = pathlib.Path(__file__).resolve().parent / "fixtures" / "torch"


class ConvBN2d(nn.Module):
  """conv 3x3 stride 2 pad 1 -> BN -> ReLU -> mean over H, W -> linear."""

  def __init__(self):
    super().__init__()
    self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    self.bn = nn.BatchNorm2d(4)
    self.fc = nn.Linear(4, 5)

  def forward(self, x):
    return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


class ConvBN3d(nn.Module):
  """conv3d 3x3x3 stride (1, 2, 2) pad 1, no bias -> BN -> ReLU -> mean -> linear."""

  def __init__(self):
    super().__init__()
    self.features = nn.Sequential(nn.Conv3d(2, 3, 3, stride=(1, 2, 2), padding=1, bias=False),
                                  nn.BatchNorm3d(3))
    self.head = nn.Linear(3, 2)

  def forward(self, x):
    return self.head(torch.relu(self.features(x)).mean(dim=(2, 3, 4)))


VGG_WIDTHS = (4, 4, 8, 8, 8)          # torchvision's are (64, 128, 256, 512, 512)
VGG_BLOCK_CONVS = (2, 2, 4, 4, 4)     # cfg 'E'
VGG_TAPS = {"relu4_1": 20, "relu4_4": 26, "relu5_3": 33, "pool5": 36}   # the release's


class VGG19(nn.Module):
  """torchvision's VGG19 layout: `features` (cfg 'E', convs 3x3 pad 1 + ReLU, max-pools
  2x2) and a three-layer `classifier` (keys classifier.0/.3/.6), at the given widths."""

  def __init__(self, widths, hidden=6, num_classes=5):
    super().__init__()
    layers, c = [], 3
    for convs, width in zip(VGG_BLOCK_CONVS, widths):
      for _ in range(convs):
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU(inplace=True)]
        c = width
      layers.append(nn.MaxPool2d(2, 2))
    self.features = nn.Sequential(*layers)
    self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
    self.classifier = nn.Sequential(nn.Linear(c * 49, hidden), nn.ReLU(True), nn.Dropout(),
                                    nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(),
                                    nn.Linear(hidden, num_classes))

  def taps(self, x):
    """The outputs of the `features` layers named in VGG_TAPS."""
    out, index = {}, {i: name for name, i in VGG_TAPS.items()}
    for i, layer in enumerate(self.features):
      x = layer(x)
      if i in index:
        out[index[i]] = x.clone()
    return out


class Maxout(nn.Module):
  """Linear(d, m * k) viewed as (..., m, k), max over k."""

  def __init__(self, d, m, k):
    super().__init__()
    self.m, self.k = m, k
    self.lin = nn.Linear(d, m * k)

  def forward(self, x):
    return self.lin(x).view(*x.shape[:-1], self.m, self.k).max(dim=-1)[0]


class MaxOutMLP(nn.Module):
  """The release's MaxOut_MLP; forward returns (o1, o3, o5)."""

  def __init__(self, num_outputs, in_features, hidden, k, p):
    super().__init__()
    self.op1 = Maxout(in_features, hidden, k)
    self.op2 = nn.Sequential(nn.BatchNorm1d(hidden), nn.Dropout(p))
    self.op3 = Maxout(hidden, 2 * hidden, k)
    self.op4 = nn.Sequential(nn.BatchNorm1d(2 * hidden), nn.Dropout(p))
    self.hid2val = nn.Linear(2 * hidden, num_outputs)

  def forward(self, x):
    o1 = self.op1(x)
    o3 = self.op3(self.op2(o1))
    return o1, o3, self.hid2val(self.op4(o3))


def bits(t):
  """What a test compares the loaded array with (bit patterns where numpy lacks the dtype)."""
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy()
  if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
    return t.view(torch.uint8).numpy()
  return t.numpy()


NUMPY_NAMES = {torch.bfloat16: "bfloat16", torch.float8_e4m3fn: "float8_e4m3fn",
               torch.float8_e5m2: "float8_e5m2", torch.bool: "bool"}


def save_expected(name, tensors, **extra):
  arrays = {k: bits(v.contiguous()) for k, v in tensors.items()}
  dtypes = [f"{k}:{NUMPY_NAMES.get(v.dtype, str(v.dtype).removeprefix('torch.'))}"
            for k, v in tensors.items()]
  np.savez(OUT / f"{name}.npz", __dtypes__=np.array(dtypes), **arrays, **extra)


def save(obj, name, legacy):
  path = OUT / name
  torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
  return path


def randomise_bn(bn, g):
  with torch.no_grad():
    bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
    bn.bias.copy_(torch.randn(bn.num_features, generator=g))
    bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
    bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
    bn.num_batches_tracked.fill_(7)


def make_checkpoint_fixtures():
  """The fixtures of test_torch_import.py (generator seed 0)."""
  g = torch.Generator().manual_seed(0)

  base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
  shared = torch.arange(6, dtype=torch.int32) * 10
  t = collections.OrderedDict()
  t["f32"] = torch.randn(2, 3, generator=g)
  t["f64"] = torch.randn(3, generator=g, dtype=torch.float64)
  t["f16"] = torch.randn(2, 2, generator=g).half()
  t["bf16"] = torch.randn(4, generator=g).bfloat16()
  t["i8"] = torch.tensor([-128, -1, 0, 127], dtype=torch.int8)
  t["i16"] = torch.tensor([-32768, 5, 32767], dtype=torch.int16)
  t["i32"] = torch.tensor([[-2**31, 0], [7, 2**31 - 1]], dtype=torch.int32)
  t["i64"] = torch.tensor([-2**63, 3, 2**63 - 1], dtype=torch.int64)
  t["u8"] = torch.tensor([0, 1, 255], dtype=torch.uint8)
  t["bool"] = torch.tensor([[True, False, True]])
  t["c64"] = torch.tensor([1 + 2j, -3.5j], dtype=torch.complex64)
  t["base"] = base
  t["transposed"] = base.t()                 # stride (1, 4), same storage as base
  t["sliced"] = base[1:, 1:3]                # storage offset 5, stride (4, 1)
  t["strided"] = base[:, ::2]                # stride (4, 2)
  t["shared_a"] = shared[:2]                 # two tensors on one storage
  t["shared_b"] = shared[3:].view(1, 3)      # offset 3
  t["scalar"] = torch.tensor(2.5)
  t["empty"] = torch.zeros(0, 3)
  for legacy in (False, True):
    save(t, f"tensors_{'legacy' if legacy else 'zip'}.pth", legacy)
  save_expected("tensors", t)

  v3 = collections.OrderedDict()
  v3["u16"] = torch.tensor([0, 1, 65535], dtype=torch.uint16)
  v3["u32"] = torch.tensor([0, 2**32 - 1], dtype=torch.uint32)
  v3["u64"] = torch.tensor([0, 2**63 + 5], dtype=torch.uint64)
  v3["f8e4m3fn"] = torch.tensor([0.5, -1.0, 448.0]).to(torch.float8_e4m3fn)
  v3["f8e5m2"] = torch.tensor([0.25, -2.0]).to(torch.float8_e5m2)
  save(v3, "v3_zip.pth", legacy=False)
  save_expected("v3", v3)

  model = nn.Sequential(collections.OrderedDict(
      conv=nn.Conv2d(2, 3, 1), flat=nn.Flatten(), fc=nn.Linear(3, 2)))
  optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
  model(torch.randn(1, 2, 1, 1, generator=g)).sum().backward()
  optimizer.step()
  wrapper = {"epoch": 3, "arch": "tiny", "best_prec1": np.float64(71.25),
             "history": np.array([[0.5, 0.25]], dtype=np.float32),
             "args": argparse.Namespace(lr=0.1, epochs=3),
             "state_dict": nn.DataParallel(model).state_dict(),
             "optimizer": optimizer.state_dict()}
  assert all(k.startswith("module.") for k in wrapper["state_dict"])
  for legacy in (False, True):
    save(wrapper, f"wrapper_{'legacy' if legacy else 'zip'}.pth", legacy)
  save_expected("wrapper", model.state_dict())

  for name, net, shape, legacy in (("convbn", ConvBN2d(), (2, 3, 6, 5), False),
                                   ("conv3d", ConvBN3d(), (2, 2, 3, 6, 6), True)):
    with torch.no_grad():
      for p in net.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    for m in net.modules():
      if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
        randomise_bn(m, g)
    net.eval()
    x = torch.randn(shape, generator=g)
    with torch.no_grad():
      y = net(x)
    path = save(net.state_dict(), f"{name}_{'legacy' if legacy else 'zip'}.pth", legacy)
    np.savez(OUT / f"{name}.npz", x=x.numpy(), y=y.numpy())
    assert torch.load(path, weights_only=True).keys() == net.state_dict().keys()


def make_mmimdb_fixtures():
  """The MM-IMDB backbone fixtures of test_nets_mmimdb.py (generator seed 1)."""
  g = torch.Generator().manual_seed(1)

  vgg = VGG19(VGG_WIDTHS)
  with torch.no_grad():
    for name, p in vgg.named_parameters():
      if name.endswith("weight"):                     # He-scaled: activations stay O(input)
        p.copy_(torch.randn(p.shape, generator=g) * (2.0 / p[0].numel()) ** 0.5)
      else:
        p.copy_(torch.randn(p.shape, generator=g) * 0.1)
  vgg.eval()
  x = torch.randint(-128, 128, (2, 3, 96, 64), generator=g, dtype=torch.int16)
  with torch.no_grad():
    taps = vgg.taps(x.float())
  path = save(vgg.state_dict(), "vgg19_legacy.pth", legacy=True)
  np.savez(OUT / "vgg19.npz", x=x.numpy(), **{k: v.numpy() for k, v in taps.items()})
  assert torch.load(path, weights_only=True).keys() == vgg.state_dict().keys()

  sizes = dict(num_outputs=3, in_features=12, hidden=4, k=5)
  net = MaxOutMLP(**sizes, p=0.5)
  with torch.no_grad():
    for p in net.parameters():
      p.copy_(torch.randn(p.shape, generator=g) * 0.5)
  for bn in (net.op2[0], net.op4[0]):
    randomise_bn(bn, g)
  net.eval()
  x = torch.randn(6, 12, generator=g)
  with torch.no_grad():
    o1, o3, o5 = net(x)
  path = save(net.state_dict(), "maxout_zip.pth", legacy=False)
  assert torch.load(path, weights_only=True).keys() == net.state_dict().keys()
  no_dropout = MaxOutMLP(**sizes, p=0.0)
  no_dropout.load_state_dict(net.state_dict())
  no_dropout.train()
  with torch.no_grad():
    t1, t3, t5 = no_dropout(x)
  stats = {f"train_{name}": v.numpy() for name, v in no_dropout.state_dict().items()
           if "running" in name}
  np.savez(OUT / "maxout.npz", x=x.numpy(), o1=o1.numpy(), o3=o3.numpy(), o5=o5.numpy(),
           train_o1=t1.numpy(), train_o3=t3.numpy(), train_o5=t5.numpy(), **stats)


PARTS = {"checkpoints": make_checkpoint_fixtures, "mmimdb": make_mmimdb_fixtures}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", choices=sorted(PARTS), help="write only this part")
  args = parser.parse_args()
  OUT.mkdir(parents=True, exist_ok=True)
  for name, make in PARTS.items():
    if args.only in (None, name):
      make()
  for path in sorted(OUT.iterdir()):
    print(f"{path.name:24s} {os.path.getsize(path):6d} bytes")
  print(f"torch {torch.__version__}, numpy {np.__version__}")


if __name__ == "__main__":
  main()

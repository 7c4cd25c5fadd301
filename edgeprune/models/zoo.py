"""A zoo of small test networks that together cover the operators edgeprune must compile correctly.

Each network is tiny (well under 5M multiply-accumulates) so a compile takes seconds, has random weights fixed by
seed and BatchNorm layers with non-trivial statistics (``randomize_bn``), and is listed with two input resolutions
so that shape-dependent code paths (padding at borders, odd sizes after stride 2) are exercised twice.

Coverage, by network:
  resnet_tiny     residual adds, 7x7 stride-2 stem, max pooling with padding, global average pool, Linear
  grouped         grouped conv (groups=2 and 4), depthwise conv, dilation 2, ReLU6, bias=True convs
  mobilenetv3     depthwise 5x5, squeeze-excite x * hardsigmoid(fc(relu(fc(mean(x))))) with 1x1 convs, hardswish
  shufflenet      torch.chunk, channel shuffle through reshape/transpose, torch.cat, stride-2 ShuffleNetV2 unit
  split_branches  torch.split with unequal sizes, 1x1/3x3/5x5/dilated branches, torch.cat, sigmoid gate (mul)
  pooling         average pooling with padding and stride (count_include_pad both ways), max pooling, flatten,
                  two Linear layers with ReLU, odd input size
  gated_add       elementwise add and mul of branches, sigmoid, hardsigmoid, hardswish, bias=True and False
  fpn_decoder     an FPN-style decoder: lateral 1x1 convs, nearest 2x upsample by scale and bilinear by size,
                  concat, transposed convs (3x3 stride 2 with output padding, 4x4 stride 2), a dense output map
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .reference import randomize_bn


def _cbr(cin: int, cout: int, k: int, stride: int = 1, *, groups: int = 1, dilation: int = 1, bias: bool = False,
         act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    pad = dilation * (k - 1) // 2
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, pad, dilation=dilation, groups=groups, bias=bias),
                               nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


# ---------------------------------------------------------------- networks


class _Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(_cbr(cin, cout, 3, stride), _cbr(cout, cout, 3, act=None))
        self.short = nn.Identity() if stride == 1 and cin == cout else _cbr(cin, cout, 1, stride, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.short(x))


class ResNetTiny(nn.Module):
    """Residual adds (identity and projection shortcuts), 7x7 stride-2 stem, max pool, global pool, Linear."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 7, 2, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        self.blocks = nn.Sequential(_Basic(16, 16, 1), _Basic(16, 32, 2))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class Grouped(nn.Module):
    """Grouped convs (groups 2 and 4), depthwise 3x3 (stride 2 and dilation 2), ReLU6, convs with bias."""

    def __init__(self):
        super().__init__()
        self.stem = _cbr(3, 16, 3, 2, act=nn.ReLU6)
        self.g2 = _cbr(16, 32, 3, groups=2, bias=True, act=nn.ReLU6)
        self.dw = _cbr(32, 32, 3, 2, groups=32, act=nn.ReLU6)
        self.g4 = _cbr(32, 32, 1, groups=4, act=nn.ReLU6)
        self.dw_dil = _cbr(32, 32, 3, groups=32, dilation=2, bias=True, act=nn.ReLU6)
        self.head = nn.Conv2d(32, 8, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.g2(self.stem(x))
        x = self.g4(self.dw(x))
        x = x + self.dw_dil(x)
        return self.head(x)


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, squeeze: int):
        super().__init__()
        self.fc1 = nn.Conv2d(c, squeeze, 1, bias=True)
        self.fc2 = nn.Conv2d(squeeze, c, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(s))))


class _V3Block(nn.Module):
    def __init__(self, cin: int, hidden: int, cout: int, k: int, stride: int, se: bool):
        super().__init__()
        self.expand = _cbr(cin, hidden, 1, act=nn.Hardswish)
        self.dw = _cbr(hidden, hidden, k, stride, groups=hidden, act=nn.Hardswish)
        self.se = SqueezeExcite(hidden, max(8, hidden // 4)) if se else nn.Identity()
        self.project = _cbr(hidden, cout, 1, act=None)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.residual else y


class MobileNetV3Tiny(nn.Module):
    """MobileNetV3-style blocks: hardswish, depthwise 3x3 and 5x5, squeeze-excite with hardsigmoid."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = _cbr(3, 16, 3, 2, act=nn.Hardswish)
        self.blocks = nn.Sequential(_V3Block(16, 32, 16, 3, 1, se=True), _V3Block(16, 48, 24, 5, 2, se=True),
                                    _V3Block(24, 64, 24, 5, 1, se=False))
        self.head = nn.Sequential(nn.Linear(24, 32), nn.Hardswish(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class _ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit: stride 1 splits channels in half; stride 2 runs both halves on the whole input."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        half = cout // 2
        bin_ = cin // 2 if stride == 1 else cin
        self.branch = nn.Sequential(_cbr(bin_, half, 1), _cbr(half, half, 3, stride, groups=half, act=None),
                                    _cbr(half, half, 1))
        self.short = (None if stride == 1 else
                      nn.Sequential(_cbr(cin, cin, 3, stride, groups=cin, act=None), _cbr(cin, half, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            a, b = x.chunk(2, dim=1)
            out = torch.cat((a, self.branch(b)), dim=1)
        else:
            out = torch.cat((self.short(x), self.branch(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetTiny(nn.Module):
    """torch.chunk, torch.cat, channel shuffle through reshape/transpose, stride-2 units, max pool."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(_cbr(3, 16, 3, 2), nn.MaxPool2d(3, 2, 1))
        self.units = nn.Sequential(_ShuffleUnit(16, 32, 2), _ShuffleUnit(32, 32, 1), _ShuffleUnit(32, 32, 1))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.units(self.stem(x))
        return self.fc(x.mean((2, 3)))


class SplitBranches(nn.Module):
    """torch.split with unequal sizes feeding 1x1, 3x3, 5x5 and dilated 3x3 branches, cat, sigmoid gate."""

    def __init__(self):
        super().__init__()
        self.stem = _cbr(3, 24, 3, 2, bias=True)
        self.b1 = _cbr(4, 8, 1, act=nn.ReLU6)
        self.b3 = _cbr(8, 8, 3, act=nn.ReLU)
        self.b5 = _cbr(8, 8, 5, act=nn.Hardswish)
        self.bd = _cbr(4, 8, 3, dilation=2, bias=True, act=nn.Sigmoid)
        self.gate = nn.Conv2d(32, 32, 1, bias=True)
        self.out = nn.Conv2d(32, 16, 3, 2, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        a, b, c, d = torch.split(x, [4, 8, 8, 4], dim=1)
        y = torch.cat((self.b1(a), self.b3(b), self.b5(c), self.bd(d)), dim=1)
        y = y * torch.sigmoid(self.gate(y))
        return self.out(y)


class Pooling(nn.Module):
    """Average pooling with padding and stride (count_include_pad True and False), max pooling with padding,
    a 5x5 conv with bias, flatten and two Linear layers."""

    def __init__(self, res: int, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 5, 1, 2, bias=True)
        self.pool1 = nn.AvgPool2d(3, 2, 1)  # count_include_pad=True: border windows divide by 9
        self.conv2 = _cbr(8, 16, 3, act=nn.ReLU)
        self.pool2 = nn.MaxPool2d(3, 2, 1)
        self.pool3 = nn.AvgPool2d(2, 2, 1, count_include_pad=False)
        side = res
        for k, s, p in ((3, 2, 1), (3, 2, 1), (2, 2, 1)):
            side = (side + 2 * p - k) // s + 1
        self.fc1 = nn.Linear(16 * side * side, 32)
        self.fc2 = nn.Linear(32, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(torch.relu(self.conv1(x)))
        x = self.pool3(self.pool2(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc2(torch.relu(self.fc1(x)))


class GatedAdd(nn.Module):
    """Two branches joined by elementwise add and mul; sigmoid, hardsigmoid and hardswish; a 7x7 conv with bias."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 7, 2, 3, bias=True)
        self.left = _cbr(12, 12, 3, act=nn.Hardswish)
        self.right = _cbr(12, 12, 3, dilation=2, bias=True, act=nn.Sigmoid)
        self.mix = _cbr(12, 16, 3, 2, act=nn.Hardsigmoid)
        self.tail = nn.Conv2d(16, 8, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        y = self.left(x) * self.right(x) + x
        y = self.mix(y)
        return self.tail(y) + 0.5 * nn.functional.hardswish(self.tail(y))


class FPNDecoder(nn.Module):
    """An encoder of stride-2 convs and an FPN-style decoder back to half the input size: lateral 1x1 convs,
    transposed convs (3x3 stride 2 with output padding 1; 4x4 stride 2 padding 1), bilinear resize by size, nearest
    upsample by scale, concats and adds. The output is a 4-channel map, as a text or object detector's head."""

    def __init__(self, res: int):
        super().__init__()
        self.quarter = res // 4
        self.c1, self.c2, self.c3 = _cbr(3, 16, 3, 2), _cbr(16, 24, 3, 2), _cbr(24, 32, 3, 2)
        self.l1, self.l2, self.l3 = nn.Conv2d(16, 16, 1), nn.Conv2d(24, 16, 1), nn.Conv2d(32, 16, 1)
        self.up3 = nn.ConvTranspose2d(16, 16, 3, 2, 1, output_padding=1)
        self.fuse = _cbr(48, 16, 3)
        self.up2 = nn.ConvTranspose2d(16, 8, 4, 2, 1, bias=False)
        self.out = nn.Conv2d(24, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1 = self.c1(x)
        c2 = self.c2(c1)
        p3 = self.l3(self.c3(c2))
        wide = nn.functional.interpolate(p3, size=(self.quarter, self.quarter), mode="bilinear", align_corners=False)
        p2 = self.fuse(torch.cat((self.l2(c2), torch.relu(self.up3(p3)), wide), 1))
        p1 = self.l1(c1) + nn.functional.interpolate(p2, scale_factor=2, mode="nearest")
        return self.out(torch.cat((p1, torch.relu(self.up2(p2))), 1))


# ---------------------------------------------------------------- registry

Constructor = Callable[[int], nn.Module]

ZOO: dict[str, tuple[Constructor, list[int]]] = {
    # name: (constructor taking the input resolution, input resolutions)
    "resnet_tiny": (lambda res: ResNetTiny(), [32, 48]),
    "grouped": (lambda res: Grouped(), [32, 40]),
    "mobilenetv3": (lambda res: MobileNetV3Tiny(), [32, 48]),
    "shufflenet": (lambda res: ShuffleNetTiny(), [32, 64]),
    "split_branches": (lambda res: SplitBranches(), [32, 40]),
    "pooling": (Pooling, [35, 48]),
    "gated_add": (lambda res: GatedAdd(), [40, 56]),
    "fpn_decoder": (FPNDecoder, [32, 48]),
}


def cases() -> list[tuple[str, int]]:
    """Every (network, resolution) pair in the zoo."""
    return [(name, res) for name, (_, sizes) in ZOO.items() for res in sizes]


def _he_init(model: nn.Module, seed: int) -> None:
    """He-normal weights and small random biases: activations stay of order one through the network, so a wrong
    kernel changes the output by far more than the tests' tolerance (PyTorch's default init shrinks them)."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)):
                # a transposed conv's output pixel sums in_channels x the taps of one phase
                fan_in = (m.weight[0].numel() if not isinstance(m, nn.ConvTranspose2d) else
                          m.in_channels * m.weight[0, 0].numel() // (m.stride[0] * m.stride[1]))
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


def make(name: str, res: int, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """Zoo network ``name`` at input resolution ``res``, weights fixed by ``seed``, in eval mode, with an input."""
    if name not in ZOO:
        raise KeyError(f"unknown zoo network '{name}'; known: {', '.join(ZOO)}")
    ctor, _ = ZOO[name]
    torch.manual_seed(seed)
    model = ctor(res)
    _he_init(model, seed)
    model = randomize_bn(model, seed)
    x = torch.randn(1, 3, res, res, generator=torch.Generator().manual_seed(seed))
    return model, x


def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of the convolutions and Linear layers on input ``x``."""
    total = 0

    def hook(m, inp, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            total += out.numel() * m.in_features
        elif isinstance(m, nn.ConvTranspose2d):  # each input pixel meets every tap once
            total += inp[0].numel() * m.out_channels * m.kernel_size[0] * m.kernel_size[1]

    kinds = (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total


def export_onnx(model: nn.Module, x: torch.Tensor, path: str | Path) -> Path:
    """ONNX opset 17 through the TorchScript exporter, one input named ``input``."""
    path = Path(path)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), opset_version=17, dynamo=False, input_names=["input"])
    return path


def export_pt2(model: nn.Module, x: torch.Tensor, path: str | Path) -> Path:
    """A torch.export archive of ``model`` traced at ``x``'s shape."""
    path = Path(path)
    torch.export.save(torch.export.export(model, (x,)), str(path))
    return path

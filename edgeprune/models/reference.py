"""Reference networks written out in PyTorch (torchvision has no CPU build here): MobileNetV1, MobileNetV2,
SqueezeNet 1.1 and ResNet-18, the networks of the published ARM latencies (../shared/docs/arm-targets.md), and
MobileNetV3-Small, whose squeeze-excite and hardswish the dense benchmark weighs against the peers.

They follow the published architectures layer for layer, so MAC counts match the papers (MobileNetV1 1.0 at 224 px:
569M; MobileNetV2 1.0: 300M; SqueezeNet 1.1: 349M with 1000 classes; ResNet-18: 1.8G). Weights are random but
fixed by seed, with non-trivial BatchNorm statistics so that folding BatchNorm is exercised.
"""

from __future__ import annotations

import torch
from torch import nn


def _make_divisible(v: float, divisor: int = 8) -> int:
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def conv_bn(cin: int, cout: int, k: int, stride: int, groups: int = 1, act: type[nn.Module] | None = nn.ReLU6):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers = [] if expand == 1 else [conv_bn(cin, hidden, 1, 1)]
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden), conv_bn(hidden, cout, 1, 1, act=None)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class _FeaturesPoolClassifier(nn.Module):
    """A feature stack, a global average pool and one linear classifier: the MobileNets' head."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class MobileNetV2(_FeaturesPoolClassifier):
    # (expand ratio, channels, repeats, first stride), Sandler et al. 2018, table 2
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]

    def __init__(self, width: float = 1.0, num_classes: int = 1000):
        super().__init__()
        cin = _make_divisible(32 * width)
        last = _make_divisible(1280 * max(1.0, width))
        layers: list[nn.Module] = [conv_bn(3, cin, 3, 2)]
        for t, c, n, s in self.SETTINGS:
            cout = _make_divisible(c * width)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers.append(conv_bn(cin, last, 1, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(last, num_classes)



class MobileNetV1(_FeaturesPoolClassifier):
    # (output channels, stride) of the depthwise-separable layers, Howard et al. 2017, table 1
    SETTINGS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]

    def __init__(self, width: float = 1.0, num_classes: int = 1000):
        super().__init__()
        cin = _make_divisible(32 * width)
        layers: list[nn.Module] = [conv_bn(3, cin, 3, 2, act=nn.ReLU)]
        for c, stride in self.SETTINGS:
            cout = _make_divisible(c * width)
            layers += [conv_bn(cin, cin, 3, stride, groups=cin, act=nn.ReLU), conv_bn(cin, cout, 1, 1, act=nn.ReLU)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)



class SqueezeExcite(nn.Module):
    """Channel gate of MobileNetV3: x * hardsigmoid(fc(relu(fc(pool(x))))), the fcs as 1x1 convolutions with bias."""

    def __init__(self, c: int, squeeze: int):
        super().__init__()
        self.fc1 = nn.Conv2d(c, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = nn.functional.adaptive_avg_pool2d(x, 1)
        return x * nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(s))))


class V3Block(nn.Module):
    """MobileNetV3's bottleneck: expand 1x1 (skipped when the width does not change), depthwise k x k, optional
    squeeze-excite after the depthwise, linear 1x1 projection, residual when shapes allow."""

    def __init__(self, cin: int, k: int, hidden: int, cout: int, se: bool, act: type[nn.Module], stride: int):
        super().__init__()
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = [] if hidden == cin else [conv_bn(cin, hidden, 1, 1, act=act)]
        layers.append(conv_bn(hidden, hidden, k, stride, groups=hidden, act=act))
        if se:
            layers.append(SqueezeExcite(hidden, _make_divisible(hidden / 4)))
        layers.append(conv_bn(hidden, cout, 1, 1, act=None))
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV3Small(_FeaturesPoolClassifier):
    """MobileNetV3-Small (Howard et al. 2019, table 2): hardswish, 3x3 and 5x5 depthwise, squeeze-excite; 56M MACs at
    224 px with width 1.0. The head is the paper's: pool, 1x1 to 1024 without BatchNorm, hardswish, classifier."""

    # (kernel, expansion channels, output channels, squeeze-excite, activation, stride), table 2
    SETTINGS = [(3, 16, 16, True, nn.ReLU, 2), (3, 72, 24, False, nn.ReLU, 2), (3, 88, 24, False, nn.ReLU, 1),
                (5, 96, 40, True, nn.Hardswish, 2), (5, 240, 40, True, nn.Hardswish, 1),
                (5, 240, 40, True, nn.Hardswish, 1), (5, 120, 48, True, nn.Hardswish, 1),
                (5, 144, 48, True, nn.Hardswish, 1), (5, 288, 96, True, nn.Hardswish, 2),
                (5, 576, 96, True, nn.Hardswish, 1), (5, 576, 96, True, nn.Hardswish, 1)]

    def __init__(self, width: float = 1.0, num_classes: int = 1000):
        super().__init__()
        cin = _make_divisible(16 * width)
        layers: list[nn.Module] = [conv_bn(3, cin, 3, 2, act=nn.Hardswish)]
        for k, exp, c, se, act, stride in self.SETTINGS:
            cout = _make_divisible(c * width)
            layers.append(V3Block(cin, k, _make_divisible(exp * width), cout, se, act, stride))
            cin = cout
        last = _make_divisible(576 * width)
        layers.append(conv_bn(cin, last, 1, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(last, 1024), nn.Hardswish(), nn.Linear(1024, num_classes))


class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, expand: int):
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2d(cin, squeeze, 1), nn.ReLU())
        self.expand1 = nn.Sequential(nn.Conv2d(squeeze, expand, 1), nn.ReLU())
        self.expand3 = nn.Sequential(nn.Conv2d(squeeze, expand, 3, padding=1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze(x)
        return torch.cat([self.expand1(x), self.expand3(x)], 1)


class SqueezeNet11(nn.Module):
    """SqueezeNet 1.1 (Iandola et al., the v1.1 of the reference repository): 3x3 stem, fire modules, conv head."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        pool = lambda: nn.MaxPool2d(3, 2, ceil_mode=True)  # noqa: E731
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, 2), nn.ReLU(), pool(), Fire(64, 16, 64), Fire(128, 16, 64), pool(),
            Fire(128, 32, 128), Fire(256, 32, 128), pool(), Fire(256, 48, 192), Fire(384, 48, 192),
            Fire(384, 64, 256), Fire(512, 64, 256))
        self.classifier = nn.Sequential(nn.Conv2d(512, num_classes, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                        nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, 3, stride, act=nn.ReLU), conv_bn(cout, cout, 3, 1, act=None))
        self.short = (nn.Identity() if stride == 1 and cin == cout
                      else conv_bn(cin, cout, 1, stride, act=None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.short(x))


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics, so a wrong fold shows up in the outputs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            m.weight.data.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


BENCH_NETWORKS = {
    # name: (constructor, input resolution)
    "mobilenetv2-1.0-224": (lambda: MobileNetV2(1.0), 224),
    "mobilenetv2-0.5-128": (lambda: MobileNetV2(0.5), 128),
    "mobilenetv2-0.35-96": (lambda: MobileNetV2(0.35), 96),
    "mobilenetv3-small-1.0-224": (lambda: MobileNetV3Small(1.0), 224),
    "resnet18-224": (ResNet18, 224),
}


# The networks of the published ARM latencies the targets' latency prior is fitted on (bench/prior.py).
PRIOR_NETWORKS = {
    "mobilenetv1-1.0-224": (lambda: MobileNetV1(1.0), 224),
    "mobilenetv2-1.0-224": BENCH_NETWORKS["mobilenetv2-1.0-224"],
    "squeezenet1.1-224": (SqueezeNet11, 224),
    "resnet18-224": BENCH_NETWORKS["resnet18-224"],
}
NETWORKS = {**BENCH_NETWORKS, **PRIOR_NETWORKS}


def build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A named reference network with seeded weights and an input of its resolution."""
    ctor, res = NETWORKS[name]
    torch.manual_seed(seed)
    model = randomize_bn(ctor(), seed)
    return model, torch.randn(1, 3, res, res, generator=torch.Generator().manual_seed(seed))

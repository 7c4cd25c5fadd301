"""The elastic supernet and the static subnets extracted from it.

Weights are shared the Once-for-All way: a subnet uses the first c channels of every layer, and a smaller depthwise
kernel is the centre of the larger one passed through a learned transform (7->5: 25x25, 5->3: 9x9, both starting as
the identity, shared across channels). `extract` copies a subnet's slice into a plain `Subnet` module (Conv2d,
BatchNorm2d, ReLU6) that exports to ONNX and compiles like any other network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .space import FIRST, LAST, STAGES, STEM, Arch, Space, blocks, max_mid


class ElasticConv(nn.Module):
    """A dense conv whose first `cout` filters over the input's first channels are used."""

    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin, k, k))
        nn.init.kaiming_normal_(self.weight, mode="fan_out")
        self.stride = stride

    def forward(self, x: torch.Tensor, cout: int) -> torch.Tensor:
        w = self.weight[:cout, : x.shape[1]]
        return F.conv2d(x, w, None, self.stride, w.shape[-1] // 2)


class ElasticDepthwise(nn.Module):
    def __init__(self, channels: int, stride: int, max_kernel: int = 7):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, max_kernel, max_kernel))
        nn.init.kaiming_normal_(self.weight, mode="fan_out")
        self.t75 = nn.Parameter(torch.eye(25))
        self.t53 = nn.Parameter(torch.eye(9))
        self.stride = stride

    def kernel(self, channels: int, k: int) -> torch.Tensor:
        w = self.weight[:channels]
        if k <= 5:
            w = (w[:, :, 1:6, 1:6].reshape(channels, 25) @ self.t75).reshape(channels, 1, 5, 5)
        if k == 3:
            w = (w[:, :, 1:4, 1:4].reshape(channels, 9) @ self.t53).reshape(channels, 1, 3, 3)
        return w

    def forward(self, x: torch.Tensor, k: int) -> torch.Tensor:
        c = x.shape[1]
        return F.conv2d(x, self.kernel(c, k), None, self.stride, k // 2, groups=c)


class ElasticBN(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        # Batch statistics while training (a subnet's running statistics are recalibrated after extraction).
        return F.batch_norm(x, self.running_mean[:c], self.running_var[:c], self.weight[:c], self.bias[:c],
                            self.training, self.momentum, self.eps)


class ElasticBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: bool):
        super().__init__()
        mid = max_mid(cin) if expand else cin
        self.expand = ElasticConv(cin, mid) if expand else None
        self.bn0 = ElasticBN(mid) if expand else None
        self.depthwise = ElasticDepthwise(mid, stride)
        self.bn1 = ElasticBN(mid)
        self.project = ElasticConv(mid, cout)
        self.bn2 = ElasticBN(cout)

    def forward(self, x: torch.Tensor, mid: int, cout: int, k: int, residual: bool) -> torch.Tensor:
        y = x
        if self.expand is not None:
            y = F.relu6(self.bn0(self.expand(y, mid)))
        y = F.relu6(self.bn1(self.depthwise(y, k)))
        y = self.bn2(self.project(y, cout))
        return x + y if residual else y


class Supernet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.num_classes = num_classes
        self.stem = ElasticConv(3, STEM, 3, 2)
        self.stem_bn = ElasticBN(STEM)
        self.first = ElasticBlock(STEM, FIRST, 1, expand=False)
        self.stages = nn.ModuleList()
        cin = FIRST
        for base, depth, stride in STAGES:
            self.stages.append(nn.ModuleList(ElasticBlock(cin if i == 0 else base, base, stride if i == 0 else 1,
                                                          expand=True) for i in range(depth)))
            cin = base
        self.last = ElasticConv(STAGES[-1][0], LAST)
        self.last_bn = ElasticBN(LAST)
        self.classifier = nn.Linear(LAST, num_classes)
        with torch.no_grad():  # BigNAS: every residual block starts as the identity, so at the start a shallow
            for stage in self.stages:  # subnet computes what a deep one does and sandwich training starts stable
                for block in stage[1:]:
                    block.bn2.weight.zero_()

    def forward(self, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        x = F.relu6(self.stem_bn(self.stem(x, arch.stem)))
        for b in blocks(arch):
            module = self.first if b.stage < 0 else self.stages[b.stage][b.index]
            x = module(x, b.mid, b.cout, b.kernel, b.residual)
        x = F.relu6(self.last_bn(self.last(x, arch.last)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return F.linear(x, self.classifier.weight[:, : arch.last], self.classifier.bias)

    def largest(self) -> Arch:
        return Space().largest()

    @torch.no_grad()
    def sort_channels(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Put each block's most important expanded channels first (L1 norm of the projection's weights over them),
        so that narrower subnets keep the channels that matter: done before each width phase (OFA). The optimizer's
        per-element state (Adam's moments) is permuted with the weights, or it would steer the wrong channels."""

        def permute(t: torch.Tensor, order: torch.Tensor, dim: int = 0) -> None:
            state = optimizer.state.get(t, {}) if optimizer is not None and isinstance(t, nn.Parameter) else {}
            for u in (t, *(v for v in state.values() if torch.is_tensor(v) and v.shape == t.shape)):
                u.copy_(u.index_select(dim, order))

        for stage in self.stages:
            for block in stage:
                order = block.project.weight.abs().sum(dim=(0, 2, 3)).argsort(descending=True)
                permute(block.expand.weight, order)
                permute(block.depthwise.weight, order)
                permute(block.project.weight, order, 1)
                for bn in (block.bn0, block.bn1):
                    for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                        permute(t, order)


# ---------------------------------------------------------------- static subnets


def _conv_bn(cin: int, cout: int, k: int, stride: int, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class SubnetBlock(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, k: int, stride: int, residual: bool, expand: bool):
        super().__init__()
        self.residual = residual
        layers = [_conv_bn(cin, mid, 1, 1)] if expand else []
        layers += [_conv_bn(mid, mid, k, stride, groups=mid), _conv_bn(mid, cout, 1, 1, act=False)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class Subnet(nn.Module):
    """A plain MobileNetV2-style network for one Arch: what is exported, compiled and deployed."""

    def __init__(self, arch: Arch, num_classes: int = 10):
        super().__init__()
        self.arch = arch
        layers: list[nn.Module] = [_conv_bn(3, arch.stem, 3, 2)]
        for b in blocks(arch):
            layers.append(SubnetBlock(b.cin, b.mid, b.cout, b.kernel, b.stride, b.residual, expand=b.stage >= 0))
        layers.append(_conv_bn(arch.widths[-1], arch.last, 1, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(arch.last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _copy_bn(dst: nn.BatchNorm2d, src: ElasticBN) -> None:
    c = dst.num_features
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(dst, name).data.copy_(getattr(src, name)[:c])


@torch.no_grad()
def extract(supernet: Supernet, arch: Arch) -> Subnet:
    """The subnet's weights, sliced (and kernel-transformed) out of the supernet."""
    net = Subnet(arch, supernet.num_classes)
    feats = list(net.features)
    stem = feats[0]
    stem[0].weight.copy_(supernet.stem.weight[: arch.stem])
    _copy_bn(stem[1], supernet.stem_bn)
    for b, block in zip(blocks(arch), feats[1:-1]):
        src = supernet.first if b.stage < 0 else supernet.stages[b.stage][b.index]
        seq = list(block.conv)
        if src.expand is not None:
            seq[0][0].weight.copy_(src.expand.weight[: b.mid, : b.cin])
            _copy_bn(seq[0][1], src.bn0)
            seq = seq[1:]
        seq[0][0].weight.copy_(src.depthwise.kernel(b.mid, b.kernel))
        _copy_bn(seq[0][1], src.bn1)
        seq[1][0].weight.copy_(src.project.weight[: b.cout, : b.mid])
        _copy_bn(seq[1][1], src.bn2)
    feats[-1][0].weight.copy_(supernet.last.weight[: arch.last, : arch.widths[-1]])
    _copy_bn(feats[-1][1], supernet.last_bn)
    net.classifier.weight.copy_(supernet.classifier.weight[:, : arch.last])
    net.classifier.bias.copy_(supernet.classifier.bias)
    return net

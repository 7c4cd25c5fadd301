"""`edgeprune calibrate`: time a suite of small builds that spans the search space on a device, and write the
device's latency table (calibrate/<device>.json) that the latency model fits.

The suite is MobileNetV2-style pieces (stem convolutions, pointwise expansions, depthwise 3/5/7, projections with
residual adds, pooling and classifier heads) at widths and resolutions from the search space, some of them with
their 1x1 layers pruned in 1xN blocks (the block-sparse kernels, N 4/8/16, at 50-90% sparsity), and whole subnets
of the search space (every other one quantized: the int8 kernels; the rest with every other 1x1 layer binary: the
bit-packed kernels), drawn with a fixed seed so every device is timed on the same suite. It runs the pipeline's own
stages: compile every network (all before any is timed: compiling beside a measurement would skew it), measure them
together (measure.batch: interleaved rounds on `local`, every board of an rpc:// key at once), and learn.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .artifacts import Build, Network, TableEntry
from .codegen import compile_model
from .cost import entry_of, learn, new_table, table_path
from .errors import UserError
from .measure.batch import measure_builds
from .measure.devices import Device, LocalDevice, QemuDevice, RpcDevice
from .targets import Target


def suite(count: int, seed: int = 1234) -> list[Network]:
    """`count` networks spanning the search space: two in three are small MobileNetV2-style pieces (widths 8-320,
    32-160 px, k 3/5/7), which cover wide shapes cheaply; every third is a whole subnet drawn from the search space,
    which brings what only deep subnets have: 2x2 to 7x7 feature maps with up to 1280 channels, and dozens of small
    kernels in a row."""
    import torch
    from torch import nn

    from .models.reference import InvertedResidual, conv_bn, randomize_bn
    from .search.select import architecture_network
    from .search.space import Space

    rng, space_rng = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    sparse_rng = np.random.default_rng(seed + 2)  # its own stream: the dense suite stays what it was
    nets = []
    for i in range(count):
        torch.manual_seed(seed + i)
        if i % 3 == 2:
            net = architecture_network(Space().sample(space_rng), seed + i, name=f"cal{i:03d}")
            # every other subnet as the int8 program a quantized build compiles, so the table times int8
            # kernels on subnets' own shapes (calibrated on noise: their speed does not depend on the scales)
            # and the others with every other 1x1 layer binary (ReCU codes), so it times the bit-packed kernels too
            nets.append(_int8(net, seed + i) if i % 6 == 2 else _binary(net, seed + i))
            continue
        res = int(rng.choice([32, 48, 64, 96, 112, 128, 160]))
        c = int(rng.choice([8, 16, 24, 32, 48, 64, 96]))
        k = int(rng.choice([3, 5, 7]))
        expand = int(rng.choice([3, 4, 6]))
        blocks = int(rng.integers(1, 4))
        layers: list[nn.Module] = [conv_bn(3, c, 3, 2)]
        cin = c
        for b in range(blocks):
            stride = 2 if b == 0 and rng.random() < 0.5 else 1
            cout = cin if stride == 1 and rng.random() < 0.5 else int(rng.choice([16, 24, 32, 64, 96, 160, 320]))
            block = InvertedResidual(cin, cout, stride, expand)
            if k != 3:  # the elastic kernel: swap the depthwise 3x3 for k x k
                dw = block.conv[-2] if expand != 1 else block.conv[0]
                hidden = dw[0].in_channels
                dw[0] = nn.Conv2d(hidden, hidden, k, dw[0].stride, k // 2, groups=hidden, bias=False)
            layers.append(block)
            cin = cout
        head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, int(rng.choice([10, 100, 1000])))]
        model = randomize_bn(nn.Sequential(*layers, *head), seed + i)
        plan = {}
        if i % 3 == 1:  # every third: its 1x1 layers 1xN block-sparse, so the table times the sparse kernels too
            from .compress.block1xn import apply_masks

            sparsity, n = float(sparse_rng.choice([0.5, 0.75, 0.9])), int(sparse_rng.choice([4, 8, 16]))
            plan = apply_masks(model, sparsity, n).plan()
        nets.append(Network(model, (1, 3, res, res), name=f"cal{i:03d}", plan=plan))
    return nets


def _int8(net: Network, seed: int) -> Network:
    import torch

    from .compress import integer
    from .compress import quantize as Q

    images = torch.randn(8, *net.input_shape[1:], generator=torch.Generator().manual_seed(seed))
    q = Q.quantize(net.module, images)
    return Network(q.module, net.input_shape, net.name, q.plan(), arch=net.arch,
                   integer=integer.program(q, net.input_shape))


def _binary(net: Network, seed: int) -> Network:
    import torch

    from .compress import binary, pointwise_layers

    chosen = set(pointwise_layers(net)[::2])
    module = net.module
    example = torch.randn(4, *net.input_shape[1:], generator=torch.Generator().manual_seed(seed))
    binary.convert(module, "recu", example, keep=lambda name, conv: name not in chosen)
    return Network(binary.export_form(module), net.input_shape, net.name, binary.plans(module), arch=net.arch)


def compile_all(networks: list[Network], target: Target, directory: Path, fmt: str = "so",
                progress: Callable[[str], None] | None = None) -> Iterator[Build]:
    """Each network compiled for `target` into directory/<its name>, one at a time, in order."""
    for i, net in enumerate(networks):
        # A network pruned in 1xN blocks runs sparse wherever it can, so its table rows time the sparse kernels
        # (auto would keep some dense by the very prices the table is for).
        sparse = "sparse" if any(p.scheme == "bsr" for p in net.plan.values()) else "auto"
        build = compile_model(net, target, directory / net.name, fmt=fmt, sparse=sparse)
        if progress:
            progress(f"[{i + 1}/{len(networks)}] {net.name}: compiled")
        yield build


def measure_entries(builds: list[Build], device: Device, runs: int = 30, warmup: int = 5,
                    threads: int | None = None, progress: Callable[[str], None] = print,
                    workers: int | None = None) -> list[TableEntry]:
    """The builds measured together on `device`, as latency-table entries."""
    measured = measure_builds(builds, device, runs, warmup, threads, progress, workers)
    note = next((m.contention_note() for m in measured if m.contended), None)
    if note:
        progress(note)
    return [entry_of(b, m) for b, m in zip(builds, measured)]


def default_table_path(device: Device, target: Target) -> Path:
    return table_path(device.table_name(target))


def calibrate(target: Target, device: Device, out: Path | None = None, count: int = 36, runs: int = 30,
              warmup: int = 5, threads: int | None = None, progress: Callable[[str], None] = print) -> Path:
    """Time `suite(count)` on `device` and write its latency table to `out` (default: calibrate/<device>.json)."""
    if isinstance(device, QemuDevice):
        raise UserError("qemu times are not latency; calibrate on local or an rpc:// board")
    if isinstance(device, LocalDevice) and not target.is_host:
        raise UserError(f"calibrating {target.name} needs that device: use --device rpc://HOST:PORT/KEY")
    # Ask the tracker first: a wrong address or key should fail now, not after minutes of compiling.
    workers = min(device.boards(), count) if isinstance(device, RpcDevice) else 1
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        builds = list(compile_all(suite(count), target, Path(tmp), progress=progress))
        entries = measure_entries(builds, device, runs, warmup, threads, progress, workers)
    out = out or default_table_path(device, target)
    learn(new_table(device.identity(target, boards=workers), threads), entries, out)  # written once, at the end
    return out

"""Binary accuracy benchmark (issue 15, the accuracy goal of bench/binary.py): ReCU and SiMaN against plain sign
binarization, at the same steps, on the built-in data.

Protocol, seeded, single-threaded:
  1. a ResNet-18-style network (ResNet-18's layout: 7x7 stem, max pool, four stages of two basic blocks, widths
     w, 2w, 4w, 8w, with w = 16 for a CPU budget) in the Bi-Real form both papers train: every 3x3 conv has its
     own identity shortcut, Hardtanh after each add (ReCU's), 1x1 strided projections, BatchNorm before the
     classifier. Input 64 px;
  2. trained full precision (fp32) from scratch: --fp32-steps, AdamW 3e-3, warm-up + cosine, batch 32;
  3. three copies of it binarized with compress.binary.binarize (every 3x3 block conv binary; the stem, the
     projections and the classifier fp32), each trained --steps from the fp32 weights with the same recipe:
     labels + distillation from the fp32 network, AdamW 1e-3, warm-up + cosine, batch 32;
  4. top-1 on the validation and test splits (held-out digits), BatchNorm recalibrated.

Goals (judged on the test split): ReCU above sign, SiMaN above sign. One GOAL line each; exits 1 when one is missed.

    python bench/binary_accuracy.py [--steps 800] [--fp32-steps 1500] [--seed 0]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
from torch import nn

WIDTH = 16
RESOLUTION = 64
FP32_LR = 3e-3
BINARY_LR = 1e-3
METHODS = ("sign", "recu", "siman")
NAMES = {"fp32": "fp32", "sign": "sign (XNOR-style, STE)", "recu": "ReCU", "siman": "SiMaN"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class BiRealBlock(nn.Module):
    """ResNet's basic block with a shortcut around each 3x3 conv (Bi-Real; z-hXu/ReCU models_imagenet/resnet.py)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act1, self.act2 = nn.Hardtanh(), nn.Hardtanh()
        self.downsample = (None if stride == 1 and cin == cout
                           else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)) + r)
        return self.act2(self.bn2(self.conv2(out)) + out)


class BiRealResNet18(nn.Module):
    """ResNet-18's layout at width `width` (64 is ResNet-18's), Bi-Real blocks."""

    def __init__(self, width: int = WIDTH, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act = nn.Hardtanh()
        self.pool = nn.MaxPool2d(3, 2, 1)
        layers: list[nn.Module] = []
        cin = width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2 ** i
            layers += [BiRealBlock(cin, cout, stride), BiRealBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.bn2 = nn.BatchNorm1d(cin)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.pool(self.act(self.bn1(self.conv1(x)))))
        return self.fc(self.bn2(x.mean((2, 3))))


def _progress(every: int):
    start = time.time()

    def report(step: int, steps: int, label: str, loss: float) -> None:
        if step % every == 0 or step == steps:
            log(f"  {label}: step {step}/{steps}  loss {loss:.3f}  {time.time() - start:.0f} s")

    return report


def accuracy_goals(steps: int = 800, seed: int = 0, fp32_steps: int = 1500,
                   width: int = WIDTH, resolution: int = RESOLUTION) -> tuple[str, list[str]]:
    """Train the fp32 network, binarize a copy with each method for `steps`, and return the Markdown table of val
    and test accuracy and the GOAL lines (ReCU, SiMaN minus sign, in points of test accuracy)."""
    if steps <= 0 or fp32_steps <= 0:
        raise ValueError(f"steps and fp32_steps must be positive, not {steps} and {fp32_steps}")
    from edgeprune import data, training
    from edgeprune.compress import binary

    ds = data.load(None, seed=seed)
    torch.manual_seed(seed)
    fp32 = BiRealResNet18(width, len(ds.classes))
    rows: dict[str, tuple[float, float, float, int]] = {}
    t = time.time()
    log(f"fp32: {fp32_steps} steps")
    training.distill(fp32, resolution, None, resolution, ds, fp32_steps, lr=FP32_LR, seed=seed,
                     progress=_progress(100), label="fp32")
    rows["fp32"] = (training.accuracy(fp32, *ds.val, resolution), training.accuracy(fp32, *ds.test, resolution),
                    (time.time() - t) / 60, 0)
    for method in METHODS:
        t = time.time()
        net = copy.deepcopy(fp32)
        torch.manual_seed(seed)  # ReCU's alpha ~ U(0, 1) is drawn here
        log(f"{method}: {steps} steps from the fp32 weights")
        binary.binarize(net, method, ds, resolution, steps, teacher=fp32, lr=BINARY_LR, seed=seed,
                        progress=_progress(100))
        rows[method] = (training.accuracy(net, *ds.val, resolution), training.accuracy(net, *ds.test, resolution),
                        (time.time() - t) / 60, len(binary.binary_modules(net)))
    lines = [f"ResNet-18-style Bi-Real network, width {width}, {resolution} px, built-in data (seed {seed}); "
             f"fp32 {fp32_steps} steps, each binary method {steps} steps from the fp32 weights.", "",
             "| network | binary convs | val % | test % | minutes |", "|---|---:|---:|---:|---:|"]
    for key, (val, test, minutes, count) in rows.items():
        lines.append(f"| {NAMES[key]} | {count} | {100 * val:.1f} | {100 * test:.1f} | {minutes:.1f} |")
    goals = []
    for method in ("recu", "siman"):
        points = 100 * (rows[method][1] - rows["sign"][1])
        goals.append(f"GOAL accuracy-{method}-vs-sign: {points:+.1f} points (goal > 0) "
                     f"{'met' if points > 0 else 'missed'}")
    return "\n".join(lines), goals


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=800, help="training steps of each binary method")
    ap.add_argument("--fp32-steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    table, goals = accuracy_goals(args.steps, args.seed, args.fp32_steps)
    print(table)
    print()
    for line in goals:
        print(line)
    return 0 if all(line.endswith(" met") for line in goals) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Supernet training: progressive shrinking (OFA) with in-place distillation, PSS-Net pools in the last phase.

Phases, in order (fractions of the steps): the full network; elastic kernel; elastic depth; elastic width (expand
ratio and stage widths), where the middle subnet of each step comes from PSS-Net's prioritized pools. Every step
trains the largest subnet on the labels and the sampled ones on its soft outputs (in-place distillation); the
resolution changes per subnet. Before the width phase the expanded channels are sorted by importance, so narrower
subnets keep the channels that matter.

Under torchrun (WORLD_SIZE > 1) each process trains on its shard of every batch and the gradients are averaged
with all_reduce; subnet choices are drawn from a seed shared by all processes, and pool scores are averaged, so the
pools stay identical everywhere. Parameters a subnet does not touch get zero gradients, so every process reduces the
same tensors.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .. import data
from .evaluate import score
from .pools import Pools, bucket_edges
from .space import KERNELS, WIDTHS, Arch, Space
from .supernet import Supernet

FORMAT = "edgeprune-supernet-1"


@dataclass
class TrainConfig:
    steps: int = 1200
    batch: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-5
    seed: int = 0
    resolutions: tuple[int, ...] = (64, 80, 96)  # CPU-sized; the space reaches 224 for supernets trained there
    buckets: int = 8
    pool_size: int = 20
    keep_per_bucket: int = 3  # pool entries scored on validation data and kept with the supernet
    target: str = "cortex-a7"  # whose latency model buckets the pools
    phases: dict[str, float] = field(default_factory=lambda: {"full": 0.25, "kernel": 0.15, "depth": 0.15,
                                                               "width": 0.45})


def phase_space(phase: str, resolutions: tuple[int, ...]) -> Space:
    full = dict(resolutions=resolutions, kernels=(max(KERNELS),), expands=(6,), widths=(1.0,), elastic_depth=False)
    if phase == "full":
        return Space(**full)
    if phase == "kernel":
        return Space(**{**full, "kernels": KERNELS})
    if phase == "depth":
        return Space(**{**full, "kernels": KERNELS, "elastic_depth": True})
    return Space(resolutions=resolutions, widths=WIDTHS)


def _world() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_mean(tensors: list[torch.Tensor], world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def _kd(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.kl_div(F.log_softmax(student, 1), F.softmax(teacher, 1), reduction="batchmean")


def train(ds: data.Dataset, cfg: TrainConfig, latency: Callable[[Arch], float],
          progress: Callable[[int, int, str, float], None] | None = None) -> dict:
    """Train a supernet on `ds`; returns the checkpoint (weights, pools with validation accuracy, config)."""
    rank, world = _world()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)  # same in every process: same subnets, same batches
    net = Supernet(len(ds.classes))
    if world > 1:
        for p in net.parameters():  # identical start everywhere
            _all_reduce_mean([p.data], world)
    decay = [p for n, p in net.named_parameters() if p.ndim == 4 and "depthwise" not in n] + [net.classifier.weight]
    ids = {id(p) for p in decay}
    other = [p for p in net.parameters() if id(p) not in ids]
    # Adam, not the papers' SGD: from scratch, SGD needs far more steps than a CPU budget allows (on the digit
    # scenes, MobileNetV2 with SGD at lr 0.1 was still at chance after 300 steps; Adam reached 53%).
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other,
                             "weight_decay": 0.0}], lr=cfg.lr)
    full_space = phase_space("width", cfg.resolutions)
    lo = latency(full_space.smallest(min(cfg.resolutions)))
    hi = latency(full_space.largest(max(cfg.resolutions)))
    pools = Pools(full_space, bucket_edges(lo, hi * 1.001, cfg.buckets), latency, size=cfg.pool_size)
    pools.build_prior(np.random.default_rng(cfg.seed + 1))

    bounds, acc = [], 0
    for name, frac in cfg.phases.items():
        bounds.append((name, acc, acc + max(1, round(frac * cfg.steps))))
        acc = bounds[-1][2]
    x_train, y_train = ds.train
    batch_iter = iter(())
    epoch = 0
    warmup = max(1, cfg.steps // 40)
    history: list[dict] = []
    for name, start, stop in bounds:
        space = phase_space(name, cfg.resolutions)
        if name == "width":
            net.sort_channels()
        for step in range(start, stop):
            try:
                xb, yb = next(batch_iter)
            except StopIteration:
                epoch += 1
                batch_iter = data.batches(x_train, y_train, cfg.batch, np.random.default_rng([cfg.seed, epoch]))
                xb, yb = next(batch_iter)
            xb, yb = xb[rank::world], torch.from_numpy(yb[rank::world])
            lr = cfg.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
            for g in opt.param_groups:
                g["lr"] = lr
            net.train()
            opt.zero_grad(set_to_none=False)
            big = space.largest(int(rng.choice(cfg.resolutions)))
            logits = net(data.tensors(xb, big.resolution), big)
            loss = F.cross_entropy(logits, yb, label_smoothing=0.1)
            loss.backward()
            teacher = logits.detach()
            students: list[tuple[Arch, int | None, tuple | None]] = []
            if name == "width":  # PSS-Net: a bucket's subnet from its pool or the sampler, plus the smallest
                bucket = int(rng.integers(len(pools.pools)))
                genes = pools.choose(bucket, (step - start) / max(1, stop - start - 1), rng)
                students = [(full_space.decode(genes), bucket, genes), (space.smallest(min(cfg.resolutions)),
                                                                       None, None)]
            elif name != "full":
                students = [(space.sample(rng), None, None) for _ in range(1 if name == "kernel" else 2)]
            for arch, bucket, genes in students:
                out = net(data.tensors(xb, arch.resolution), arch)
                kd = _kd(out, teacher)
                kd.backward()
                if bucket is not None:
                    s = torch.tensor([-float(F.cross_entropy(out.detach(), yb))])
                    _all_reduce_mean([s], world)
                    pools.update(bucket, genes, float(s))
            for p in net.parameters():  # untouched by every subnet so far: still None, but reduced everywhere
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            _all_reduce_mean([p.grad for p in net.parameters()], world)
            opt.step()
            history.append({"step": step, "phase": name, "loss": float(loss.detach())})
            if progress:
                progress(step + 1, acc, name, float(loss.detach()))

    keep = []
    for b in range(len(pools.pools)):  # the best of each pool, scored on validation data with BN recalibrated
        for genes in pools.top(b, cfg.keep_per_bucket):
            arch = full_space.decode(genes)
            keep.append({"arch": arch.to_dict(), "bucket": b, "pool_score": pools.pools[b][genes],
                         "val_accuracy": score(net, arch, ds)})
    largest = full_space.largest(max(cfg.resolutions))
    return {
        "format": FORMAT,
        "state_dict": {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()},
        "num_classes": len(ds.classes),
        "classes": list(ds.classes),
        "dataset": ds.name,
        "config": {**asdict(cfg), "resolutions": list(cfg.resolutions)},
        "space": {"resolutions": list(cfg.resolutions)},
        "bucket_edges_ms": [float(e) for e in pools.edges],
        "pools": keep,
        "largest": {"arch": largest.to_dict(), "val_accuracy": score(net, largest, ds)},
        "history": history[:: max(1, len(history) // 200)],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "world_size": world,
    }


def load(path) -> tuple[Supernet, dict]:
    """A supernet checkpoint written by `edgeprune train-supernet` (tensors and plain values: no pickle runs)."""
    from ..errors import UserError

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file
        raise UserError(f"{path} is not a supernet checkpoint ({str(e).splitlines()[0][:120]}); "
                        "write one with edgeprune train-supernet") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not an {FORMAT} checkpoint; write one with edgeprune train-supernet")
    net = Supernet(ckpt["num_classes"])
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()})
    return net.eval(), ckpt


def save(ckpt: dict, path) -> None:
    """Atomically: a checkpoint is the old one or the complete new one."""
    import tempfile
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(ckpt, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a checkpoint is shared like any build output
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

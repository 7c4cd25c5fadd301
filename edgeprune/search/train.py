"""Supernet training: the sandwich rule with in-place distillation, PSS-Net pools, optional progressive shrinking.

Every step trains the largest subnet (at the largest resolution) on the labels, then the smallest subnet and
`sampled` subnets from PSS-Net's prioritized pools on the largest's soft outputs (in-place distillation; BigNAS,
OFA). The gradients of all of them are summed into one optimizer step, so the smallest subnet is trained at every
step rather than only late. Progressive shrinking (OFA: the full network, then elastic kernel, depth and width) is a
choice of `phases`; in its early phases the sandwich is taken within that phase's space. Before a width phase that
follows others, the expanded channels are sorted by importance, so narrower subnets keep the channels that matter.

Training is resumable: `state` is everything a step depends on (weights, optimizer, pools, step, torch's rng; the
batches and subnet draws come from generators seeded by (seed, step)), written atomically every few minutes.

Under torchrun (WORLD_SIZE > 1) each process trains on its shard of every batch and the gradients are averaged
with all_reduce; subnet choices are drawn from seeds shared by all processes, and pool scores are averaged, so the
pools stay identical everywhere. Parameters a subnet does not touch get zero gradients, so every process reduces the
same tensors.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .. import data
from ..training import batch_at, kd, learning_rate, optimizer
from .evaluate import score
from .pools import Pools, bucket_edges
from .space import KERNELS, WIDTHS, Arch, Space
from .supernet import Subnet, Supernet

FORMAT = "edgeprune-supernet-1"
STATE_FORMAT = "edgeprune-supernet-state-1"  # a training run to resume, not a supernet to search
PROGRESSIVE = {"full": 0.25, "kernel": 0.15, "depth": 0.15, "width": 0.45}  # fractions of the steps
SANDWICH_ONLY = {"width": 1.0}


@dataclass
class TrainConfig:
    steps: int = 600
    batch: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-5
    seed: int = 0
    resolutions: tuple[int, ...] = (64, 80, 96)  # CPU-sized; the space reaches 224 for supernets trained there
    buckets: int = 8
    pool_size: int = 20
    keep_per_bucket: int = 3  # pool entries scored on validation data and kept with the supernet
    target: str = "cortex-a7"  # whose latency model buckets the pools
    sampled: int = 1  # subnets per step between the largest and the smallest, from the pools (PSS-Net: one)
    kd_temperature: float = 1.0
    prior_draws: int = 4000  # random subnets behind PSS-Net's per-bucket marginals
    # Progressive shrinking measured better than the sandwich over every size from the first step: after 300 steps
    # the smallest subnet reached 39.6% against 17.8%, the largest 95.6% against 87.4% (the students learn little
    # from a teacher that is still guessing). SANDWICH_ONLY is the other choice.
    phases: dict[str, float] = field(default_factory=lambda: dict(PROGRESSIVE))

    @staticmethod
    def from_dict(d: dict) -> TrainConfig:
        return TrainConfig(**{**d, "resolutions": tuple(d["resolutions"]), "phases": dict(d["phases"])})


def phase_space(phase: str, resolutions: tuple[int, ...]) -> Space:
    full = dict(resolutions=resolutions, kernels=(max(KERNELS),), expands=(6,), widths=(1.0,), elastic_depth=False)
    if phase == "full":
        return Space(**full)
    if phase == "kernel":
        return Space(**{**full, "kernels": KERNELS})
    if phase == "depth":
        return Space(**{**full, "kernels": KERNELS, "elastic_depth": True})
    return Space(resolutions=resolutions, widths=WIDTHS)


def phase_bounds(cfg: TrainConfig) -> list[tuple[str, int, int]]:
    """(phase, first step, stop) for each phase; the last one ends at cfg.steps."""
    bounds, acc = [], 0
    names = list(cfg.phases)
    for i, name in enumerate(names):
        stop = cfg.steps if i == len(names) - 1 else min(cfg.steps, acc + max(1, round(cfg.phases[name] * cfg.steps)))
        bounds.append((name, acc, stop))
        acc = stop
    return bounds


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


def train(ds: data.Dataset, cfg: TrainConfig, latency: Callable[[Arch], float],
          progress: Callable[[int, int, str, float], None] | None = None, resume: dict | None = None,
          checkpoint: Callable[[dict], None] | None = None, every_s: float = 300.0,
          stop_at: int | None = None) -> dict:
    """Train a supernet on `ds`; returns the supernet (weights, pools with validation accuracy, config).

    `resume`: a `state` dict to continue from. `checkpoint(state)` is called every `every_s` seconds and at the end
    (in the first process only). `stop_at`: stop after this step (the schedule still spans cfg.steps), returning
    None; what a test uses to interrupt a run."""
    rank, world = _world()
    torch.manual_seed(cfg.seed)
    net = Supernet(len(ds.classes))
    opt = optimizer(net, cfg.lr, cfg.weight_decay)
    full_space = phase_space("width", cfg.resolutions)
    lo = latency(full_space.smallest(min(cfg.resolutions)))
    hi = latency(full_space.largest(max(cfg.resolutions)))
    pools = Pools(full_space, bucket_edges(lo, hi * 1.001, cfg.buckets), latency, size=cfg.pool_size)
    first, history = 0, []
    if resume is not None:
        net.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        pools.load_state(resume["pools"])
        torch.set_rng_state(resume["torch_rng"])
        first, history = int(resume["step"]), list(resume["history"])
    else:
        if world > 1:
            for p in net.parameters():  # identical start everywhere
                _all_reduce_mean([p.data], world)
        pools.build_prior(np.random.default_rng(cfg.seed + 1), cfg.prior_draws)

    def state(step: int) -> dict:
        return {"format": STATE_FORMAT, "config": _plain_config(cfg), "dataset": ds.name, "step": step,
                "model": net.state_dict(), "optimizer": opt.state_dict(), "pools": pools.state(),
                "torch_rng": torch.get_rng_state(), "history": history, "world_size": world}

    x_train, y_train = ds.train
    smallest, teacher_res = min(cfg.resolutions), max(cfg.resolutions)
    saved = time.monotonic()
    last = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
    for name, start, stop in phase_bounds(cfg):
        space = phase_space(name, cfg.resolutions)
        for step in range(max(start, first), min(stop, last)):
            if step == start and name == "width" and start > 0:
                net.sort_channels(opt)
            rng = np.random.default_rng([cfg.seed, 1, step])  # same in every process, and after a resume
            xb, yb = batch_at(x_train, y_train, cfg.batch, cfg.seed, step)
            xb, yb = xb[rank::world], torch.from_numpy(yb[rank::world])
            for g in opt.param_groups:
                g["lr"] = learning_rate(cfg.lr, step, cfg.steps)
            net.train()
            opt.zero_grad(set_to_none=False)
            logits = net(data.tensors(xb, teacher_res), space.largest(teacher_res))
            loss = F.cross_entropy(logits, yb, label_smoothing=0.1)
            loss.backward()
            teacher = logits.detach()
            students: list[tuple[Arch, int | None, tuple | None]] = []
            if name != "full":  # the sandwich: the smallest, and the sampled ones in between
                students.append((space.smallest(smallest), None, None))
                for _ in range(cfg.sampled):
                    if name == "width":  # PSS-Net: a bucket's subnet from its pool or the conditional sampler
                        bucket = int(rng.integers(len(pools.pools)))
                        genes = pools.choose(bucket, (step - start) / max(1, stop - start - 1), rng)
                        students.append((full_space.decode(genes), bucket, genes))
                    else:
                        students.append((space.sample(rng), None, None))
            for arch, bucket, genes in students:
                out = net(data.tensors(xb, arch.resolution), arch)
                kd(out, teacher, cfg.kd_temperature).backward()
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
                progress(step + 1, cfg.steps, name, float(loss.detach()))
            if checkpoint and rank == 0 and time.monotonic() - saved >= every_s:
                checkpoint(state(step + 1))
                saved = time.monotonic()
    if checkpoint and rank == 0:
        checkpoint(state(last))
    if last < cfg.steps:
        return None
    return _supernet(net, pools, full_space, ds, cfg, history, world)


def _plain_config(cfg: TrainConfig) -> dict:
    return {**asdict(cfg), "resolutions": list(cfg.resolutions)}


def _supernet(net: Supernet, pools: Pools, full_space: Space, ds: data.Dataset, cfg: TrainConfig,
              history: list[dict], world: int) -> dict:
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
        "config": _plain_config(cfg),
        "space": {"resolutions": list(cfg.resolutions)},
        "bucket_edges_ms": [float(e) for e in pools.edges],
        "pools": keep,
        "largest": {"arch": largest.to_dict(), "val_accuracy": score(net, largest, ds)},
        "history": history[:: max(1, len(history) // 200)],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "world_size": world,
    }


def train_alone(arch: Arch, ds: data.Dataset, steps: int = 600, batch: int = 32, lr: float = 3e-3,
                weight_decay: float = 1e-5, seed: int = 0) -> Subnet:
    """One architecture trained alone from scratch with the supernet's recipe (AdamW, warmup and cosine decay,
    label smoothing, the same batches): the baseline a subnet taken from the supernet is held to."""
    torch.manual_seed(seed)
    net = Subnet(arch, len(ds.classes))
    opt = optimizer(net, lr, weight_decay)
    net.train()
    for step in range(steps):
        xb, yb = batch_at(*ds.train, batch, seed, step)
        for g in opt.param_groups:
            g["lr"] = learning_rate(lr, step, steps)
        opt.zero_grad()
        F.cross_entropy(net(data.tensors(xb, arch.resolution)), torch.from_numpy(yb), label_smoothing=0.1).backward()
        opt.step()
    return net.eval()


def load_state(path) -> dict:
    """A training state written by train-supernet's checkpoints (weights_only: no pickle runs)."""
    from ..errors import UserError

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file
        raise UserError(f"cannot resume from {path} ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError(f"{path} is not a training checkpoint ({STATE_FORMAT}); train-supernet writes one next to "
                        "its output every few minutes")
    return state


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

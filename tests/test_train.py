"""Supernet training: the sandwich rule with PSS-Net pools, progressive shrinking, the checkpoint, resuming, and
DistributedDataParallel runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_one_line_error

from edgeprune import data as D
from edgeprune.search.space import Arch
from edgeprune.search.supernet import Supernet
from edgeprune.search.train import SANDWICH_ONLY, TrainConfig, load, load_state, optimizer, save, train


def _tiny(path: Path) -> Path:
    """Four classes a network can tell apart in a few steps: the class is which quadrant is bright."""
    rng = np.random.default_rng(0)
    y = np.arange(80) % 4
    x = rng.integers(0, 60, (80, 32, 32, 3)).astype(np.uint8)
    for i, c in enumerate(y):
        r, q = divmod(int(c), 2)
        x[i, 16 * r:16 * r + 16, 16 * q:16 * q + 16] += 150
    np.savez(path, x=x, y=y)
    return path


def test_train_writes_a_checkpoint_with_pools(cli, tmp_path):
    data = _tiny(tmp_path / "tiny.npz")
    rc, out, err = cli("train-supernet", "--data", data, "--steps", "8", "--batch", "8", "--resolutions", "32",
                       "-o", tmp_path / "s.pt", "--quiet")
    assert rc == 0, err
    net, ckpt = load(tmp_path / "s.pt")  # weights_only: tensors and plain values
    assert ckpt["num_classes"] == 4 and ckpt["space"]["resolutions"] == [32]
    assert ckpt["pools"], "the best subnets of each pool are kept with the supernet"
    edges = ckpt["bucket_edges_ms"]
    assert all(a < b for a, b in zip(edges, edges[1:]))
    for p in ckpt["pools"]:
        arch = Arch.from_dict(p["arch"])
        assert arch.resolution == 32 and 0.0 <= p["val_accuracy"] <= 1.0
    phases = {h["phase"] for h in ckpt["history"]}
    assert phases == {"full", "kernel", "depth", "width"}  # progressive shrinking ran every phase
    x = torch.randn(1, 3, 32, 32)
    assert net(x, Arch.from_dict(ckpt["pools"][0]["arch"])).shape == (1, 4)


def test_resumed_training_continues_exactly(cli, tmp_path):
    """6 steps in one go, and 3 steps, a checkpoint, then --resume for the other 3: the same supernet, bit for bit."""
    from edgeprune.pipeline import latency_function

    ds = D.load(_tiny(tmp_path / "tiny.npz"))
    cfg = TrainConfig(steps=6, batch=8, resolutions=(32,), phases=dict(SANDWICH_ONLY), prior_draws=200, buckets=2,
                      keep_per_bucket=2, sampled=1)  # small, so the test takes seconds
    once = train(ds, cfg, latency_function(cfg.target))
    state = tmp_path / "half.pt.state"
    assert train(ds, cfg, latency_function(cfg.target), checkpoint=lambda s: save(s, state), stop_at=3) is None
    assert load_state(state)["step"] == 3
    rc, _, err = cli("train-supernet", "--resume", "-o", tmp_path / "half.pt", "--quiet")  # the default state path
    assert rc == 0, err
    _, resumed = load(tmp_path / "half.pt")
    assert once["state_dict"].keys() == resumed["state_dict"].keys()
    for k, v in once["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), k
    assert [p["arch"] for p in once["pools"]] == [p["arch"] for p in resumed["pools"]]
    assert load_state(state)["step"] == 6
    assert {h["phase"] for h in once["history"]} == {"width"}


def test_sorting_channels_permutes_the_optimizer_state():
    """Adam's moments belong to weights: after sorting they must still sit with the weights they were computed for."""
    torch.manual_seed(0)
    net = Supernet(4)
    opt = optimizer(net, 1e-3, 0.0)
    a = net.largest().replace(resolution=32)
    net(torch.randn(2, 3, 32, 32), a).sum().backward()
    opt.step()
    block = net.stages[1][0]
    for p in (block.expand.weight, block.project.weight):
        opt.state[p]["exp_avg"].copy_(p.detach())
    before = block.expand.weight.detach().clone()
    net.sort_channels(opt)
    assert not torch.equal(block.expand.weight, before)  # the sort did move channels
    for p in (block.expand.weight, block.project.weight):
        assert torch.equal(opt.state[p]["exp_avg"], p.detach())


def test_bad_resume(cli, tmp_path):
    (tmp_path / "x.state").write_bytes(b"not a checkpoint")
    rc, _, err = cli("train-supernet", "--resume", tmp_path / "x.state", "-o", tmp_path / "s.pt")
    assert rc == 2
    assert_one_line_error(err, "cannot resume")
    assert not (tmp_path / "s.pt").exists()


def test_bad_training_input(cli, tmp_path):
    rc, _, err = cli("train-supernet", "--data", tmp_path / "none", "-o", tmp_path / "s.pt")
    assert rc == 2
    assert_one_line_error(err, "neither a directory")
    assert not (tmp_path / "s.pt").exists()


@pytest.mark.slow
def test_training_runs_under_torchrun(tmp_path):
    """Two processes on one machine (gloo): each trains on its shard, gradients are averaged."""
    data = _tiny(tmp_path / "tiny.npz")
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "edgeprune.cli",
                           "train-supernet", "--data", str(data), "--steps", "6", "--batch", "8", "--resolutions", "32",
                           "-o", str(tmp_path / "ddp.pt"), "--quiet"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _, ckpt = load(tmp_path / "ddp.pt")
    assert ckpt["world_size"] == 2 and ckpt["pools"]

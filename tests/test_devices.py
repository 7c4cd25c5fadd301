"""Devices by URI: local, a TVM RPC tracker and server started here on 127.0.0.1, and qemu; and `check`, the
latency gate for CI (exit 1 over budget, JUnit XML)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from helpers import assert_one_line_error
from torch import nn

from edgeprune.codegen.build import compile_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _stop(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(p.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def tracker():
    """A tracker and one server under key 'board', both on 127.0.0.1; yields the tracker's port."""
    import tvm.rpc

    port = _free_port()
    trk = _start("tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1))
    srv_port = _free_port()
    srv = _start("tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(srv_port), "--port-end",
                 str(srv_port + 10), "--tracker", f"127.0.0.1:{port}", "--key", "board")
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                summary = tvm.rpc.connect_tracker("127.0.0.1", port).summary()
                if summary.get("queue_info", {}).get("board", {}).get("free", 0) > 0:
                    break
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.5)
        else:
            pytest.fail("the RPC tracker and server did not come up in 60 s")
        yield port
    finally:
        _stop(srv)
        _stop(trk)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("dev")
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4)).eval()
    x = torch.randn(1, 3, 16, 16)
    path = root / "m.onnx"
    torch.onnx.export(model, (x,), str(path), opset_version=17, dynamo=False, input_names=["input"])
    np.save(root / "x.npy", x.numpy())
    so = compile_model(path, "host", root / "so")
    a7 = compile_model(path, "cortex-a7", root / "a7", fmt="c")
    return root, so, a7


def test_measure_and_run_over_rpc(tracker, builds, cli, tmp_path):
    root, so, _ = builds
    rc, out, err = cli("measure", so.directory, "--device", f"rpc://127.0.0.1:{tracker}/board", "--runs", "7",
                       "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["runs"] == 7 and report["real_time"] is True
    assert 0 < report["p10_ms"] <= report["median_ms"] <= report["p90_ms"]
    rc, _, err = cli("run", so.directory, "--device", f"rpc://127.0.0.1:{tracker}/board", "-i", root / "x.npy",
                     "-o", tmp_path / "remote.npy")
    assert rc == 0, err
    rc, _, err = cli("run", so.directory, "-i", root / "x.npy", "-o", tmp_path / "local.npy")
    assert rc == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "remote.npy"), np.load(tmp_path / "local.npy"))


def test_rpc_errors_are_one_line(tracker, builds, cli):
    _, so, _ = builds
    rc, _, err = cli("measure", so.directory, "--device", f"rpc://127.0.0.1:{tracker}/nosuchkey")
    assert rc == 2
    assert_one_line_error(err, "no board is registered", "nosuchkey")
    rc, _, err = cli("measure", so.directory, "--device", f"rpc://127.0.0.1:{_free_port()}/board")
    assert rc == 2
    assert_one_line_error(err, "cannot reach the RPC tracker")
    rc, _, err = cli("measure", so.directory, "--device", "carrier-pigeon://x")
    assert rc == 2
    assert_one_line_error(err, "unknown device")


def test_check_gates_on_the_budget_and_writes_junit(builds, cli, tmp_path):
    _, so, _ = builds
    rc, out, err = cli("check", so.directory, "--latency", "10s", "--runs", "20", "--junit", tmp_path / "ok.xml")
    assert rc == 0, err
    assert "within the budget" in out
    suite = ET.parse(tmp_path / "ok.xml").getroot()
    assert suite.get("tests") == "1" and suite.get("failures") == "0"

    rc, out, err = cli("check", so.directory, "--latency", "1us", "--runs", "20", "--median", "--junit",
                       tmp_path / "bad.xml")
    assert rc == 1, err
    assert "median" in out and "misses the budget" in out
    suite = ET.parse(tmp_path / "bad.xml").getroot()
    assert suite.get("failures") == "1"
    assert suite.find("testcase/failure") is not None


@pytest.mark.slow
def test_qemu_times_are_marked_not_real(builds, cli):
    _, _, a7 = builds
    rc, out, err = cli("measure", a7.directory, "--device", "qemu://cortex-a7", "--runs", "3", "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["real_time"] is False and report["runs"] == 3
    rc, _, err = cli("check", a7.directory, "--device", "qemu://cortex-a7", "--latency", "1s", "--runs", "3")
    assert rc == 2
    assert_one_line_error(err, "emulation")

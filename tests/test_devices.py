"""Devices by URI: local, a TVM RPC tracker and server started here on 127.0.0.1, and qemu; and `check`, the
latency gate for CI (exit 1 over budget, JUnit XML). Also calibration spread over a farm of two boards under one
key, and the faults a farm has: a board that never answers, and no free board."""

from __future__ import annotations

import gc
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import assert_one_line_error
from torch import nn

from edgeprune.codegen.build import compile_model
from edgeprune.measure import devices


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(*args: str, log: Path | None = None) -> subprocess.Popen:
    """`python -m ARGS` in its own process group (rpc_server forks workers: _stop ends them all); its output goes
    to `log` when given (an rpc_server logs "connected from" per session), else nowhere."""
    out = open(log, "wb") if log else subprocess.DEVNULL  # the child has its own copy: ours is closed below
    try:
        return subprocess.Popen([sys.executable, "-m", *args], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    finally:
        if log:
            out.close()


def _server(tracker_port: int, key: str, log: Path | None = None) -> subprocess.Popen:
    port = _free_port()
    return _start("tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 10),
                  "--tracker", f"127.0.0.1:{tracker_port}", "--key", key, log=log)


def _wait_for_boards(port: int, free: dict[str, int], timeout: float = 60) -> None:
    """Until the tracker at `port` has at least `free[key]` free boards under each key (servers take seconds)."""
    import tvm.rpc

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            queues = tvm.rpc.connect_tracker("127.0.0.1", port).summary().get("queue_info", {})
            if all(queues.get(k, {}).get("free", 0) >= n for k, n in free.items()):
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.5)
    pytest.fail(f"the RPC tracker and servers ({free}) did not come up in {timeout:g} s")


def _stop(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(p.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def tracker():
    """A tracker and one server under key 'board', both on 127.0.0.1; yields the tracker's port."""
    port = _free_port()
    trk = _start("tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1))
    srv = _server(port, "board")
    try:
        _wait_for_boards(port, {"board": 1})
        yield port
    finally:
        _stop(srv)
        _stop(trk)


class MuteBoard:
    """A board that registers with the tracker under `key`, accepts every connection and never answers: what a
    hung or wedged rpc_server looks like to a client. Unlike a stopped real server it offers itself again after
    each connection, so every request for `key` hangs, not only the first."""

    def __init__(self, tracker_port: int, key: str):
        from tvm.rpc import base

        self.key, self.held = key, []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.trk = socket.create_connection(("127.0.0.1", tracker_port), timeout=10)
        self.trk.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        assert struct.unpack("<i", base.recvall(self.trk, 4))[0] == base.RPC_TRACKER_MAGIC
        base.sendjson(self.trk, [base.TrackerCode.UPDATE_INFO, {"key": f"server:{key}", "addr": ["127.0.0.1",
                                                                                                  self.port]}])
        assert base.recvjson(self.trk) == base.TrackerCode.SUCCESS
        self._offer()
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _offer(self) -> None:
        from tvm.rpc import base

        base.sendjson(self.trk, [base.TrackerCode.PUT, self.key, (self.port, base.random_key(self.key)), None])
        assert base.recvjson(self.trk) == base.TrackerCode.SUCCESS

    def _serve(self) -> None:
        while self.running:
            if select.select([self.listener], [], [], 0.2)[0]:
                conn, _ = self.listener.accept()
                self.held.append(conn)  # open and silent: the client waits for the handshake forever
                self._offer()

    def close(self) -> None:
        self.running = False
        self.thread.join(5)
        for s in [*self.held, self.listener, self.trk]:
            s.close()  # the clients left waiting see the connection end and finish


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    """A second tracker with two servers under key 'farm' (each logging to its own file) and a MuteBoard under
    'mute'; yields the tracker's port and the two servers' logs."""
    logs = tmp_path_factory.mktemp("farm")
    port = _free_port()
    trk = _start("tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1))
    servers = [_server(port, "farm", logs / f"server{i}.log") for i in range(2)]
    mute = None
    try:
        _wait_for_boards(port, {"farm": 2})
        mute = MuteBoard(port, "mute")
        yield SimpleNamespace(port=port, logs=[logs / f"server{i}.log" for i in range(2)])
    finally:
        if mute:
            mute.close()
        for p in [*servers, trk]:
            _stop(p)


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


def test_rpc_uri_options_are_checked(cli, builds):
    _, so, _ = builds
    rc, _, err = cli("measure", so.directory, "--device", "rpc://127.0.0.1:9190/board?speed=11")
    assert rc == 2
    assert_one_line_error(err, "unknown parameter", "speed")
    rc, _, err = cli("measure", so.directory, "--device", "rpc://127.0.0.1:9190/board?wait=soon")
    assert rc == 2
    assert_one_line_error(err, "wait and timeout are numbers")
    dev = devices.get_device("rpc://127.0.0.1:9190/board?wait=2&timeout=30")
    assert (dev.wait_free, dev.timeout, dev.uri) == (2.0, 30.0, "rpc://127.0.0.1:9190/board")


@pytest.mark.slow
def test_no_free_board_is_a_bounded_wait_then_one_line(tracker, builds, cli):
    """The only board under 'board' is held by another client: measure waits ?wait=2 s, then says so."""
    import tvm.rpc

    _, so, _ = builds
    held = tvm.rpc.connect_tracker("127.0.0.1", tracker).request("board")
    try:
        t0 = time.monotonic()
        rc, _, err = cli("measure", so.directory, "--device", f"rpc://127.0.0.1:{tracker}/board?wait=2")
        elapsed = time.monotonic() - t0
    finally:
        del held
        gc.collect()  # the board goes back to the tracker
    assert rc == 2
    assert_one_line_error(err, "no free board", "'board'", "waited 2 s")
    assert 2 <= elapsed < 10, elapsed
    print(f"no free board reported after {elapsed:.1f} s")


@pytest.mark.slow
def test_calibrate_spreads_over_every_board_under_the_key(farm, cli, tmp_path):
    table = tmp_path / "farm.json"
    rc, out, err = cli("calibrate", "--target", "host", "--device", f"rpc://127.0.0.1:{farm.port}/farm",
                       "--count", "4", "--runs", "3", "-o", table)
    assert rc == 0, err
    data = json.loads(table.read_text())
    assert [e["name"] for e in data["entries"]] == ["cal000", "cal001", "cal002", "cal003"]  # suite order
    assert all(e["ms"] > 0 for e in data["entries"])
    assert data["device"]["boards"] == 2 and data["device"]["key"] == "farm"
    assert sum(" ms" in line for line in out.splitlines()) == 4  # one progress line per measured build
    # Proof that both boards measured: each server logs "connected from" once per session it served.
    sessions = [log.read_text().count("connected from") for log in farm.logs]
    assert all(n >= 1 for n in sessions) and sum(sessions) >= 4, sessions


@pytest.mark.slow
def test_a_board_that_never_answers_fails_in_bounded_time(farm, builds, cli, tmp_path, monkeypatch):
    """The mute board accepts and stays silent: each session is given up after wait + timeout + grace
    (0 + 1 + 1 s here), measure fails in one line, and calibrate (tried twice) leaves the old table alone."""
    monkeypatch.setattr(devices, "CONNECT_GRACE", 1.0)
    mute = f"rpc://127.0.0.1:{farm.port}/mute?wait=0&timeout=1"
    _, so, _ = builds
    t0 = time.monotonic()
    rc, _, err = cli("measure", so.directory, "--device", mute)
    elapsed = time.monotonic() - t0
    assert rc == 2
    assert_one_line_error(err, "did not answer within 2 s", "'mute'")
    assert elapsed < 8, elapsed
    measured = elapsed

    table = tmp_path / "table.json"
    table.write_text('{"old": "table"}')
    t0 = time.monotonic()
    rc, _, err = cli("calibrate", "--target", "host", "--device", mute, "--count", "3", "--runs", "3", "-o", table,
                     "--quiet")
    elapsed = time.monotonic() - t0
    assert rc == 2
    assert_one_line_error(err, "cal000", "failed 2 times", "did not answer")
    assert table.read_text() == '{"old": "table"}'
    assert not list(tmp_path.glob(".table.json.*"))  # no temporary left behind either
    assert elapsed < 60, elapsed  # compiling 3 builds, then 2 attempts of 2 s
    print(f"mute board: measure failed after {measured:.1f} s, calibrate after {elapsed:.1f} s (compiling too)")


# ---------------------------------------------------------------- servers that lie (issue 18)

LIES = ("nan", "negative", "hang")


@pytest.fixture(scope="module")
def liars(tracker):
    """Under the `tracker` fixture, one hostile_rpc_server.py per lie, each under key 'liar-<lie>'; yields the
    tracker's port."""
    script = Path(__file__).with_name("hostile_rpc_server.py")
    servers = [subprocess.Popen([sys.executable, str(script), str(tracker), f"liar-{lie}", lie],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
               for lie in LIES]
    try:
        _wait_for_boards(tracker, {f"liar-{lie}": 1 for lie in LIES})
        yield tracker
    finally:
        for p in servers:
            _stop(p)


@pytest.mark.parametrize("lie", ["nan", "negative"])
def test_a_server_reporting_impossible_times_is_refused(liars, builds, cli, lie):
    """NaN or negative seconds from the server never reach a Measurement: measure and check fail in one line."""
    _, so, _ = builds
    uri = f"rpc://127.0.0.1:{liars}/liar-{lie}"
    rc, out, err = cli("measure", so.directory, "--device", uri, "--runs", "5", "--json")
    assert rc == 2 and out == ""
    assert_one_line_error(err, "impossible time", f"'liar-{lie}'", "run 1 of 5")
    rc, out, err = cli("check", so.directory, "--device", uri, "--latency", "1s", "--runs", "5")
    assert rc == 2 and "within the budget" not in out
    assert_one_line_error(err, "impossible time")


def test_a_session_that_never_ends_fails_in_bounded_time(liars, builds, cli, monkeypatch):
    """A server whose timing never returns and which ignores the session timeout: given up after wait + timeout +
    grace (0 + 1 + 1 s here), in one line."""
    monkeypatch.setattr(devices, "CONNECT_GRACE", 1.0)
    _, so, _ = builds
    t0 = time.monotonic()
    rc, _, err = cli("measure", so.directory, "--device", f"rpc://127.0.0.1:{liars}/liar-hang?wait=0&timeout=1")
    elapsed = time.monotonic() - t0
    assert rc == 2
    assert_one_line_error(err, "did not answer within 2 s", "'liar-hang'")
    assert elapsed < 8, elapsed

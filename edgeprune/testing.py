"""A pytest plugin, so a user's own suite can gate on latency with the same machinery as `edgeprune check`.

Installed with edgeprune (entry point ``pytest11``); in a test:

    def test_fits_the_budget(edgeprune_latency):
        m = edgeprune_latency("build/")            # on --edgeprune-device, local by default
        assert m.p90_ms <= 50, m.describe()

    def test_fits_the_budget_too():
        from edgeprune.testing import assert_latency
        assert_latency("build/", "rpc://127.0.0.1:9190/rpi2", budget_ms=50)

Command-line options: ``--edgeprune-device URI`` and ``--edgeprune-runs N``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class LatencyResult:
    device: str
    runs_ms: list[float]
    real_time: bool

    def _pct(self, q: float) -> float:
        import numpy as np

        return float(np.percentile(self.runs_ms, q))

    @property
    def median_ms(self) -> float:
        return self._pct(50)

    @property
    def p90_ms(self) -> float:
        return self._pct(90)

    def describe(self) -> str:
        kind = "" if self.real_time else " (emulated: not the device's latency)"
        return (f"on {self.device}: median {self.median_ms:.3f} ms, p90 {self.p90_ms:.3f} ms over "
                f"{len(self.runs_ms)} runs{kind}")


def latency(build: str | Path, device: str = "local", runs: int = 50, warmup: int = 5) -> LatencyResult:
    """Measure a build directory on a device URI (local, rpc://HOST:PORT/KEY, qemu://TARGET)."""
    from .api import measure

    m = measure(build, device, runs=runs, warmup=warmup, layers=False)
    return LatencyResult(m.device, m.runs_ms, m.real_time)


def assert_latency(build: str | Path, device: str, budget_ms: float, statistic: str = "p90",
                   runs: int = 50) -> LatencyResult:
    """Fail the calling test when the build misses its budget (p90 by default, or 'median')."""
    result = latency(build, device, runs=runs)
    if not result.real_time:
        pytest.fail(f"{device} is an emulator; its times are not latency", pytrace=False)
    value = result.p90_ms if statistic == "p90" else result.median_ms
    if value > budget_ms:
        pytest.fail(f"{build} misses its {budget_ms:g} ms budget: {statistic} {value:.3f} ms "
                    f"{result.describe()}", pytrace=False)
    return result


def pytest_addoption(parser) -> None:
    group = parser.getgroup("edgeprune", "latency of edgeprune builds")
    group.addoption("--edgeprune-device", default="local", help="device URI for edgeprune_latency (default local)")
    group.addoption("--edgeprune-runs", type=int, default=50, help="timed runs per measurement (default 50)")


@pytest.fixture
def edgeprune_device(request) -> str:
    return request.config.getoption("--edgeprune-device")


@pytest.fixture
def edgeprune_latency(request, edgeprune_device):
    """A function: build directory -> LatencyResult on the session's device."""
    runs = request.config.getoption("--edgeprune-runs")

    def measure(build: str | Path) -> LatencyResult:
        return latency(build, edgeprune_device, runs=runs)

    return measure

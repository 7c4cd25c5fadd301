"""The published ARM figures bench/prior.py fits the targets' latency prior to: every figure carries the facts of its
board known without timing it, and the facts the fit uses are read the way they are recorded."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeprune.targets import get_target

BENCH = Path(__file__).resolve().parents[1] / "bench" / "prior.py"


@pytest.fixture(scope="module")
def prior():
    spec = importlib.util.spec_from_file_location("bench_prior", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_every_figure_carries_its_boards_facts(prior):
    figs = prior.figures()
    assert len(figs) >= 60
    for f in figs:
        cores = get_target(prior.CORES[f.core]).cores
        assert 1 <= f.threads <= cores and 0.5 <= f.ghz <= 2.0
        assert f.os in ("android", "linux") and f.bits in ("32", "64", "?")
        assert f.runtime in ("ncnn", "XNNPACK", "TVM") and f.precision in ("fp32", "int8")
        if f.core == "A7":
            assert f.bits == "32"  # ARMv7-A: no 64-bit mode
    # one board, one set of facts: the facts describe the board and its build, not a figure
    by_board: dict[str, set] = {}
    for f in figs:
        by_board.setdefault(f.board, set()).add((f.core, f.ghz, f.runtime, f.version, f.os, f.bits))
    assert all(len(v) == 1 for v in by_board.values())
    assert {b for b, v in by_board.items() if next(iter(v))[4] == "android"} == {"i.MX7D ncnn", "Snapdragon 410 ncnn"}


def test_the_fit_reads_the_board_facts(prior):
    """The Android build's factor applies to ncnn figures of Android boards only; a board's clock scales its figure;
    SqueezeNet is priced at benchncnn's 227 px for ncnn."""
    rows = {"squeezenet1.1-224": [_pointwise()], "mobilenetv1-1.0-224": [_pointwise()]}
    target = get_target("cortex-a7")
    theta = prior.CORE_START.copy()
    runtime = prior.RUNTIME_START.copy()
    runtime[3] = np.log(1.5)  # an Android NDK build of ncnn 1.5x as fast as a Linux one

    def fig(**kw):
        base = dict(board="b", core="A7", ghz=1.0, threads=1, runtime="ncnn", version="2022-01-03", os="linux",
                    bits="32", network="mobilenetv1-1.0-224", precision="fp32", ms=1.0)
        return prior.Figure(**{**base, **kw})

    linux = prior.predict(target, theta, runtime, fig(), rows)
    assert prior.predict(target, theta, runtime, fig(os="android"), rows) == pytest.approx(linux / 1.5)
    assert prior.predict(target, theta, runtime, fig(os="android", runtime="XNNPACK"), rows) == pytest.approx(linux)
    overhead = np.exp(theta[3]) / 1e3
    assert prior.predict(target, theta, runtime, fig(ghz=2.0), rows) - overhead == pytest.approx((linux - overhead) / 2)
    squeeze = prior.predict(target, theta, runtime, fig(network="squeezenet1.1-224"), rows)
    assert squeeze == pytest.approx(linux * (227 / 224) ** 2)


def _pointwise():
    from edgeprune.cost import rows

    return rows.conv(64, 64, 1, 1, 28)


def test_depthwise_meets_the_bandwidth_before_pointwise_does():
    """The fitted prior's memory roofline: on an A72, a depthwise layer stops scaling with threads at the board's
    bandwidth (its bytes times PRIOR_TRAFFIC), while a wide 1x1 convolution keeps scaling as t ** thread_scaling."""
    from edgeprune.cost import rows
    from edgeprune.cost.model import PRIOR_TRAFFIC, LatencyModel, memory_ms

    a72 = get_target("cortex-a72")
    overhead = a72.prior_overhead_us / 1e3
    dw, pw = rows.conv(96, 96, 3, 1, 112, depthwise=True), rows.conv(256, 256, 1, 1, 28)  # MobileNetV2's, ResNet's
    one, four = LatencyModel(a72, threads=1), LatencyModel(a72, threads=4)
    assert four.predict([dw]).ms - overhead == pytest.approx(PRIOR_TRAFFIC * memory_ms(dw, a72))
    assert (one.predict([dw]).ms - overhead) / (four.predict([dw]).ms - overhead) < 4 ** a72.prior_thread_scaling
    assert (one.predict([pw]).ms - overhead) / (four.predict([pw]).ms - overhead) == pytest.approx(
        4 ** a72.prior_thread_scaling)

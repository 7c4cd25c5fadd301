"""The pytest plugin: a user's own suite gates on latency with edgeprune_latency / assert_latency."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgeprune.codegen.build import compile_model

pytest_plugins = ["pytester"]


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin")
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.ReLU()).eval()
    path = root / "m.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 16, 16),), str(path), opset_version=17, dynamo=False,
                      input_names=["input"])
    return compile_model(path, "host", root / "build").directory


def test_user_suite_passes_and_fails_on_the_budget(pytester, build_dir):
    pytester.makepyfile(f"""
        from edgeprune.testing import assert_latency

        def test_generous(edgeprune_latency):
            m = edgeprune_latency({str(build_dir)!r})
            assert m.p90_ms <= 10_000, m.describe()
            assert m.real_time and len(m.runs_ms) == 7

        def test_impossible():
            assert_latency({str(build_dir)!r}, "local", budget_ms=1e-6, runs=5)
    """)
    result = pytester.runpytest("--edgeprune-runs", "7")  # the plugin loads through its pytest11 entry point
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*misses its 1e-06 ms budget: p90*"])

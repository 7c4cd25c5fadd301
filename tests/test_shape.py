"""The house's shape: the Python API, typed hand-offs from an in-memory network to a build, kernel families chosen by
tags, and cost rows that a subnet's analytic pricing and its compiled build make the same way."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import assert_close
from torch import nn

import edgeprune
from edgeprune.artifacts import LayerPlan, Network


class Tiny(nn.Module):
    """A stem, an inverted residual (pointwise, depthwise 5x5, projection with the residual add), a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU6())
        self.expand = nn.Sequential(nn.Conv2d(16, 48, 1), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(48, 48, 5, 1, 2, groups=48), nn.ReLU6())
        self.project = nn.Conv2d(48, 16, 1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.depthwise(self.expand(x)))
        return self.head(x.mean((2, 3)))


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    torch.manual_seed(0)
    module = Tiny().eval()
    out = tmp_path_factory.mktemp("api") / "build"
    return module, edgeprune.compile(module, "host", out, input_shape=(1, 3, 32, 32), name="tiny")


def test_api_compiles_a_torch_module_in_memory_and_runs_it(tiny_build):
    module, build = tiny_build
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    (y,) = edgeprune.run(build, x.numpy())
    with torch.no_grad():
        assert_close(y, module(x).numpy())  # independent reference: PyTorch itself
    # The in-memory network's ONNX form is kept in the build as its source, so the build can be rebuilt from it.
    assert (build.directory / "model.onnx").is_file() and build.source.endswith("model.onnx")
    assert edgeprune.load(build.directory).layers == build.layers


def test_compiled_rows_say_what_each_kernel_does_and_name_the_users_layers(tiny_build):
    _, build = tiny_build
    compute = [r for r in build.layers if r.op != "data"]
    assert [r.op for r in compute] == ["conv", "pointwise", "depthwise", "pointwise", "reduce", "matmul"]
    assert all(r.family == "dense" and r.weight_bits == 32 and r.density == 1.0 for r in compute)
    by_op = {r.op: r for r in compute}
    assert by_op["depthwise"].macs == 16 * 16 * 48 * 25
    assert by_op["conv"].macs == 16 * 16 * 16 * 27
    # The user's names (ONNX nodes of the exported module), not TVM's fused-kernel names.
    named = [r.sources for r in compute if r.op in ("conv", "pointwise", "depthwise", "matmul")]
    assert all(len(s) == 1 for s in named), named
    assert "stem" in named[0][0] and "expand" in named[1][0] and "depthwise" in named[2][0]
    assert "project" in named[3][0] and "head" in named[4][0]


def test_measure_and_check_through_the_api(tiny_build):
    _, build = tiny_build
    m = edgeprune.measure(build, "local", runs=10, warmup=2)
    assert m.median_ms > 0 and m.layers
    assert any(row["sources"] for row in m.layers)  # the profile speaks the user's layer names too
    assert edgeprune.check(build, 1e6, "local", runs=5, warmup=1).met
    assert not edgeprune.check(build, 1e-6, "local", runs=5, warmup=1).met
    with pytest.raises(edgeprune.UserError, match="statistic"):
        edgeprune.check(build, 1.0, statistic="p99")


def test_a_layer_planned_for_a_kernel_not_built_yet_is_refused(tmp_path):
    net = Network(Tiny().eval(), (1, 3, 32, 32), plan={"expand.0": LayerPlan("expand.0", "int8", weight_bits=8,
                                                                                act_bits=8)})
    with pytest.raises(edgeprune.UserError, match="int8"):
        edgeprune.compile(net, "host", tmp_path / "b")
    assert not (tmp_path / "b").exists()
    with pytest.raises(edgeprune.UserError, match="input_shape"):
        edgeprune.compile(Tiny(), "host", tmp_path / "b")


def test_python_dash_m_is_the_command_line():
    proc = subprocess.run([sys.executable, "-m", "edgeprune", "targets", "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "cortex-a7" in proc.stdout
    assert {t.name for t in edgeprune.targets()} >= {"host", "cortex-a7", "cortex-a53", "cortex-m7"}


@pytest.mark.slow
def test_a_subnet_priced_before_compiling_gets_the_rows_its_build_reports(tmp_path):
    """The search prices a subnet from its architecture; the compiled subnet's kernels report their own rows. Both
    come from cost.rows: the same classes in the same order, the same MACs, the same bytes."""
    from edgeprune.search import space as S
    from edgeprune.search.select import architecture_network

    arch = S.Space(resolutions=(64,)).sample(np.random.default_rng(3))
    build = edgeprune.compile(architecture_network(arch, 0), "host", tmp_path / "b")
    analytic = [r for r in S.layers(arch) if r.op != "data"]
    compiled = [r for r in build.layers if r.op != "data"]
    assert [r.op for r in compiled] == [r.op for r in analytic]
    assert [r.macs for r in compiled] == [r.macs for r in analytic]
    weights = [(a.weight_bytes, c.weight_bytes) for a, c in zip(analytic, compiled)]
    assert all(a == c for a, c in weights), weights
    assert [r.act_bytes for r in compiled] == [r.act_bytes for r in analytic]


def test_kernel_families_size_tiles_from_the_target_and_take_only_their_own_kernels():
    import tvm
    from tvm import tirx

    from edgeprune.codegen.kernels import CpuSpec, dense
    from edgeprune.codegen.kernels.common import FAMILY
    from edgeprune.targets import get_target

    def spec(**t):
        return CpuSpec.of(tvm.target.Target({"kind": "llvm", **t}))

    assert spec(mtriple="x86_64-linux-gnu", mcpu="znver4").lanes == 16
    assert spec(mtriple="x86_64-linux-gnu", mcpu="cascadelake").lanes == 16
    assert spec(mtriple="x86_64-linux-gnu", mcpu="haswell").lanes == 8
    assert spec(mtriple="x86_64-linux-gnu", mcpu="znver4", mattr=["-avx512f"]).lanes == 8
    # Zen 4 runs 512-bit operations as two halves; Zen 5 and Cascade Lake have full-width units
    assert spec(mtriple="x86_64-linux-gnu", mcpu="znver4").split_512
    assert not spec(mtriple="x86_64-linux-gnu", mcpu="znver5").split_512
    assert not spec(mtriple="x86_64-linux-gnu", mcpu="cascadelake").split_512
    assert CpuSpec.of(get_target("cortex-a7").tvm_target()) == CpuSpec(4, 12)
    assert CpuSpec.of(get_target("cortex-a53").tvm_target()) == CpuSpec(4, 24)
    assert CpuSpec.of(get_target("cortex-m7").tvm_target()).lanes == 1

    func = tirx.PrimFunc([], tirx.Evaluate(0))
    target = get_target("host").tvm_target()
    for rule in dense.RULES:
        assert rule.apply(func.with_attr(FAMILY, "int8"), target, False) is None
    assert dense.ours(func.with_attr(FAMILY, "dense")) and not dense.ours(func.with_attr(FAMILY, "bsr"))

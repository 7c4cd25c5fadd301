"""Every zoo network, at both its sizes, compiled for the host: its outputs match ONNX Runtime on the same .onnx
file, and (for a few networks) PyTorch eager on a .pt2 export.

Tolerance (helpers.assert_close): 1e-4 relative to the output's scale, i.e. rtol=1e-4 and
atol=1e-4 * max(1, |ref|.max()).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import assert_close

from edgeprune.artifacts import Build
from edgeprune.codegen.build import compile_model
from edgeprune.measure.local import Session
from edgeprune.models import zoo

pytestmark = pytest.mark.slow



def _params(cases):
    return [pytest.param(n, r, id=f"{n}-{r}") for n, r in cases]


def _input(res: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 3, res, res)).astype(np.float32)


class Builds:
    """Exports and compiles each zoo case once per module, on first use."""

    def __init__(self, root: Path):
        self.root = root
        self.cache: dict[tuple, tuple] = {}

    def onnx(self, name: str, res: int) -> tuple[Path, Build]:
        key = ("onnx", name, res)
        if key not in self.cache:
            model, x = zoo.make(name, res)
            path = zoo.export_onnx(model, x, self.root / f"{name}-{res}.onnx")
            self.cache[key] = (path, None)
            self.cache[key] = (path, compile_model(path, "host", self.root / f"{name}-{res}.onnx.build"))
        path, build = self.cache[key]
        if build is None:
            pytest.fail("the compile failed in an earlier test")
        return path, build


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> Builds:
    return Builds(tmp_path_factory.mktemp("zoo"))


@pytest.mark.parametrize("name,res", _params(zoo.cases()))
def test_onnx_matches_onnxruntime(builds, name, res):
    path, build = builds.onnx(name, res)
    x = _input(res)
    (ref,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    assert [(s.name, s.shape, s.dtype) for s in build.inputs] == [("input", (1, 3, res, res), "float32")]
    assert [s.shape for s in build.outputs] == [ref.shape]
    (ours,) = Session(build).run([x])
    assert ours.dtype == np.float32
    assert_close(ours, ref)


@pytest.mark.parametrize("name,res", _params(zoo.cases()[:2]))
def test_reloaded_build_gives_the_same_outputs(builds, name, res):
    """A build directory loaded afresh (Build.load, new VM) computes bit-identical outputs, run after run."""
    _, build = builds.onnx(name, res)
    x = _input(res, seed=1)
    (first,) = Session(build).run([x])
    loaded = Build.load(build.directory)
    assert loaded.to_json() == build.to_json()
    sess = Session(loaded)
    for _ in range(2):
        (again,) = sess.run([x])
        np.testing.assert_array_equal(again, first)


# shufflenet: torch.chunk, channel shuffle, cat; pooling: average pooling with
# count_include_pad both ways, at an odd size; grouped: grouped, depthwise and dilated convolutions.
PT2_CASES = [("shufflenet", 32), ("pooling", 35), ("grouped", 40)]


@pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")  # torch.export.load, inside torch
@pytest.mark.parametrize("name,res", PT2_CASES, ids=[f"{n}-{r}" for n, r in PT2_CASES])
def test_pt2_matches_torch(tmp_path, name, res):
    model, x = zoo.make(name, res)
    path = zoo.export_pt2(model, x, tmp_path / f"{name}.pt2")
    build = compile_model(path, "host", tmp_path / "build")
    assert [(s.shape, s.dtype) for s in build.inputs] == [((1, 3, res, res), "float32")]
    x = torch.from_numpy(_input(res, seed=2))
    with torch.no_grad():
        ref = model(x).numpy()
    (ours,) = Session(build).run([x.numpy()])
    assert_close(ours, ref)

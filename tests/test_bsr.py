"""The block-sparse kernel family (codegen/kernels/bsr.py): 1xN zeros found in any model's constant weights, compiled
with BSR kernels that match onnxruntime on the dense twin (the same weights, zeros included) within 1e-4 relative,
on host (both kernels), cortex-a7 and cortex-a53 (C packages under qemu-user); chosen per layer by the latency model.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import assert_close
from torch import nn

from edgeprune.codegen.build import compile_model
from edgeprune.codegen.kernels import bsr
from edgeprune.measure import package
from edgeprune.models import zoo


class Net(nn.Module):
    """Every shape of layer the family takes: a 1x1 convolution with BatchNorm and ReLU6, one with a residual add, a
    3x3 convolution between (stays dense), a dense layer; 7x9 maps, so pixel tiles do not divide evenly."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.expand = nn.Sequential(nn.Conv2d(32, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU6())
        self.mix = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.project = nn.Conv2d(64, 32, 1)
        self.fc = nn.Linear(32, 16)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.mix(self.expand(x)))
        return self.fc(x.mean((2, 3)))


def block_sparse(model: nn.Module, n: int, sparsity: float, seed: int = 0) -> nn.Module:
    """Zero a random `sparsity` of the 1xN blocks (N output channels x 1 input channel) of every 1x1 convolution
    and linear layer that reads more than 3 channels."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.shape[1] > 3 and m.weight[0, 0].numel() == 1:
                cout, cin = m.weight.shape[:2]
                keep = (torch.rand(cout // n, cin, generator=g) >= sparsity).float().repeat_interleave(n, 0)
                m.weight.mul_(keep.view(m.weight.shape))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1, generator=g)
                m.running_var.uniform_(0.5, 2, generator=g)
    return model.eval()


def run_so(build, x: np.ndarray) -> np.ndarray:
    from edgeprune.measure.local import Session

    return Session(build).run([x])[0]


@pytest.fixture(scope="module")
def sparse_onnx(tmp_path_factory):
    torch.manual_seed(0)
    model = block_sparse(Net(), 4, 0.6)
    x = torch.randn(1, 3, 7, 9)
    path = zoo.export_onnx(model, x, tmp_path_factory.mktemp("bsr") / "net.onnx")
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    return path, x.numpy(), ref, model


def test_bsr_storage_round_trips_and_finds_the_block_size():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 32)).astype("float32")
    keep = rng.random((24, 4)) > 0.5  # 1x8 blocks
    w *= np.repeat(keep, 8, axis=1)
    b = bsr.to_bsr(w, 8)
    dense = np.zeros_like(w)
    for row in range(32 // 8):
        for j in range(b.indptr[row], b.indptr[row + 1]):
            dense[b.indices[j], row * 8:(row + 1) * 8] = b.data[j]
    np.testing.assert_array_equal(dense, w)
    assert b.density == pytest.approx(keep.mean())
    # 1x8 zeros are 1x4 zeros too, at the same density: the widest N is offered first, 1x16 is not (denser)
    options = bsr.candidates(w)
    assert [n for n, _ in options] == [8, 4]
    assert bsr.candidates(rng.standard_normal((24, 32)).astype("float32")) == []  # no zero blocks: dense


@pytest.mark.parametrize("variant", ["pixels", "channels"])
def test_host_kernels_match_onnxruntime(sparse_onnx, variant):
    import tvm
    from tvm import relax

    from edgeprune.codegen.importers import import_model
    from edgeprune.codegen.lower import compile_module
    from edgeprune.targets import get_target

    path, x, ref, _ = sparse_onnx
    chosen = []

    def choose(kernel, dense, options):
        chosen.append(kernel)
        return f"{variant}:4"

    ex, scheduled = compile_module(import_model(path).mod, get_target("host").tvm_target(), sparse=choose)
    families = [str(f.attrs["edgeprune.family"]) for _, f in scheduled.functions_items()
                if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(chosen) == 3 and families.count("bsr") == 3  # expand, project (+ residual), fc
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    assert_close(out, ref)


def test_build_reports_each_layers_choice(sparse_onnx, tmp_path, cli):
    path, x, ref, _ = sparse_onnx
    build = compile_model(path, "host", tmp_path / "b", sparse="sparse")
    rows = [r for r in build.layers if r.family == "bsr"]
    assert len(rows) == 3 and all(r.block == 4 and 0.3 < r.density < 0.5 for r in rows)
    assert all(r.macs < r.shapes[-1][-1] * np.prod(r.shapes[-1][:-1]) * r.shapes[1][-2] for r in rows)
    saved = json.loads((tmp_path / "b" / "build.json").read_text())
    assert sum(layer["family"] == "bsr" for layer in saved["layers"]) == 3
    assert_close(run_so(build, x), ref)
    dense = compile_model(path, "host", tmp_path / "d", sparse="dense")
    assert not any(r.family == "bsr" for r in dense.layers)
    rc, out, err = cli("compile", path, "-o", tmp_path / "c", "--sparse", "sparse")
    assert rc == 0 and "block-sparse: 3 layers" in out, err


def test_auto_compiles_sparse_where_the_model_prices_it_faster(tmp_path):
    from edgeprune.codegen.choose import chooser
    from edgeprune.codegen.kernels import dense
    from edgeprune.targets import get_target

    choose = chooser("auto", get_target("host"))
    shape_in, weight, shape_out = (1, 28, 28, 256), (1, 1, 256, 256), (1, 28, 28, 256)
    dense_row = dense.cost_row("pointwise", [shape_in], [weight], [shape_out], 256, "k")

    def option(density):
        tags = {bsr.BLOCK: 4, bsr.DENSITY: density, bsr.VARIANT: "pixels"}
        return [("pixels:4", bsr.cost_row("pointwise", [shape_in], [weight], [shape_out], 256, "k", tags=tags))]

    assert choose("k", dense_row, option(0.25)) == "pixels:4"  # a quarter of the work: sparse
    assert choose("k", dense_row, option(0.9)) is None  # 10% fewer MACs at a lower rate: dense
    # and end to end: a wide 1x1 layer at 75% 1x4 sparsity compiles sparse, a tiny one stays dense
    wide = block_sparse(nn.Sequential(nn.Conv2d(256, 256, 1), nn.ReLU()), 4, 0.75)
    x = torch.randn(1, 256, 28, 28)
    build = compile_model(zoo.export_onnx(wide, x, tmp_path / "wide.onnx"), "host", tmp_path / "b", sparse="auto")
    assert [r.family for r in build.layers if r.op == "pointwise"] == ["bsr"]
    with torch.no_grad():
        assert_close(run_so(build, x.numpy()), wide(x).numpy())


def test_the_model_keeps_narrow_layers_dense_where_their_transposes_outweigh_the_skipped_work():
    """The sparse price has a per-input and per-output term the density does not shrink (bench/sparse.py: 1x4 at 50%
    on 112x112, 32 -> 16 runs 0.89x its dense kernel, on 7x7, 320 -> 1280 1.59x)."""
    from edgeprune.codegen.choose import chooser
    from edgeprune.codegen.kernels import dense
    from edgeprune.cost.model import model_for
    from edgeprune.targets import get_target

    target = get_target("host")
    model, choose = model_for(target), chooser("auto", target)

    def prices(h, k, m, density):
        shape_in, weight, shape_out = (1, h, h, k), (1, 1, k, m), (1, h, h, m)
        dense_row = dense.cost_row("pointwise", [shape_in], [weight], [shape_out], k, "k")
        tags = {bsr.BLOCK: 4, bsr.DENSITY: density, bsr.VARIANT: "pixels"}
        sparse_row = bsr.cost_row("pointwise", [shape_in], [weight], [shape_out], k, "k", tags=tags)
        return dense_row, sparse_row

    narrow, wide = prices(112, 32, 16, 0.5), prices(7, 320, 1280, 0.5)
    ratio = [model.layer_ms(s)[0] / model.layer_ms(d)[0] for d, s in (narrow, wide)]
    assert ratio[0] > 1.0 > ratio[1]  # same density, opposite choices
    assert choose("k", narrow[0], [("pixels:4", narrow[1])]) is None
    assert choose("k", wide[0], [("pixels:4", wide[1])]) == "pixels:4"
    # the skipped work still counts: at 90% the narrow layer goes sparse too
    sparser = prices(112, 32, 16, 0.1)
    assert choose("k", sparser[0], [("pixels:4", sparser[1])]) == "pixels:4"


def test_maps_smaller_than_a_vector_are_priced_and_run_with_vectors_of_pixels():
    """A small subnet's last stages run 1x4 layers on 3x3 maps: a vector of 16 pixels holds 9. Measured (Zen 5,
    960 -> 320 at 3x3): the pixels kernel ran as fast as dense at 50% and 1.9x faster at 75%, the channels kernel
    2.8x slower than pixels. So the model prices the kept MACs of such a layer at 9/16 of the rate of a map that
    fills its vectors, and the kernel vectorizes over pixels unless the map has fewer pixels than the block has
    outputs."""
    from edgeprune.codegen.kernels.common import CpuSpec
    from edgeprune.cost.model import bsr_efficiency
    from edgeprune.targets import get_target

    target = get_target("host")

    def efficiency(h, n=4):
        shape_in, weight, shape_out = (1, h, h, 960), (1, 1, 960, 320), (1, h, h, 320)
        tags = {bsr.BLOCK: n, bsr.DENSITY: 0.5, bsr.VARIANT: "pixels"}
        return bsr_efficiency(bsr.cost_row("pointwise", [shape_in], [weight], [shape_out], 960, "k", tags=tags),
                              target)

    lanes = target.simd_lanes
    full = int(lanes ** 0.5) if int(lanes ** 0.5) ** 2 == lanes else 8  # a map of whole vectors: 4x4 (16), 8x8
    # the kept MACs' rate falls with the share of the vector the map fills (the fixed terms barely move it)
    assert efficiency(3) / efficiency(full) == pytest.approx(9 / (-(-9 // lanes) * lanes), rel=0.05)
    assert efficiency(3, n=lanes) == efficiency(full, n=lanes)  # a block as wide as a vector: outputs fill it
    spec = CpuSpec(16, 24)
    assert bsr.preferred(spec, 4, 9)[0] == "pixels" and bsr.preferred(spec, 8, 25)[0] == "pixels"
    assert bsr.preferred(spec, 8, 1)[0] == "channels"  # one pixel: a vector of 8 outputs is the fuller one


def test_dense_enough_weights_stay_dense(tmp_path):
    torch.manual_seed(1)
    model = block_sparse(Net(), 4, 0.05)  # 5% of blocks zero: below what the family looks at
    x = torch.randn(1, 3, 7, 9)
    path = zoo.export_onnx(model, x, tmp_path / "dense.onnx")
    build = compile_model(path, "host", tmp_path / "b", sparse="sparse")
    assert not any(r.family == "bsr" for r in build.layers)


def test_sparsity_is_found_in_a_torch_export(tmp_path):
    torch.manual_seed(2)
    model = block_sparse(Net(), 8, 0.7)
    x = torch.randn(1, 3, 7, 9)
    pt2 = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(model, (x,)), pt2)
    build = compile_model(pt2, "host", tmp_path / "b", sparse="sparse")
    rows = [r for r in build.layers if r.family == "bsr"]
    assert len(rows) == 3 and {r.block for r in rows} == {8}
    with torch.no_grad():
        assert_close(run_so(build, x.numpy()), model(x).numpy())


@pytest.mark.slow
@pytest.mark.parametrize("target", ["cortex-a7", "cortex-a53"])
def test_arm_packages_match_onnxruntime_under_qemu(sparse_onnx, tmp_path, target):
    path, x, ref, _ = sparse_onnx
    build = compile_model(path, target, tmp_path / "pkg", fmt="c", sparse="sparse")
    assert sum(r.family == "bsr" for r in build.layers) == 3
    assert_close(package.run(build, [x], f"qemu://{target}")[0], ref)


def test_squeeze_excite_and_hardswish_tails(tmp_path):
    """MobileNetV3's tails: hardswish after a pointwise layer is rebuilt onto the sparse accumulators; a squeeze-excite
    gate (a 1x1 layer on a 1x1 map whose tail multiplies a whole feature map) is not one output per MAC and stays
    dense. The network matches onnxruntime either way."""
    from edgeprune.compress.block1xn import apply_masks
    from edgeprune.models.reference import MobileNetV3Small

    torch.manual_seed(3)
    model = MobileNetV3Small(1.0).eval()
    apply_masks(model, 0.6, 4)
    x = torch.randn(1, 3, 64, 64)
    path = zoo.export_onnx(model, x, tmp_path / "v3.onnx")
    build = compile_model(path, "host", tmp_path / "b", sparse="sparse")
    assert sum(r.family == "bsr" for r in build.layers) >= 10
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    assert_close(run_so(build, x.numpy()), ref)


def test_identical_layers_sharing_a_kernel_each_get_their_own(tmp_path):
    """Identical layers share one fused dense kernel, called with their own weights: each call is made sparse on
    its own weights (MobileNetV2 repeats its blocks: 24 of its 34 pointwise layers share a kernel)."""
    torch.manual_seed(4)
    model = block_sparse(nn.Sequential(nn.Conv2d(32, 64, 1), nn.ReLU(), nn.Conv2d(64, 64, 1), nn.ReLU(),
                                       nn.Conv2d(64, 64, 1), nn.ReLU(), nn.Conv2d(64, 64, 1)), 4, 0.5)
    x = torch.randn(1, 32, 14, 14)
    build = compile_model(zoo.export_onnx(model, x, tmp_path / "m.onnx"), "host", tmp_path / "b", sparse="sparse")
    rows = [r for r in build.layers if r.family == "bsr"]
    assert len(rows) == 4 and len({r.kernel for r in rows}) == 4
    with torch.no_grad():
        assert_close(run_so(build, x.numpy()), model(x).numpy())


def test_bad_sparse_modes_are_one_line_errors(sparse_onnx, tmp_path):
    import edgeprune

    path = sparse_onnx[0]
    with pytest.raises(edgeprune.UserError, match="unknown sparse mode 'lots'; one of: auto, sparse, dense"):
        compile_model(path, "host", tmp_path / "b", sparse="lots")
    for bad, needle in (("lots", "give a fraction"), (1.5, "below 1")):
        with pytest.raises(edgeprune.UserError, match=needle) as e:
            edgeprune.build("host", 1.0, tmp_path / "o", sparsity=bad)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "b").exists() and not (tmp_path / "o").exists()


def test_channels_first_tiles_are_even_and_split_rows_rather_than_starve_the_fma_units():
    from edgeprune.codegen.kernels.bsr import _even_tiles

    # 7x7 at 16 lanes is 3 vectors (and a spare pixel): one tile, its rows split between 2 threads, not 2 tiles
    assert _even_tiles(3, 6, 2, threads=2, rows=40) == 1
    # 14x14 at 16 lanes is 13 vectors: 4 tiles (4, 3, 3, 3: 7 and 6 vectors a thread), not 4, 4, 4, 1
    assert _even_tiles(13, 6, 2, threads=2, rows=24) == 4
    # never more vectors a tile than the registers hold, nor fewer than hide the FMA latency
    for vectors in range(1, 60):
        count = _even_tiles(vectors, 6, 2, threads=2, rows=24)
        assert -(-vectors // count) <= 6 and (vectors // count >= 2 or vectors < 4)

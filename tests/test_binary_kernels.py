"""The binary kernel family (codegen/kernels/binary.py, codegen/binarized.py): bit-packed convolutions bit-exact
against a numpy reference of the same arithmetic, on host and (C packages under qemu-user) on cortex-a7 and
cortex-a53; the reference against PyTorch's float binary convolution; popcounts by CPU; whole networks with their
binary layers compiled as these kernels, against PyTorch."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import tvm
from helpers import assert_close
from torch import nn
from tvm.target import Target

from edgeprune.codegen.binarized import compile_binarized
from edgeprune.codegen.kernels import binary as B
from edgeprune.compress import binary
from edgeprune.errors import UserError
from edgeprune.measure import package
from edgeprune.measure.local import Session
from edgeprune.targets import get_target

HOST = get_target("host").tvm_target()


def _codes(rng, conv: B.Conv) -> np.ndarray:
    values = [-1, 1] if conv.codes == "pm1" else [0, 1]
    return rng.choice(values, size=(conv.cout, conv.cin, *conv.kernel)).astype(np.int8)


def _same(got: np.ndarray, conv: B.Conv, **ref) -> None:
    """Bit-exact: integers and bits exactly; floats exactly too, each element equal to the reference with the
    epilogue's multiply-add rounded once (where LLVM fused it) or twice (where it did not)."""
    if conv.out != "float":
        np.testing.assert_array_equal(got, B.reference(conv, **ref))
        return
    fused, plain = B.reference(conv, fused=True, **ref), B.reference(conv, fused=False, **ref)
    assert np.all((got == fused) | (got == plain)), f"{np.sum((got != fused) & (got != plain))} elements differ"


def _run_host(conv: B.Conv, kind: str | None = None, seed: int = 0):
    """One kernel on random data: (its output, the reference's inputs)."""
    rng = np.random.default_rng(seed)
    codes = _codes(rng, conv)
    mul = rng.standard_normal(conv.cout).astype(np.float32)
    add = rng.standard_normal(conv.cout).astype(np.float32)
    thr = (0.2 * rng.standard_normal(conv.cin)).astype(np.float32)
    nxt = (0.5 * rng.standard_normal(conv.cout)).astype(np.float32) if conv.out == "bits" else None
    x = (rng.standard_normal((1, conv.height, conv.width, conv.cin)) + 0.3).astype(np.float32)
    res = rng.standard_normal((1, conv.oh, conv.ow, conv.cout)).astype(np.float32) if conv.residual else None
    consts = B.constants(conv, codes, mul, add, thr, nxt)
    inp = B.pack_bits(x >= thr, conv.word) if conv.act == "packed" else x
    ref = dict(x=x, codes=codes, mul=mul, add=add, threshold=thr, residual=res, next_threshold=nxt)
    out_shape = B.reference(conv, **ref).shape
    out_dtype = {"float": "float32", "int": "int32", "bits": conv.udtype}[conv.out]
    lib = tvm.tirx.build(tvm.IRModule({"main": B.kernel(conv, HOST, 2, kind).with_attr("global_symbol", "main")}),
                         target=HOST)
    args = [inp, *consts.arrays(conv), *([res] if conv.residual else []), np.zeros(out_shape, out_dtype)]
    args = [tvm.runtime.tensor(a) for a in args]
    lib["main"](*args)
    return args[-1].numpy(), ref


CASES = {
    "xnor-int": B.Conv(9, 7, 70, 16, out="int"),
    "and-int": B.Conv(9, 7, 70, 16, codes="01", out="int"),
    "xnor-float-residual-hardtanh": B.Conv(9, 7, 70, 16, residual=True, clamp=(-1.0, 1.0)),
    "and-stride2-relu": B.Conv(10, 9, 64, 24, stride=(2, 2), codes="01", clamp=(0.0, None)),
    "sample-mean": B.Conv(8, 8, 33, 8, act="sample-mean", out="int"),
    "packed-input-dilated": B.Conv(11, 9, 130, 16, dilation=(2, 2), padding=(2, 2), act="packed", out="int"),
    "no-padding-5x5": B.Conv(9, 9, 40, 12, kernel=(5, 5), padding=(0, 0), out="int"),
    "bits-out": B.Conv(7, 7, 64, 72, codes="01", out="bits", clamp=(-1.0, 1.0)),
    "32-bit-words": B.Conv(6, 6, 48, 16, word=32, out="int"),
}


@pytest.mark.parametrize("case", CASES)
def test_host_kernels_are_bit_exact(case):
    conv = CASES[case]
    if conv.word == 32:  # a 32-bit-word kernel is what an ARM target builds; host packs 64: check the guard
        with pytest.raises(UserError, match="64-bit words"):
            B.kernel(conv, HOST)
        return
    got, ref = _run_host(conv)
    _same(got, conv, **ref)


def test_scalar_popcount_kernel_is_bit_exact():
    """The kernel a CPU without VPOPCNTDQ runs (scalar counts), here on this host."""
    for conv in (CASES["xnor-float-residual-hardtanh"], CASES["and-stride2-relu"]):
        got, ref = _run_host(conv, "scalar", seed=1)
        _same(got, conv, **ref)


def test_padding_is_zero_not_minus_one():
    """A padded position contributes 0: with all codes +1 and all inputs below the threshold (-1), a corner output
    of a 3x3 window sums 4 taps (-4 x Cin), an edge one 6, the interior 9."""
    conv = B.Conv(5, 5, 64, 8, out="int")
    codes = np.ones((8, 64, 3, 3), np.int8)
    x = -np.ones((1, 5, 5, 64), np.float32)
    d = B.reference_dot(conv, x, codes)[0, :, :, 0]
    assert (d[0, 0], d[0, 2], d[2, 2]) == (-4 * 64, -6 * 64, -9 * 64)
    consts = B.constants(conv, codes, np.ones(8), None)
    lib = tvm.tirx.build(tvm.IRModule({"main": B.kernel(conv, HOST).with_attr("global_symbol", "main")}), target=HOST)
    args = [tvm.runtime.tensor(a) for a in [x, *consts.arrays(conv), np.zeros((1, 5, 5, 8), np.int32)]]
    lib["main"](*args)
    np.testing.assert_array_equal(args[-1].numpy()[0, :, :, 0], d)


@pytest.mark.parametrize("method,stride", [("sign", 1), ("recu", 2), ("siman", 1)])
def test_reference_matches_pytorchs_float_binary_conv(method, stride):
    """reference() from a layer's BinaryWeights alone equals compress/binary.py's float convolution."""
    torch.manual_seed(0)
    conv = nn.Conv2d(40, 24, 3, stride, 1, bias=True)
    layer = {"sign": binary.SignConv2d, "recu": binary.ReCUConv2d, "siman": binary.SiMaNConv2d}[method](conv).eval()
    layer.act_threshold.uniform_(-0.2, 0.2)
    bw = binary.binary_layers(nn.Sequential(layer))["0"]
    x = torch.randn(1, 40, 11, 9)
    kconv = B.Conv(11, 9, 40, 24, stride=(stride, stride), codes=bw.code_set,
                   act="sample-mean" if bw.act_mode == "sample-mean" else "static")
    ours = B.reference(kconv, x.permute(0, 2, 3, 1).numpy(), bw.codes, bw.scale, bw.bias, bw.act_threshold)
    with torch.no_grad():
        theirs = layer(x).permute(0, 2, 3, 1).numpy()
    assert_close(ours, theirs)
    # the packed codes are compress.binary's packing
    np.testing.assert_array_equal(B.constants(kconv, bw.codes, bw.scale).weights.transpose(0, 1, 3, 2),
                                  bw.packed(64).transpose(1, 2, 0, 3))


def test_popcount_by_cpu():
    """VPOPCNTDQ where the target's CPU has it and never where it does not (Cascade Lake: a pshufb nibble table;
    without AVX2: scalar popcnt), NEON cnt on the ARM targets."""
    x86 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}
    expect = [(Target({**x86, "mcpu": "cascadelake"}), "nibble", r"\bvpshufb\b", r"\bv?popcnt"),
              (Target({**x86, "mcpu": "znver4"}), "vpopcntdq", r"\bvpopcntq\b", None),
              (Target({**x86, "mcpu": "nehalem"}), "scalar", r"\bpopcntq\b", r"\bvpopcnt"),
              (get_target("cortex-a53").tvm_target(), "neon", r"\bcnt\b", None),
              (get_target("cortex-a7").tvm_target(), "neon", r"\bvcnt\.8\b", None)]
    for target, kind, has, lacks in expect:
        assert B.popcount_kind(target)[0] == kind
        conv = B.Conv(8, 8, 128, 16, out="int", word=B.popcount_kind(target)[1])
        asm = tvm.tirx.build(tvm.IRModule({"main": B.kernel(conv, target).with_attr("global_symbol", "main")}),
                             target=target).inspect_source("s")
        assert re.search(has, asm), (target, has)
        assert lacks is None or not re.search(lacks, asm), (target, lacks)


def test_bad_input_is_a_user_error():
    with pytest.raises(UserError, match="codes must be one of"):
        B.Conv(8, 8, 16, 16, codes="ternary")
    with pytest.raises(UserError, match="larger than"):
        B.Conv(2, 2, 16, 16, kernel=(5, 5), padding=(0, 0))
    with pytest.raises(UserError, match=r"must be in \[0, 1\]"):
        B.constants(B.Conv(8, 8, 16, 16, codes="01"), -np.ones((16, 16, 3, 3), np.int8), np.ones(16))
    with pytest.raises(UserError, match="no binary convolution"):
        binary.export_form(nn.Sequential(nn.Conv2d(3, 8, 3)))


# ---------------------------------------------------------------- whole networks


class Small(nn.Module):
    """A Bi-Real-style piece: fp32 stem, two binary 3x3 convs with shortcuts and Hardtanh (the second strided,
    with a 1x1 projection), fp32 classifier. 70 channels: a 64-bit word and a partial one."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 70, 3, padding=1), nn.BatchNorm2d(70), nn.Hardtanh())
        self.conv1, self.bn1 = nn.Conv2d(70, 70, 3, padding=1, bias=False), nn.BatchNorm2d(70)
        self.conv2, self.bn2 = nn.Conv2d(70, 96, 3, 2, 1, bias=False), nn.BatchNorm2d(96)
        self.downsample = nn.Sequential(nn.Conv2d(70, 96, 1, 2, bias=False), nn.BatchNorm2d(96))
        self.act = nn.Hardtanh()
        self.fc = nn.Linear(96, 10)

    def forward(self, x):
        x = self.stem(x)
        x = self.act(self.bn1(self.conv1(x)) + x)
        x = self.act(self.bn2(self.conv2(x)) + self.downsample(x))
        return self.fc(x.mean((2, 3)))


def _binarized(method: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = Small().eval()
    x = torch.randn(1, 3, 12, 10)
    assert binary.convert(model, method, x) == ["conv1", "conv2"]
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval(), x


@pytest.mark.parametrize("method", ["recu", "siman"])
def test_network_binary_layers_run_as_binary_kernels(method, tmp_path):
    model, x = _binarized(method)
    build, report = compile_binarized(binary.export_form(model), "host", tmp_path / "b", input_shape=tuple(x.shape))
    rows = [r for r in build.layers if r.family == "binary"]
    assert len(rows) == 2 and all(r.weight_bits == 1 and r.act_bits == 1 for r in rows)
    # named after the user's layers, though conv2's kernel is called after the projection its residual needs
    assert [r.sources for r in rows] == [("conv1/Conv",), ("conv2/Conv",)]
    assert len(report.binary_layers) == 2
    # the two layers' codes at 1 bit (70 channels in two 64-bit words), the per-channel terms beside
    assert report.weight_bytes < report.fp32_weight_bytes / 4
    with torch.no_grad():
        assert_close(Session(build).run([x.numpy()])[0], model(x).numpy())


def test_compile_of_a_binary_onnx_file_runs_its_binary_layers_in_bits(cli, tmp_path):
    """`edgeprune compile` of an ONNX file in binary export form, written by anyone (here torch.onnx), finds the
    binary layers and runs them as binary kernels; the build computes what onnxruntime computes from the file."""
    import json

    import onnxruntime as ort

    from edgeprune.models import zoo

    model, x = _binarized("recu")
    onnx = zoo.export_onnx(binary.export_form(model), x, tmp_path / "net.onnx")
    rc, _, err = cli("compile", onnx, "--target", "host", "-o", tmp_path / "b")
    assert rc == 0, err
    built = json.loads((tmp_path / "b" / "build.json").read_text())
    assert [r["sources"] for r in built["layers"] if r["family"] == "binary"] == [["conv1/Conv"], ["conv2/Conv"]]
    from edgeprune.artifacts import Build

    ref = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    assert_close(Session(Build.load(tmp_path / "b")).run([x.numpy()])[0], ref)


class TwoLayers(nn.Module):
    """Two binary layers side by side on one input, their outputs the kernels' own, concatenated (a copy)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(70, 40, 3, padding=1)
        self.b = nn.Conv2d(70, 24, 3, padding=1)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


@pytest.mark.parametrize("target", ["cortex-a7", "cortex-a53"])
def test_arm_packages_are_bit_exact_under_qemu(target, tmp_path):
    """C packages: a ReCU (xnor, static threshold) and a SiMaN layer (and, the sample's mean), bit-exact against
    the reference on the device's own output."""
    torch.manual_seed(0)
    model = TwoLayers().eval()
    model.a, model.b = binary.ReCUConv2d(model.a), binary.SiMaNConv2d(model.b)  # in training mode, as made
    model.a.act_threshold.uniform_(-0.2, 0.2)
    x = torch.randn(1, 70, 9, 11)
    layers = binary.binary_layers(model)
    assert all(np.array_equal(a.codes, b.codes) for a, b in zip(layers.values(), binary.binary_layers(model).values()))
    build, _ = compile_binarized(binary.export_form(model, layers), target, tmp_path / "pkg",
                                 input_shape=tuple(x.shape), fmt="c")
    assert [r.family for r in build.layers if r.op == "conv"] == ["binary", "binary"]
    both = package.run(build, [x.numpy()], f"qemu://{target}")[0]
    xh = x.permute(0, 2, 3, 1).numpy()
    for out, bw in zip((both[:, :40], both[:, 40:]), layers.values()):
        conv = B.Conv(9, 11, 70, bw.codes.shape[0], stride=bw.stride, codes=bw.code_set, word=32,
                      act="sample-mean" if bw.act_mode == "sample-mean" else "static")
        _same(out.transpose(0, 2, 3, 1), conv, x=xh, codes=bw.codes, mul=bw.scale, add=bw.bias,
              threshold=bw.act_threshold, residual=None, next_threshold=None)


class Plain(nn.Module):
    """XNOR-Net style: binary conv -> BatchNorm -> Hardtanh -> binary conv, no shortcut between them."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.Hardtanh())
        self.conv1, self.bn1 = nn.Conv2d(64, 72, 3, padding=1, bias=False), nn.BatchNorm2d(72)
        self.conv2, self.bn2 = nn.Conv2d(72, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64)
        self.act1, self.act2 = nn.Hardtanh(), nn.Hardtanh()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(self.stem(x)))))))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("target", ["host", "cortex-a7"])
def test_next_layers_binarization_is_fused(target, tmp_path):
    """A binary layer read only by the next one's binarization writes that layer's input bits (exact integer
    thresholds), and the next reads them packed; the network still matches PyTorch (cortex-a7: 32-bit words, a C
    package under qemu)."""
    torch.manual_seed(5)
    model, x = Plain().eval(), torch.randn(1, 3, 12, 10)
    assert binary.convert(model, "recu", x) == ["conv1", "conv2"]
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    build, report = compile_binarized(binary.export_form(model), target, tmp_path / "b", input_shape=tuple(x.shape),
                                      fmt="so" if target == "host" else "c")
    assert report.binary_layers[0].endswith("bits out") and report.binary_layers[1].endswith("packed in")
    if target == "host":
        out = Session(build).run([x.numpy()])[0]
    else:
        out = package.run(build, [x.numpy()], f"qemu://{target}")[0]
    with torch.no_grad():
        assert_close(out, model(x).numpy())

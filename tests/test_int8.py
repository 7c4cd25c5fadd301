"""int8 end to end (issue 14, part 2): the int8 kernel family (kernels/int8.py) bit-exact against the numpy reference
of the same integer arithmetic (compress/quantize.reference), the integer program (compress/integer.py) against the
float simulation, and compiled int8 networks bit-exact against the program's interpreter on host and, as C
packages, on cortex-a7 and cortex-a53 under qemu-user and on cortex-m7 under qemu-system-arm (mps2-an500)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from test_quantize import RES, Tiny, _images
from torch import nn

from edgeprune.artifacts import Network
from edgeprune.codegen.build import compile_model
from edgeprune.codegen.kernels import int8 as K
from edgeprune.compress import integer as I
from edgeprune.compress import quantize as Q
from edgeprune.errors import UserError
from edgeprune.measure import package
from edgeprune.targets import get_target

HOST = get_target("host").tvm_target()
VARIANTS = ["widen", "vnni"] if K.has_vnni(HOST) else ["widen"]

# (kind, c, o, kernel, stride, padding, map): a stem over 3 channels, 3x3 convs (on a 7x7 map the VNNI kernel's row
# is a tile of 4 and one of 3), depthwise at both strides, pointwise with channel counts off the vector width, and a
# dense layer (a 1x1 map).
SHAPES = [("conv", 3, 16, 3, 2, (0, 0, 1, 1), 16), ("depthwise", 24, 24, 3, 2, (0, 1, 1, 0), 12),
          ("conv", 3, 16, 3, 2, 1, 17), ("conv", 24, 40, 3, 1, 1, 10), ("conv", 64, 64, 3, 1, 1, 7),
          ("pointwise", 32, 64, 1, 1, 0, 14),
          ("pointwise", 20, 10, 1, 1, 0, 7), ("depthwise", 48, 48, 3, 2, 1, 15), ("depthwise", 32, 32, 5, 1, 2, 9),
          ("dense", 72, 10, 1, 1, 0, 1)]


def _layer(rng, kind: str, c: int, o: int, k: int, s: int, p: int, act: str = "relu6"):
    dw = kind == "depthwise"
    w = rng.integers(-127, 128, size=(o, 1 if dw else c, k, k)).astype(np.int8)
    w = w.reshape(o, c) if kind == "dense" else w
    mult, shift = Q.quantize_multiplier(rng.uniform(1e-4, 3e-3, size=o))
    zx, zo = int(rng.integers(-30, 30)), int(rng.integers(-20, 20))
    lo, hi = (zo, min(127, zo + 100)) if act == "relu6" else (-128, 127)
    pad = tuple(p) if isinstance(p, tuple) else (p, p)  # (top, left, bottom, right): TFLite's SAME at stride 2
    return Q.QuantLayer("l", kind, w, 8, np.ones(o, np.float32), rng.integers(-9000, 9000, o).astype(np.int32), 1.0,
                        zx, 1.0, zo, mult, shift, lo, hi, act, (s, s), pad, (1, 1), o if dw else 1)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}{s[1]}x{s[2]}k{s[3]}s{s[4]}")
def test_kernels_are_bit_exact_against_the_numpy_reference(shape, variant):
    kind, c, o, k, s, p, hw = shape
    if variant == "vnni" and kind == "depthwise":
        pytest.skip("depthwise runs the widening kernel on every CPU")
    rng = np.random.default_rng(hash(shape) % 2 ** 32)
    layer = _layer(rng, kind, c, o, k, s, p, act="none" if kind == "dense" else "relu6")
    conv = K.Conv(hw, hw, c, o, k, k, (s, s), layer.padding, (1, 1), kind == "depthwise", layer.input_zero_point,
                  layer.output_zero_point, layer.act_min, layer.act_max)
    lib, consts = K.build_module(conv, layer.weight, layer.bias, layer.multiplier, layer.shift, HOST, variant)
    x = rng.integers(-128, 128, size=(1, hw, hw, c)).astype(np.int8)
    oh, ow = conv.out_hw
    out = tvm.runtime.tensor(np.zeros((1, oh, ow, o), np.int8))
    lib["main"](*[tvm.runtime.tensor(a) for a in (x, *consts)], out)
    if kind == "dense":
        ref = Q.reference(layer, x.reshape(1, c)).reshape(1, 1, 1, o)
    else:
        ref = Q.reference(layer, x.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(out.numpy(), ref)
    assert len(np.unique(ref)) >= min(10, ref.size // 2)  # the clamp did not flatten the comparison


def test_the_scalar_kernel_a_microcontroller_runs_is_bit_exact_on_ties_too():
    """The scalar widening kernel (one lane, as on cortex-m7), compiled for the host: its float32 epilogue rounds half
    to even like the reference, on ties too (a scale of 0.5 puts one on every odd accumulator). The cortex-m7
    package itself is checked on a whole network in test_memory_budget, which caught an epilogue that subtracted
    the rounding constant in float: LLVM's thumbv7em code did not round."""
    from edgeprune.codegen.kernels.common import CpuSpec

    rng = np.random.default_rng(7)
    layer = _layer(rng, "pointwise", 16, 8, 1, 1, 0, act="none")
    layer.multiplier[:], layer.shift[:] = 2 ** 30, 31  # 0.5
    conv = K.Conv(5, 5, 16, 8, 1, 1, (1, 1), (0, 0), (1, 1), False, layer.input_zero_point, layer.output_zero_point,
                  layer.act_min, layer.act_max)
    w, b = K.pack(conv, layer.weight, layer.bias, "widen")
    scale = K.requant_scale(layer.multiplier, layer.shift)
    func = K.kernel(conv, "widen", CpuSpec(lanes=1, acc_regs=32), threads=1).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), target=HOST)
    x = rng.integers(-40, 40, size=(1, 5, 5, 16)).astype(np.int8)
    out = tvm.runtime.tensor(np.zeros((1, 5, 5, 8), np.int8))
    lib["main"](*[tvm.runtime.tensor(a) for a in (x, w, b, scale)], out)
    ref = Q.reference(layer, x.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(out.numpy(), ref)


@pytest.fixture(scope="module")
def quantized():
    torch.manual_seed(0)
    net = Tiny().eval()
    x, _ = _images(64)
    q = Q.quantize(net, x)
    prog = I.program(q, (1, 3, RES, RES))
    return q, prog, x


def test_the_integer_program_follows_the_float_simulation(quantized):
    q, prog, x = quantized
    kinds = [op.kind for op in prog.ops]
    assert kinds == ["quantize", "conv", "conv", "conv", "add", "conv", "mean", "flatten", "conv", "dequantize"]
    step = prog.ops[-1].params["scale"]
    ours = np.concatenate([I.run(prog, x[i:i + 1].numpy()) for i in range(16)])
    sim = q.module(x[:16]).detach().numpy()
    # the simulation rounds in float at every quantization point, the program in integers: at most a step apart
    assert np.abs(ours - sim).max() <= step * 1.01
    assert np.mean(np.isclose(ours, sim, atol=step * 0.01)) > 0.9


def test_host_build_is_bit_exact_and_reports_int8_layers(quantized, tmp_path):
    import edgeprune as ep

    q, prog, x = quantized
    net = Network(q.module, (1, 3, RES, RES), "tiny", q.plan(), integer=prog)
    build = compile_model(net, "host", tmp_path / "b")
    rows = [r for r in build.layers if r.family == "int8"]
    assert len(rows) == 5 and all(r.weight_bits == 8 and r.act_bits == 8 for r in rows)
    assert {r.op for r in rows} == {"conv", "depthwise", "pointwise", "matmul"}
    assert not build.unscheduled
    for i in range(4):
        xi = x[i:i + 1].numpy()
        np.testing.assert_array_equal(ep.run(build, xi)[0], I.run(prog, xi))


@pytest.mark.slow
@pytest.mark.parametrize("target", ["cortex-a7", "cortex-a53", "cortex-m7"])
def test_arm_packages_are_bit_exact_under_qemu(quantized, tmp_path, target):
    q, prog, x = quantized
    net = Network(q.module, (1, 3, RES, RES), "tiny", q.plan(), integer=prog)
    build = compile_model(net, target, tmp_path / "pkg", fmt="c")
    assert build.memory["weight_bytes"] < 2000  # int8 weights: a quarter of the fp32 twin's ~4.6 KB
    xi = x[:1].numpy()
    np.testing.assert_array_equal(package.run(build, [xi], f"qemu://{target}")[0], I.run(prog, xi))


def test_what_int8_cannot_take_is_a_one_line_error():
    class Grouped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1, groups=2)
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.head(torch.sigmoid(self.conv(x)))

    torch.manual_seed(0)
    x = torch.randn(8, 8, 6, 6)
    q = Q.quantize(Grouped().eval(), x)
    with pytest.raises(UserError, match="no int8 kernel for 'sigmoid'") as e:
        I.program(q, (1, 8, 6, 6))
    assert "\n" not in str(e.value)


def test_w4a8_runs_on_the_same_kernels_bit_exact(tmp_path):
    """4-bit weights (-7..7, first and last layers at 8) are int8 values to the kernels: same program, same kernels."""
    import edgeprune as ep

    torch.manual_seed(0)
    x, _ = _images(32)
    q = Q.quantize(Tiny().eval(), x, bits=(4, 8))
    prog = I.program(q, (1, 3, RES, RES))
    peaks = [int(np.abs(op.params["weight"]).max()) for op in prog.ops if op.kind == "conv"]
    assert peaks[0] > 7 and peaks[-1] > 7 and all(p <= 7 for p in peaks[1:-1])
    build = compile_model(Network(q.module, (1, 3, RES, RES), "tiny", q.plan(), integer=prog), "host", tmp_path / "b")
    for i in range(3):
        xi = x[i:i + 1].numpy()
        np.testing.assert_array_equal(ep.run(build, xi)[0], I.run(prog, xi))


def test_c_package_offers_int8_in_and_out(quantized, tmp_path):
    """<name>_run_int8 takes the quantized input (NCHW, the header's scale and zero point) and returns the output
    before dequantization: equal to the integer program's own int8 tensors."""
    import shutil
    import subprocess

    q, prog, x = quantized
    build = compile_model(Network(q.module, (1, 3, RES, RES), "tiny", q.plan(), integer=prog), "host",
                          tmp_path / "pkg", fmt="c")
    header = (build.directory / "tiny.h").read_text()
    assert "int tiny_run_int8(const int8_t *in, int8_t *out);" in header and "TINY_OUTPUT_ZERO_POINT" in header
    env = I.run(prog, x[:1].numpy(), keep=True)
    q_in, q_out = env[prog.ops[0].output], env[prog.ops[-1].inputs[0]]
    (tmp_path / "in.bin").write_bytes(q_in.tobytes())
    (tmp_path / "main.c").write_text(
        '#include <stdio.h>\n#include "tiny.h"\n'
        'int main(void) { int8_t in[TINY_INPUT_SIZE], out[TINY_OUTPUT_SIZE]; FILE *f = fopen("in.bin", "rb");\n'
        '  if (fread(in, 1, sizeof in, f) != sizeof in) return 2; fclose(f);\n'
        '  if (tiny_run_int8(in, out)) return 1; fwrite(out, 1, sizeof out, stdout); return 0; }\n')
    exe = tmp_path / "main"
    subprocess.run([shutil.which("gcc") or "cc", "-O1", "-I", str(build.directory), str(tmp_path / "main.c"),
                    str(build.directory / build.library), "-lm", "-o", str(exe)], check=True)
    got = np.frombuffer(subprocess.run([str(exe)], cwd=tmp_path, capture_output=True, check=True).stdout, np.int8)
    np.testing.assert_array_equal(got, q_out.reshape(-1))


def test_layers_kept_in_fp32_run_between_int8_tensors(tmp_path):
    """Mixed precision: layers named in keep_float are "fconv" ops (float weights, int8 in and out), compiled as the
    dense family's float kernels; the rest stays int8. The float kernels may round a product differently from
    PyTorch's, so outputs agree within one step of their grid, not bit for bit."""
    import edgeprune as ep

    torch.manual_seed(0)
    x, _ = _images(32)
    net = Tiny().eval()
    order = Q.sensitivity(net, x[:8])
    assert sorted(order) == sorted(["stem.0", "dw.0", "pw.0", "expand.0", "classifier"])
    q = Q.quantize(net, x, keep_float=["pw.0", "classifier"])
    prog = I.program(q, (1, 3, RES, RES))
    assert [op.name for op in prog.ops if op.kind == "fconv"] == ["pw.0", "classifier"]
    build = compile_model(Network(q.module, (1, 3, RES, RES), "tiny", q.plan(), integer=prog), "host", tmp_path / "b")
    assert {r.family for r in build.layers if r.op in ("pointwise", "matmul")} == {"int8", "dense"}
    step = prog.ops[-1].params["scale"]
    for i in range(4):
        xi = x[i:i + 1].numpy()
        ref = I.run(prog, xi)
        assert np.abs(ep.run(build, xi)[0] - ref).max() <= 1.01 * step
        assert np.abs(q.module(x[i:i + 1]).detach().numpy() - ref).max() <= 1.01 * step

"""Post-training quantization: a float CNN to int8 (or 4-bit) weights and int8 activations, simulated in PyTorch for
accuracy, with the integer parameters every quantized layer's kernel needs.

Scheme (the one TFLite's int8 spec and onnxruntime's QDQ u8s8/s8s8 use, so both export paths and our kernels share it):
  weights      per output channel, symmetric, zero point 0: scale = max|w| / 127 at 8 bits (255 levels, -127..127:
               the narrow range keeps -128 out, so a u8 x s8 pair product never needs 16-bit saturation handling);
               at 4 bits -7..7 (15 levels), scale chosen per channel to minimize the squared rounding error (at 4
               bits clipping the largest weight pays; at 8 bits it does not). 4-bit values are stored in int8.
  activations  per tensor, asymmetric int8 (-128..127) with a zero point. Asymmetric because after ReLU6 every value
               is >= 0, and a symmetric grid would waste half its levels; the zero point costs integer kernels
               nothing in the inner loop: with symmetric weights, sum w*(x - zx) = sum w*x - zx*sum(w), and the second
               term is a per-channel constant folded into the bias (padding is filled with zx, so it holds at the
               borders too). On x86 VNNI (u8 x s8) the kernel flips x to uint8 with xor 0x80 (zx + 128), the same
               fold; on ARM (s8 x s8 sdot, or vmlal.s16 after widening) it runs as is.
  bias         int32 at scale input_scale * weight_scale[c].
  requantize   a convolution's int32 accumulator to its int8 output: y = float32(acc) * float32(multiplier /
               2**shift), clamped to [act_min - zo, act_max - zo], rounded to nearest even, + zo (`requantize` is
               the reference): IEEE float32 operations, the same on every CPU, and the cheapest epilogue the
               kernels have (XNNPACK and onnxruntime's MLAS requantize in float32 too). The fused ReLU/ReLU6 is the
               clamp. Adds, means and standalone requantizations use the int64 fixed point (`requantize_fixed`).

BatchNorm is folded into the convolutions here, after any synthetic calibration data was made (FDDA and ZeroQ align
images to the BN statistics; methods.md 5.6). Where activations are quantized: the network input, after every
convolution or linear layer (after its ReLU/ReLU6 when one follows it alone: the fused activation), after every other
computing node (residual adds, concatenation, pooling), and not after layout-only nodes (flatten, reshape,
transpose, split, indexing, max pooling, dropout), whose output stays on their input's grid. This is where an
integer graph holds int8 tensors, so the simulation and the kernels agree to within one step of the output grid.
"""

from __future__ import annotations

import copy
import operator
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from .. import data
from ..artifacts import LayerPlan
from ..errors import UserError
from ..fixedpoint import QMAX, QMIN, quantize_multiplier, requant_scale  # noqa: F401 - re-exported
from . import distill as _distill
from . import fdda as _fdda

SOURCES = ("real", "fdda", "zeroq", "noise")
Progress = Callable[[int, int, str, float], None]
REAL_IMAGES = 256  # real calibration images (activation ranges settle well before this)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6)
_ACT_FUNCTIONS = (F.relu, torch.relu, F.relu6)
_LAYOUT_MODULES = (nn.Flatten, nn.Identity, nn.Dropout, nn.MaxPool2d)
_LAYOUT_FUNCTIONS = (torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.split, torch.chunk,
                     torch.squeeze, torch.unsqueeze, F.max_pool2d, F.dropout, operator.getitem)
_LAYOUT_METHODS = ("view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous", "transpose", "permute",
                   "split", "chunk")
_SHAPE_METHODS = ("size", "dim")


# ---------------------------------------------------------------- the integer arithmetic


def weight_levels(bits: int) -> int:
    """The largest weight magnitude on a `bits` grid: 127 at 8 bits, 7 at 4 (symmetric, narrow range)."""
    return 2 ** (bits - 1) - 1


def quantize_weight(w: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric quantization: (integer weights as int8, per-channel scales). At 8 bits the scale
    is max|w| / 127; below, the clipping ratio (0.5 to 1 of max|w|) with the least squared error per channel."""
    q = weight_levels(bits)
    flat = w.detach().reshape(w.shape[0], -1).double()
    peak = flat.abs().amax(1).clamp_min(1e-12)
    scale = peak / q
    if bits < 8:
        best = torch.full_like(peak, float("inf"))
        for ratio in torch.linspace(0.5, 1.0, 51, dtype=torch.float64):
            s = peak * ratio / q
            err = ((flat / s[:, None]).round().clamp(-q, q) * s[:, None] - flat).pow(2).sum(1)
            better = err < best
            best, scale = torch.where(better, err, best), torch.where(better, s, scale)
    scale = scale.float()
    ints = (w.detach() / scale.view(-1, *[1] * (w.dim() - 1))).round().clamp(-q, q)
    return ints.to(torch.int8), scale


def requantize(acc: np.ndarray, multiplier: np.ndarray, shift: np.ndarray, zero_point: int, lo: int = QMIN,
               hi: int = QMAX, axis: int = 1) -> np.ndarray:
    """The reference of a convolution's epilogue, which the int8 kernels match bit for bit: int32 accumulators (bias
    added; per-channel multiplier and shift along `axis`) to int8 through float32: acc converted, multiplied by
    requant_scale(multiplier, shift), clamped to [lo - zero_point, hi - zero_point], rounded half to even."""
    shape = [1] * acc.ndim
    shape[axis] = -1
    scale = requant_scale(multiplier, shift).reshape(shape)
    y = np.clip(np.asarray(acc).astype(np.int32).astype(np.float32) * scale, np.float32(lo - zero_point),
                np.float32(hi - zero_point))
    return (np.rint(y).astype(np.int32) + zero_point).astype(np.int8)


def requantize_fixed(acc: np.ndarray, multiplier: np.ndarray, shift: np.ndarray, zero_point: int, lo: int = QMIN,
                     hi: int = QMAX, axis: int = 1) -> np.ndarray:
    """Fixed-point requantization (adds, means, standalone requantizations): int accumulators (per-channel multiplier
    and shift along `axis`) to int8, rounding half up once: (acc * mult + 2**(shift-1)) >> shift, in int64."""
    shape = [1] * acc.ndim
    shape[axis] = -1
    mult = np.asarray(multiplier, dtype=np.int64).reshape(shape)
    sh = np.asarray(shift, dtype=np.int64).reshape(shape)
    out = (acc.astype(np.int64) * mult + (np.int64(1) << (sh - 1))) >> sh
    return np.clip(out + zero_point, lo, hi).astype(np.int8)


@dataclass
class QuantLayer:
    """One quantized convolution or linear layer as integer kernels consume it. The weight is int8 in PyTorch's
    layout (OIHW, or OI for dense), values within +-weight_levels(weight_bits); the bias is int32 at scale
    input_scale * weight_scale; `multiplier`/`shift` requantize the int32 accumulator to the output grid
    (see `requantize`); act_min/act_max clamp the int8 output (the fused ReLU/ReLU6)."""

    name: str
    kind: str  # conv | depthwise | pointwise | dense
    weight: np.ndarray
    weight_bits: int
    weight_scale: np.ndarray  # float32 (O,)
    bias: np.ndarray  # int32 (O,)
    input_scale: float
    input_zero_point: int
    output_scale: float
    output_zero_point: int
    multiplier: np.ndarray  # int32 (O,)
    shift: np.ndarray  # int32 (O,)
    act_min: int
    act_max: int
    activation: str = "none"  # none | relu | relu6
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, ...] = (0, 0)  # (rows, columns) on both sides, or (top, left, bottom, right)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    def folded_bias(self) -> np.ndarray:
        """bias - input_zero_point * sum(w) per channel: with it, the inner loop is a plain sum of w * x."""
        sums = self.weight.reshape(self.weight.shape[0], -1).astype(np.int64).sum(1)
        return (self.bias.astype(np.int64) - self.input_zero_point * sums).astype(np.int32)

    def summary(self) -> dict:
        """The scalars and small arrays as JSON-ready values (the weights themselves are left out)."""
        return {"kind": self.kind, "weight_bits": self.weight_bits, "shape": list(self.weight.shape),
                "weight_scale": [float(s) for s in self.weight_scale], "input_scale": self.input_scale,
                "input_zero_point": self.input_zero_point, "output_scale": self.output_scale,
                "output_zero_point": self.output_zero_point, "activation": self.activation,
                "act_min": self.act_min, "act_max": self.act_max}


def reference(layer: QuantLayer, x: np.ndarray) -> np.ndarray:
    """numpy reference of one quantized layer on int8 input (NCHW, or NC for dense): int32 accumulation over
    (x - zx) with zx padding, bias, then `requantize`. Slow and plain, for checking kernels."""
    xz = x.astype(np.int64) - layer.input_zero_point
    w = layer.weight.astype(np.int64)
    if layer.kind == "dense":
        acc = xz @ w.T + layer.bias
        return requantize(acc, layer.multiplier, layer.shift, layer.output_zero_point, layer.act_min, layer.act_max)
    (sh, sw), (dh, dw), g = layer.stride, layer.dilation, layer.groups
    pad = tuple(layer.padding)
    ph, pw, pb, pr = pad if len(pad) == 4 else (pad[0], pad[1], pad[0], pad[1])  # (top, left, bottom, right)
    n, c, h, wd = xz.shape
    o, cg, kh, kw = w.shape
    xp = np.pad(xz, ((0, 0), (0, 0), (ph, pb), (pw, pr)))  # zero after subtracting zx: padded with zx
    oh, ow = (h + ph + pb - dh * (kh - 1) - 1) // sh + 1, (wd + pw + pr - dw * (kw - 1) - 1) // sw + 1
    acc = np.zeros((n, o, oh, ow), dtype=np.int64)
    og = o // g
    for gi in range(g):
        xs = xp[:, gi * cg:(gi + 1) * cg]
        ws = w[gi * og:(gi + 1) * og]
        for i in range(kh):
            for j in range(kw):
                patch = xs[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]
                acc[:, gi * og:(gi + 1) * og] += np.einsum("nchw,oc->nohw", patch, ws[:, :, i, j])
    acc += layer.bias.astype(np.int64)[None, :, None, None]
    return requantize(acc, layer.multiplier, layer.shift, layer.output_zero_point, layer.act_min, layer.act_max)


# ---------------------------------------------------------------- graph: BatchNorm folding, quantization points


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as e:  # torch.fx raises many types (TraceError, TypeError, ...) on data-dependent control flow
        raise UserError(f"cannot quantize {type(model).__name__}: torch.fx cannot trace it ({str(e).splitlines()[0]});"
                        " quantization needs a network without data-dependent control flow") from None


@torch.no_grad()
def fold_bn(model: nn.Module) -> fx.GraphModule:
    """A traced copy of `model` (eval mode) with every BatchNorm2d folded into the convolution before it. The
    convolutions keep their module paths, so plans and exported layers are named as in the original network."""
    gm = _trace(copy.deepcopy(model).eval())
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        prev, bn = node.args[0], modules[node.target]
        conv = modules.get(prev.target) if isinstance(prev, fx.Node) and prev.op == "call_module" else None
        if not isinstance(conv, nn.Conv2d) or len(prev.users) != 1:
            raise UserError(f"BatchNorm layer '{node.target}' does not directly follow a convolution, so it cannot "
                            "be folded for integer kernels")
        k = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        conv.weight.mul_(k.view(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.bias = nn.Parameter((bias - bn.running_mean) * k + bn.bias)
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm


class ActQuant(nn.Module):
    """A per-tensor int8 quantization point: observes the range while calibrating (min/max, always including 0),
    then fake-quantizes (quantize, clamp, dequantize) on the grid it chose."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("hi", torch.tensor(0.0))
        self.observing, self.enabled = True, False
        self.straight_through = False  # while distilling: the gradient passes inside the range (distill.py)
        self.scale, self.zero_point = 1.0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return x  # a node the graph rules took for an activation but is not one (shapes, indices)
        if self.observing:
            self.lo = torch.minimum(self.lo, x.detach().min())
            self.hi = torch.maximum(self.hi, x.detach().max())
        if not self.enabled:
            return x
        q = (torch.clamp(torch.round(x / self.scale) + self.zero_point, QMIN, QMAX) - self.zero_point) * self.scale
        if not self.straight_through:
            return q
        inside = torch.clamp(x, (QMIN - self.zero_point) * self.scale, (QMAX - self.zero_point) * self.scale)
        return inside + (q - inside).detach()

    def freeze(self) -> None:
        """Fix scale and zero point from the observed range, and quantize from now on."""
        lo, hi = float(self.lo), float(self.hi)
        self.scale = (hi - lo) / (QMAX - QMIN) if hi > lo else 1.0
        self.zero_point = int(np.clip(round(QMIN - lo / self.scale), QMIN, QMAX))
        self.observing, self.enabled = False, True


def _is(node: fx.Node, modules: dict, types: tuple, functions: tuple = (), methods: tuple = ()) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], types)
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods


def _layout(node: fx.Node, modules: dict) -> bool:
    return _is(node, modules, _LAYOUT_MODULES, _LAYOUT_FUNCTIONS, _LAYOUT_METHODS)


def _not_a_tensor(node: fx.Node) -> bool:
    if node.op in ("output", "get_attr"):
        return True
    if node.op == "call_method" and node.target in _SHAPE_METHODS or \
            node.op == "call_function" and node.target is getattr:  # x.shape, x.size(1), ...
        return True
    return node.op == "call_function" and node.target is operator.getitem and \
        isinstance(node.args[0], fx.Node) and _not_a_tensor(node.args[0])


def _fused_activation(node: fx.Node, modules: dict) -> fx.Node | None:
    """The ReLU/ReLU6 a layer's output goes to alone (fused into the layer's requantization), if any."""
    users = list(node.users)
    if len(users) == 1 and _is(users[0], modules, _ACTIVATIONS, _ACT_FUNCTIONS):
        return users[0]
    return None


def _layers(gm: fx.GraphModule) -> list[fx.Node]:
    modules = dict(gm.named_modules())
    return [n for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(modules[n.target], (nn.Conv2d, nn.Linear))]


def insert_quant_points(gm: fx.GraphModule) -> dict[str, ActQuant]:
    """ActQuant nodes wherever the integer graph holds an int8 tensor (see the module docstring); returns them by
    the name of the node whose output they quantize."""
    modules = dict(gm.named_modules())
    points: dict[str, ActQuant] = {}
    for node in list(gm.graph.nodes):
        if _not_a_tensor(node) or _layout(node, modules):
            continue
        if node.op == "call_module" and isinstance(modules[node.target], (nn.Conv2d, nn.Linear)) and \
                _fused_activation(node, modules) is not None:
            continue
        q = ActQuant()
        name = f"aq_{node.name}"
        gm.add_submodule(name, q)
        with gm.graph.inserting_after(node):
            qnode = gm.graph.call_module(name, (node,))
        node.replace_all_uses_with(qnode, delete_user_cb=lambda user, qnode=qnode: user is not qnode)
        points[node.name] = q
    gm.graph.lint()
    gm.recompile()
    return points


def _input_point(node: fx.Node, modules: dict) -> ActQuant:
    src = node.args[0]
    while isinstance(src, fx.Node) and not (src.op == "call_module" and isinstance(modules[src.target], ActQuant)):
        if not _layout(src, modules):
            raise UserError(f"layer '{node.target}' has an input no quantization point covers ({src.name})")
        src = src.args[0]
    return modules[src.target]


def _activation_kind(node: fx.Node, modules: dict) -> str | None:
    """"relu6" or "relu" for an activation node (module or function), else None."""
    if _is(node, modules, (nn.ReLU6,), (F.relu6,)):
        return "relu6"
    if _is(node, modules, _ACTIVATIONS, _ACT_FUNCTIONS):
        return "relu"
    return None


def _output_point(node: fx.Node, modules: dict) -> tuple[ActQuant, str]:
    act = _fused_activation(node, modules)
    kind = "none" if act is None else _activation_kind(act, modules)
    src = act or node
    user = next(iter(src.users))
    return modules[user.target], kind


# ---------------------------------------------------------------- quantize


@dataclass
class FloatLayer:
    """A convolution or linear layer kept in fp32 inside an int8 network: its input is dequantized from one grid,
    its output quantized to another (the clamp is its activation on that grid)."""

    name: str
    weight: np.ndarray  # float32, PyTorch's layout (BatchNorm folded)
    bias: np.ndarray  # float32
    input_scale: float
    input_zero_point: int
    output_scale: float
    output_zero_point: int
    act_min: int
    act_max: int
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, ...] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1


@dataclass
class Quantized:
    """A quantized network: `module` simulates it in float (fake quantization; BatchNorm folded), `layers` holds
    each convolution's and linear layer's integer parameters by module path, `activations` every quantization
    point's (scale, zero point) by the graph node it follows (for adds and pooling between layers)."""

    module: fx.GraphModule
    layers: dict[str, QuantLayer]
    activations: dict[str, tuple[float, int]]
    weight_bits: int
    act_bits: int = 8
    calibration: dict = field(default_factory=dict)  # source, images, seconds, ...
    float_layers: dict[str, FloatLayer] = field(default_factory=dict)  # kept in fp32 between int8 tensors

    def plan(self) -> dict[str, LayerPlan]:
        """LayerPlan scheme "int8" per layer, with the layer's bit widths and its scales as params."""
        return {name: LayerPlan(name, "int8", q.weight_bits, self.act_bits, params=q.summary())
                for name, q in self.layers.items()}


def _bits(bits: tuple[int, int]) -> tuple[int, int]:
    try:
        w, a = (int(b) for b in bits)
    except (TypeError, ValueError):
        raise ValueError(f"bits must be (weight_bits, act_bits), e.g. (8, 8) or (4, 8); got {bits!r}") from None
    if not 2 <= w <= 8 or a != 8:
        raise ValueError(f"bits must be (2..8 weight bits, 8 activation bits), e.g. (8, 8) or (4, 8); got {bits!r}")
    return w, a


@torch.no_grad()
def quantize(model: nn.Module, calibration: torch.Tensor, bits: tuple[int, int] = (8, 8), ends: int | None = 8,
             batch: int = 64, keep_float: Collection[str] = (), distill_steps: int = 0, seed: int = 0,
             progress: Progress | None = None) -> Quantized:
    """Post-training quantization of `model` (not modified) with activation ranges from `calibration` (normalized
    model inputs, N,C,H,W). `bits` = (weight, activation) bits: (8, 8) or (4, 8). With fewer than 8 weight bits,
    the first and last layers keep `ends` bits (8 by default, the paper's F8L8; None quantizes them like the rest):
    they hold few weights and lose the most accuracy. Layers named in `keep_float` keep fp32 weights and compute in
    fp32 between their int8 input and output (mixed precision). With `distill_steps`, the quantized network is then
    trained towards `model` on the calibration images (FDDA's distillation, distill.py) before it is exported."""
    wbits, abits = _bits(bits)
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 4 or len(calibration) == 0:
        shape = list(calibration.shape) if isinstance(calibration, torch.Tensor) else type(calibration).__name__
        raise ValueError(f"calibration must be a float tensor of N>=1 images (N,C,H,W); got {shape}")
    gm = fold_bn(model)
    layer_nodes = _layers(gm)
    if not layer_nodes:
        raise UserError(f"{type(model).__name__} has no Conv2d or Linear layer to quantize")
    points = insert_quant_points(gm)
    for i in range(0, len(calibration), batch):
        gm(calibration[i:i + batch].float())
    for q in points.values():
        q.freeze()
    layer_bits = {node.target: max(wbits, ends) if i in (0, len(layer_nodes) - 1) and ends is not None else wbits
                  for i, node in enumerate(layer_nodes) if node.target not in keep_float}
    info: dict = {"images": len(calibration)}
    if distill_steps > 0:
        losses = _distill.distill(gm, model.eval(), calibration, layer_bits, points, distill_steps, seed=seed,
                                  progress=progress)
        info.update(distill_steps=distill_steps, distill_loss=[round(losses[0], 4), round(losses[-1], 4)])
    modules = dict(gm.named_modules())
    layers, floats = {}, {}
    for node in layer_nodes:
        if node.target in keep_float:
            floats[node.target] = _float_layer(node, modules)
        else:
            layers[node.target] = _finish_layer(node, modules, layer_bits[node.target])
    acts = {name: (q.scale, q.zero_point) for name, q in points.items()}
    return Quantized(gm.eval(), layers, acts, wbits, abits, info, floats)


def _clamp(activation: str, scale: float, zero_point: int) -> tuple[int, int]:
    """The int8 range a fused activation leaves on a grid: ReLU clamps at the zero point, ReLU6 at 6 as well."""
    lo, hi = QMIN, QMAX
    if activation != "none":
        lo = max(QMIN, zero_point)
    if activation == "relu6":
        hi = min(QMAX, zero_point + round(6.0 / scale))
    return lo, hi


def _float_layer(node: fx.Node, modules: dict) -> FloatLayer:
    m = modules[node.target]
    qin, (qout, act) = _input_point(node, modules), _output_point(node, modules)
    bias = m.bias.detach() if m.bias is not None else torch.zeros(m.weight.shape[0])
    geometry = {} if isinstance(m, nn.Linear) else {"stride": tuple(m.stride), "padding": tuple(m.padding),
                                                    "dilation": tuple(m.dilation), "groups": m.groups}
    return FloatLayer(node.target, m.weight.detach().float().numpy().copy(), bias.float().numpy().copy(),
                      float(qin.scale), int(qin.zero_point), float(qout.scale), int(qout.zero_point),
                      *_clamp(act, qout.scale, qout.zero_point), **geometry)


@torch.no_grad()
def sensitivity(model: nn.Module, calibration: torch.Tensor, bits: tuple[int, int] = (8, 8)) -> list[str]:
    """The network's convolution and linear layers, the most sensitive to quantization first: each scored by how
    far the network's outputs on `calibration` move (mean squared error against fp32) when its weights alone are
    rounded to `bits`. Every activation is on its int8 grid in every trial, as it is in a mixed network: keeping a
    layer in fp32 saves its weights' rounding, not its tensors'. One traced copy, one forward pass per layer."""
    wbits, _ = _bits(bits)
    x = calibration.float()
    gm = fold_bn(model)
    nodes = _layers(gm)
    points = insert_quant_points(gm)
    gm(x)
    for q in points.values():
        q.freeze()
    reference = model.eval()(x)
    modules = dict(gm.named_modules())
    scores = {}
    for node in nodes:
        m = modules[node.target]
        w = m.weight.data
        ints, scale = quantize_weight(w, wbits)
        m.weight.data = ints.float() * scale.view(-1, *[1] * (w.dim() - 1))
        scores[node.target] = float((gm(x) - reference).pow(2).mean())
        m.weight.data = w
    return sorted(scores, key=lambda n: -scores[n])


def _finish_layer(node: fx.Node, modules: dict, bits: int) -> QuantLayer:
    """Integer parameters of one layer; its module's weight and bias become their dequantized values."""
    m = modules[node.target]
    qin, (qout, act) = _input_point(node, modules), _output_point(node, modules)
    ints, ws = quantize_weight(m.weight, bits)
    bias = m.bias.detach() if m.bias is not None else torch.zeros(m.weight.shape[0])
    bscale = qin.scale * ws.double()
    bias_q = torch.round(bias.double() / bscale).clamp(-2 ** 31, 2 ** 31 - 1)
    m.weight.data = ints.float() * ws.view(-1, *[1] * (m.weight.dim() - 1))
    m.bias = nn.Parameter((bias_q * bscale).float())
    mult, shift = quantize_multiplier((bscale / qout.scale).numpy())
    zo = qout.zero_point
    lo, hi = _clamp(act, qout.scale, zo)
    if isinstance(m, nn.Linear):
        kind, geometry = "dense", {}
    else:
        kind = "depthwise" if m.groups > 1 and m.groups == m.in_channels == m.out_channels else \
            "pointwise" if m.kernel_size == (1, 1) and m.groups == 1 else "conv"
        if isinstance(m.padding, str) or m.padding_mode != "zeros":
            raise UserError(f"layer '{node.target}': only explicit zero padding is supported for int8, "
                            f"got padding={m.padding!r} ({m.padding_mode})")
        geometry = {"stride": tuple(m.stride), "padding": tuple(m.padding), "dilation": tuple(m.dilation),
                    "groups": m.groups}
    return QuantLayer(node.target, kind, ints.numpy(), bits, ws.numpy(), bias_q.to(torch.int32).numpy(),
                      float(qin.scale), int(qin.zero_point), float(qout.scale), int(zo), mult, shift, lo, hi, act,
                      **geometry)


# ---------------------------------------------------------------- calibration sources



def calibration_images(model: nn.Module, source: str, resolution: int, images: np.ndarray | None = None,
                       labels: np.ndarray | None = None, classes: int | None = None, per_class: int = _fdda.PER_CLASS,
                       images_per_class: int = _fdda.IMAGES_PER_CLASS, steps: int = _fdda.STEPS,
                       real_images: int = REAL_IMAGES, seed: int = 0,
                       progress: Progress | None = None) -> _fdda.Synthetic:
    """Calibration images from `source`: "real" (`real_images` of `images`), "fdda" (`per_class` real images per
    class give the BN-statistics centres; `images_per_class` synthetic images per class, then those real images),
    "zeroq" and "noise" (no real data; as many images as FDDA gives: `classes`, or the labels' count, or 10, times
    `images_per_class + per_class`). `images` are uint8 (N,H,W,3) as the datasets hold them. The synthetic
    sources are made on a copy of `model` with its BatchNorm layers, which they need."""
    if source not in SOURCES:
        raise UserError(f"unknown calibration source '{source}'; choose one of {', '.join(SOURCES)}")
    if source in ("real", "fdda") and (images is None or len(images) == 0):
        raise UserError(f"calibration '{source}' needs real images (and labels for fdda); pass images=...")
    if source == "fdda" and (labels is None or len(labels) != len(images)):
        raise UserError("calibration 'fdda' needs one label per image for its per-class BN-statistics centres")
    if classes is None:
        classes = int(np.max(labels)) + 1 if labels is not None and len(labels) else 10
    count = (images_per_class + per_class) * classes
    if source == "real":
        order = np.random.default_rng(seed).permutation(len(images))[:real_images]
        return _fdda.Synthetic(data.tensors(images[order], resolution), torch.as_tensor(labels[order]) if
                               labels is not None else torch.full((len(order),), -1), "real")
    if source == "noise":
        return _fdda.noise(count, resolution, seed)
    model = copy.deepcopy(model).eval()
    if source == "zeroq":
        return _fdda.zeroq(model, count, resolution, steps=steps, seed=seed, progress=progress)
    labels_t = torch.as_tensor(np.asarray(labels))
    pick = np.concatenate([np.flatnonzero(np.asarray(labels) == c)[:per_class] for c in range(classes)])
    real = data.tensors(images[pick], resolution)
    centres = _fdda.class_centres(model, real, labels_t[pick], classes, per_class)
    syn = _fdda.fdda(model, centres, resolution, images_per_class, steps, seed=seed, progress=progress)
    # The real images the centres came from calibrate too, as the paper's calibration batch joins every synthetic one
    return replace(syn, images=torch.cat([syn.images, real]), labels=torch.cat([syn.labels, labels_t[pick]]))


def ptq(model: nn.Module, resolution: int, source: str = "fdda", images: np.ndarray | None = None,
        labels: np.ndarray | None = None, bits: tuple[int, int] = (8, 8), classes: int | None = None,
        per_class: int = _fdda.PER_CLASS, steps: int = _fdda.STEPS, seed: int = 0, ends: int | None = 8,
        synthetic: _fdda.Synthetic | None = None, distill_steps: int = 0,
        progress: Progress | None = None) -> Quantized:
    """The whole post-training quantization: calibration images from `source` (made on the network with its
    BatchNorm layers), then `quantize` (which folds BatchNorm, calibrates and exports). Pass `synthetic` to reuse
    images already made (one FDDA run serves W8A8 and W4A8)."""
    _bits(bits)
    t = time.perf_counter()
    if synthetic is None:
        synthetic = calibration_images(model, source, resolution, images, labels, classes, per_class, steps=steps,
                                       seed=seed, progress=progress)
    made = time.perf_counter() - t
    q = quantize(model, synthetic.images, bits, ends, distill_steps=distill_steps, seed=seed, progress=progress)
    q.calibration.update(source=synthetic.source, seconds=round(made, 2))
    return q

"""A quantized network as an integer program (edgeprune.artifacts.IntegerProgram), and a numpy interpreter of it.

`program(q)` walks the BatchNorm-folded, fake-quantized graph of `quantize.quantize` and writes, op by op, what an
int8 build computes: every convolution and linear layer with its integer parameters (quantize.QuantLayer), and
between them residual adds, global means and standalone ReLUs in integer arithmetic too, each with fixed-point
multipliers computed here once, so codegen and the reference apply the very same constants. `run(program, x)` is
that reference: plain numpy, NCHW, int64 where products need it. Compiled int8 networks match it bit for bit; it
matches the float simulation to within one step of each grid (the simulation rounds in float at every point).
"""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..artifacts import IntegerOp, IntegerProgram
from ..errors import UserError
from ..fixedpoint import add_multipliers, quantize_multiplier
from .quantize import (
    QMAX,
    QMIN,
    ActQuant,
    Quantized,
    QuantLayer,
    _activation_kind,
    _clamp,
    _fused_activation,
    reference,
    requantize_fixed,
)

_ADD = (operator.add, operator.iadd, torch.add)
_MEAN_FUNCTIONS = (F.adaptive_avg_pool2d, torch.mean)
_FLATTEN_FUNCTIONS = (torch.flatten,)
_FLATTEN_METHODS = ("flatten", "view", "reshape")
_PASS = (nn.Identity, nn.Dropout)
_PASS_FUNCTIONS = (F.dropout,)
_PASS_METHODS = ("contiguous",)


def _is_mean(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        m = modules[node.target]
        return isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1))
    if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
        return node.args[1] in (1, (1, 1))
    if node.op == "call_function" and node.target is torch.mean or node.op == "call_method" and node.target == "mean":
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return tuple(sorted(d % 4 for d in (dims if isinstance(dims, (list, tuple)) else [dims]))) == (2, 3)
    return False


class _Writer:
    def __init__(self, q: Quantized, example: torch.Tensor) -> None:
        self.q = q
        self.gm = q.module
        self.modules = dict(self.gm.named_modules())
        ShapeProp(self.gm).propagate(example)
        self.val: dict[str, str] = {}  # fx node -> program tensor
        self.grid: dict[str, tuple[float, int]] = {}  # program tensor -> (scale, zero point)
        self.ops: list[IntegerOp] = []

    def shape(self, node: fx.Node) -> tuple[int, ...]:
        return tuple(node.meta["tensor_meta"].shape)

    def tensor(self, node) -> str:
        if not isinstance(node, fx.Node) or node.name not in self.val:
            raise UserError(f"cannot compile the int8 network: '{getattr(node, 'name', node)}' is not an int8 "
                            "tensor where an integer kernel reads it; quantize the network with quantize.quantize")
        return self.val[node.name]

    def emit(self, kind: str, inputs: list[str], output: str, grid: tuple[float, int] | None, name: str = "",
             **params) -> None:
        if grid is not None:  # every int8 tensor's scale, which a .tflite export writes (codegen/tflite_export.py)
            params.setdefault("output_scale", float(grid[0]))
        self.ops.append(IntegerOp(kind, inputs, output, params, name))
        if grid is not None:
            self.grid[output] = grid

    def run(self) -> IntegerProgram:
        placeholder = None
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                placeholder = node
            elif node.op == "output":
                src = self.tensor(node.args[0])
                scale, zp = self.grid[src]
                self.emit("dequantize", [src], "output", None, scale=scale, zero_point=zp)
            elif node.op == "call_module" and isinstance(self.modules[node.target], ActQuant):
                self.point(node)
            elif node.op == "call_module" and isinstance(self.modules[node.target], (nn.Conv2d, nn.Linear)):
                self.layer(node)
            else:
                self.layout(node)
        if placeholder is None:
            raise UserError("the quantized network has no input")
        return IntegerProgram(placeholder.name, self.shape(placeholder), self.ops, "output")

    def layer(self, node: fx.Node) -> None:
        act = _fused_activation(node, self.modules)
        point = next(iter((act or node).users))
        out = point.name
        x = self.tensor(node.args[0])
        if node.target in self.q.float_layers:  # kept in fp32 (mixed precision)
            fl = self.q.float_layers[node.target]
            self.emit("fconv", [x], out, (fl.output_scale, fl.output_zero_point), node.target,
                      weight=fl.weight, bias=fl.bias, input_scale=fl.input_scale,
                      input_zero_point=fl.input_zero_point, output_scale=fl.output_scale,
                      output_zero_point=fl.output_zero_point, act_min=fl.act_min, act_max=fl.act_max,
                      stride=fl.stride, padding=fl.padding, dilation=fl.dilation, groups=fl.groups)
        else:
            L: QuantLayer = self.q.layers[node.target]
            self.emit("conv", [x], out, (L.output_scale, L.output_zero_point), node.target, weight=L.weight,
                      bias=L.bias, multiplier=L.multiplier, shift=L.shift, input_zero_point=L.input_zero_point,
                      output_zero_point=L.output_zero_point, act_min=L.act_min, act_max=L.act_max, stride=L.stride,
                      padding=L.padding, dilation=L.dilation, groups=L.groups)
        self.val[node.name] = out
        if act is not None:
            self.val[act.name] = out

    def point(self, node: fx.Node) -> None:
        """An activation quantization point: the op that makes its tensor, unless a layer already did."""
        src = node.args[0]
        if src.name in self.val:  # a layer, its fused activation, or a layout node of an int8 tensor
            self.val[node.name] = self.val[src.name]
            return
        aq = self.modules[node.target]
        grid = (float(aq.scale), int(aq.zero_point))
        out = self.val[node.name] = node.name
        if src.op == "placeholder":
            self.emit("quantize", [src.name], out, grid, scale=grid[0], zero_point=grid[1])
        elif src.op in ("call_function", "call_method") and src.target in _ADD or \
                src.op == "call_method" and src.target in ("add", "__add__"):
            a, b = (self.tensor(x) for x in src.args[:2])
            (sa, za), (sb, zb) = self.grid[a], self.grid[b]
            ma, mb, shift = add_multipliers(sa, sb, grid[0])
            self.emit("add", [a, b], out, grid, multipliers=(ma, mb), shift=shift, input_zero_points=(za, zb),
                      output_zero_point=grid[1], act_min=QMIN, act_max=QMAX)
        elif _is_mean(src, self.modules):
            x = self.tensor(src.args[0])
            sx, zx = self.grid[x]
            _, _, h, w = self.shape(src.args[0])
            m, s = quantize_multiplier(np.array([sx / (grid[0] * h * w)]))
            self.emit("mean", [x], out, grid, multiplier=int(m[0]), shift=int(s[0]), input_zero_point=zx,
                      output_zero_point=grid[1])
        elif (kind := _activation_kind(src, self.modules)) is not None:
            x = self.tensor(src.args[0])
            sx, zx = self.grid[x]
            m, s = quantize_multiplier(np.array([sx / grid[0]]))
            lo, hi = _clamp(kind, *grid)
            self.emit("requant", [x], out, grid, multiplier=int(m[0]), shift=int(s[0]), input_zero_point=zx,
                      output_zero_point=grid[1], act_min=lo, act_max=hi)
        else:
            what = src.target if src.op != "call_module" else type(self.modules[src.target]).__name__
            raise UserError(f"no int8 kernel for '{src.name}' ({getattr(what, '__name__', what)}); int8 builds "
                            "take convolutions, linear layers, ReLU/ReLU6, residual adds, max pooling and global "
                            "means: keep this layer in fp32")

    def layout(self, node: fx.Node) -> None:
        """Nodes that keep the grid: flatten, max pooling, dropout. Other nodes are made at their point."""
        m = self.modules.get(node.target) if node.op == "call_module" else None
        if node.op == "call_method" and node.target in ("size", "dim") or node.op == "get_attr":
            return
        if isinstance(m, _PASS) or node.op == "call_function" and node.target in _PASS_FUNCTIONS or \
                node.op == "call_method" and node.target in _PASS_METHODS:
            self.alias(node, node.args[0])
        elif isinstance(m, nn.Flatten) or node.op == "call_function" and node.target in _FLATTEN_FUNCTIONS or \
                node.op == "call_method" and node.target in _FLATTEN_METHODS:
            src = node.args[0]
            if len(self.shape(node)) != 2 or self.shape(node)[0] != self.shape(src)[0]:
                raise UserError(f"int8 builds flatten to [batch, features] only; '{node.name}' makes "
                                f"{list(self.shape(node))}")
            self.grid_op("flatten", node, src)
        elif isinstance(m, nn.MaxPool2d) or node.op == "call_function" and node.target is F.max_pool2d:
            pool = m if m is not None else nn.MaxPool2d(*node.args[1:], **node.kwargs)
            pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
            if pool.ceil_mode or pair(pool.dilation) != (1, 1):
                raise UserError(f"int8 max pooling '{node.name}' takes neither ceil_mode nor dilation")
            self.grid_op("maxpool", node, node.args[0], kernel=pair(pool.kernel_size),
                         stride=pair(pool.stride or pool.kernel_size), padding=pair(pool.padding))

    def alias(self, node: fx.Node, src) -> None:
        if isinstance(src, fx.Node) and src.name in self.val:
            self.val[node.name] = self.val[src.name]

    def grid_op(self, kind: str, node: fx.Node, src, **params) -> None:
        if not (isinstance(src, fx.Node) and src.name in self.val):
            return  # not an int8 tensor (made later at its point, or a shape)
        x = self.val[src.name]
        self.emit(kind, [x], node.name, self.grid[x], **params)
        self.val[node.name] = node.name


def program(q: Quantized, input_shape: tuple[int, ...]) -> IntegerProgram:
    """The integer program of quantized network `q` for inputs of `input_shape` (N, C, H, W)."""
    return _Writer(q, torch.zeros(*input_shape)).run()


# ---------------------------------------------------------------- the reference interpreter


def _conv(p: dict, x: np.ndarray) -> np.ndarray:
    w = p["weight"]
    kind = "dense" if w.ndim == 2 else "conv"
    layer = QuantLayer("", kind, w, 8, np.ones(len(w), np.float32), p["bias"], 1.0, p["input_zero_point"], 1.0,
                       p["output_zero_point"], p["multiplier"], p["shift"], p["act_min"], p["act_max"],
                       stride=tuple(p["stride"]), padding=tuple(p["padding"]), dilation=tuple(p["dilation"]),
                       groups=p["groups"])
    return reference(layer, x)


def _to_grid(y: np.ndarray, scale: float, zero_point: int, lo: int = QMIN, hi: int = QMAX) -> np.ndarray:
    """float32 -> int8: clamp(round_half_even(y / scale) + zero_point, lo, hi)."""
    return np.clip(np.round(y.astype(np.float32) / np.float32(scale)) + zero_point, lo, hi).astype(np.int8)


def _from_grid(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """int8 -> float32: (x - zero_point) * scale."""
    return ((x.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)).astype(np.float32)


def _fconv(p: dict, x: np.ndarray) -> np.ndarray:
    """A layer kept in fp32: dequantize, PyTorch's float convolution or linear layer, quantize with its clamp."""
    xf = torch.from_numpy(_from_grid(x, p["input_scale"], p["input_zero_point"]))
    w, b = torch.from_numpy(np.asarray(p["weight"], np.float32)), torch.from_numpy(np.asarray(p["bias"], np.float32))
    if w.dim() == 2:
        y = F.linear(xf, w, b)
    else:
        pad = tuple(p["padding"])
        t, left, bottom, right = pad if len(pad) == 4 else (pad[0], pad[1], pad[0], pad[1])
        y = F.conv2d(F.pad(xf, (left, right, t, bottom)), w, b, tuple(p["stride"]), 0, tuple(p["dilation"]),
                     int(p["groups"]))
    return _to_grid(y.numpy(), p["output_scale"], p["output_zero_point"], p["act_min"], p["act_max"])


def _maxpool(p: dict, x: np.ndarray) -> np.ndarray:
    (kh, kw), (sh, sw), pad = p["kernel"], p["stride"], tuple(p["padding"])
    ph, pw, pb, pr = pad if len(pad) == 4 else (pad[0], pad[1], pad[0], pad[1])
    xp = np.pad(x, ((0, 0), (0, 0), (ph, pb), (pw, pr)), constant_values=QMIN)
    oh, ow = (xp.shape[2] - kh) // sh + 1, (xp.shape[3] - kw) // sw + 1
    out = np.full(x.shape[:2] + (oh, ow), QMIN, np.int8)
    for i in range(kh):
        for j in range(kw):
            out = np.maximum(out, xp[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw])
    return out


def _step(op: IntegerOp, env: dict) -> np.ndarray:
    p, xs = op.params, [env[i] for i in op.inputs]
    if op.kind == "quantize":
        return _to_grid(xs[0], p["scale"], p["zero_point"])
    if op.kind == "dequantize":
        return _from_grid(xs[0], p["scale"], p["zero_point"])
    if op.kind == "conv":
        return _conv(p, xs[0])
    if op.kind == "fconv":
        return _fconv(p, xs[0])
    if op.kind == "add":
        s = p["shift"]  # two inputs, or more (an imported .tflite's residual chain)
        acc = sum(m * (x.astype(np.int64) - z) for x, m, z in zip(xs, p["multipliers"], p["input_zero_points"]))
        out = ((acc + (1 << (s - 1))) >> s) + p["output_zero_point"]
        return np.clip(out, p["act_min"], p["act_max"]).astype(np.int8)
    if op.kind == "mean":
        if "multipliers" in p:  # the mean of a sum of inputs (an imported .tflite's float mean), one rounding
            acc = sum(m * (x.astype(np.int64) - z).sum((2, 3), keepdims=True)
                      for x, m, z in zip(xs, p["multipliers"], p["input_zero_points"]))
            return np.clip(((acc + (1 << (p["shift"] - 1))) >> p["shift"]) + p["output_zero_point"], -128,
                           127).astype(np.int8)
        acc = (xs[0].astype(np.int64) - p["input_zero_point"]).sum((2, 3), keepdims=True)
        return requantize_fixed(acc, [p["multiplier"]], [p["shift"]], p["output_zero_point"], axis=0)
    if op.kind == "requant":
        acc = xs[0].astype(np.int64) - p["input_zero_point"]
        return requantize_fixed(acc, [p["multiplier"]], [p["shift"]], p["output_zero_point"], p["act_min"],
                                p["act_max"], axis=0)
    if op.kind == "maxpool":
        return _maxpool(p, xs[0])
    if op.kind == "flatten":
        return xs[0].reshape(len(xs[0]), -1)
    raise ValueError(f"unknown integer op kind '{op.kind}'")


def run(prog: IntegerProgram, x: np.ndarray, keep: bool = False) -> np.ndarray | dict[str, np.ndarray]:
    """Interpret `prog` on float input `x` (NCHW): the output (float), or every tensor by name with `keep`."""
    env = {prog.input: np.asarray(x, np.float32)}
    for op in prog.ops:
        env[op.output] = _step(op, env)
    return env if keep else env[prog.output]

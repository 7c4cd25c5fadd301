"""A network with binary convolutions compiled with the binary kernel family.

compress.binary.export_form writes each BinaryConv2d of a trained network as what it computes at inference,

    conv2d(where(x >= threshold, 1, -1), codes x scale) + bias        (threshold: static, or the sample's mean)

so its ONNX form is a plain float network any runtime runs (and our own reference for --debug-layers). After
canonicalization (BatchNorm folded, channels-last) each such pattern is found again in the Relax graph and replaced
by one call of a binary kernel (kernels/binary.py), with the codes read back from the folded weight (a binary
layer's weight is codes x one value per output channel, exactly) and the elementwise tail that follows it (bias,
folded BatchNorm, a per-channel multiply, one residual add, clamps such as Hardtanh and ReLU) fused into the
kernel. A layer whose output only the next binary layer's binarization reads writes that layer's input bits, and
the next reads them packed (XNOR-Net-style stacks; Bi-Real shortcuts read the float map, so there it stays float).
Everything else compiles as usual (kernels/dense.py), into shared libraries and C packages alike.

    build, report = compile_binarized(export_form(model), "host", "out/", input_shape=(1, 3, 64, 64))
    report.binary_layers, report.weight_bytes, report.fp32_weight_bytes   # 1-bit layers at ~1/32 of fp32
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import tvm
from torch import nn
from tvm import relax

from ..artifacts import Build
from ..errors import UserError
from ..targets import Target, get_target
from .kernels import binary
from .kernels.common import FAMILY, FLOPS, OP, REDUCTION

SOURCE_ONNX = "binarized.onnx"


# ---------------------------------------------------------------- finding the pattern in Relax


@dataclass
class Found:
    """One binary convolution found in the graph, with the tail fused into it."""

    conv: binary.Conv
    x: relax.Expr  # the float input (channels-last)
    codes: np.ndarray  # int8 [Cout, Cin, kh, kw]
    mul: np.ndarray
    add: np.ndarray
    threshold: np.ndarray
    residual: relax.Expr | None
    last: relax.Var  # the variable the kernel's output replaces
    conv_var: relax.Var | None = None  # the conv2d's own variable
    sign_var: relax.Var | None = None  # the comparison x >= t
    next_threshold: np.ndarray | None = None  # bits out: the next binary layer's threshold


@dataclass
class Report:
    """What became binary: each layer's kernel shape, and flash: the binary layers' constants against the fp32
    weights they replace."""

    binary_layers: list[str] = field(default_factory=list)
    weight_bytes: int = 0
    fp32_weight_bytes: int = 0
    conv_order: list[int] = field(default_factory=list)  # the graph's convolutions (by position) in call order


def _op(expr) -> str:
    return getattr(getattr(expr, "op", None), "name", "") if isinstance(expr, relax.Call) else ""


def _const(expr) -> np.ndarray | None:
    return expr.value.numpy() if isinstance(expr, tvm.ir.Constant) else None


def _ints(values) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def split_codes(w_hwio: np.ndarray) -> tuple[str, np.ndarray, np.ndarray] | None:
    """(code set, codes [Cout, Cin, kh, kw], per-channel multiplier) when every output channel of the weight is
    codes x one value, exactly: {-v, +v} (pm1) or {0, v} (01, a layer with zeros). None for any other weight."""
    w = w_hwio.transpose(3, 2, 0, 1).reshape(w_hwio.shape[3], -1)  # [Cout, Cin * kh * kw] in OIHW order
    shape = (w_hwio.shape[3], w_hwio.shape[2], w_hwio.shape[0], w_hwio.shape[1])
    mag = np.abs(w)
    nonzero = w != 0
    v = np.where(nonzero.any(1), mag.max(1), 0).astype(np.float32)
    if not np.all((mag == v[:, None]) | ~nonzero):
        return None  # magnitudes that differ within a channel: not binary
    if nonzero.all():
        return "pm1", np.sign(w).astype(np.int8).reshape(shape), v
    first = np.where(nonzero.any(1), w[np.arange(len(w)), nonzero.argmax(1)], 0).astype(np.float32)
    if not np.all((w == first[:, None]) | ~nonzero):
        return None  # {0, -v, +v}: ternary
    if not nonzero.any():
        return None
    return "01", nonzero.astype(np.int8).reshape(shape), first


def _vars_in(expr) -> dict:
    """The variables an expression reads, each once (a dict used as an ordered set)."""
    read: dict = {}
    relax.analysis.post_order_visit(expr, lambda e: read.setdefault(e, None) if isinstance(e, relax.Var) else None)
    return read


class _Graph:
    """The bindings of main's dataflow block: what each variable is bound to, and how often it is used."""

    def __init__(self, func: relax.Function) -> None:
        self.value: dict = {}
        for block in func.body.blocks:
            for b in block.bindings:
                self.value[b.var] = b.value

        self.users: dict = {}  # var -> the variables whose values read it (once per reading binding)
        for var, value in [*self.value.items(), (None, func.body.body)]:
            for used in _vars_in(value):
                self.users.setdefault(used, []).append(var)

    def through_permutes(self, expr) -> tuple[relax.Expr, list[int]]:
        """The expression under any permute_dims, and the axes they compose to (what the outer axes index)."""
        axes = None
        while isinstance(expr, relax.Var) and _op(self.value.get(expr)) == "relax.permute_dims":
            call = self.value[expr]
            perm = _ints(call.attrs.axes)
            axes = list(perm) if axes is None else [perm[a] for a in axes]
            expr = call.args[0]
        return expr, axes or []

    def bound(self, expr):
        return self.value.get(expr) if isinstance(expr, relax.Var) else None

    def single_user(self, var) -> relax.Var | None:
        users = self.users.get(var, [])
        return users[0] if len(users) == 1 else None  # None too where the function returns it


def find(func: relax.Function, word: int) -> list[Found]:
    """Every `conv2d(where(x >= t, 1, -1), binary weight)` of a channels-last graph, with its fused tail."""
    g = _Graph(func)
    found = []
    for var, call in g.value.items():
        if _op(call) != "relax.nn.conv2d" or str(call.attrs.data_layout) != "NHWC" \
                or str(call.attrs.kernel_layout) != "HWIO" or int(call.attrs.groups) != 1:
            continue
        w = _const(call.args[1])
        split = None if w is None else split_codes(w)
        sign_in = _sign_input(g, call.args[0])
        if split is None or sign_in is None:
            continue
        x, t_expr, compared = sign_in
        xshape = _ints(call.args[0].ty.shape.values)
        if len(xshape) != 4 or xshape[0] != 1 or _pad(call.attrs.padding) is None:
            continue  # batched or asymmetrically padded: left to the float kernels
        t = _const(t_expr)
        if t is not None:
            mode, threshold = "static", np.broadcast_to(t.reshape(-1), (xshape[3],)).astype(np.float32).copy()
        elif _is_sample_mean(g, t_expr, compared):
            mode, threshold = "sample-mean", np.zeros(xshape[3], np.float32)
        else:
            continue
        codes, (mul, add), residual, clamp, last = split[0], (split[2], np.zeros(len(split[2]), np.float32)), \
            None, [None, None], var
        mul = mul.copy()
        while True:  # the tail: each step the only use of the one before
            nxt = g.single_user(last)
            value = g.bound(nxt)
            if nxt is None or not isinstance(value, relax.Call) or not value.args[0].same_as(last):
                break
            other = value.args[1] if len(value.args) > 1 else None
            c = _const(other) if other is not None else None
            name = _op(value)
            if name == "relax.nn.relu" and clamp == [None, None]:
                clamp[0] = 0.0
            elif name == "relax.maximum" and c is not None and c.size == 1 and clamp == [None, None]:
                clamp[0] = float(c.reshape(()))
            elif name == "relax.minimum" and c is not None and c.size == 1 and clamp[1] is None:
                clamp[1] = float(c.reshape(()))
            elif clamp != [None, None]:
                break  # nothing but clamps after a clamp
            elif name == "relax.add" and c is not None and residual is None and _per_channel(c, len(mul)):
                add = (add + c.reshape(-1)).astype(np.float32)
            elif name == "relax.multiply" and c is not None and residual is None and _per_channel(c, len(mul)):
                mul, add = (mul * c.reshape(-1)).astype(np.float32), (add * c.reshape(-1)).astype(np.float32)
            elif name == "relax.add" and c is None and residual is None and other is not None \
                    and _ints(other.ty.shape.values) == _ints(value.ty.shape.values):
                residual = other
            else:
                break
            last = nxt
        conv = binary.Conv(xshape[1], xshape[2], xshape[3], int(w.shape[3]), (int(w.shape[0]), int(w.shape[1])),
                           _ints(call.attrs.strides), _pad(call.attrs.padding), _ints(call.attrs.dilation),
                           codes, mode, "float", residual is not None, (clamp[0], clamp[1]), word)
        found.append(Found(conv, x, split[1], mul, add, threshold, residual, last, var, _sign_var(g, call.args[0])))
    return _chain(g, found)


def _sign_var(g: _Graph, data) -> relax.Var:
    where, _ = g.through_permutes(data)
    return g.through_permutes(g.bound(where).args[0])[0]


def _chain(g: _Graph, found: list[Found]) -> list[Found]:
    """Where a binary layer's output is read only by the next binary layer's binarization (a static threshold, no
    residual between), the first writes the second's input bits and the second reads them packed: the float map
    between them is never written."""
    by_sign = {f.sign_var: f for f in found}
    for f in found:
        nxt = g.single_user(f.last)
        second = by_sign.get(nxt) if nxt is not None else None
        if second is None or f.residual is not None or second.conv.act != "static" \
                or not second.x.same_as(f.last) or not _only_path(g, nxt, second.conv_var):
            continue
        f.conv, f.next_threshold = replace(f.conv, out="bits"), second.threshold
        second.conv = replace(second.conv, act="packed")
    return found


def _only_path(g: _Graph, var, end) -> bool:
    """Whether `var`'s value reaches `end` and nothing else: each step the only user, through where and permutes."""
    while not var.same_as(end):
        var = g.single_user(var)
        if var is None or not (var.same_as(end) or _op(g.bound(var)) in ("relax.where", "relax.permute_dims")):
            return False
    return True


def _pad(padding) -> tuple[int, int] | None:
    """(top, left) of a symmetric padding; None otherwise (the layer then stays a float convolution)."""
    top, left, bottom, right = _ints(padding)
    return (top, left) if (top, left) == (bottom, right) else None


def _per_channel(c: np.ndarray, channels: int) -> bool:
    return c.size == channels and all(d == 1 for d in c.shape[:-1]) and c.shape[-1] == channels


def _sign_input(g: _Graph, data) -> tuple[relax.Expr, relax.Expr, relax.Expr] | None:
    """(x, t, what t is compared with) when `data` is where(x >= t, 1, -1) seen through permute_dims: x
    channels-last: itself, or x transposed where the binarization was computed channels-first (on the network's
    NCHW input, say)."""
    where, outer = g.through_permutes(data)
    call = g.bound(where)
    if _op(call) != "relax.where":
        return None
    ones = [_const(a) for a in call.args[1:]]
    if any(v is None or v.size != 1 for v in ones) or (float(ones[0].reshape(())), float(ones[1].reshape(()))) \
            != (1.0, -1.0):
        return None
    cond, inner = g.through_permutes(call.args[0])
    ge = g.bound(cond)
    if _op(ge) != "relax.greater_equal":
        return None
    axes = list(range(len(_ints(data.ty.shape.values))))
    composed = [(inner or axes)[a] for a in (outer or axes)]
    x = ge.args[0]
    if composed == [0, 2, 3, 1]:
        x = relax.op.permute_dims(x, composed)  # NCHW -> NHWC (the threshold is per channel either way)
    elif composed != axes:
        return None
    return x, ge.args[1], ge.args[0]


def _is_sample_mean(g: _Graph, t, x) -> bool:
    """Whether t is the mean of x over all but the batch axis."""
    call = g.bound(t)
    return _op(call) == "relax.mean" and call.args[0].same_as(x) and bool(call.attrs.keepdims) \
        and sorted(_ints(call.attrs.axis)) == [1, 2, 3]


# ---------------------------------------------------------------- the rewrite


@relax.expr_functor.mutator
class _Replace(relax.PyExprMutator):
    """Each replaced call (the value the tail's last variable is bound to, matched by identity) becomes its
    kernel's call; the pattern's other bindings are left dead."""

    def __init__(self, calls: list) -> None:
        super().__init__()
        self.calls = calls

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        for old, new in self.calls:
            if call.same_as(old):
                return relax.call_tir(new.args[0], [self.visit_expr(a) for a in new.args[1]], new.ty_args[0])
        return super().visit_call_(call)


def binarize_module(mod: tvm.IRModule, target, threads: int = 2) -> tuple[tvm.IRModule, Report]:
    """A canonicalized (channels-last) module with each binary convolution a call of its binary kernel."""
    kind, word = binary.popcount_kind(target)
    found = find(mod["main"], word)
    report = Report()
    if not found:
        return mod, report
    convs = [v for v, value in _Graph(mod["main"]).value.items() if _op(value) == "relax.nn.conv2d"]
    made = []
    for i, f in enumerate(found):
        consts = binary.constants(f.conv, f.codes, f.mul, f.add, f.threshold, f.next_threshold)
        func = binary.kernel(f.conv, target, threads, kind)
        func = func.with_attrs({OP: "conv" if f.conv.taps > 1 else "pointwise", FAMILY: binary.NAME,
                                FLOPS: 2 * f.conv.macs, REDUCTION: f.conv.taps * f.conv.cin,
                                binary.CODES: f.conv.codes, binary.ACT: f.conv.act, "op_pattern": 8,
                                "tirx.is_scheduled": True, "tirx.noalias": True})
        args = [f.x, *(relax.const(a) for a in consts.arrays(f.conv))]
        args += [f.residual] if f.residual is not None else []
        out = relax.TensorType((1, f.conv.oh, f.conv.ow, f.conv.out_words), f.conv.udtype) \
            if f.conv.out == "bits" else relax.TensorType((1, f.conv.oh, f.conv.ow, f.conv.cout), "float32")
        made.append((f, func, f"binary_conv{i}_{f.conv.kernel[0]}x{f.conv.kernel[1]}", args, out))
        report.binary_layers.append(f"{f.conv.kernel[0]}x{f.conv.kernel[1]} {f.conv.cin}->{f.conv.cout} "
                                    f"{f.conv.height}x{f.conv.width}/{f.conv.stride[0]} {f.conv.codes}"
                                    + (", bits out" if f.conv.out == "bits" else "")
                                    + (", packed in" if f.conv.act == "packed" else ""))
        report.weight_bytes += consts.weight_bytes + (consts.threshold.nbytes if f.conv.act == "static" else 0)
        report.fp32_weight_bytes += 4 * f.codes.size + 4 * f.conv.cout  # the weight and a bias
    # Layers writing bits last: their output changes type, and the float binarization that read it must be gone
    # (dead once the next layer's call replaced it) before it would be rebuilt on bits.
    for bits in (False, True):
        builder = relax.BlockBuilder(mod)  # add_func gives the kernels' GlobalVars the type call_tir checks
        bound = _Graph(mod["main"]).value
        todo = [(bound[f.last], relax.call_tir(builder.add_func(func, name), args, out))
                for f, func, name, args, out in made if (f.conv.out == "bits") == bits]
        mod = builder.get()
        mod["main"] = _Replace(todo).visit_expr(mod["main"])
        mod = relax.transform.DeadCodeElimination()(mod)
    report.conv_order = _conv_order(mod["main"], convs, {name: f.conv_var for f, _, name, _, _ in made})
    return mod, report


def _conv_order(func: relax.Function, convs: list, replaced: dict[str, relax.Var]) -> list[int]:
    """Each convolution's position in the original graph, in the order the rewritten one calls them: a kernel
    with a fused residual is called after the residual's producer, which may be another convolution."""
    order = []
    for var, value in _Graph(func).value.items():
        if _op(value) == "relax.nn.conv2d":
            order += [i for i, v in enumerate(convs) if v.name == var.name][:1]
        elif _op(value) == "relax.call_tir" and value.args[0].name_hint in replaced:
            conv_var = replaced[value.args[0].name_hint]
            order += [i for i, v in enumerate(convs) if v.same_as(conv_var)]
    return order


def _reorder_convs(layers: list, order: list[int]) -> list:
    """The user's layers (sources.source_layers) with the convolutions in call order, where the counts agree."""
    convs = [entry for entry in layers if entry[0] == "conv"]
    if sorted(order) != list(range(len(convs))):
        return layers
    called = iter([convs[i] for i in order])
    return [next(called) if entry[0] == "conv" else entry for entry in layers]


def import_binarized(model: nn.Module, input_shape: tuple[int, ...], onnx_path: str | Path, target: Target,
                     threads: int | None = None):
    """(an ImportedModel whose binary layers call binary kernels, the Report): `model` (a network in export form,
    compress.binary.export_form) is written to `onnx_path`, which stays the build's source."""
    from ..models import zoo
    from .importers import import_model

    x = torch.zeros(*input_shape)
    path = zoo.export_onnx(model.eval(), x, onnx_path)
    found = with_binary_kernels(import_model(path), target, threads)
    if found is None:
        raise UserError("no binary convolution was found in the exported graph; please report it")
    return found


def with_binary_kernels(imported, target: Target, threads: int | None = None):
    """(the imported model with its binary layers calling binary kernels, the Report), or None when its graph has
    no binarization (a `where`) to look at or no binary layer was found: any ONNX file in export form, however
    it was written, compiles binary this way."""
    from .importers import ImportedModel
    from .lower import canonicalize

    if not any(_op(v) == "relax.where" for v in _Graph(imported.mod["main"]).value.values()):
        return None  # the common case, a float network: not worth a canonicalization
    tvm_target = target.tvm_target()
    with tvm_target:
        mod = canonicalize()(imported.mod)
    mod, report = binarize_module(mod, tvm_target, threads or target.cores)
    if not report.binary_layers:
        return None
    return ImportedModel(mod, imported.inputs, imported.source, imported.format, imported.sha256,
                         _reorder_convs(imported.layers, report.conv_order)), report


def compile_binarized(model: nn.Module, target: str | Target, out_dir: str | Path, *,
                      input_shape: tuple[int, ...], fmt: str | None = None,
                      package_name: str | None = None) -> tuple[Build, Report]:
    """Compile a network whose binary convolutions are in export form (compress.binary.export_form): a shared
    library or a C package in `out_dir` (the binary layers' kernels are in both), and the Report of what became
    binary and its flash."""
    from .build import compile_model

    target = get_target(target) if isinstance(target, str) else target
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.src-", dir=out_dir.parent) as scratch:
        imported, report = import_binarized(model, input_shape, Path(scratch) / SOURCE_ONNX, target)
        build = compile_model(imported, target, out_dir, fmt=fmt, package_name=package_name or "binarized",
                              sparse="dense")
    return build, report

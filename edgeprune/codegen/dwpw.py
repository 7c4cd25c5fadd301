"""Depthwise + pointwise fusion: a depthwise convolution and the pointwise one that alone consumes it, as one kernel.

In an inverted-residual block the depthwise layer writes the expanded tensor (96-960 channels) and the projecting
1x1 convolution reads it straight back. Merged, the depthwise outputs of one row of the map (all their channels)
are computed into a small buffer and consumed by the pointwise layer's tiles of that row at once: the expanded
tensor is never written, which takes a pass over memory out of the network and the largest tensors out of a C
package's arena.

TVM's FuseOps never puts two reductions in one function, so this pass does it after fusion: each pair of fused
calls, depthwise then pointwise, becomes one Relax function marked primitive, and FuseTIR merges the two PrimFuncs.
The merged kernel is tagged here (kernels/common.py: op "dwpw", its FLOPs the two layers'), and kernels/dwpw.py
schedules it.
"""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import relax, tirx

from ..artifacts import LayerCost
from .kernels.common import FAMILY, FLOPS, OP, REDUCTION, tag_of

OP_NAME = "dwpw"
# Maps smaller than this stay two kernels. A merged kernel's parallel jobs are its rows, which a 7x7 map has 7 of
# (4 and 3 on two threads), and its tensors fit in L2 anyway: MobileNetV2 1.0's 7x7 pairs ran 0.94-0.99x of their
# two kernels in the network at 2 threads; its 14x14 and larger pairs 0.92-1.72x, most above 1.05 (per-layer
# profiles, `edgeprune measure`, an earlier version that ran 8-pixel tiles as the jobs).
MIN_PIXELS = 100
# Tags of a merged kernel, besides the common ones (kernels/common.py; its FLOPs are the two layers'):
PART_ARGS = "edgeprune.part_args"  # how many of its leading parameters are the depthwise kernel's (input first)
PART_REDUCTIONS = "edgeprune.part_reductions"  # MACs per output element of the depthwise and the pointwise part


def _dense(func, op: str) -> bool:
    return tag_of(func, OP) == op and tag_of(func, FAMILY) == "dense"


def pairs(mod: tvm.IRModule) -> list[tuple[relax.VarBinding, relax.VarBinding]]:
    """(depthwise binding, pointwise binding) in main where the pointwise kernel's activation input is the
    depthwise kernel's output and nothing else reads it."""
    main = mod["main"]
    funcs = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
    uses: dict[relax.Var, int] = {}

    def count(e) -> None:  # every occurrence (a visitor sees a variable passed twice to one call once)
        if isinstance(e, relax.Var):
            uses[e] = uses.get(e, 0) + 1
        elif isinstance(e, relax.Tuple):
            for f in e.fields:
                count(f)
        elif isinstance(e, relax.Call):
            for a in e.args:
                count(a)
        elif isinstance(e, relax.TupleGetItem):
            count(e.tuple_value)
        elif isinstance(e, relax.Expr) and not isinstance(e, tvm.ir.GlobalVar):
            relax.analysis.post_order_visit(e, lambda v: count(v) if isinstance(v, relax.Var) else None)

    bindings = [b for block in main.body.blocks for b in block.bindings]
    for b in bindings:
        count(b.value)
    count(main.body.body)
    depthwise: dict[relax.Var, relax.VarBinding] = {}
    found = []
    for b in bindings:
        call = b.value
        if not (isinstance(call, relax.Call) and getattr(call.op, "name", "") == "relax.call_tir"):
            continue
        func = funcs.get(call.args[0].name_hint)
        if func is None:
            continue
        if _dense(func, "depthwise"):
            depthwise[b.var] = b
        elif _dense(func, "pointwise"):
            x = call.args[1][0]
            if isinstance(x, relax.Var) and x in depthwise and uses.get(x) == 1:
                found.append((depthwise.pop(x), b))
    return found


def worth_fusing(dw: tirx.PrimFunc, pw: tirx.PrimFunc) -> bool:
    """Whether a (depthwise, pointwise) pair merges: the pointwise reads the depthwise output whole and keeps its
    map (stride 1), and the map has at least MIN_PIXELS pixels. The rule depends on shapes only, not on the
    target, so a device's build and its reference build on this machine (--debug-layers) split the network alike."""
    dw_out, pw_in, pw_out = ([int(d) for d in b.shape] for b in (dw.params[-1], pw.params[0], pw.params[-1]))
    return len(dw_out) == 4 and pw_in == dw_out and pw_out[:3] == dw_out[:3] and dw_out[1] * dw_out[2] >= MIN_PIXELS


def fuse(mod: tvm.IRModule, keep: Callable[[tirx.PrimFunc, tirx.PrimFunc], bool] = worth_fusing) -> tvm.IRModule:
    """Merge each depthwise -> pointwise pair that `keep(depthwise, pointwise)` accepts into one tagged kernel."""
    funcs = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
    chosen = [(d, p) for d, p in pairs(mod)
              if keep(funcs[d.value.args[0].name_hint], funcs[p.value.args[0].name_hint])]
    if not chosen:
        return mod
    builder = relax.BlockBuilder(mod)
    replace: dict[relax.Var, relax.Call] = {}
    gone: list[relax.Var] = []
    made: dict[str, tuple[str, str]] = {}
    for i, (d, p) in enumerate(chosen):
        args = [*d.value.args[1], *list(p.value.args[1])[1:]]
        params = [relax.Var(f"a{j}", a.ty) for j, a in enumerate(args)]
        nd = len(d.value.args[1])
        inner = relax.BlockBuilder()
        with inner.function("fused", params, {"Primitive": True}, private=True):
            with inner.dataflow():
                mid = inner.emit(relax.call_tir(d.value.args[0], params[:nd], d.value.ty_args[0]))
                out = inner.emit_output(relax.call_tir(p.value.args[0], [mid, *params[nd:]], p.value.ty_args[0]))
            inner.emit_func_output(out)
        name = f"fused_dwpw_{p.value.args[0].name_hint.removeprefix('fused_')}_{i}"
        gv = builder.add_func(inner.get()["fused"], name)
        made[name] = (d.value.args[0].name_hint, p.value.args[0].name_hint)
        replace[p.var] = relax.Call(gv, args)
        gone.append(d.var)
    mod = builder.get()
    mod["main"] = _Rewriter(replace, gone).visit_expr(mod["main"])
    mod = relax.transform.DeadCodeElimination()(relax.transform.FuseTIR()(mod))
    for gv, f in list(mod.functions_items()):
        if gv.name_hint in made:
            dw, pw = (funcs[n] for n in made[gv.name_hint])
            mod[gv] = f.with_attrs({
                OP: OP_NAME, FAMILY: "dense",
                FLOPS: int(tag_of(dw, FLOPS, 0)) + int(tag_of(pw, FLOPS, 0)),
                REDUCTION: int(tag_of(pw, REDUCTION, 0)),
                PART_ARGS: len(dw.params) - 1,
                PART_REDUCTIONS: [int(tag_of(dw, REDUCTION, 0)), int(tag_of(pw, REDUCTION, 0))],
            })
    return mod


def cost_rows(depthwise: tuple[list, list], pointwise: tuple[list, list], outputs: list, tags: dict,
              kernel: str) -> list[LayerCost]:
    """A merged kernel's two rows, both naming the one kernel: each layer's row as the dense family reports it
    unmerged (depthwise and pointwise are each part's (activation shapes, constant shapes), main weight first).
    Rows describe layers, so they stay the rows the search prices a subnet with (search/space.py) whether or not
    codegen merges the pair; what merging saves shows in the kernel's measured time (cost/table.py splits it)."""
    from .kernels import dense

    (d_acts, d_consts), (p_acts, p_consts) = depthwise, pointwise
    d_red, p_red = (int(r) for r in tags[PART_REDUCTIONS])
    mid = (*outputs[0][:-1], d_acts[0][-1])  # the depthwise output: the map of the output, channels of the input
    return [dense.cost_row("depthwise", d_acts, d_consts, [mid], d_red, kernel),
            dense.cost_row("pointwise", [mid, *p_acts], p_consts, outputs, p_red, kernel)]


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    """The pointwise binding becomes the merged call; the depthwise binding goes."""

    def __init__(self, replace: dict, gone: list) -> None:
        super().__init__()
        self.replace, self.gone = replace, gone

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if any(binding.var.same_as(v) for v in self.gone):
            return
        for var, call in self.replace.items():
            if binding.var.same_as(var):
                self.builder_.emit_normalized(relax.VarBinding(var, self.builder_.normalize(call)))
                return
        super().visit_var_binding_(binding)

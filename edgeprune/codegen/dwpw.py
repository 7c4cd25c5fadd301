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

import math
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
# Tags of a merged kernel, besides the common ones (kernels/common.py; its FLOPs are its layers'):
PART_OPS = "edgeprune.part_ops"  # the layers it runs: ["depthwise", "pointwise"], or an expanding pointwise first
PART_ARGS = "edgeprune.part_args"  # how many of its parameters are each part's, in order (the first's input first)
PART_REDUCTIONS = "edgeprune.part_reductions"  # MACs per output element of each part
PART_BLOCKS = "edgeprune.part_blocks"  # each part's (N, density) where more than one part is block-sparse


def _dense(func, op: str) -> bool:
    return tag_of(func, OP) == op and tag_of(func, FAMILY) == "dense"


def pairs(mod: tvm.IRModule) -> list[tuple[relax.VarBinding, ...]]:
    """(depthwise binding, pointwise binding) in main where the pointwise kernel's activation input is the
    depthwise kernel's output and nothing else reads it; led by the expanding pointwise binding whose output only
    the depthwise kernel reads, where there is one: (expand, depthwise, pointwise)."""
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
    pointwise: dict[relax.Var, relax.VarBinding] = {}
    found = []
    for b in bindings:
        call = b.value
        if not (isinstance(call, relax.Call) and getattr(call.op, "name", "") == "relax.call_tir"):
            continue
        func = funcs.get(call.args[0].name_hint)
        if func is None:
            continue
        x = call.args[1][0] if len(call.args[1]) else None
        if _dense(func, "depthwise"):
            depthwise[b.var] = b
        elif _dense(func, "pointwise"):
            if isinstance(x, relax.Var) and x in depthwise and uses.get(x) == 1:
                d = depthwise.pop(x)
                e = d.value.args[1][0]
                expand = pointwise.get(e) if isinstance(e, relax.Var) and uses.get(e) == 1 else None
                found.append(((expand,) if expand is not None else ()) + (d, b))
            pointwise[b.var] = b
    return found


def worth_fusing(dw: tirx.PrimFunc, pw: tirx.PrimFunc) -> bool:
    """Whether a (depthwise, pointwise) pair merges: the pointwise reads the depthwise output whole and keeps its
    map (stride 1), and the map has at least MIN_PIXELS pixels. The rule depends on shapes only, not on the
    target, so a device's build and its reference build on this machine (--debug-layers) split the network alike."""
    dw_out, pw_in, pw_out = ([int(d) for d in b.shape] for b in (dw.params[-1], pw.params[0], pw.params[-1]))
    return len(dw_out) == 4 and pw_in == dw_out and pw_out[:3] == dw_out[:3] and dw_out[1] * dw_out[2] >= MIN_PIXELS


def expand_too(expand: tirx.PrimFunc, dw: tirx.PrimFunc) -> bool:
    """Whether the expanding pointwise layer joins a merged pair: where the depthwise layer is 3x3 with stride 2 on
    a map of even size, its output rows read 3 expanded rows each, 1.5 per row in all. (At stride 1 each expanded
    row would be computed 3 times, under a 5x5 window 2.5 times. And under a 5x5 window or on an odd map, 41x41,
    TVM's region analysis let the kernel compute the whole expanded map for every row; kernels/dwpw.py refuses
    that.) Shapes only, as worth_fusing."""
    e_out, d_in, d_out = ([int(d) for d in b.shape] for b in (expand.params[-1], dw.params[0], dw.params[-1]))
    return (e_out == d_in and len(d_out) == 4 and int(tag_of(dw, REDUCTION, 0)) == 9
            and d_in[1:3] == [2 * d_out[1], 2 * d_out[2]])


def fuse(mod: tvm.IRModule, keep: Callable[[tirx.PrimFunc, tirx.PrimFunc], bool] = worth_fusing,
         expand: bool = False) -> tvm.IRModule:
    """Merge each depthwise -> pointwise pair that `keep(depthwise, pointwise)` accepts into one tagged kernel; with
    `expand` (C packages, where RAM is the budget), the expanding pointwise layer before it too where `expand_too`
    says so, at the price of computing a third of its rows twice."""
    funcs = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}

    def func(binding: relax.VarBinding) -> tirx.PrimFunc:
        return funcs[binding.value.args[0].name_hint]

    chosen = []
    for chain in pairs(mod):
        *lead, d, p = chain
        if not keep(func(d), func(p)):
            continue
        chosen.append(tuple(lead) + (d, p) if expand and lead and expand_too(func(lead[0]), func(d)) else (d, p))
    if not chosen:
        return mod
    builder = relax.BlockBuilder(mod)
    replace: dict[relax.Var, relax.Call] = {}
    gone: list[relax.Var] = []
    made: dict[str, tuple[list[str], list[int]]] = {}  # merged kernel -> its parts' kernels, their argument counts
    for i, chain in enumerate(chosen):
        # the first call's arguments, then each later call's but its first (the previous call's output)
        parts = [list(b.value.args[1]) if j == 0 else list(b.value.args[1])[1:] for j, b in enumerate(chain)]
        args = [a for part in parts for a in part]
        params = [relax.Var(f"a{j}", a.ty) for j, a in enumerate(args)]
        inner = relax.BlockBuilder()
        with inner.function("fused", params, {"Primitive": True}, private=True):
            with inner.dataflow():
                at, prev = 0, None
                for j, (b, part) in enumerate(zip(chain, parts)):
                    ins = params[at:at + len(part)]
                    at += len(part)
                    call = relax.call_tir(b.value.args[0], ins if prev is None else [prev, *ins], b.value.ty_args[0])
                    prev = inner.emit_output(call) if j == len(chain) - 1 else inner.emit(call)
            inner.emit_func_output(prev)
        name = f"fused_dwpw_{chain[-1].value.args[0].name_hint.removeprefix('fused_')}_{i}"
        gv = builder.add_func(inner.get()["fused"], name)
        made[name] = ([b.value.args[0].name_hint for b in chain], [len(part) for part in parts])
        replace[chain[-1].var] = relax.Call(gv, args)
        gone += [b.var for b in chain[:-1]]
    mod = builder.get()
    mod["main"] = _Rewriter(replace, gone).visit_expr(mod["main"])
    mod = relax.transform.DeadCodeElimination()(relax.transform.FuseTIR()(mod))
    for gv, f in list(mod.functions_items()):
        if gv.name_hint in made:
            names, counts = made[gv.name_hint]
            parts = [funcs[n] for n in names]
            mod[gv] = f.with_attrs({
                OP: OP_NAME, FAMILY: "dense",
                FLOPS: sum(int(tag_of(p, FLOPS, 0)) for p in parts),
                REDUCTION: int(tag_of(parts[-1], REDUCTION, 0)),
                PART_OPS: [str(tag_of(p, OP)) for p in parts],
                PART_ARGS: counts,
                PART_REDUCTIONS: [int(tag_of(p, REDUCTION, 0)) for p in parts],
            })
    return mod


def cost_rows(parts: list[tuple[list, list]], outputs: list, tags: dict, kernel: str) -> list[LayerCost]:
    """A merged kernel's rows, one per layer, all naming the one kernel: each layer's row as the dense family
    reports it unmerged. `parts` are each layer's (activation shapes, constant shapes), main weight first; a later
    layer's input is the previous one's output, which the kernel keeps to itself. Rows describe layers, so they
    stay the rows the search prices a subnet with (search/space.py) whether or not codegen merges the layers; what
    merging saves shows in the kernel's measured time (cost/table.py splits it). A block-sparse pointwise part
    (kernels/chw_merged.py) is reported by its family, from the kernel's block and density tags."""
    from .kernels import bsr, dense

    ops, reductions = list(tags[PART_OPS]), [int(r) for r in tags[PART_REDUCTIONS]]
    rows, prev = [], None
    for j, ((acts, consts), op, red) in enumerate(zip(parts, ops, reductions)):
        ins = acts if prev is None else [prev, *acts]
        last = j == len(parts) - 1
        if last:
            out = outputs[0]
        elif op == "depthwise":  # the depthwise output: the output's map, its own channels (those of its input)
            out = (*outputs[0][:-1], ins[0][-1])
        elif PART_BLOCKS in tags:  # a block-sparse expanding layer: its channels those of the depthwise weight
            out = (*ins[0][:-1], int(parts[j + 1][1][0][-1]))
        else:  # the expanding layer: its input's map; its channels from its weight, however packed (K x M floats)
            out = (*ins[0][:-1], math.prod(consts[0]) // ins[0][-1])
        if op == "pointwise" and tags.get(FAMILY) == bsr.NAME:
            own = tags if PART_BLOCKS not in tags else {
                **tags, bsr.BLOCK: int(tags[PART_BLOCKS][j][0]), bsr.DENSITY: float(tags[PART_BLOCKS][j][1])}
            rows.append(bsr.cost_row(op, ins, consts, [out], red, kernel, tags=own))
        else:
            rows.append(dense.cost_row(op, ins, consts, [out], red, kernel))
        prev = out
    return rows


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    """The last binding of each merged chain becomes the merged call; the bindings before it go."""

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

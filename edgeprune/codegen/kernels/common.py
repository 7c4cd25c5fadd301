"""What every kernel family shares: the CPU as the TVM Target describes it, the tags lowering puts on each fused
function, and small TIR helpers.

Tags (PrimFunc attributes, set once by `tag_kernels` after fusion, read by the families and the cost rows):
  edgeprune.op         the operator class (edgeprune.artifacts.OP_CLASSES), read from the loop nest's structure;
  edgeprune.family     which kernel family schedules it and reports its cost ("dense" for fp32);
  edgeprune.flops      2 x the multiply-accumulates of its reduction blocks (a Winograd GEMM: of the direct
                       convolution it replaces, so rates compare across the two);
  edgeprune.reduction  MACs per output element (a pooling window, a mean's map).
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.target import Target

REDUCE = 2  # tirx.IterVar.CommReduce
OP, FAMILY, FLOPS, REDUCTION = "edgeprune.op", "edgeprune.family", "edgeprune.flops", "edgeprune.reduction"
CONV_FLOPS = "edgeprune.conv_flops"  # block annotation: the FLOPs of the direct convolution a kernel stands for


@dataclass(frozen=True)
class CpuSpec:
    """What a register tile is sized from, read off the TVM Target (triple, cpu, features, vector-width)."""

    lanes: int  # fp32 lanes in one SIMD register
    acc_regs: int  # SIMD registers we let the accumulator tile use
    split_512: bool = False  # 512-bit operations run as two 256-bit halves (AMD Zen 4): 256-bit code loses nothing

    @staticmethod
    def of(target: Target) -> CpuSpec:
        from tvm.target import codegen

        triple = str(target.attrs.get("mtriple", ""))
        width = target.attrs.get("vector-width")
        if triple.startswith(("x86_64", "i686")) or not triple:
            has = lambda f: bool(codegen.llvm_cpu_has_features([f], target))  # noqa: E731
            bits, regs = (512, 32) if has("avx512f") else (256, 16) if has("avx2") else (128, 16)
        elif triple.startswith("aarch64"):
            bits, regs = 128, 32  # ASIMD: 32 q registers
        elif triple.startswith("thumb"):
            bits, regs = 32, 32  # Cortex-M: scalar FPU, 32 single-precision registers
        else:
            bits, regs = 128, 16  # armv7 NEON: 16 q registers
        bits = int(width) if width else bits
        lanes = max(1, bits // 32)
        split = bits == 512 and str(target.attrs.get("mcpu", "")) == "znver4"  # Zen 5 has full 512-bit units
        # Leave a quarter of the register file for the broadcast inputs and weight vectors (half on a scalar FPU,
        # where every operand is its own register).
        return CpuSpec(lanes, regs // 2 if lanes == 1 else regs * 3 // 4, split)


def pick_vector(c: int, lanes: int) -> int:
    """Widest vector (<= lanes) that divides the channel count; 1 means scalar."""
    v = lanes
    while v >= 4:
        if c % v == 0:
            return v
        v //= 2
    return 1


def schedule_injective(sch: s_tir.Schedule, block, lanes: int, parallel: bool = True) -> None:
    """Parallel over the outer loops, SIMD over the innermost one when it divides evenly."""
    loops = sch.get_loops(block)
    if not loops:
        return
    extents = [extent(sch, lp) for lp in loops]
    if any(e is None for e in extents):
        return
    inner = loops[-1]
    vec = pick_vector(extents[-1], lanes)
    if vec > 1:
        _, inner = sch.split(inner, [None, vec])
        sch.vectorize(inner)
    outer = sch.get_loops(block)[: len(loops) - 1] if len(loops) > 1 else []
    if parallel and outer:
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        sch.parallel(fused)


def vectorize_innermost(sch: s_tir.Schedule, block, vec: int) -> None:
    """SIMD over a block's innermost loop, in vectors of `vec`, when they divide it (an epilogue under a tile)."""
    last = sch.get_loops(block)[-1]
    ext = extent(sch, last)
    if ext and vec > 1 and ext % vec == 0:
        if ext > vec:
            _, last = sch.split(last, [None, vec])
        sch.vectorize(last)


def extent(sch: s_tir.Schedule, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def is_reduction(sch: s_tir.Schedule, block) -> bool:
    return any(int(iv.iter_type) == REDUCE for iv in sch.get(block).iter_vars)


def split_at_reduction(sch: s_tir.Schedule) -> tuple[list, object, list] | None:
    """(the blocks before, the one reduction block, the blocks after) of a fused kernel, with every elementwise
    stage after the reduction but the last inlined into that last one, which then writes the output; None when
    the kernel has not exactly one reduction or its tail does not inline."""
    blocks = sch.get_child_blocks(dl.analysis.get_root_block(sch))
    reds = [b for b in blocks if is_reduction(sch, b)]
    if len(reds) != 1:
        return None
    pos = [sch.get(b).name_hint for b in blocks].index(sch.get(reds[0]).name_hint)
    before, after = blocks[:pos], blocks[pos + 1:]
    try:
        for b in after[:-1]:
            sch.compute_inline(b)
    except Exception:  # noqa: BLE001 - a stage that cannot inline: not an elementwise tail
        return None
    return before, reds[0], after[-1:]


def tag_of(func: tirx.PrimFunc, key: str, default=None):
    attrs = func.attrs or {}
    return attrs[key] if key in attrs else default


def classify(func: tirx.PrimFunc) -> tuple[str, int, int]:
    """(operator class, FLOPs, MACs per output) of a fused kernel, from its reduction block's structure.

    In NHWC with HWIO weights: a convolution reduces over (kh, kw, cin): pointwise when the window is 1x1; a
    depthwise one over the window of one channel; a dense layer over one axis into a 2-D output; pooling and means
    read one buffer (no weights), a mean down to 1x1."""
    sch = s_tir.Schedule(func)
    blocks = sch.get_child_blocks(dl.analysis.get_root_block(sch))
    reds = [b for b in blocks if is_reduction(sch, b)]
    flops = 0
    for b in reds:
        n = 1
        for iv in sch.get(b).iter_vars:
            n *= int(iv.dom.extent)
        flops += 2 * n
    if not reds:
        return "data", 0, 0
    if len(reds) > 1:
        return "reduce", flops, 0  # softmax and the like: several passes over one tensor
    block = sch.get(reds[0])
    red_extents = [int(iv.dom.extent) for iv in block.iter_vars if int(iv.iter_type) == REDUCE]
    per_out = 1
    for e in red_extents:
        per_out *= e
    if CONV_FLOPS in block.annotations:
        # A Winograd GEMM (codegen/winograd.py) is the convolution's kernel: its class and the direct convolution's
        # FLOPs, so a measured rate compares with the direct kernel's. Its reduction stays its own (Cin MACs per
        # element of its [t, t, tiles, Cout] output), so a cost row counts the multiplies it does execute.
        return "conv", int(block.annotations[CONV_FLOPS]), per_out
    out_shape = [int(d) for d in block.writes[0].source.ty.shape]
    reads = {r.source.name for r in block.reads} - {block.writes[0].source.name}
    if len(reads) < 2:
        spatial = out_shape[1:-1]
        return ("reduce" if len(out_shape) <= 2 or all(d == 1 for d in spatial) else "pool"), flops, per_out
    if len(out_shape) == 2 or len(red_extents) == 1:
        return "matmul", flops, per_out
    # TVM's grouped NHWC convolution reduces over (kh, kw, cin per group): one channel per group, read from a
    # tensor of as many channels as it writes, is depthwise. (A 2-axis window reduction is depthwise too.)
    lasts = {int(r.source.ty.shape[-1]) for r in block.reads if r.source.name in reads}
    if len(red_extents) == 2 or (red_extents[-1] == 1 and lasts == {out_shape[-1]} and per_out > 1):
        return "depthwise", flops, per_out
    if sum(e > 1 for e in red_extents[:-1]) == 0:
        return "pointwise", flops, per_out
    return "conv", flops, per_out


def family_of(func: tirx.PrimFunc) -> str:
    """The family by what the kernel computes in: fp32 is dense. (int8, block-sparse and binary kernels will be
    told apart here by their buffers' dtypes and the plan's marks.)"""
    return "dense"


@tvm.transform.module_pass(opt_level=0, name="EdgepruneTagKernels")
def tag_kernels(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Tag every fused PrimFunc with its operator class, family, FLOPs and reduction (see the module docstring)."""
    for gv, f in list(mod.functions_items()):
        if isinstance(f, tirx.PrimFunc) and FAMILY not in (f.attrs or {}):  # families that write their own tag them
            try:
                op, flops, per_out = classify(f)
            except Exception:  # noqa: BLE001 - TVM raises its own errors on nests it cannot schedule
                op, flops, per_out = "data", 0, 0  # not a single loop nest we can read: priced as data movement
            mod[gv] = f.with_attrs({OP: op, FAMILY: family_of(f), FLOPS: flops, REDUCTION: per_out})
    return mod

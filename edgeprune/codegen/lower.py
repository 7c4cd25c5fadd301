"""Relax lowering: imported network -> channels-last, fused, scheduled module -> TVM executable.

The passes are TVM's own; the order and the layout choice are ours:
  1. fold BatchNorm into the convolution weights, decompose what is left of inference-only ops;
  2. turn clip into maximum/minimum so layout conversion sees through ReLU6 and the hard activations;
  3. convert conv2d to NHWC activations and HWIO weights (output channels innermost and contiguous),
     fold the weight transposes into the constants;
  4. legalize to TIR and fuse each convolution with its elementwise tail (bias, activation, residual add);
  5. tag every fused function with its operator class and kernel family (kernels/common.py), swap block-sparse
     kernels in where chosen (kernels/bsr.py), merge each depthwise convolution with the pointwise one that
     consumes it (dwpw.py), then schedule every kernel with its family's rules (kernels/), or MetaSchedule
     records if tuned.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu
from tvm.relax.dpl import is_op, wildcard
from tvm.relax.dpl.rewrite import rewrite_call
from tvm.s_tir import dlight as dl

from . import dwpw, legalize
from .kernels import bsr, dense, rules, tag_kernels


@tvm.transform.module_pass(opt_level=0, name="ClipToMinMax")
def clip_to_min_max(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """relax.clip has no layout rule in 0.27; maximum/minimum do, and fuse the same."""
    x = wildcard()
    pattern = is_op("relax.clip")(x, wildcard(), wildcard())

    def rewrite(call, matches):
        data = matches[x]
        dtype = data.ty.dtype
        lo, hi = (float(a.value.value if hasattr(a.value, "value") else a.value) for a in call.args[1:3])
        return relax.op.minimum(relax.op.maximum(data, relax.const(lo, dtype)), relax.const(hi, dtype))

    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            mod[gv] = rewrite_call(pattern, rewrite, func)
    return mod


def canonicalize() -> tvm.transform.Pass:
    """Graph-level passes that run before legalization."""
    return tvm.transform.Sequential(
        [
            relax.transform.FoldBatchnormToConv2D(),
            relax.transform.DecomposeOpsForInference(),
            relax.transform.FoldConstant(),
            clip_to_min_max,
            # a transposed conv too, even where nothing before it is NHWC (legalize.py has its NHWC kernel)
            relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"],
                                           "relax.nn.conv2d_transpose": ["NHWC", "IOHW"]}),
            relax.transform.FoldConstant(),
            relax.transform.CanonicalizeBindings(),
            relax.transform.DeadCodeElimination(),
        ]
    )


def fused_module(mod: tvm.IRModule, target: tvm.target.Target, winograd: bool = True) -> tvm.IRModule:
    """The module after fusion and before scheduling: the tuning tasks and the per-layer view.

    winograd=False keeps every convolution direct (C packages: Winograd's transformed tiles are workspace, and
    its weights 4x the flash)."""
    custom = legalize.CUSTOM if winograd else {k: v for k, v in legalize.CUSTOM.items() if k != "relax.nn.conv2d"}
    with target:
        mod = canonicalize()(mod)
        # ours first for what TVM cannot legalize in NHWC (legalize.py); TVM's own for the rest
        mod = relax.transform.LegalizeOps(customize_legalize_map=custom)(mod)
        return tvm.transform.Sequential(cpu.legalize_passes(target))(mod)


def schedule_module(mod: tvm.IRModule, target: tvm.target.Target, database_dir: str | None = None,
                    use_rules: bool = True, sparse: bsr.Chooser | None = None, threads: int = 2,
                    inline_padding: bool = False, fuse_depthwise: bool = True,
                    channels_first: bool = False) -> tvm.IRModule:
    """Fused module with every kernel scheduled: tuning records first, then our kernel library.

    use_rules=False keeps TVM's plain legalized loops: slow, but an implementation independent of ours with the
    same kernel boundaries, which is what --debug-layers compares against.
    sparse: picks a block-sparse kernel, or dense, for each kernel whose constant weight has 1xN zero blocks
    (kernels/bsr.py); None compiles every kernel dense.
    inline_padding: no kernel keeps a padded copy of its input (C packages: the copy would be workspace), no
    convolution is Winograd (fused_module), and a merged depthwise + pointwise kernel takes in the expanding layer
    before a stride-2 depthwise one too (RAM before speed).
    fuse_depthwise: each depthwise convolution and the pointwise one that consumes it run as one kernel
    (codegen/dwpw.py; in a channels-first run, kernels/chw_merged.py) where the map is large enough for it to pay.
    channels_first: runs of sparse pointwise layers and the depthwise layers between them compute channels-first
    (kernels/chw.py); off by default until it pays in the network (bench/sparse.py measures both).
    """
    mod = tag_kernels(fused_module(mod, target, winograd=not inline_padding))
    if not use_rules:
        # the same kernel boundaries as the scheduled build's (--debug-layers compares them step by step)
        return legalize.narrow_indices(dwpw.fuse(mod, expand=inline_padding) if fuse_depthwise else mod, target)
    if sparse is not None:
        mod = bsr.sparsify(mod, target, sparse, threads, channels_first, merge=fuse_depthwise)
    if fuse_depthwise:  # after sparsify: a pointwise layer that runs sparse stays its own kernel
        mod = dwpw.fuse(mod, expand=inline_padding)  # C packages: the expanding layer too, where RAM is the budget
    if inline_padding:
        mod = _tag_all(mod, dense.INLINE_PADDING)
    with target:
        # Weights are constants, so kernels may store them in whatever layout they read fastest: the schedules
        # mark the repacking copy, which is split out and folded into the constants here.
        mod = relax.transform.AttachAttrLayoutFreeBuffers()(mod)
        if database_dir is not None:
            mod = relax.transform.MetaScheduleApplyDatabase(database_dir)(mod)
        mod = dl.ApplyDefaultSchedule(*rules())(mod)
        return legalize.narrow_indices(tvm.transform.Sequential([
            relax.transform.SplitLayoutRewritePreproc(),
            relax.transform.FoldConstant(),
            relax.transform.DeadCodeElimination(),
        ])(mod), target)


def _tag_all(mod: tvm.IRModule, key: str) -> tvm.IRModule:
    for gv, f in list(mod.functions_items()):
        if isinstance(f, tvm.tirx.PrimFunc):
            mod[gv] = f.with_attr(key, True)
    return mod


def compile_module(mod: tvm.IRModule, target: tvm.target.Target, database_dir: str | None = None,
                   use_rules: bool = True, sparse: bsr.Chooser | None = None, threads: int = 2,
                   inline_padding: bool = False, fuse_depthwise: bool = True, channels_first: bool = False):
    """Relax module -> (tvm.runtime.Executable, the scheduled module it was built from)."""
    scheduled = schedule_module(mod, target, database_dir, use_rules, sparse, threads, inline_padding, fuse_depthwise,
                                channels_first)

    @tvm.transform.module_pass(opt_level=0, name="EdgepruneFinalize")
    def finalize(m: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target))(m)

    with tvm.transform.PassContext(opt_level=3):
        return tvm.compile(scheduled, target=target, relax_pipeline=finalize), scheduled

"""The C package's memory plan: where each tensor lives, decided once at compile time.

The generated code has no heap, so every byte it touches is laid out here. Inputs and intermediate tensors share
one static arena: each gets an offset from a lifetime-based plan, so tensors that are never alive at the same
time reuse the same bytes (`plan_memory`). Weights get offsets in one read-only blob. The kernels' own scratch
(tiles too large for the stack; padding is inlined in C packages), which they request through
``TVMBackendAllocWorkspace``, comes from a fixed region after the arena that the runtime hands out as a stack;
`workspace_bytes` sizes that region from the requests in the kernels as lowered for the target. Every offset
and size is aligned to `ALIGN` bytes.
"""

from __future__ import annotations

import re

from .program import Plan, Tensor, root_tensor

ALIGN = 64  # LLVM's kernels assume 64-byte aligned tensors (aligned NEON loads fault otherwise)


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def plan_memory(plan: Plan) -> None:
    """Arena offsets from tensor lifetimes: largest first, each at the lowest offset that no tensor alive at the
    same time overlaps (greedy by size, the usual heuristic for static memory planning)."""
    n = len(plan.steps)
    for name in plan.inputs:
        plan.tensors[name].first = -1
    for i, step in enumerate(plan.steps):
        for a in step.args[: len(step.args) - step.n_out]:
            r = root_tensor(plan, a)
            r.last = max(r.last, i)
    for name in plan.outputs:  # outputs live until the caller copies them out
        root_tensor(plan, name).last = n
    arena = [t for t in plan.tensors.values() if t.alias_of is None and t.kind in ("input", "temp")]
    for t in arena:
        if t.last < 0:
            t.last = t.first  # written but never read: still needs room while it is written
    plan.intermediate_bytes = sum(t.nbytes for t in arena if t.kind == "temp")
    placed: list[Tensor] = []
    for t in sorted(arena, key=lambda t: (-t.nbytes, t.first)):
        busy = sorted((p.offset, p.offset + align(p.nbytes)) for p in placed
                      if not (p.last < t.first or t.last < p.first))
        offset = 0
        for lo, hi in busy:
            if offset + align(t.nbytes) <= lo:
                break
            offset = max(offset, hi)
        t.offset = offset
        placed.append(t)
    plan.arena_bytes = max((t.offset + align(t.nbytes) for t in placed), default=0)
    offset = 0
    for t in plan.tensors.values():
        if t.kind == "const" and t.alias_of is None:
            t.offset = offset
            offset += align(t.nbytes)


def workspace_bytes(kernels, target) -> int:
    """Scratch the kernels may request at once from the workspace region: the largest sum of one kernel's
    TVMBackendAllocWorkspace requests, read from the kernels lowered as the build lowers them (after buffer
    compaction: a register tile is its tile, not the whole output; buffers up to 1 KiB stay on the stack).
    The runtime hands workspace out as a stack, so a kernel's requests summed bound what it holds at once."""
    import tvm
    from tvm.tirx.build import split_host_device_mods

    from ...errors import UserError

    bound = tvm.tirx.transform.BindTarget(target.with_host(target))(kernels)
    pipeline, finalize_host, _ = tvm.tirx.get_default_tir_pipeline(target)
    with target:
        host, _ = split_host_device_mods(pipeline(bound))
        host = finalize_host()(host)
    worst = 0
    for gv, f in host.functions_items():
        script = f.script()
        sizes = [int(n) for n in _ALLOC.findall(script)]
        if len(sizes) != script.count("TVMBackendAllocWorkspace("):
            raise UserError(f"kernel {gv.name_hint} asks for workspace of a size known only at run time; "
                            "the C package cannot size it: use --format so")
        worst = max(worst, sum(align(n) for n in sizes))
    return worst


_ALLOC = re.compile(r"TVMBackendAllocWorkspace\([^()]*?T\.uint64\((\d+)\)")

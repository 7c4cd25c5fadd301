"""The C package's memory plan: where each tensor lives, decided once at compile time.

The generated code has no heap, so every byte it touches is laid out here. Inputs and intermediate tensors share
one static arena: each gets an offset from a lifetime-based plan, so tensors that are never alive at the same
time reuse the same bytes (`plan_memory`). Weights get offsets in one read-only blob. The kernels' own scratch
(tiles too large for the stack, a merged depthwise + pointwise kernel's row; padding is inlined in C packages),
which they request through ``TVMBackendAllocWorkspace``, is a tensor of the arena too, alive during its call only
(`place_workspace`): the runtime hands it out as a stack from a region that model.c points at that tensor before
the call. Scratch thus fills the gaps that the intermediate tensors leave and adds to the arena only where it
meets the peak. Every offset and size is aligned to `ALIGN` bytes.
"""

from __future__ import annotations

import re

from .program import Plan, Tensor, root_tensor

ALIGN = 64  # LLVM's kernels assume 64-byte aligned tensors (aligned NEON loads fault otherwise)
SCRATCH = "scratch"  # the Tensor kind of a kernel call's workspace


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
    arena = [t for t in plan.tensors.values() if t.alias_of is None and t.kind in ("input", "temp", SCRATCH)]
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


def workspace_per_kernel(kernels, target) -> dict[str, int]:
    """The scratch each kernel may request at once: the sum of its TVMBackendAllocWorkspace requests, read from the
    kernels lowered as the build lowers them (after buffer compaction: a register tile is its tile, not the whole
    output; buffers under 1 KiB stay on the stack). The runtime hands workspace out as a stack, so a kernel's
    requests summed bound what it holds at once. Kernels that request none are left out."""
    import tvm
    from tvm.tirx.build import split_host_device_mods

    from ...errors import UserError

    bound = tvm.tirx.transform.BindTarget(target.with_host(target))(kernels)
    pipeline, finalize_host, _ = tvm.tirx.get_default_tir_pipeline(target)
    with target:
        host, _ = split_host_device_mods(pipeline(bound))
        host = finalize_host()(host)
    sizes_of = {}
    for gv, f in host.functions_items():
        script = f.script()
        sizes = [int(n) for n in _ALLOC.findall(script)]
        if len(sizes) != script.count("TVMBackendAllocWorkspace("):
            raise UserError(f"kernel {gv.name_hint} asks for workspace of a size known only at run time; "
                            "the C package cannot size it: use --format so")
        if sizes:
            sizes_of[gv.name_hint] = sum(align(n) for n in sizes)
    return sizes_of


def place_workspace(plan: Plan, per_kernel: dict[str, int]) -> None:
    """Each kernel call's scratch (`workspace_per_kernel`) as a tensor of the arena alive during that call, and the
    arena planned again around them; plan.workspace_bytes is the largest (what one call holds)."""
    for i, step in enumerate(plan.steps):
        n = per_kernel.get(step.kernel, 0)
        if n:
            plan.tensors[scratch_name(i)] = Tensor(scratch_name(i), (n,), "uint8", SCRATCH, first=i, last=i)
    plan.workspace_bytes = max((per_kernel.get(s.kernel, 0) for s in plan.steps), default=0)
    plan_memory(plan)


def scratch_name(step: int) -> str:
    return f"workspace{step}"


_ALLOC = re.compile(r"TVMBackendAllocWorkspace\([^()]*?T\.uint64\((\d+)\)")

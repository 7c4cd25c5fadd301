"""The C package's memory plan: where each tensor lives, decided once at compile time.

The generated code has no heap, so every byte it touches is laid out here. Inputs and intermediate tensors share
one static arena: each gets an offset from a lifetime-based plan, so tensors that are never alive at the same
time reuse the same bytes (`plan_memory`). Weights get offsets in one read-only blob. The kernels' own scratch
(padded copies, large tiles), which they request through ``TVMBackendAllocWorkspace``, comes from a fixed region
after the arena that the runtime hands out as a stack; `workspace_bytes` sizes that region by reading the
``alloc_buffer`` calls in each kernel's TVMScript text. Every offset and size is aligned to `ALIGN` bytes.
"""

from __future__ import annotations

import re

import numpy as np

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


def workspace_bytes(scheduled) -> int:
    """Scratch the kernels may request at once: the largest sum of one kernel's own buffers (padded copies,
    large tiles). Buffers that stay on the stack are counted too, which only over-provisions."""
    from tvm import tirx

    worst = 0
    for _, f in scheduled.functions_items():
        if isinstance(f, tirx.PrimFunc):
            worst = max(worst, sum(align(n) for n in _buffer_sizes(f.script())))
    return worst


def _buffer_sizes(script: str) -> list[int]:
    """Byte sizes of the alloc_buffer((shape), dtype) calls in a TVMScript text."""
    sizes = []
    for m in re.finditer(r"alloc_buffer\(\(", script):
        i, depth = m.end(), 1
        while depth and i < len(script):
            depth += {"(": 1, ")": -1}.get(script[i], 0)
            i += 1
        dims = script[m.end(): i - 1]
        dtype = re.match(r'\s*,\s*"(\w+)"', script[i:])
        count = 1
        for d in re.findall(r"\d+", re.sub(r"T\.int(?:32|64)\((\d+)\)", r"\1", dims)):
            count *= int(d)
        sizes.append(count * np.dtype(dtype.group(1) if dtype else "float32").itemsize)
    return sizes

"""The program the C package runs, read out of the scheduled Relax module.

TVM 0.27 has no AOT executor, so the executor is ours, and this is its input: the main function of a scheduled
module is a straight line of ``call_tir`` kernels. `extract_plan` walks it once and names every tensor (inputs,
weights, intermediates; reshapes become aliases of their source, since they share its storage) and every kernel
call, in order. It refuses, with a `UserError` that points at ``--format so``, anything a straight line of direct
calls cannot express. The result, a `Plan`, is what the memory planner (`memory.py`) places in the arena, what
the emitter (`emit.py`) turns into ``model.c``, and what the build's layer table prices kernel by kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...errors import UserError


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: str
    kind: str  # "input", "const", "temp"
    first: int = -1  # step that writes it (-1: before the first step)
    last: int = -1  # last step that reads it
    alias_of: str | None = None  # a reshape shares its source's storage
    const_index: int = -1
    offset: int = -1  # in the arena (temps) or the weight blob (consts)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass
class Step:
    kernel: str
    args: list[str]  # tensor names: inputs..., then outputs
    n_out: int = 1


@dataclass
class Plan:
    steps: list[Step]
    tensors: dict[str, Tensor]
    inputs: list[str]
    outputs: list[str]
    constants: list[np.ndarray] = field(default_factory=list)
    arena_bytes: int = 0
    workspace_bytes: int = 0
    intermediate_bytes: int = 0  # the sum of all intermediate tensors, without reuse

    @property
    def weight_bytes(self) -> int:
        return sum(c.nbytes for c in self.constants)


def _shape_dtype(ty) -> tuple[tuple[int, ...], str]:
    return tuple(int(d) for d in ty.shape.values), str(ty.dtype)


def extract_plan(scheduled) -> Plan:
    """The straight-line program in a scheduled module's main function, with its memory planned."""
    from tvm import relax
    from tvm.ir import Constant

    from .memory import plan_memory  # here, not at the top: memory.py imports this module

    main = scheduled["main"]
    tensors: dict[str, Tensor] = {}
    names: dict = {}  # relax var -> tensor name
    inputs = []
    for i, p in enumerate(main.params):
        shape, dtype = _shape_dtype(p.ty)
        tensors[f"in{i}"] = Tensor(f"in{i}", shape, dtype, "input")
        names[p] = f"in{i}"
        inputs.append(f"in{i}")
    constants: list[np.ndarray] = []
    const_names: dict = {}

    def ref(expr) -> str:
        if isinstance(expr, Constant):
            key = expr  # the TVM object itself: Python wrappers come and go, so id() would collide
            if key not in const_names:
                arr = expr.value.numpy()
                name = f"w{len(constants)}"
                tensors[name] = Tensor(name, tuple(arr.shape), str(arr.dtype), "const", const_index=len(constants))
                constants.append(np.ascontiguousarray(arr))
                const_names[key] = name
            return const_names[key]
        if expr in names:
            return names[expr]
        raise UserError(f"the C package cannot express '{type(expr).__name__}' in the model; use --format so")

    steps: list[Step] = []
    body = main.body
    for block in body.blocks:
        for b in block.bindings:
            v, var = b.value, b.var
            if isinstance(v, relax.Call) and getattr(v.op, "name", "") == "relax.call_tir":
                args = [ref(a) for a in v.args[1].fields]
                outs = []
                for ty in (list(var.ty.fields) if hasattr(var.ty, "fields") else [var.ty]):  # split: several
                    shape, dtype = _shape_dtype(ty)
                    name = f"t{len(tensors)}"  # Relax var names repeat across scopes; ours must not
                    tensors[name] = Tensor(name, shape, dtype, "temp", first=len(steps))
                    outs.append(name)
                names[var] = tuple(outs) if hasattr(var.ty, "fields") else outs[0]
                steps.append(Step(v.args[0].name_hint, [*args, *outs], len(outs)))
            elif isinstance(v, relax.Call) and getattr(v.op, "name", "") == "relax.reshape":
                src = ref(v.args[0])
                shape, dtype = _shape_dtype(var.ty)
                name = f"t{len(tensors)}"
                tensors[name] = Tensor(name, shape, dtype, tensors[src].kind, alias_of=src)
                names[var] = name
            elif isinstance(v, relax.Var | relax.DataflowVar):
                names[var] = ref(v)
            elif isinstance(v, relax.Tuple):
                names[var] = tuple(ref(f) for f in v.fields)
            elif isinstance(v, relax.TupleGetItem) and isinstance(names.get(v.tuple_value), tuple):
                names[var] = names[v.tuple_value][v.index]
            else:
                raise UserError(f"the C package cannot express the step '{type(v).__name__}'; use --format so")
    out = names[body.body] if body.body in names else ref(body.body)
    outputs = list(out) if isinstance(out, tuple) else [out]
    plan = Plan(steps, tensors, inputs, outputs, constants)
    plan_memory(plan)
    return plan


def root_tensor(plan: Plan, name: str) -> Tensor:
    """The tensor that owns `name`'s storage: itself, or what its chain of reshapes aliases."""
    t = plan.tensors[name]
    while t.alias_of is not None:
        t = plan.tensors[t.alias_of]
    return t

"""The C package (`--format c`): kernels as an object file for the target, a generated ``model.c`` that calls them
in order over one static arena, the weights as a binary blob linked in read-only, and a small header.

TVM 0.27 has no AOT executor, so the executor is ours: the scheduled Relax module's main function is a straight
line of ``call_tir`` kernels; each intermediate tensor gets an offset in the arena from a lifetime-based memory
plan, and each call becomes a DLTensor argument list and a direct call into the kernel. No malloc, no threads,
no file I/O: the runtime symbols the kernels need come from ``codegen/runtime/edgeprune_rt.c``.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..targets import Target

RUNTIME_DIR = Path(__file__).resolve().parent.parent.parent / "codegen" / "runtime"
ALIGN = 64  # LLVM's kernels assume 64-byte aligned tensors (aligned NEON loads fault otherwise)


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


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _shape_dtype(ty) -> tuple[tuple[int, ...], str]:
    return tuple(int(d) for d in ty.shape.values), str(ty.dtype)


def extract_plan(scheduled) -> Plan:
    """The straight-line program in a scheduled module's main function."""
    from tvm import relax
    from tvm.ir import Constant

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
    _plan_memory(plan)
    return plan


def _root(plan: Plan, name: str) -> Tensor:
    t = plan.tensors[name]
    while t.alias_of is not None:
        t = plan.tensors[t.alias_of]
    return t


def _plan_memory(plan: Plan) -> None:
    """Arena offsets from tensor lifetimes: largest first, each at the lowest offset that no tensor alive at the
    same time overlaps (greedy by size, the usual heuristic for static memory planning)."""
    n = len(plan.steps)
    for name in plan.inputs:
        plan.tensors[name].first = -1
    for i, step in enumerate(plan.steps):
        for a in step.args[: len(step.args) - step.n_out]:
            r = _root(plan, a)
            r.last = max(r.last, i)
    for name in plan.outputs:  # outputs live until the caller copies them out
        _root(plan, name).last = n
    arena = [t for t in plan.tensors.values() if t.alias_of is None and t.kind in ("input", "temp")]
    for t in arena:
        if t.last < 0:
            t.last = t.first  # written but never read: still needs room while it is written
    plan.intermediate_bytes = sum(t.nbytes for t in arena if t.kind == "temp")
    placed: list[Tensor] = []
    for t in sorted(arena, key=lambda t: (-t.nbytes, t.first)):
        busy = sorted((p.offset, p.offset + _align(p.nbytes)) for p in placed
                      if not (p.last < t.first or t.last < p.first))
        offset = 0
        for lo, hi in busy:
            if offset + _align(t.nbytes) <= lo:
                break
            offset = max(offset, hi)
        t.offset = offset
        placed.append(t)
    plan.arena_bytes = max((t.offset + _align(t.nbytes) for t in placed), default=0)
    offset = 0
    for t in plan.tensors.values():
        if t.kind == "const" and t.alias_of is None:
            t.offset = offset
            offset += _align(t.nbytes)


def workspace_bytes(scheduled) -> int:
    """Scratch the kernels may request at once: the largest sum of one kernel's own buffers (padded copies,
    large tiles). Buffers that stay on the stack are counted too, which only over-provisions."""
    from tvm import tirx

    worst = 0
    for _, f in scheduled.functions_items():
        if isinstance(f, tirx.PrimFunc):
            worst = max(worst, sum(_align(n) for n in _buffer_sizes(f.script())))
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


_DTYPE_CODES = {"float": 2, "int": 0, "uint": 1}


def _dl_dtype(dtype: str) -> tuple[int, int]:
    m = re.fullmatch(r"([a-z]+?)(\d+)", dtype)
    if not m or m.group(1) not in _DTYPE_CODES:
        raise UserError(f"tensor type {dtype} is not supported by the C package; use --format so")
    return _DTYPE_CODES[m.group(1)], int(m.group(2))


def _c_ident(text: str) -> str:
    ident = re.sub(r"\W", "_", text)
    return ident if re.match(r"[A-Za-z_]", ident) else f"m_{ident}"


def write_package(directory: Path, plan: Plan, kernels_object: Path, target: Target, name: str,
                  build_id: str) -> None:
    """model.c, <name>.h, weights.bin/.S, the runtime, test_main.c, Makefile and CMakeLists.txt."""
    if len(plan.inputs) != 1 or len(plan.outputs) != 1:
        raise UserError(f"the C package API takes one input and one output; this model has {len(plan.inputs)} and "
                        f"{len(plan.outputs)}; use --format so")
    prefix, upper = name, name.upper()
    t_in, t_out = plan.tensors[plan.inputs[0]], _root(plan, plan.outputs[0])
    for t in (t_in, t_out):
        if t.dtype != "float32":
            raise UserError(f"the C package API is float32 in and out; this model's {t.name} is {t.dtype}")
    shutil.copy(kernels_object, directory / "kernels.o")
    for f in ("edgeprune_rt.h", "edgeprune_rt.c"):
        shutil.copy(RUNTIME_DIR / f, directory / f)

    blob = bytearray()
    for t in plan.tensors.values():
        if t.kind == "const" and t.alias_of is None:
            blob.extend(b"\0" * (t.offset - len(blob)))
            blob.extend(plan.constants[t.const_index].tobytes())
    (directory / "weights.bin").write_bytes(bytes(blob))
    (directory / "weights.S").write_text(
        "/* The weights, linked read-only and 64-byte aligned; generated by edgeprune. */\n"
        "  .section .rodata\n  .balign 64\n"
        f"  .global {prefix}_weights\n{prefix}_weights:\n  .incbin \"weights.bin\"\n"
        + ("  .section .note.GNU-stack,\"\",%progbits\n" if "none" not in target.triple else ""))

    ws = _align(plan.workspace_bytes)
    arena = _align(plan.arena_bytes) + ws
    lines = [f'/* Generated by edgeprune for target {target.name}: runs the network with no heap. */',
             f'#include "{prefix}.h"', '#include "edgeprune_rt.h"', '#include <string.h>', '',
             f'extern const uint8_t {prefix}_weights[];',
             f'static uint8_t arena[{arena}] __attribute__((aligned(64)));', '',
             '/* With -DEP_DEBUG_LAYERS each kernel output goes to ep_debug_layer() (edgeprune run --debug-layers) */',
             '#ifdef EP_DEBUG_LAYERS',
             'void ep_debug_layer(int step, const char *kernel, const void *data, unsigned long nbytes);',
             '#define EP_DEBUG_LAYER(i, k, p, n) ep_debug_layer(i, k, p, n)',
             '#else', '#define EP_DEBUG_LAYER(i, k, p, n) ((void)0)', '#endif', '']
    for k in sorted({s.kernel for s in plan.steps}):
        lines.append(f'int32_t __tvm_ffi_{k}(void *self, const ep_ffi_any *args, int32_t n, ep_ffi_any *ret);')
    lines.append('')
    order = [t for t in plan.tensors.values() if t.kind != "input" or t.name == t_in.name]
    index = {t.name: i for i, t in enumerate(order)}
    for t in order:
        lines.append(f'static int64_t shape_{index[t.name]}[] = {{{", ".join(map(str, t.shape)) or "1"}}};')
    lines += ['', f'static ep_dl_tensor tensors[{len(order)}];', '', 'static void bind(void) {']
    for t in order:
        root = _root(plan, t.name)
        base = (f"(void *)({prefix}_weights + {root.offset})" if root.kind == "const"
                else f"arena + {root.offset}")
        code, bits = _dl_dtype(t.dtype)
        lines.append(f'  tensors[{index[t.name]}] = (ep_dl_tensor){{{base}, {{EP_DL_CPU, 0}}, {len(t.shape)}, '
                     f'{{{code}, {bits}, 1}}, shape_{index[t.name]}, NULL, 0}};')
    lines += ['}', '', 'static const char *last = "";', '',
              f'int {prefix}_run(const float *in, float *out) {{',
              '  ep_ffi_any args[16], ret;',
              '  bind();',
              f'  ep_rt_set_workspace(arena + {_align(plan.arena_bytes)}, {ws});',
              f'  memcpy(arena + {t_in.offset}, in, {t_in.nbytes});']
    for i, s in enumerate(plan.steps):
        if len(s.args) > 16:
            raise UserError(f"kernel {s.kernel} takes {len(s.args)} tensors; the C package supports 16")
        for j, a in enumerate(s.args):
            lines.append(f'  args[{j}] = (ep_ffi_any){{EP_FFI_DLTENSOR_PTR, 0, {{.v_ptr = &tensors[{index[a]}]}}}};')
        lines.append(f'  if (__tvm_ffi_{s.kernel}(NULL, args, {len(s.args)}, &ret) != 0) '
                     f'{{ last = "{s.kernel}"; return {i + 1}; }}')
        out = _root(plan, s.args[-1])
        lines.append(f'  EP_DEBUG_LAYER({i}, "{s.kernel}", arena + {out.offset}, {out.nbytes});')
    lines += [f'  memcpy(out, arena + {t_out.offset}, {t_out.nbytes});', '  return 0;', '}', '',
              f'const char *{prefix}_last_error(void) {{ return ep_rt_last_error()[0] ? ep_rt_last_error() : last; }}',
              '']
    (directory / "model.c").write_text("\n".join(lines))

    n_in, n_out = int(np.prod(t_in.shape)), int(np.prod(t_out.shape))
    header = f"""/* {prefix}: a network compiled by edgeprune for {target.name} ({target.triple}).
 * Generated; do not edit.
 *
 * {prefix}_run() computes one inference with no heap, no threads and no I/O. It is not reentrant: it uses one
 * static arena of {upper}_ARENA_BYTES. Weights are {upper}_WEIGHT_BYTES of read-only data.
 * Returns 0, or the 1-based index of the kernel that failed ({prefix}_last_error() says why).
 */
#ifndef {upper}_H_
#define {upper}_H_
#ifdef __cplusplus
extern "C" {{
#endif

#define {upper}_BUILD_ID "{build_id}"
#define {upper}_INPUT_NDIM {len(t_in.shape)}
#define {upper}_INPUT_SHAPE {{{", ".join(map(str, t_in.shape))}}}
#define {upper}_INPUT_SIZE {n_in}
#define {upper}_OUTPUT_NDIM {len(t_out.shape)}
#define {upper}_OUTPUT_SHAPE {{{", ".join(map(str, t_out.shape))}}}
#define {upper}_OUTPUT_SIZE {n_out}
#define {upper}_ARENA_BYTES {arena}
#define {upper}_WEIGHT_BYTES {len(blob)}

int {prefix}_run(const float *in, float *out);
const char *{prefix}_last_error(void);

#ifdef __cplusplus
}}
#endif
#endif
"""
    (directory / f"{prefix}.h").write_text(header)
    (directory / "test_main.c").write_text(_TEST_MAIN.replace("PREFIX", prefix).replace("UPPER", upper))
    cflags = " ".join(target.cflags)
    (directory / "Makefile").write_text(_MAKEFILE.format(cc=target.cross_compiler, cflags=cflags, prefix=prefix,
                                                         ldflags="" if "none" in target.triple else "-static"))
    (directory / "CMakeLists.txt").write_text(_CMAKE.format(prefix=prefix, cflags=cflags))


def build_id(kernels_object: Path, plan: Plan) -> str:
    h = hashlib.sha256(kernels_object.read_bytes())
    for c in plan.constants:
        h.update(c.tobytes())
    return h.hexdigest()[:16]


_TEST_MAIN = r"""/* Test program, not in the library: PREFIX_run from a raw float32 file to another. */
#define _POSIX_C_SOURCE 199309L
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include "PREFIX.h"

static float in[UPPER_INPUT_SIZE], out[UPPER_OUTPUT_SIZE];

#ifdef EP_DEBUG_LAYERS
/* Every kernel's output to $EP_DEBUG_DIR/layer_<step>.bin, for edgeprune run --debug-layers. */
#include <string.h>
void ep_debug_layer(int step, const char *kernel, const void *data, unsigned long nbytes) {
  const char *dir = getenv("EP_DEBUG_DIR");
  char path[1024];
  snprintf(path, sizeof path, "%s/layer_%04d.bin", dir ? dir : ".", step);
  FILE *f = fopen(path, "wb");
  if (f) { fwrite(data, 1, nbytes, f); fclose(f); }
  (void)kernel;
}
#endif

static double now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

int main(int argc, char **argv) {
  if (argc != 3 && argc != 5) {
    fprintf(stderr, "usage: %s INPUT.bin OUTPUT.bin [RUNS WARMUP]\n", argv[0]);
    return 2;
  }
  FILE *f = fopen(argv[1], "rb");
  if (!f || fread(in, sizeof(float), UPPER_INPUT_SIZE, f) != UPPER_INPUT_SIZE) {
    fprintf(stderr, "cannot read %d floats from %s\n", UPPER_INPUT_SIZE, argv[1]); return 2;
  }
  fclose(f);
  int runs = argc == 5 ? atoi(argv[3]) : 1, warmup = argc == 5 ? atoi(argv[4]) : 0;
  for (int i = 0; i < warmup + runs; ++i) {
    double t0 = now_ms();
    int rc = PREFIX_run(in, out);
    double t1 = now_ms();
    if (rc != 0) { fprintf(stderr, "kernel %d failed: %s\n", rc, PREFIX_last_error()); return 1; }
    if (argc == 5 && i >= warmup) printf("time_ms %.6f\n", t1 - t0);
  }
  f = fopen(argv[2], "wb");
  if (!f || fwrite(out, sizeof(float), UPPER_OUTPUT_SIZE, f) != UPPER_OUTPUT_SIZE) {
    fprintf(stderr, "cannot write %s\n", argv[2]); return 2;
  }
  fclose(f);
  printf("build %s ok\n", UPPER_BUILD_ID);
  return 0;
}
"""

_MAKEFILE = """# Generated by edgeprune. `make` builds lib{prefix}.a and the test program for this package's target.
# make's built-in CC would win over `?=`: set it plainly (override with `make CC=...`).
CC = {cc}
CFLAGS = {cflags}
LDFLAGS = {ldflags}

lib{prefix}.a: model.o edgeprune_rt.o weights.o kernels.o
\t$(AR) rcs $@ $^

%.o: %.c {prefix}.h edgeprune_rt.h
\t$(CC) $(CFLAGS) $(EXTRA_CFLAGS) -c $< -o $@

weights.o: weights.S weights.bin
\t$(CC) $(CFLAGS) -c weights.S -o $@

test_{prefix}: test_main.c lib{prefix}.a
\t$(CC) $(CFLAGS) $(EXTRA_CFLAGS) test_main.c lib{prefix}.a -lm $(LDFLAGS) -o $@

clean:
\trm -f model.o edgeprune_rt.o weights.o lib{prefix}.a test_{prefix}

# Kernel outputs dumped per layer (edgeprune run --debug-layers builds this in a scratch copy).
debug:
\t$(MAKE) clean
\t$(MAKE) test_{prefix} EXTRA_CFLAGS=-DEP_DEBUG_LAYERS
"""

_CMAKE = """# Generated by edgeprune. add_subdirectory() this folder and link {prefix}.
cmake_minimum_required(VERSION 3.13)
project({prefix} C ASM)
set(CMAKE_C_FLAGS "${{CMAKE_C_FLAGS}} {cflags}")
add_library({prefix} STATIC model.c edgeprune_rt.c weights.S ${{CMAKE_CURRENT_SOURCE_DIR}}/kernels.o)
set_source_files_properties(weights.S PROPERTIES OBJECT_DEPENDS ${{CMAKE_CURRENT_SOURCE_DIR}}/weights.bin
                            INCLUDE_DIRECTORIES ${{CMAKE_CURRENT_SOURCE_DIR}})
target_include_directories({prefix} PUBLIC ${{CMAKE_CURRENT_SOURCE_DIR}})
target_link_libraries({prefix} PUBLIC m)
add_executable(test_{prefix} test_main.c)
target_link_libraries(test_{prefix} {prefix})
"""

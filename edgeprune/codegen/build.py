"""compile: model file + target -> a build directory, written atomically.

The directory holds ``model.so`` (the Relax VM executable with our kernels, for the target's CPU) and
``build.json`` (inputs, outputs, kernels, provenance). It is assembled in a sibling temporary directory and
moved into place in one rename, so an interrupted compile never leaves a half-written build behind.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from ..artifacts import BUILD_JSON, Build, LayerCost, MemoryBudget, Network
from ..errors import UserError
from ..targets import Target, get_target
from ..version import __version__
from .importers import ImportedModel, TensorSpec, import_model, import_network

LIBRARY = "model.so"
SOURCE = "model.onnx"  # an in-memory network's source, kept inside its build
FORMATS = ("so", "c")


def output_specs(mod) -> list[TensorSpec]:
    ret = mod["main"].ret_ty
    fields = list(ret.fields) if hasattr(ret, "fields") else [ret]
    specs = []
    for i, t in enumerate(fields):
        if not hasattr(t, "shape") or t.shape is None:
            raise UserError("the model returns something other than tensors; only tensor outputs are supported")
        specs.append(TensorSpec(f"output{i}", tuple(int(d) for d in t.shape.values), str(t.dtype)))
    return specs


def kernel_table(mod) -> tuple[dict[str, int], list[str]]:
    """Fused TIR kernels with their FLOPs, and the kernels no schedule rule fit (they run unscheduled)."""
    from tvm import tirx

    from .kernels.common import FLOPS, tag_of

    flops, raw = {}, []
    for gv, f in mod.functions_items():
        if isinstance(f, tirx.PrimFunc):
            flops[gv.name_hint] = int(tag_of(f, FLOPS, 0))
            if "tirx.is_scheduled" not in (f.attrs or {}):
                raw.append(gv.name_hint)
    return dict(sorted(flops.items())), sorted(raw)


def layer_table(scheduled) -> list[LayerCost]:
    """One cost row per kernel call, in order, each reported by the kernel's family from its tags and the call's
    tensors (constants are weights). The user's layer names are added after (codegen/sources.py)."""
    import numpy as np

    from . import dwpw
    from .cpackage import extract_plan, root_tensor
    from .kernels import family
    from .kernels.bsr import VARIANT
    from .kernels.common import FAMILY, OP, REDUCTION, tag_of

    try:
        plan = extract_plan(scheduled)
    except UserError:
        return []
    funcs = {gv.name_hint: f for gv, f in scheduled.functions_items()}
    def split(ins: list) -> tuple[list, list]:
        consts = [t for t in ins if root_tensor(plan, t.name).kind == "const"]
        acts = [t for t in ins if root_tensor(plan, t.name).kind != "const"]
        consts.sort(key=lambda t: -t.nbytes)  # the main weight first, then bias and folded BatchNorm terms
        return [t.shape for t in acts], [t.shape for t in consts]

    def channels_last(shapes: list, chw: bool) -> list:
        """A channels-first kernel's activations as the layer's own (channels-last) shapes: rows describe layers,
        whatever layout a kernel runs them in."""
        return [(s[0], s[2], s[3], s[1]) if chw and len(s) == 4 else s for s in shapes]

    rows = []
    for step in plan.steps:
        func = funcs[step.kernel]
        tensors = [plan.tensors[a] for a in step.args]
        tags = dict(func.attrs or {})
        chw = str(tags.get(VARIANT, "")) == "chw"
        outs = channels_last([t.shape for t in tensors[len(tensors) - step.n_out:]], chw)
        ins = tensors[: len(tensors) - step.n_out]
        if tag_of(func, OP) == dwpw.OP_NAME:  # one kernel, two or three layers: a row each (codegen/dwpw.py)
            bounds = np.cumsum([0, *(int(n) for n in tags[dwpw.PART_ARGS])])
            parts = [split(ins[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
            parts = [(channels_last(acts, chw), consts) for acts, consts in parts]
            rows.extend(dwpw.cost_rows(parts, outs, tags, step.kernel))
            continue
        acts, consts = split(ins)
        acts = channels_last(acts, chw)
        rows.append(family(str(tag_of(func, FAMILY, "dense"))).cost_row(
            str(tag_of(func, OP, "data")), acts, consts, outs, int(tag_of(func, REDUCTION, 0)), step.kernel,
            tags=tags))
    return rows


def _faster(a, b, inputs: list[TensorSpec], runs: int = 30) -> bool:
    """Whether executable a runs faster than b on this machine (interleaved medians, same inputs)."""
    import numpy as np
    import tvm
    from tvm import relax

    rng = np.random.default_rng(0)
    args = [tvm.runtime.tensor(rng.standard_normal(s.shape).astype(s.dtype)) for s in inputs]
    vms = [relax.VirtualMachine(ex, tvm.cpu()) for ex in (a, b)]
    times: list[list[float]] = [[], []]
    for vm in vms:
        vm.set_input("main", *args)
        for _ in range(3):
            vm.invoke_stateful("main")
    for _ in range(runs):
        for vm, ts in zip(vms, times):
            t = time.perf_counter()
            vm.invoke_stateful("main")
            ts.append(time.perf_counter() - t)
    return float(np.median(times[0])) < float(np.median(times[1]))


def _has_bsr(mod, variant: str) -> bool:
    """Whether a scheduled module has a block-sparse or depthwise kernel of `variant` ("pixels", "chw")."""
    from tvm import tirx

    from .kernels.bsr import VARIANT

    return any(isinstance(f, tirx.PrimFunc) and str((f.attrs or {}).get(VARIANT, "")) == variant
               for _, f in mod.functions_items())


def _export(ex, target: Target, path: Path) -> None:
    from tvm.support import cc

    if target.is_host:
        ex.export_library(str(path))
        return
    if shutil.which(target.cross_compiler) is None:
        raise UserError(f"cross compiler {target.cross_compiler} for target {target.name} is not installed; "
                        f"install it (Debian: apt-get install {_debian_package(target.cross_compiler)})")
    ex.export_library(str(path), fcompile=cc.cross_compiler(target.cross_compiler, options=list(target.cflags)))


def compile_model(
    model: str | Path | ImportedModel | Network,
    target: str | Target,
    out_dir: str | Path,
    *,
    input_shape: tuple[int, ...] | None = None,
    fmt: str | None = None,
    tune_trials: int = 0,
    package_name: str | None = None,
    use_rules: bool = True,
    sparse: str = "auto",
    table=None,
    budget: MemoryBudget | None = None,
    fuse_depthwise: bool = True,
    channels_first: bool | None = None,
) -> Build:
    """Compile a model file, an imported model or a Network for `target` into `out_dir`.

    budget: the RAM (arena + workspace) and flash (code + weights) a C package may take; one that does not fit is
    refused (MemoryBudgetError, nothing written), and build.json states both figures beside the budgets.

    sparse: how layers whose weights have 1xN zero blocks are compiled (codegen/choose.py): "auto" prices
    block-sparse against dense kernels with the device's latency model (`table`, else the target's prior) and keeps
    the faster per layer; "sparse" runs every such layer sparse; "dense" ignores the zeros.

    fuse_depthwise: run each depthwise convolution and the pointwise one that consumes it as one kernel where the map
    is large enough (codegen/dwpw.py); False keeps them two, for comparison.

    channels_first: runs of sparse pointwise layers (and the depthwise layers between them) compute channels-first,
    transposed once at each edge (kernels/chw.py). None (the default): a shared library for this machine is built
    both ways where such runs exist, and the one measured faster here is kept (the two are level within a few
    percent on MobileNetV2 at 2 threads, and which wins moves with the sparsity and the CPU); elsewhere off, since
    no device is at hand to measure (True asks for it)."""
    t0 = time.perf_counter()
    target = get_target(target) if isinstance(target, str) else target
    fmt = fmt or target.default_format
    if fmt not in FORMATS:
        raise UserError(f"unknown format '{fmt}'; this version writes: {', '.join(FORMATS)}")
    if budget and fmt != "c":
        raise UserError("--ram and --flash are budgets of a C package (firmware); add --format c")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / BUILD_JSON).exists())):
        raise UserError(f"{out_dir} exists and is not an edgeprune build; choose another -o directory")
    scratch, int8_io = None, None
    if isinstance(model, Network) and model.integer is not None:  # int8: the integer program, no float source
        from .integer import import_program

        mod, spec, digest, layers = import_program(model.integer, target.tvm_target(), target.cores)
        imported = ImportedModel(mod, [spec], f"{model.name} (int8 program)", "int8", digest, layers)
        ops = model.integer.ops
        if ops[0].kind == "quantize" and ops[-1].kind == "dequantize":  # the C package's int8 entry point
            int8_io = {"input": (ops[0].params["scale"], ops[0].params["zero_point"]),
                       "output": (ops[-1].params["scale"], ops[-1].params["zero_point"])}
        package_name = package_name or model.name
    elif isinstance(model, Network):  # in memory: its ONNX form is kept in the build as the source
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.src-", dir=out_dir.parent))
        if any(p.scheme == "binary" for p in model.plan.values()):  # its module in export form (compress.binary)
            from .binarized import import_binarized

            imported, _ = import_binarized(model.module, tuple(model.input_shape), scratch / SOURCE, target)
        else:
            imported = import_network(model, scratch / SOURCE)
        imported.source = str(out_dir / SOURCE)
        package_name = package_name or model.name
    else:
        imported = model if isinstance(model, ImportedModel) else import_model(model, input_shape, target)
        if not isinstance(model, ImportedModel):  # a file in binary export form: its binary layers run in bits
            from .binarized import with_binary_kernels

            imported = (with_binary_kernels(imported, target) or (imported,))[0]
    try:
        from .choose import chooser

        choose = chooser(sparse, target, table)
        return _compile(imported, target, out_dir, fmt, tune_trials, package_name, use_rules, t0, scratch, choose,
                        budget, int8_io, fuse_depthwise, channels_first)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _compile(imported: ImportedModel, target: Target, out_dir: Path, fmt: str, tune_trials: int,
             package_name: str | None, use_rules: bool, t0: float, scratch: Path | None, choose=None,
             budget: MemoryBudget | None = None, int8_io: dict | None = None, fuse_depthwise: bool = True,
             channels_first: bool | None = None) -> Build:
    from .lower import compile_module, fused_module

    tvm_target = target.tvm_target()

    database = None
    if tune_trials > 0:
        from .tuning import tune

        database = tune(fused_module(imported.mod, tvm_target), target, tune_trials)
    outputs = output_specs(imported.mod)
    try:
        threads = target.cores
        inline = fmt == "c"  # firmware: no padded copies as workspace
        ex, scheduled = compile_module(imported.mod, tvm_target, use_rules=use_rules, sparse=choose, threads=threads,
                                       inline_padding=inline, fuse_depthwise=fuse_depthwise,
                                       channels_first=bool(channels_first))
        if channels_first is None and choose is not None and target.is_host and fmt == "so" \
                and _has_bsr(scheduled, "pixels"):  # runs may form: build them too, keep the faster here
            chw_ex, chw_scheduled = compile_module(imported.mod, tvm_target, use_rules=use_rules, sparse=choose,
                                                   threads=threads, fuse_depthwise=fuse_depthwise,
                                                   channels_first=True)
            if _has_bsr(chw_scheduled, "chw") and _faster(chw_ex, ex, imported.inputs):
                ex, scheduled = chw_ex, chw_scheduled
        if database is not None:
            # Unmerged: the records are for the kernels fusion made, and a merged depthwise + pointwise kernel
            # is neither of its two; the measurement below then chooses between merged and tuned.
            tuned_ex, tuned_sched = compile_module(imported.mod, tvm_target, database, sparse=choose, threads=threads,
                                                   inline_padding=inline, fuse_depthwise=False)
            if _faster(tuned_ex, ex, imported.inputs):
                ex, scheduled = tuned_ex, tuned_sched
            else:
                database = None  # our schedules measured faster than the records so far
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a TVM failure here is a compiler bug or an unsupported construct
        raise _compile_failure(imported, target, tvm_target, e) from None
    kernels, raw = kernel_table(scheduled)
    layers = layer_table(scheduled)
    if imported.layers:
        from .sources import name_rows

        layers = name_rows(layers, imported.layers)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        memory: dict = {}
        if scratch is not None:
            shutil.copy2(scratch / SOURCE, stage / SOURCE)
        if fmt == "so":
            _export(ex, target, stage / LIBRARY)
            library = LIBRARY
        else:
            name = _c_name(package_name or Path(imported.source).stem)
            memory = _write_c_package(scheduled, target, stage, name, int8_io)
            library = f"lib{name}.a"
            if budget:
                memory["ram_budget_bytes"], memory["flash_budget_bytes"] = budget.ram, budget.flash
                budget.check(memory["ram_bytes"], memory["flash_bytes"], f"{Path(imported.source).name} on "
                             f"{target.name}")
        build = Build(directory=out_dir, target=target.name, format=fmt, library=library, inputs=imported.inputs,
                      outputs=outputs, source=str(imported.source), source_sha256=imported.sha256,
                      kernels=kernels, unscheduled=raw, tuned=database is not None, tool_version=__version__,
                      compile_seconds=round(time.perf_counter() - t0, 2), memory=memory, layers=layers)
        build.save(stage)
        _replace_dir(stage, out_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return build


# Relax operators no legalization lowers -> the ONNX operator they come from, to name the user's node
_ONNX_OF = {"nn.conv2d_transpose": "ConvTranspose", "nn.conv1d_transpose": "ConvTranspose",
            "nn.conv3d_transpose": "ConvTranspose", "image.resize2d": "Resize", "image.resize3d": "Resize",
            "nn.conv3d": "Conv", "nn.conv1d": "Conv", "image.grid_sample": "GridSample"}


def _compile_failure(imported: ImportedModel, target: Target, tvm_target, error: Exception) -> UserError:
    """One line for a model TVM failed on: the operator no kernel lowers and the node it came from, when that is
    the cause; else that the compiler failed (TVM's own text is for a bug report, not for the user's terminal)."""
    from tvm import relax

    from .lower import fused_module

    left: list[str] = []
    try:
        main = fused_module(imported.mod, tvm_target)["main"]

        def visit(expr) -> None:
            if isinstance(expr, relax.Call) and hasattr(expr.op, "name"):
                name = str(expr.op.name)
                if not name.startswith(("relax.call_tir", "relax.reshape", "relax.builtin", "relax.memory")):
                    left.append(name.removeprefix("relax."))

        relax.analysis.post_order_visit(main, visit)
    except Exception:  # noqa: BLE001 - the failure is earlier than lowering: nothing to name
        pass
    if left:
        onnx_type = _ONNX_OF.get(left[0])
        node = _onnx_node(imported.source, onnx_type) if onnx_type else None
        where = f" at node '{node}'" if node else ""
        return UserError(f"{imported.source}: operator {onnx_type or left[0]}{where} cannot be compiled for "
                         f"{target.name} by this version (no kernel lowers relax.{left[0]} as it is used here); "
                         "replace it in the model")
    return UserError(f"compiling {imported.source} for {target.name} failed inside the compiler "
                     f"({type(error).__name__}); please report it with the model attached")


def _onnx_node(source: str, op_type: str) -> str | None:
    """The first node of `op_type` in an ONNX file, by name."""
    if not str(source).endswith(".onnx") or not Path(source).is_file():
        return None
    import onnx

    graph = onnx.load(str(source), load_external_data=False).graph
    return next(((n.name or f"#{i}") for i, n in enumerate(graph.node) if n.op_type == op_type), None)


def _c_name(text: str) -> str:
    name = re.sub(r"\W+", "_", text).strip("_").lower() or "model"
    name = name if name[0].isalpha() else f"m_{name}"
    # lib<name>.a must not shadow a system library the test program links (libm, libc, ...)
    return f"{name}_net" if name in ("m", "c", "dl", "rt", "gcc", "pthread", "stdc") else name


def _write_c_package(scheduled, target: Target, stage: Path, name: str, int8_io: dict | None = None) -> dict:
    """Kernels object + generated executor + weights, then a trial build with the target's compiler."""

    import tvm
    from tvm import relax, tirx

    from . import cpackage

    if shutil.which(target.cross_compiler) is None:
        raise UserError(f"C compiler {target.cross_compiler} for target {target.name} is not installed; install it "
                        f"(Debian: apt-get install {_debian_package(target.cross_compiler)})")
    with_symbols = relax.transform.AttachGlobalSymbol()(scheduled)
    kernels = tvm.IRModule({gv: f for gv, f in with_symbols.functions_items() if isinstance(f, tirx.PrimFunc)})
    obj = stage / "kernels.tmp.o"
    bare_metal = "none" in target.triple
    pipeline = _lean_pipeline() if bare_metal else "default"
    tvm.tirx.build(kernels, target=target.tvm_target(), pipeline=pipeline).write_to_file(str(obj))
    plan = cpackage.extract_plan(scheduled)
    cpackage.place_workspace(plan, cpackage.workspace_per_kernel(kernels, target.tvm_target()))
    cpackage.write_package(stage, plan, obj, target, name, cpackage.build_id(obj, plan), int8_io)
    obj.unlink()
    # no OS: the library may need nothing but mem* and libm
    _make(stage, [f"lib{name}.a"], target)
    if bare_metal:
        _check_bare_metal(stage / f"lib{name}.a", target)
    # The test program; a bare-metal one boots on the emulated board (codegen/baremetal/mps2_an500.ld), which a large
    # network outgrows: then the library stands alone and `run --device qemu://` says why there is no program.
    board_fits = _make(stage, [f"test_{name}"], target, overflow_ok=bare_metal)
    code, weights = _code_and_weights(stage / f"lib{name}.a", target)
    return {"arena_bytes": plan.arena_bytes, "workspace_bytes": plan.workspace_bytes,
            "intermediate_bytes": plan.intermediate_bytes, "weight_bytes": plan.weight_bytes,
            "package": name, "kernel_calls": len(plan.steps),
            "ram_bytes": plan.arena_bytes, "flash_bytes": code + weights, "code_bytes": code,
            **({} if board_fits else {"test_program": _BOARD_MISFIT})}


_BOARD_MISFIT = "does not fit the emulated board (4 MiB of RAM, 4 MiB of flash for code, 16 MiB for weights)"


def _lean_pipeline() -> str:
    """TVM's lowering without the argument checks of each kernel's entry point, for firmware, where flash is the
    budget: they were ~4 KB of code and messages per kernel, most of a small network's code, and model.c (ours)
    calls every kernel with exactly the tensors it was compiled for."""
    import tvm
    from tvm.tirx import compilation_pipeline as tirp

    if "edgeprune_lean" not in tirp.PIPELINE_MAP:
        def factory():
            pipeline, host, device = tirp.get_tir_pipeline("s_tir")
            return tvm.transform.Sequential([pipeline, tvm.tirx.transform.SkipAssert()]), host, device

        tirp.register_tir_pipeline("edgeprune_lean", factory)
    return "edgeprune_lean"


def _make(stage: Path, goals: list[str], target: Target, overflow_ok: bool = False) -> bool:
    """`make goals` in the package; False when the link overflowed a memory region and that is allowed."""
    import subprocess

    proc = subprocess.run(["make", "-s", *goals], cwd=stage, capture_output=True, text=True)
    if proc.returncode == 0:
        return True
    lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
    if overflow_ok and any("overflowed by" in ln for ln in lines):
        return False
    first = next((ln for ln in lines if "error" in ln), lines[-1])
    raise UserError(f"the generated C package did not build with {target.cross_compiler} ({first[:200]}); "
                    "please report it")


def _code_and_weights(library: Path, target: Target) -> tuple[int, int]:
    """(code, weights) in bytes of flash: every member's text and initialized data, read with the target's
    `size`; the weights are weights.o's (the blob, as linked)."""
    import subprocess

    size = target.cross_compiler[: -len("gcc")] + "size" if target.cross_compiler.endswith("gcc") else "size"
    proc = subprocess.run([size, "-B", str(library)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"{size} could not read {library.name} ({proc.stderr.strip()[:120]}); "
                        "install binutils for the target")
    code = weights = 0
    for line in proc.stdout.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 6 and parts[0].isdigit():
            text, data = int(parts[0]), int(parts[1])
            if parts[5].startswith("weights.o"):
                weights += text + data
            else:
                code += text + data
    return code, weights


# What a bare-metal package may need from outside: memcpy/memset, libm, and the compiler's own runtime.
_BARE_METAL_OK = re.compile(r"^(memcpy|memset|memmove|__aeabi_\w+|__\w+[sd]f\w*|"
                            r"(exp|log|sqrt|tanh|pow|fabs|floor|ceil|round|fmax|fmin|erf|sin|cos)f?)$")


def _check_bare_metal(library: Path, target: Target) -> None:
    import subprocess

    nm = target.cross_compiler.replace("gcc", "nm")
    proc = subprocess.run([nm, "-u", str(library)], capture_output=True, text=True)
    defined = subprocess.run([nm, "--defined-only", str(library)], capture_output=True, text=True).stdout
    own = {ln.split()[-1] for ln in defined.splitlines() if len(ln.split()) == 3}
    needed = {ln.split()[-1] for ln in proc.stdout.splitlines() if ln.strip() and ":" not in ln} - own
    extra = sorted(s for s in needed if not _BARE_METAL_OK.match(s))
    if extra:
        raise UserError(f"the {target.name} package needs symbols a bare-metal build lacks: {', '.join(extra[:6])}; "
                        "please report it")


def _debian_package(compiler: str) -> str:
    return {"arm-linux-gnueabihf-gcc": "gcc-arm-linux-gnueabihf", "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu",
            "arm-none-eabi-gcc": "gcc-arm-none-eabi"}.get(compiler, compiler)


def _replace_dir(stage: Path, out_dir: Path) -> None:
    """Move a finished build into place; an existing build is swapped out, then removed."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(stage, out_dir)
    os.chmod(out_dir, 0o755)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

"""Peer runtimes for the benchmarks: onnxruntime, MNN (dense and sparse builds) and LiteRT/XNNPACK, each timed in
its own subprocess.

Why a subprocess per timing: every runtime's thread pool spins for a while after a run, and two pools in one
process (or a pool left spinning by the previous runtime) slow each other down. A worker loads one model, warms up
(>= 10 runs), times runs for at least ``seconds`` and at least 20 runs, and reports the median and the output of
the given input (for numerics checks). One timed call is what a user's call costs: set the input, run, read the
output.

Peers and the files they run (``model_file`` writes them):

- ``onnxruntime``: the ONNX file itself; ``intra_op_num_threads`` = T, full graph optimization.
- ``mnn``: MNN's conversion of the ONNX file; a session with ``numThread`` = T, ``precision`` "high" (fp32).
- ``mnn-sparse``: the same conversion with ``--detectSparseSpeedUp`` and a compression-parameters file that asks
  for 1xN blocks (see below).
- ``litert``: a ``.tflite`` written by litert-torch from the PyTorch module, run by ai-edge-litert's Interpreter
  with ``num_threads`` = T (XNNPACK is its default delegate).

Packages: onnxruntime and ai-edge-litert are required dependencies already; the optional extra ``bench``
(``pip install -e '.[bench]'``) brings ``mnn``. litert-torch, which writes the ``.tflite``, cannot be in that extra:
litert-torch 0.10.0 (the first to accept torch 2.13) pins litert-converter 0.5.0 -> xdsl==0.28.0 ->
typing-extensions<4.13, while our pinned apache-tvm-ffi asks for typing-extensions>=4.13, so one resolve of both is
impossible and pip backtracks to litert-torch 0.9.x, which needs torch<2.13. Install it as a second step::

    pip install litert-torch==0.10.0        # leaves torch 2.13.0+cpu and numpy 2 alone; no CUDA wheels
    pip install 'typing-extensions>=4.13'   # if the step above downgraded it: TVM's FFI wants it back

pip then warns that xdsl wants typing-extensions<4.13; conversion works with 4.16 (checked 2026-11, mnn 3.6.1,
litert-torch 0.10.0, which also brings jax/jaxlib CPU and transformers). A missing package raises ``PeerMissing``,
which names the pip package.

MNN's Python converter (``mnnconvert``, ``MNN.tools.mnnconvert``) is not used: on import it runs
``os.system("pip install -U aliyun-log-python-sdk")`` against whatever ``pip`` is first on PATH, then reports every
conversion (with the machine id) to an Aliyun log service. ``write_mnn`` calls the converter's C++ entry point
(``_tools.mnnconvert``) in a subprocess instead: no install, no telemetry, and a converter abort cannot take the
caller down.

MNN's sparse build, as found in MNN 3.6.1 (and its converter sources, tools/converter/source/common/
AddSparseInfo.cpp): ``--detectSparseSpeedUp`` alone marks a convolution sparse with ``sparseBlockOC`` = 1
(unstructured, needs > 60% zeros). The block size comes only from ``--compressionParamsFile``, a serialized
``MNN.Compression.Pipeline`` protobuf (tools/converter/source/compression/MNN_compression.proto) holding one
``CompressionAlgo{type: PRUNE, prune_params{type: SIMD_OC, simd_oc_pruner_params{oc_blocks: [N]}}}``;
``write_mnn(..., sparse_block=N)`` writes that file (hand-encoded, no protobuf package). A layer is marked when its
fraction of all-zero 1xN blocks exceeds the threshold for N (0.6 for N=1, 0.5 for 2, 0.3 for N >= 3 in current
sources). The CPU backend has 1x1, 1x4 and 1x8 kernels on AVX-512 (N = 16 runs as 8). ``mnn_sparse_layers``
counts the marked layers of a ``.mnn`` file, and ``python bench/peers.py --check-sparse`` times a MobileNetV2
whose pointwise layers are block-sparse against its dense build.

Usage from a benchmark::

    from peers import model_file, time_peer
    path = model_file("mnn", onnx_path, workdir)
    result = time_peer("mnn", path, threads=2, seconds=2.0, inputs=x)   # result.median_ms, result.output
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PEERS = ("onnxruntime", "mnn", "mnn-sparse", "litert")
# peer -> (module it imports, pip package that brings it)
RUNTIME_PACKAGE = {"onnxruntime": ("onnxruntime", "onnxruntime"), "mnn": ("MNN", "mnn"),
                   "mnn-sparse": ("MNN", "mnn"), "litert": ("ai_edge_litert", "ai-edge-litert")}
CONVERTER_PACKAGE = {"mnn": ("MNN", "mnn"), "mnn-sparse": ("MNN", "mnn"), "litert": ("litert_torch", "litert-torch")}
WARMUP = 10
MIN_RUNS = 20
CHUNK_MS = 200.0
DEFAULT_SPARSE_BLOCK = 4


class PeerMissing(RuntimeError):
    """A peer's Python package is not installed; the message names the pip package."""


def require(module: str, package: str, what: str) -> None:
    """Raise PeerMissing unless `module` imports; checked in the parent, before any subprocess starts."""
    if importlib.util.find_spec(module) is None:
        how = (f"pip install {package}==0.10.0 (not part of the 'bench' extra: see bench/peers.py)"
               if package == "litert-torch" else f"pip install {package}, or pip install -e '.[bench]'")
        raise PeerMissing(f"{what} needs the pip package '{package}' (module '{module}' is not installed): {how}")


def require_peer(peer: str) -> None:
    """Everything `peer` needs to be converted and run."""
    if peer not in PEERS:
        raise ValueError(f"unknown peer '{peer}'; peers: {', '.join(PEERS)}")
    require(*RUNTIME_PACKAGE[peer], what=peer)
    if peer in CONVERTER_PACKAGE:
        require(*CONVERTER_PACKAGE[peer], what=f"{peer} (converting its model)")


# ---------------------------------------------------------------- the timing harness (shared with bench/dense.py)


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


RunBatch = Callable[[int, int], list[float]]


def timed(run_batch: RunBatch, seconds: float) -> list[float]:
    """Warm up, then time runs in chunks of ~0.2 s until `seconds` have passed and MIN_RUNS are done.

    run_batch(runs, warmup) returns the latency of each of `runs` runs in ms, after `warmup` untimed runs. Chunks
    keep the clock reads out of the way of sub-millisecond runs without one slow spell owning the whole figure.
    """
    probe = run_batch(WARMUP, WARMUP)
    chunk = max(1, math.ceil(CHUNK_MS / max(median(probe), 1e-3)))
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < MIN_RUNS or time.perf_counter() - start < seconds:
        times += run_batch(chunk, 0)
    return times


def loop_batch(fn: Callable[[], Any]) -> RunBatch:
    """run_batch for a plain Python callable."""

    def run_batch(runs: int, warmup: int) -> list[float]:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(runs):
            t = time.perf_counter_ns()
            fn()
            times.append((time.perf_counter_ns() - t) / 1e6)
        return times

    return run_batch


# ---------------------------------------------------------------- model files


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, value: int | bytes) -> bytes:
    """One protobuf field: a varint, or a length-delimited payload."""
    if isinstance(value, bytes):
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    return _varint(number << 3) + _varint(value)


def mnn_sparse_pipeline(block: int) -> bytes:
    """MNN.Compression.Pipeline{version "0.0.0", algo {type PRUNE, prune_params {type SIMD_OC,
    simd_oc_pruner_params {oc_blocks: [block]}}}}, serialized: the converter's only way to take a block size."""
    prune = _field(1, 1) + _field(3, _field(4, block))  # PruneParams.type = SIMD_OC; SIMDOCPrunerParams.oc_blocks
    algo = _field(1, 1) + _field(3, prune)  # CompressionAlgo.type = PRUNE
    return _field(1, b"0.0.0") + _field(2, algo)


def _mnnconvert(args: list[str], what: str) -> str:
    """Run MNN's converter (its C++ entry point, not the Python wrapper: see the module docstring).

    The entry point returns True even when it fails (a missing file, say): callers check that it wrote its output.
    """
    cmd = [sys.executable, "-c", "import sys, _tools; _tools.mnnconvert(sys.argv)", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"MNN converter failed on {what} (exit {proc.returncode}):\n{tail}")
    return proc.stdout + proc.stderr


def write_mnn(onnx_path: str | Path, out: str | Path, sparse_block: int | None = None) -> Path:
    """Convert an ONNX file to MNN; with `sparse_block`, ask for 1xN block-sparse convolutions where they pay."""
    require("MNN", "mnn", "converting to MNN")
    out = Path(out)
    args = ["-f", "ONNX", "--modelFile", str(onnx_path), "--MNNModel", str(out), "--bizCode", "MNN"]
    if sparse_block is not None:
        pipeline = out.with_name(f"{out.name}.sparse{sparse_block}.pipeline")
        pipeline.write_bytes(mnn_sparse_pipeline(sparse_block))
        args += ["--detectSparseSpeedUp", "--compressionParamsFile", str(pipeline)]
    log = _mnnconvert(args, str(onnx_path))
    if not out.is_file():
        raise RuntimeError(f"MNN converter wrote no {out}:\n{log[-2000:]}")
    return out


def mnn_sparse_layers(mnn_path: str | Path) -> dict[int, int]:
    """{block size: number of convolutions marked sparse} in a .mnn file, read from the converter's JSON dump."""
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "model.json"
        log = _mnnconvert(["-f", "MNN", "--modelFile", str(mnn_path), "--JsonFile", str(dump)], str(mnn_path))
        if not dump.is_file():
            raise RuntimeError(f"MNN converter could not dump {mnn_path}:\n{log[-2000:]}")
        text = dump.read_text()
    counts: dict[int, int] = {}
    # The dump writes each attribute on one line: { "i": 4, ..., "key": "sparseBlockOC", ... }
    for line in text.splitlines():
        if '"sparseBlockOC"' in line:
            block = int(line.split('"i":')[1].split(",")[0])
            counts[block] = counts.get(block, 0) + 1
    return counts


def write_tflite(module: Any, example: Any, out: str | Path) -> Path:
    """A .tflite of a PyTorch module written by litert-torch (NCHW at the edges, NHWC inside)."""
    require("litert_torch", "litert-torch", "writing a .tflite for LiteRT")
    import litert_torch

    out = Path(out)
    with contextlib.redirect_stdout(sys.stderr):  # its progress lines would mix with the caller's results
        litert_torch.convert(module.eval(), (example,)).export(str(out))
    return out


def model_file(peer: str, onnx_path: str | Path, workdir: str | Path, module: Any = None, example: Any = None,
               sparse_block: int = DEFAULT_SPARSE_BLOCK) -> Path:
    """The file `peer` runs for this network, written into `workdir` unless it is there already.

    LiteRT needs the PyTorch `module` and an `example` input; the others convert the ONNX file.
    """
    require_peer(peer)
    onnx_path, workdir = Path(onnx_path), Path(workdir)
    stem = onnx_path.stem  # names such as mobilenetv2-0.35-96 have dots: no with_suffix
    if peer == "onnxruntime":
        return onnx_path
    if peer == "mnn":
        path = workdir / f"{stem}.mnn"
        return path if path.is_file() else write_mnn(onnx_path, path)
    if peer == "mnn-sparse":
        path = workdir / f"{stem}.sparse{sparse_block}.mnn"
        return path if path.is_file() else write_mnn(onnx_path, path, sparse_block)
    if module is None or example is None:
        raise ValueError("litert needs the PyTorch module and an example input to write its .tflite")
    path = workdir / f"{stem}.tflite"
    return path if path.is_file() else write_tflite(module, example, path)


# ---------------------------------------------------------------- timing in a subprocess


@dataclass
class Timing:
    """One worker's figures: median and fastest run in ms, how many runs, and the output of the given input."""

    peer: str
    threads: int
    median_ms: float
    min_ms: float
    runs: int
    output: np.ndarray | None


def time_peer(peer: str, model: str | Path, threads: int, seconds: float = 2.0,
              inputs: np.ndarray | None = None, timeout: float = 600.0) -> Timing:
    """Time `peer` running `model` (from model_file) at `threads` threads, in a subprocess of its own.

    With `inputs` (float32 NCHW, batch 1), those are timed and the output is returned; without, random normal
    inputs of the model's shape are timed and output is None.
    """
    if peer not in PEERS:
        raise ValueError(f"unknown peer '{peer}'; peers: {', '.join(PEERS)}")
    require(*RUNTIME_PACKAGE[peer], what=peer)
    with tempfile.TemporaryDirectory(prefix="edgeprune-peer-") as tmp:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", peer, "--model", str(model),
               "--threads", str(threads), "--seconds", str(seconds)]
        if inputs is not None:
            np.save(Path(tmp) / "input.npy", np.ascontiguousarray(inputs, dtype=np.float32))
            cmd += ["--input", str(Path(tmp) / "input.npy"), "--output", str(Path(tmp) / "output.npy")]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"{peer} at {threads} thread(s) on {model} timed out after {timeout:.0f} s") from e
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            raise RuntimeError(f"{peer} worker at {threads} thread(s) on {model} failed (exit {proc.returncode}):"
                               f"\n{tail}")
        res = json.loads(lines[-1])
        output = np.load(Path(tmp) / "output.npy") if inputs is not None else None
    return Timing(peer, threads, res["median_ms"], res["min_ms"], res["runs"], output)


# ---------------------------------------------------------------- workers (run in their own subprocess)

Runner = Callable[[], np.ndarray]
# (run one call, the input's shape, a box whose "x" is the input the call uses: set once the shape is known)
Loaded = tuple[Runner, tuple[int, ...], dict]


def _onnxruntime(model: str, threads: int, x: np.ndarray | None) -> Loaded:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    spec = sess.get_inputs()[0]
    box = {"x": x}
    return (lambda: sess.run(None, {spec.name: box["x"]})[0]), tuple(spec.shape), box


def _mnn(model: str, threads: int, x: np.ndarray | None) -> Loaded:
    import MNN

    interp = MNN.Interpreter(model)
    sess = interp.createSession({"numThread": threads, "precision": "high"})
    inp, out = interp.getSessionInput(sess), interp.getSessionOutput(sess)
    shape = tuple(inp.getShape())
    box = {"x": x}

    def run() -> np.ndarray:
        inp.copyFrom(MNN.Tensor(shape, MNN.Halide_Type_Float, box["x"], MNN.Tensor_DimensionType_Caffe))
        interp.runSession(sess)
        oshape = tuple(out.getShape())
        host = MNN.Tensor(oshape, MNN.Halide_Type_Float, np.zeros(oshape, np.float32), MNN.Tensor_DimensionType_Caffe)
        out.copyToHostTensor(host)
        return np.array(host.getNumpyData(), copy=True).reshape(oshape)

    return run, shape, box


def _litert(model: str, threads: int, x: np.ndarray | None) -> Loaded:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=model, num_threads=threads)
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    box = {"x": x}

    def run() -> np.ndarray:
        x = box["x"]
        if inp["dtype"] != np.float32:  # a full-integer model: quantize the input as its own front end would
            scale, zero = inp["quantization"]
            info = np.iinfo(inp["dtype"])
            x = np.clip(np.round(x / scale) + zero, info.min, info.max).astype(inp["dtype"])
        interp.set_tensor(inp["index"], x)
        interp.invoke()
        y = interp.get_tensor(out["index"])
        if out["dtype"] != np.float32:
            scale, zero = out["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        return y

    return run, tuple(int(d) for d in inp["shape"]), box


WORKERS = {"onnxruntime": _onnxruntime, "mnn": _mnn, "mnn-sparse": _mnn, "litert": _litert}


def worker_main(args: argparse.Namespace) -> None:
    x = np.load(args.input).astype(np.float32) if args.input else None
    run, shape, box = WORKERS[args.worker](args.model, args.threads, x)
    if x is None:
        box["x"] = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    else:
        np.save(args.output, np.asarray(run()))
    times = timed(loop_batch(run), args.seconds)
    print(json.dumps({"peer": args.worker, "threads": args.threads, "runs": len(times),
                      "median_ms": median(times), "min_ms": min(times)}))


# ---------------------------------------------------------------- self-check: does MNN's sparse build pay?


def block_sparsify(module: Any, block: int, sparsity: float, seed: int = 1) -> int:
    """Zero a `sparsity` fraction of 1 x `block` blocks (`block` consecutive output channels at one input channel)
    in every dense 1x1 convolution, chosen at random; returns how many layers were touched."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    layers = 0
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1 and m.out_channels % block == 0:
                keep = torch.rand(m.out_channels // block, m.in_channels, generator=g) >= sparsity
                m.weight.mul_(keep.repeat_interleave(block, 0)[:, :, None, None].to(m.weight.dtype))
                layers += 1
    return layers


def check_sparse(network: str, blocks: list[int], sparsities: list[float], threads: list[int],
                 seconds: float, rounds: int) -> None:
    """Convert a block-sparse network dense and sparse, count the layers MNN marks, time both interleaved."""
    import warnings

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from edgeprune.models.reference import build

    require("MNN", "mnn", "the MNN sparse check")
    workdir = Path(tempfile.mkdtemp(prefix="edgeprune-mnn-sparse-"))
    print(f"work directory: {workdir}", file=sys.stderr)
    for block in blocks:
        for sparsity in sparsities:
            model, x = build(network)
            touched = block_sparsify(model, block, sparsity)
            onnx = workdir / f"{network}-1x{block}-{round(sparsity * 100)}.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (x,), str(onnx), opset_version=17, dynamo=False, input_names=["input"])
            with torch.inference_mode():
                ref = model(x).numpy()
            dense = write_mnn(onnx, onnx.with_suffix(".mnn"))
            sparse = write_mnn(onnx, onnx.with_name(onnx.stem + ".sparse.mnn"), block)
            marked = mnn_sparse_layers(sparse)
            for t in threads:
                best = {"dense": math.inf, "sparse": math.inf}
                err = 0.0
                for r in range(rounds):
                    for kind, path in (("dense", dense), ("sparse", sparse))[:: 1 if r % 2 == 0 else -1]:
                        res = time_peer("mnn", path, t, seconds, x.numpy())
                        best[kind] = min(best[kind], res.median_ms)
                        err = max(err, float(np.abs(res.output - ref).max() / np.abs(ref).max()))
                print(f"{network} 1x{block} {sparsity:.0%} ({touched} pointwise layers; marked sparse: {marked}) "
                      f"{t}T: dense {best['dense']:.3f} ms, sparse {best['sparse']:.3f} ms, "
                      f"speed-up {best['dense'] / best['sparse']:.2f}x, max rel error {err:.1e}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check-sparse", action="store_true",
                   help="time MNN's sparse build of a 1xN block-sparse MobileNetV2 against its dense build")
    p.add_argument("--network", default="mobilenetv2-1.0-224")
    p.add_argument("--blocks", type=int, nargs="+", default=[4])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.9])
    p.add_argument("--thread-counts", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=float, default=2.0)
    internal = p.add_argument_group("worker (internal)")
    internal.add_argument("--worker", choices=PEERS, help=argparse.SUPPRESS)
    internal.add_argument("--model", help=argparse.SUPPRESS)
    internal.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    internal.add_argument("--input", help=argparse.SUPPRESS)
    internal.add_argument("--output", help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.worker:
        worker_main(arguments)
    elif arguments.check_sparse:
        check_sparse(arguments.network, arguments.blocks, arguments.sparsities, arguments.thread_counts,
                     arguments.seconds, arguments.rounds)
    else:
        sys.exit("nothing to do: import this module, or run it with --check-sparse")

"""int8 benchmark (issue 14's goals): accuracy (bench/quant_accuracy.py's table and goals) and speed on the host.

Speed protocol, MobileNetV2 1.0 @224 and ResNet-18 @224 (models/reference.py: seeded weights and BatchNorm
statistics), each runtime timed in its own subprocess (bench/peers.py), 1 and 2 threads, interleaved over rounds,
the lowest of the round medians kept:
  edgeprune fp32   compile_model of the network (the dense family);
  edgeprune int8   compress.quantize on 32 calibration images, its integer program compiled (the int8 family);
  onnxruntime int8 onnxruntime.quantization.quantize_static on the same ONNX file and images: QDQ, per-channel
                   int8 weights, uint8 activations (its x86 default), run by onnxruntime;
  LiteRT int8      litert-torch's PT2E quantizer (symmetric, per-channel) calibrated on the same images, converted
                   to a full-int8 .tflite, run by ai-edge-litert (XNNPACK).
Calibration images are Gaussian noise: speed does not depend on them, and every runtime gets the same ones. A
sanity line per network checks that our int8 output is the integer program's (compress/integer.py) and how far
each int8 runtime's output is from fp32's.

Goals, per network and thread count: our int8 / our fp32 >= 2.0; ours faster than onnxruntime's int8 and than
LiteRT's int8. Then the accuracy goals (skip them with --speed-only). One GOAL line each; exits 1 when one is missed.

    python bench/quant.py [--networks mobilenetv2-1.0-224 resnet18-224] [--rounds 3] [--seconds 2] [--speed-only]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

from dense import run_worker
from peers import PeerMissing, require, time_peer

NETWORKS = ("mobilenetv2-1.0-224", "resnet18-224")
THREADS = (1, 2)
GOAL_OVER_FP32 = 2.0
CALIBRATION_IMAGES = 32
RUNTIMES = ("edgeprune-fp32", "edgeprune-int8", "onnxruntime-int8", "litert-int8")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _ort_int8(onnx_path: Path, images, out: Path) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"input": images[i:i + 1]} for i in range(len(images))])

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(onnx_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def _litert_int8(model, example, images, out: Path) -> Path:
    import contextlib

    import torch

    require("litert_torch", "litert-torch", "writing an int8 .tflite for LiteRT")
    import litert_torch
    from litert_torch.quantize import pt2e_quantizer, quant_config
    from torchao.quantization.pt2e import quantize_pt2e

    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True))
    with contextlib.redirect_stdout(sys.stderr), torch.no_grad():
        m = torch.export.export(model.eval(), (example,)).module()
        m = quantize_pt2e.prepare_pt2e(m, quantizer)
        for i in range(len(images)):
            m(torch.from_numpy(images[i:i + 1]))
        m = quantize_pt2e.convert_pt2e(m, fold_quantize=False)
        litert_torch.convert(m, (example,), quant_config=quant_config.QuantConfig(pt2e_quantizer=quantizer)) \
            .export(str(out))
    return out


def prepare(name: str, workdir: Path) -> dict:
    """Both builds, the two peers' int8 files, the input, and the sanity figures."""
    import numpy as np
    import torch

    import edgeprune as ep
    from edgeprune.artifacts import Network
    from edgeprune.codegen.build import compile_model
    from edgeprune.compress import integer
    from edgeprune.compress import quantize as Q
    from edgeprune.models.reference import build

    model, x = build(name)
    model.eval()
    images = np.random.default_rng(1).standard_normal((CALIBRATION_IMAGES, *x.shape[1:])).astype(np.float32)
    onnx_path = workdir / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(onnx_path), opset_version=17, dynamo=False, input_names=["input"])
    np.save(workdir / f"{name}.input.npy", x.numpy())
    t = time.perf_counter()
    fp32 = compile_model(onnx_path, "host", workdir / f"{name}.fp32")
    q = Q.quantize(model, torch.from_numpy(images))
    prog = integer.program(q, tuple(x.shape))
    int8 = compile_model(Network(q.module, tuple(x.shape), name, q.plan(), integer=prog), "host",
                         workdir / f"{name}.int8")
    log(f"{name}: both builds in {time.perf_counter() - t:.0f} s; int8 kernels: "
        f"{sum(r.family == 'int8' for r in int8.layers)} of {len(int8.layers)}")
    files = {"edgeprune-fp32": str(fp32.directory), "edgeprune-int8": str(int8.directory)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files["onnxruntime-int8"] = str(_ort_int8(onnx_path, images, workdir / f"{name}.qdq.onnx"))
        files["litert-int8"] = str(_litert_int8(model, x, images, workdir / f"{name}.int8.tflite"))
    xi = x.numpy()
    ours = ep.run(int8, xi)[0]
    exact = bool(np.array_equal(ours, integer.run(prog, xi)))
    with torch.no_grad():
        ref = model(x).numpy()
    return {"files": files, "exact": exact, "ref": ref, "ours": ours, "input": workdir / f"{name}.input.npy"}


def _time(runtime: str, path: str, threads: int, seconds: float, check: tuple[Path, Path] | None) -> tuple[float,
                                                                                                               object]:
    import numpy as np

    if runtime.startswith("edgeprune"):
        res = run_worker("edgeprune", path, threads, seconds, check)
        return res["median_ms"], np.load(check[1]) if check else None
    peer = runtime.split("-")[0]
    timing = time_peer(peer, path, threads, seconds, np.load(check[0]) if check else None)
    return timing.median_ms, timing.output


def bench(name: str, prep: dict, workdir: Path, rounds: int, seconds: float) -> dict:
    """Lowest round median per (runtime, threads), and each runtime's output on the seeded input."""
    best: dict[tuple[str, int], float] = {}
    outputs: dict[str, object] = {}
    for r in range(rounds):
        for threads in THREADS:
            for runtime in RUNTIMES:
                check = (prep["input"], workdir / f"{name}.{runtime}.out.npy") if r == 0 and threads == 1 else None
                ms, out = _time(runtime, prep["files"][runtime], threads, seconds, check)
                if out is not None:
                    outputs[runtime] = out
                best[runtime, threads] = min(ms, best.get((runtime, threads), float("inf")))
        log(f"  {name} round {r + 1}: " + ", ".join(f"{rt} {t}T {best[rt, t]:.3f}" for t in THREADS
                                                     for rt in RUNTIMES))
    return {"ms": best, "outputs": outputs}


def _cos(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / max(1e-12, np.linalg.norm(a) * np.linalg.norm(b)))


def speed(names: list[str], workdir: Path, rounds: int, seconds: float) -> tuple[list[str], list[str]]:
    preps = {n: prepare(n, workdir) for n in names}  # everything compiled and converted before any timing
    table = ["| network | threads | edgeprune fp32 | edgeprune int8 | onnxruntime int8 | LiteRT int8 | int8 / fp32 |"
             " vs onnxruntime int8 | vs LiteRT int8 |", "|---|---|---|---|---|---|---|---|---|"]
    goals = []
    for name in names:
        res = bench(name, preps[name], workdir, rounds, seconds)
        ms = res["ms"]
        for t in THREADS:
            ours = ms["edgeprune-int8", t]
            ratios = {"fp32": ms["edgeprune-fp32", t] / ours, "ort": ms["onnxruntime-int8", t] / ours,
                      "litert": ms["litert-int8", t] / ours}
            table.append(f"| {name} | {t} | " + " | ".join(f"{ms[rt, t]:.3f} ms" for rt in RUNTIMES)
                         + f" | {ratios['fp32']:.2f}x | {ratios['ort']:.2f}x | {ratios['litert']:.2f}x |")
            goals.append(f"GOAL int8-vs-fp32 [{name}, {t}T]: {ratios['fp32']:.2f}x (goal >= {GOAL_OVER_FP32:.1f}x) "
                         f"{'met' if ratios['fp32'] >= GOAL_OVER_FP32 else 'missed'}")
            for key, peer in (("ort", "onnxruntime int8"), ("litert", "LiteRT int8")):
                goals.append(f"GOAL int8-vs-{key} [{name}, {t}T]: {ratios[key]:.2f}x over {peer} (goal > 1.0x) "
                             f"{'met' if ratios[key] > 1.0 else 'missed'}")
        p = preps[name]
        cos = {rt: _cos(out, p["ref"]) for rt, out in res["outputs"].items()}
        log(f"  {name}: our int8 output {'equals' if p['exact'] else 'DIFFERS FROM'} the integer program's; cosine "
            "to fp32 PyTorch: " + ", ".join(f"{rt} {c:.4f}" for rt, c in cos.items()))
    return table, goals


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=NETWORKS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--workdir", type=Path, help="keep builds and converted files here (default: a temporary one)")
    ap.add_argument("--speed-only", action="store_true", help="skip the accuracy table and goals")
    ap.add_argument("--cache", type=Path, help="accuracy: keep the demo subnet's fine-tuned weights in this file")
    args = ap.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="edgeprune-quant-"))
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"work directory: {workdir}")
    t = time.perf_counter()
    try:
        table, goals = speed(args.networks, workdir, args.rounds, args.seconds)
    except PeerMissing as e:
        sys.exit(str(e))
    print("\n".join(table))
    print()
    if not args.speed_only:
        from quant_accuracy import accuracy_goals

        acc_table, acc_goals = accuracy_goals(cache=args.cache)
        print(acc_table)
        print()
        goals += acc_goals
    print("\n".join(goals))
    log(f"{time.perf_counter() - t:.0f} s")
    return 0 if all(g.endswith(" met") for g in goals) else 1


if __name__ == "__main__":
    sys.exit(main())

"""int8 .tflite both ways (issue 14, deliverable 4), one run, GOAL lines.

Export: the demo's subnet and the supernet's largest (bench/quant_accuracy.py's, fine-tuned as build does; with
--finetune-steps 0 the demo's is taken from the supernet as is), quantized W8A8 on real calibration images, compiled
by us for the host and exported (codegen/tflite_export.py); both run on the built-in data's validation split.
GOAL: ai-edge-litert's top-1 agrees with our build's on >= 99% of it.

Import: an int8 MobileNetV2 0.35 @96 written by litert-torch's PT2E quantizer (skipped when litert-torch is not
installed), compiled by us (codegen/tflite_int8.py) and run beside ai-edge-litert on the same inputs. GOAL: no
output more than one step of its grid away.

    python bench/tflite_int8.py [--seed 0] [--finetune-steps 200] [--cache FILE] [--inputs 30]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from quant_accuracy import demo_subnet, log


def _litert(path: Path):
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    return it, it.get_input_details()[0], it.get_output_details()[0]


def export_agreement(name: str, net, resolution: int, ds, seed: int, work: Path) -> float:
    """Share of the validation split where LiteRT's top-1 on our exported .tflite equals our build's."""
    import edgeprune as ep
    from edgeprune import data
    from edgeprune.artifacts import Network
    from edgeprune.codegen.build import compile_model
    from edgeprune.codegen.tflite_export import export_tflite
    from edgeprune.compress import integer
    from edgeprune.compress import quantize as Q

    q = Q.ptq(net, resolution, "real", *ds.train, classes=len(ds.classes), seed=seed)
    prog = integer.program(q, (1, 3, resolution, resolution))
    build = compile_model(Network(q.module, (1, 3, resolution, resolution), name, q.plan(), integer=prog), "host",
                          work / f"{name}-build")
    path = export_tflite(prog, work / f"{name}.tflite")
    it, d, od = _litert(path)
    x, _ = ds.val
    agree = 0
    worst = 0.0
    step = prog.ops[-1].params["scale"]
    for i in range(len(x)):
        xi = data.tensors(x[i:i + 1], resolution).numpy()
        ours = ep.run(build, xi)[0]
        it.set_tensor(d["index"], np.ascontiguousarray(xi.transpose(0, 2, 3, 1)))
        it.invoke()
        theirs = it.get_tensor(od["index"])
        agree += int(ours.argmax() == theirs.argmax())
        worst = max(worst, float(np.abs(ours - theirs).max()) / step)
    share = agree / len(x)
    log(f"export {name}: {len(prog.ops)} ops, {path.stat().st_size / 1e3:.0f} KB; top-1 agreement "
        f"{agree}/{len(x)}; largest output difference {worst:.0f} steps")
    return share


def import_steps(inputs: int, work: Path) -> int | None:
    """Largest difference, in output steps, between our build of litert-torch's int8 MobileNetV2 0.35 @96 and
    LiteRT on `inputs` random images; None without litert-torch."""
    try:
        import litert_torch  # noqa: F401
    except ImportError:
        log("import: litert-torch is not installed; skipped")
        return None
    from quant import _litert_int8

    from edgeprune.codegen.build import compile_model
    from edgeprune.measure.local import Session
    from edgeprune.models.reference import build

    model, example = build("mobilenetv2-0.35-96")
    images = np.random.default_rng(1).standard_normal((16, *example.shape[1:])).astype(np.float32)
    path = _litert_int8(model.eval(), example, images, work / "mobilenetv2.int8.tflite")
    ours_build = compile_model(path, "host", work / "import-build")
    it, d, od = _litert(path)
    s, z = d["quantization"]
    so, zo = od["quantization"]
    rng = np.random.default_rng(2)
    worst, exact = 0, 0
    for _ in range(inputs):
        q = np.clip(np.round(rng.standard_normal(example.shape) / s) + z, -128, 127).astype(np.int8)
        it.set_tensor(d["index"], q)
        it.invoke()
        theirs = it.get_tensor(od["index"]).astype(np.int64)
        (ours,) = Session(ours_build).run([((q.astype(np.float32) - z) * s).astype(np.float32)])
        diff = int(np.abs(np.round(ours / so).astype(np.int64) + zo - theirs).max())
        worst, exact = max(worst, diff), exact + (diff == 0)
    log(f"import: {inputs} inputs, {exact} bit-exact with LiteRT, largest difference {worst} steps")
    return worst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--finetune-steps", type=int, default=None)
    ap.add_argument("--cache", type=Path, default=None, help="keep the demo subnet's fine-tuned weights here")
    ap.add_argument("--inputs", type=int, default=30, help="random inputs for the import check")
    args = ap.parse_args()

    import torch

    from edgeprune import data
    from edgeprune.pipeline import SUPERNET
    from edgeprune.search import space as S
    from edgeprune.search.evaluate import subnet
    from edgeprune.search.train import load

    torch.manual_seed(args.seed)
    supernet, ckpt = load(SUPERNET)
    ds = data.load(None, seed=args.seed)
    resolutions = tuple(ckpt["space"]["resolutions"])
    largest = S.Space(resolutions=resolutions).largest(max(resolutions))
    demo, arch = demo_subnet(supernet, ckpt, ds, args.seed, args.finetune_steps, args.cache, log)
    goals, ok = [], True
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, net, res in (("demo", demo, arch.resolution),
                               ("largest", subnet(supernet, largest, ds.train[0]).eval(), largest.resolution)):
            share = export_agreement(name, net, res, ds, args.seed, work)
            met = share >= 0.99
            ok &= met
            goals.append(f"GOAL tflite-export-agreement [{name}]: {share:.2%} of the validation split (goal >= 99%) "
                         f"{'met' if met else 'missed'}")
        worst = import_steps(args.inputs, work)
        if worst is not None:
            ok &= worst <= 1
            goals.append(f"GOAL tflite-import-steps [mobilenetv2-0.35-96, litert-torch]: {worst} (goal <= 1) "
                         f"{'met' if worst <= 1 else 'missed'}")
    print("\n".join(goals))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

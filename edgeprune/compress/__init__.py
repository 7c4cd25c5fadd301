"""The compress stage: a Network in, the same Network with every layer's plan out.

1xN block pruning (block1xn.py: block scores, masks, filter rearrangement over coupled channels, gradual pruning
with fine-tuning and distillation from the dense network) runs here when a sparsity is asked for; FDDA int8
quantization (quantize.py, fdda.py) and ReCU / SiMaN binarization (binary.py) move in here next. Without a
sparsity, compression is the identity: every convolution and linear layer is planned dense fp32, so the plan codegen
receives names every layer that has weights.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..artifacts import LayerCost, LayerPlan, Network
from ..errors import UserError

if TYPE_CHECKING:
    from .fdda import Synthetic

PRUNE_STEPS = 200  # as many as build fine-tunes a subnet: a few minutes on 2 cores


def compress(network: Network, data=None, *, sparsity: float | None = None, block: int = 4,
             steps: int = PRUNE_STEPS, kernels: tuple[int, ...] = (1,), teacher=None,
             teacher_resolution: int | None = None, seed: int = 0,
             progress: Callable[[int, int, str, float], None] | None = None) -> Network:
    """The network with a plan for each weighted layer. Without `sparsity` (None or 0) every layer is dense fp32 and
    the module is the network's own. With it, a copy of the module is pruned to that sparsity in 1xN blocks of
    `block` output channels (block1xn.prune: `steps` of fine-tuning on `data`, a Dataset or a data spec, with
    distillation from `teacher`, by default the dense network itself), and its pruned layers are planned
    block-sparse ("bsr"); the input network's module is untouched. The returned accuracy is the pruned network's on
    the validation split (None when it was pruned without data)."""
    from torch import nn

    plan = dict(network.plan)
    module, accuracy = network.module, network.accuracy
    if sparsity:
        from .. import data as datasets
        from ..training import accuracy as accuracy_of
        from . import block1xn

        if block not in block1xn.BLOCK_SIZES:
            raise UserError(f"block {block}: the 1xN block size is one of {', '.join(map(str, block1xn.BLOCK_SIZES))}")
        if not 0.0 < sparsity < 1.0:
            raise UserError(f"sparsity {sparsity} must be above 0 and below 1 (the fraction of blocks pruned)")
        if steps < 0:
            raise UserError(f"steps {steps} must be at least 0")
        if isinstance(data, (str, Path)):
            data = datasets.load(data, seed=seed)
        elif data is not None and not isinstance(data, datasets.Dataset):
            raise UserError(f"data must be a Dataset or a data spec (a directory or a .npz), not {type(data).__name__}")
        if data is None and steps:
            raise UserError("pruning fine-tunes the network: pass its training data, or steps=0 for one-shot pruning")
        resolution = int(network.input_shape[-1])
        module = copy.deepcopy(network.module)
        pruned = block1xn.prune(module, data, resolution, sparsity, block, steps, teacher=teacher,
                                teacher_resolution=teacher_resolution, kernels=kernels, seed=seed, progress=progress)
        plan.update(pruned.plan())
        accuracy = accuracy_of(module, *data.val, resolution) if data is not None else None
    for name, layer in module.named_modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)) and name not in plan:
            plan[name] = LayerPlan(name)
    return replace(network, module=module, plan=plan, accuracy=accuracy)


PRECISIONS = {"int8": (8, 8), "w4a8": (4, 8)}  # --quantize: (weight bits, activation bits)
CALIBRATIONS = ("fdda", "real", "noise", "zeroq")
SENSITIVITY_IMAGES = 32  # ranking layers needs a network's response, not calibrated ranges: one batch, per layer
DISTILL_STEPS = 200  # below 8 weight bits: the quantized network distilled on the calibration images (FDDA)


def distill_steps_for(precision: str) -> int:
    """Distillation steps by default: DISTILL_STEPS where the weights have fewer than 8 bits (rounding them costs
    accuracy that ranges cannot buy back), none at 8 bits (within a fraction of a point of fp32 without it)."""
    return DISTILL_STEPS if PRECISIONS[precision][0] < 8 else 0



def layer_costs(network: Network, plan: LayerPlan | None = None) -> dict[str, LayerCost]:
    """Each convolution's and linear layer's cost row on the network's input (one forward pass finds its map),
    running as `plan` says (dense fp32 when None): what a latency model prices, layer by layer."""
    import torch
    from torch import nn

    from ..cost import rows
    from .trace import forward_hooked

    out: dict[str, LayerCost] = {}

    def on_layer(name: str, m: nn.Module, args: tuple) -> None:
        if name in out:
            return
        if isinstance(m, nn.Linear):
            out[name] = rows.dense(m.in_features, m.out_features, plan=plan)
        elif isinstance(m, nn.Conv2d):
            depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
            out[name] = rows.conv(m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0],
                                  int(args[0].shape[-1]), depthwise=depthwise, plan=plan)

    forward_hooked(network.module, torch.zeros(*network.input_shape), on_layer)
    return out


def quantize_network(network: Network, data, *, precision: str = "int8", calibration: str = "fdda",
                     per_class: int = 4, seed: int = 0, max_drop: float | None = None,
                     keep_float: Collection[str] = (), distill_steps: int | None = None,
                     synthetic: Synthetic | None = None,
                     progress: Callable[[int, int, str, float], None] | None = None) -> tuple[Network, dict]:
    """Post-training quantization of the network (calibration images from `calibration`, BatchNorm folded after
    them, per-channel weights and per-tensor activations), as the integer program codegen compiles
    (integer.program). With `max_drop` (points of validation accuracy), layers are kept in fp32, the most sensitive
    first (quantize.sensitivity), until quantization costs no more than that; the info says which. Returns the
    quantized Network (its module the float simulation, its accuracy the simulation's on the validation split) and
    what was done: bits, calibration, seconds, accuracy before/after, the layers kept in fp32. Layers named in
    `keep_float` stay fp32 from the start (a device that runs them no faster in int8). The quantized network is then
    distilled from the fp32 one on the calibration images for `distill_steps` (FDDA's fine-tuning; default:
    `distill_steps_for`), kept when it raises validation accuracy; the info's distill_steps is 0 when it did not.
    `synthetic` (a `fdda.Synthetic` from `quantize.calibration_images`) reuses calibration images already made."""
    import time

    from ..training import accuracy as accuracy_of
    from . import integer
    from . import quantize as Q

    if precision not in PRECISIONS:
        raise UserError(f"precision '{precision}': choose one of {', '.join(PRECISIONS)}")
    if calibration not in CALIBRATIONS:
        raise UserError(f"calibration '{calibration}': choose one of {', '.join(CALIBRATIONS)}")
    if per_class < 1:
        raise UserError(f"per_class {per_class}: FDDA needs at least one real image per class")
    resolution, bits = int(network.input_shape[-1]), PRECISIONS[precision]
    if distill_steps is None:
        distill_steps = distill_steps_for(precision)
    if distill_steps < 0:
        raise UserError(f"distill_steps {distill_steps}: the distillation steps are at least 0")
    images, labels = data.train
    t = time.perf_counter()
    syn = synthetic or Q.calibration_images(network.module, calibration, resolution, images, labels,
                                            classes=len(data.classes), per_class=per_class, seed=seed,
                                            progress=progress)
    made = time.perf_counter() - t
    before = network.accuracy if network.accuracy is not None else accuracy_of(network.module, *data.val, resolution)
    slower = list(keep_float)

    def quantized(keep: list[str], steps: int) -> tuple[Q.Quantized, float]:
        """Quantized with `keep` in fp32, and its validation accuracy; distilled for `steps` only when that raises
        the accuracy (distilling on poor images, noise, can lower it)."""
        plain = Q.quantize(network.module, syn.images, bits, keep_float=keep)
        acc = accuracy_of(plain.module, *data.val, resolution)
        if steps:
            distilled = Q.quantize(network.module, syn.images, bits, keep_float=keep, distill_steps=steps, seed=seed,
                                   progress=progress)
            distilled_acc = accuracy_of(distilled.module, *data.val, resolution)
            if distilled_acc >= acc:
                return distilled, distilled_acc
        return plain, acc

    q, after = quantized(slower, distill_steps)
    kept: list[str] = list(slower)
    if max_drop is not None and 100 * (before - after) > max_drop:
        order = [n for n in Q.sensitivity(network.module, syn.images[:SENSITIVITY_IMAGES], bits) if n not in slower]
        k = 1
        while k < len(order):  # 1, 2, 4, ... layers in fp32: a few evaluations, not one per layer
            # undistilled (a distillation per trial would multiply its time): the trial can only be pessimistic
            trial, acc = quantized(slower + order[:k], 0)
            if 100 * (before - acc) <= max_drop:
                kept = slower + order[:k]
                q, after = quantized(kept, distill_steps) if distill_steps else (trial, acc)
                break
            k *= 2
    program = integer.program(q, tuple(network.input_shape))
    plan = dict(network.plan) | q.plan()
    info = {"precision": precision, "weight_bits": q.weight_bits, "calibration": syn.source,
            "calibration_images": len(syn.images), "calibration_seconds": round(made, 2),
            "distill_steps": q.calibration.get("distill_steps", 0), "distill_tried": distill_steps,
            "val_fp32": round(float(before), 4), "val_quantized": round(float(after), 4),
            "drop_points": round(100 * (float(before) - float(after)), 2), "layers": len(q.layers),
            "fp32_layers": kept, "fp32_where_faster": slower}
    return replace(network, module=q.module, plan=plan, accuracy=after, integer=program), info


BINARIZE_STEPS = 200  # training from the fp32 weights with distillation: a minute or two for a subnet on 2 cores


def pointwise_layers(network: Network) -> list[str]:
    """The network's 1x1 convolutions (groups 1), in the order they run: the layers binarization chooses among."""
    modules = dict(network.module.named_modules())
    return [name for name, row in layer_costs(network).items() if row.op == "pointwise"
            and tuple(modules[name].kernel_size) == (1, 1) and modules[name].groups == 1]


def binarize_network(network: Network, data, method: str, layers: list[str], *, steps: int = BINARIZE_STEPS,
                     teacher=None, seed: int = 0,
                     progress: Callable[[int, int, str, float], None] | None = None) -> tuple[Network, dict]:
    """`layers` of a copy of the network made binary by `method` (recu, siman or sign: binary.py) and the copy
    trained `steps` steps from its fp32 weights, with distillation from `teacher` (default: the network itself).
    Returns the Network in export form (each binary layer the float operators a bit-packed kernel replaces, which
    compile finds: codegen/binarized.py), planned "binary" for those layers, with its validation accuracy, and
    what was done: method, layers, steps, accuracy before and after, weight bytes against fp32."""
    import time

    from torch import nn

    from ..training import accuracy as accuracy_of
    from . import binary

    if method not in binary.METHODS:
        raise UserError(f"binarization method '{method}': choose one of {', '.join(binary.METHODS)}")
    if not layers:
        raise UserError("no layer to binarize: name at least one 1x1 convolution of the network")
    resolution = int(network.input_shape[-1])
    chosen = set(layers)
    module = copy.deepcopy(network.module)
    convs = dict(module.named_modules())
    missing = sorted(n for n in chosen if not isinstance(convs.get(n), nn.Conv2d))
    if missing:
        raise UserError(f"no convolution named {', '.join(missing)} in the network; name layers it has")
    before = network.accuracy if network.accuracy is not None else accuracy_of(network.module, *data.val, resolution)
    fp32_bytes = sum(4 * convs[n].weight.numel() for n in chosen)
    t = time.perf_counter()
    binary.binarize(module, method, data, resolution, steps, teacher=teacher or network.module, seed=seed,
                    keep=lambda name, conv: name not in chosen, progress=progress)
    done = binary.binary_layers(module)
    if set(done) != chosen:  # the stem, the classifier, depthwise and projections stay fp32 whatever was asked
        kept = sorted(chosen - set(done))
        raise UserError(f"layers {', '.join(kept)} stay full precision (the stem, the classifier, depthwise or "
                        "shortcut projections); binarize other 1x1 convolutions")
    after = accuracy_of(module, *data.val, resolution)
    plan = dict(network.plan) | binary.plans(module)
    info = {"method": method, "layers": list(layers), "steps": steps,
            "seconds": round(time.perf_counter() - t, 2), "val_fp32": round(float(before), 4),
            "val_binary": round(float(after), 4), "drop_points": round(100 * (float(before) - float(after)), 2),
            "weight_bytes": sum(bw.weight_bytes for bw in done.values()), "fp32_weight_bytes": fp32_bytes}
    return replace(network, module=binary.export_form(module, done), plan=plan, accuracy=after), info

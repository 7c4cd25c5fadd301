"""LayerCost rows: the one way a layer becomes what the latency model prices.

Both the search's analytic pricing of a subnet (edgeprune.search.space.layers) and a compiled build's kernels
(edgeprune.codegen.kernels, per family) call `layer_cost` with the layer's class, its activation, weight and output
shapes, and how it runs (bits, density, block). MACs and bytes are worked out here, once, from those, so a subnet
priced before compiling and the same subnet compiled land on the same row.

Shapes are as compiled: activations NHWC, convolution weights HWIO (HWI1C... for depthwise: [kh, kw, 1, C]),
matmul weights [in, out].
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

from ..artifacts import OP_CLASSES, LayerCost, LayerPlan

Shape = Sequence[int]


def _nbytes(shape: Shape, bits: int) -> int:
    return (prod(shape) * bits + 7) // 8


def layer_cost(op: str, inputs: Sequence[Shape], weights: Sequence[Shape], outputs: Sequence[Shape], *,
               reduction: int | None = None, plan: LayerPlan | None = None, family: str | None = None,
               kernel: str = "", sources: Sequence[str] = ()) -> LayerCost:
    """The row of one kernel call.

    inputs: activations read (the main input first; a fused residual add's operand after it);
    weights: constants read (the main weight first, then bias or folded BatchNorm terms);
    outputs: what it writes;
    reduction: MACs per output element (a compiled kernel knows it from its loop nest; an analytic row leaves it
               to the weight's shape, except for pooling and means, which have no weights);
    plan: how the layer runs (bits, 1xN block density); dense fp32 when None.
    """
    if op not in OP_CLASSES:
        raise ValueError(f"unknown operator class {op!r}; one of {', '.join(OP_CLASSES)}")
    plan = plan or LayerPlan("")
    # the family that runs such a plan
    family = family or {"bsr": "bsr", "int8": "int8", "binary": "binary"}.get(plan.scheme, "dense")
    w = tuple(weights[0]) if weights else ()
    if reduction:
        per_out = reduction
    elif op in ("pointwise", "conv", "depthwise"):
        per_out = w[0] * w[1] * w[2]  # kh * kw * input channels per group (1 for depthwise)
    elif op == "matmul":
        per_out = w[0]
    else:
        per_out = 0
    density = plan.density if weights else 1.0
    macs = int(round(prod(outputs[0]) * per_out * density)) if outputs else 0
    weight_bytes = 0
    for i, s in enumerate(weights):
        # The main weight at its bit-width and density (a 1xN block's index costs 4 bytes); the rest stay fp32.
        if i == 0:
            kept = prod(s) * density
            weight_bytes += int(kept * plan.weight_bits + 7) // 8
            if plan.block > 1:
                weight_bytes += 4 * int(kept // plan.block)
        else:
            weight_bytes += _nbytes(s, 32)
    return LayerCost(
        op=op,
        shapes=tuple(tuple(int(d) for d in s) for s in ([inputs[0]] if inputs else []) + ([w] if w else [])
                     + [outputs[0]]),
        macs=macs,
        act_bytes=sum(_nbytes(s, plan.act_bits) for s in inputs),
        weight_bytes=weight_bytes,
        out_bytes=sum(_nbytes(s, plan.act_bits) for s in outputs),
        weight_bits=plan.weight_bits if weights else 32,
        act_bits=plan.act_bits,
        density=density,
        block=plan.block if weights else 1,
        family=family,
        kernel=kernel,
        sources=tuple(sources),
    )


def conv(cin: int, cout: int, k: int, stride: int, size: int, *, depthwise: bool = False, residual: bool = False,
         plan: LayerPlan | None = None, sources: Sequence[str] = ()) -> LayerCost:
    """A square, 'same'-padded convolution on a size x size map, with its bias (folded BatchNorm), activation and,
    with `residual`, the block's input added: what TVM fuses into one kernel."""
    osize = (size + stride - 1) // stride
    out = (1, osize, osize, cout)
    weight = (k, k, 1 if depthwise else cin, cout)
    op = "depthwise" if depthwise else "pointwise" if k == 1 else "conv"
    inputs = [(1, size, size, cin)] + ([out] if residual else [])
    return layer_cost(op, inputs, [weight, (cout,)], [out], plan=plan, sources=sources)


def dense(cin: int, cout: int, plan: LayerPlan | None = None, sources: Sequence[str] = ()) -> LayerCost:
    """A fully connected layer with its bias."""
    return layer_cost("matmul", [(1, cin)], [(cin, cout), (cout,)], [(1, cout)], plan=plan, sources=sources)


def global_mean(size: int, channels: int, sources: Sequence[str] = ()) -> LayerCost:
    """The mean over a size x size map (counted as TVM counts it: an add and a scale per input)."""
    return layer_cost("reduce", [(1, size, size, channels)], [], [(1, channels)], reduction=size * size,
                      sources=sources)


def data(inputs: Sequence[Shape], outputs: Sequence[Shape], sources: Sequence[str] = ()) -> LayerCost:
    """Data movement: a layout change, a copy, a reshape."""
    return layer_cost("data", inputs, [], outputs, sources=sources)

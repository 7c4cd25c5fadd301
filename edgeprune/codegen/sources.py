"""Which of the user's layers each compiled kernel came from, so profiles and reports speak the user's names.

TVM's frontends keep no node names through fusion, but they keep order: the ONNX importer emits one binding per
node in graph order, fusion keeps binding order, and the program calls its kernels in that order. So the i-th
convolution kernel the program calls is the i-th Conv node of the graph, and likewise for dense layers, pooling
and means. Each pairing is checked on output channels; a group that does not line up gets no names rather than
wrong ones.
"""

from __future__ import annotations

from ..artifacts import LayerCost
from .kernels.winograd import GEMM as WINOGRAD_GEMM
from .kernels.winograd import INPUT as WINOGRAD_INPUT
from .kernels.winograd import OUTPUT as WINOGRAD_OUTPUT

# ONNX operator -> the row classes its kernel can have
_GROUPS = {
    "conv": ({"Conv", "ConvTranspose"}, {"pointwise", "conv", "depthwise"}),
    "matmul": ({"Gemm", "MatMul"}, {"matmul"}),
    "pool": ({"MaxPool", "AveragePool"}, {"pool"}),
    "reduce": ({"GlobalAveragePool", "ReduceMean"}, {"reduce"}),
}


def source_layers(model) -> list[tuple[str, str, int | None]]:
    """(group, node name, output channels or None) of an ONNX graph's weighted and pooling nodes, in graph order."""
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    out = []
    for i, node in enumerate(model.graph.node):
        for group, (ops, _) in _GROUPS.items():
            if node.op_type in ops:
                channels = None
                if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in inits:
                    channels = inits[node.input[1]][0]
                elif node.op_type == "ConvTranspose" and len(node.input) > 1 and node.input[1] in inits:
                    channels = inits[node.input[1]][1]  # [in, out per group, kh, kw]; group 1 only
                elif node.op_type == "Gemm" and len(node.input) > 1 and node.input[1] in inits:
                    trans_b = any(a.name == "transB" and a.i for a in node.attribute)
                    dims = inits[node.input[1]]
                    channels = dims[0] if trans_b else dims[-1]
                out.append((group, (node.name or f"#{i}").lstrip("/"), channels))
    return out


def name_rows(rows: list[LayerCost], layers: list[tuple[str, str, int | None]]) -> list[LayerCost]:
    """`rows` with each kernel call's `sources` set from `layers` (source_layers), group by group, where they
    align."""
    from dataclasses import replace

    named = list(rows)
    for group, (_, classes) in _GROUPS.items():
        idx = [i for i, r in enumerate(rows) if r.op in classes]
        nodes = [(name, ch) for g, name, ch in layers if g == group]
        if len(idx) != len(nodes):
            continue
        if any(ch is not None and rows[i].shapes and rows[i].shapes[-1][-1] != ch for i, (_, ch) in zip(idx, nodes)):
            continue
        for i, (name, _) in zip(idx, nodes):
            named[i] = replace(rows[i], sources=(name,))
    # A Winograd convolution is three kernels called in a row (input transform, GEMM, output transform); the GEMM
    # took the Conv node's name above, and its transforms are the same layer's work.
    for i, r in enumerate(named):
        gemm = i + 1 if WINOGRAD_INPUT in r.kernel else i - 1 if WINOGRAD_OUTPUT in r.kernel else None
        if gemm is not None and 0 <= gemm < len(named) and WINOGRAD_GEMM in named[gemm].kernel:
            named[i] = replace(r, sources=named[gemm].sources)
    return named

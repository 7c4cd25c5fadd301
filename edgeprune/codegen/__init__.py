"""The codegen stage: a network (in memory, or an ONNX / .pt2 / .tflite file) and a Target -> a Build.

    importers.py  ways in (TVM's frontends, with one-line errors naming the node)
    lower.py      Relax passes: BatchNorm folding, NHWC, fusion, tagging, scheduling
    kernels/      kernel families, one a file: what each matches, its schedules, the cost rows it reports
    cpackage/     the C package for firmware: program IR, memory plan, C emission
    build.py      the stage itself: compile, export, write the build directory atomically
"""

from .build import compile_model

__all__ = ["compile_model"]

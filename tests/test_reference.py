"""The reference networks the benchmarks run: MobileNetV3-Small follows its paper and exports faithfully.

No compiler here: bench/dense.py compiles it and checks edgeprune's outputs against onnxruntime's.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from edgeprune.models.reference import BENCH_NETWORKS, SqueezeExcite, build


def test_mobilenetv3_small_matches_the_paper():
    model, x = build("mobilenetv3-small-1.0-224")
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(x)
    assert 55e6 < counter.get_total_flops() // 2 < 58e6  # Howard et al. 2019, table 3: 56M MACs
    kinds = {type(m) for m in model.modules()}
    assert {SqueezeExcite, nn.Hardswish, nn.ReLU} <= kinds
    assert {m.kernel_size[0] for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1} == {3, 5}


def test_bench_networks_are_seeded_and_export_faithfully(tmp_path):
    assert {"mobilenetv2-0.35-96", "mobilenetv3-small-1.0-224"} <= set(BENCH_NETWORKS)
    model, x = build("mobilenetv3-small-1.0-224")
    again, x2 = build("mobilenetv3-small-1.0-224")
    with torch.inference_mode():
        y = model(x).numpy()
        assert np.array_equal(y, again(x2).numpy())
    path = tmp_path / "v3.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), opset_version=17, dynamo=False, input_names=["input"])
    (ref,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})
    assert np.abs(ref - y).max() <= 1e-4 * max(1.0, float(np.abs(y).max()))

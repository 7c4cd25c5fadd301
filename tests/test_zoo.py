"""The test zoo itself: small, deterministic, and exported faithfully (ONNX Runtime agrees with PyTorch).

These run no compiler, so a failure here is the zoo's or the exporter's, not edgeprune's.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import assert_close
from torch import nn

from edgeprune.models import zoo

CASES = zoo.cases()


def test_zoo_shape():
    assert 6 <= len(zoo.ZOO) <= 8
    for name, (_, sizes) in zoo.ZOO.items():
        assert len(sizes) == 2 and len(set(sizes)) == 2, name


@pytest.mark.parametrize("name,res", CASES, ids=[f"{n}-{r}" for n, r in CASES])
def test_small_and_deterministic(name, res):
    model, x = zoo.make(name, res, seed=3)
    assert not model.training
    assert zoo.count_macs(model, x) < 5_000_000
    again, x2 = zoo.make(name, res, seed=3)
    torch.testing.assert_close(x, x2, rtol=0, atol=0)
    with torch.no_grad():
        y, y2 = model(x), again(x2)
    torch.testing.assert_close(y, y2, rtol=0, atol=0)
    assert torch.isfinite(y).all()
    # activations of order one: the tolerance of the numerics tests is meaningful
    assert 0.1 < float(y.abs().max()) < 1e3
    other, _ = zoo.make(name, res, seed=4)
    with torch.no_grad():
        assert not torch.equal(other(x), y)


def test_batchnorm_statistics_are_not_trivial():
    model, _ = zoo.make("resnet_tiny", 32)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    for bn in bns:
        assert bn.running_mean.abs().max() > 0 and not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))


def test_zoo_covers_the_operators():
    kinds: dict[str, bool] = {}
    for name in zoo.ZOO:
        model, _ = zoo.make(name, zoo.ZOO[name][1][0])
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                kinds["grouped"] = kinds.get("grouped", False) or 1 < m.groups < m.in_channels
                kinds["depthwise"] = kinds.get("depthwise", False) or m.groups == m.in_channels > 1
                kinds["dilated"] = kinds.get("dilated", False) or m.dilation[0] == 2
                kinds["stride2"] = kinds.get("stride2", False) or m.stride[0] == 2
                kinds["5x5"] = kinds.get("5x5", False) or m.kernel_size[0] == 5
                kinds["7x7"] = kinds.get("7x7", False) or m.kernel_size[0] == 7
                kinds["bias"] = kinds.get("bias", False) or m.bias is not None
                kinds["no bias"] = kinds.get("no bias", False) or m.bias is None
            for cls in (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.MaxPool2d, nn.AvgPool2d,
                        nn.Linear, zoo.SqueezeExcite):
                kinds[cls.__name__] = kinds.get(cls.__name__, False) or isinstance(m, cls)
    missing = [k for k, v in kinds.items() if not v]
    assert not missing, missing


@pytest.mark.parametrize("name,res", CASES, ids=[f"{n}-{r}" for n, r in CASES])
def test_onnx_export_matches_torch(name, res, tmp_path):
    model, x = zoo.make(name, res)
    path = zoo.export_onnx(model, x, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"]
    (ref,) = sess.run(None, {"input": x.numpy()})
    with torch.no_grad():
        assert_close(ref, model(x).numpy())


def test_export_pt2_round_trips(tmp_path):
    model, x = zoo.make("pooling", 35)
    path = zoo.export_pt2(model, x, tmp_path / "m.pt2")
    ep = torch.export.load(str(path))
    with torch.no_grad():
        np.testing.assert_allclose(ep.module()(x).numpy(), model(x).numpy(), rtol=1e-6, atol=1e-6)


def test_make_rejects_unknown_name():
    with pytest.raises(KeyError, match="resnet_tiny"):
        zoo.make("no-such-net", 32)

"""Post-training quantization (compress/quantize.py) and its synthetic calibration data (compress/fdda.py), on a tiny
MobileNetV2-like network (stem, depthwise, pointwise, residual add, pooling, classifier) so every test takes seconds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgeprune.compress import fdda
from edgeprune.compress import quantize as Q
from edgeprune.errors import UserError

CLASSES, RES = 3, 16


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([nn.ReLU6()] if act else []))


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 8, 3, 2)
        self.dw = _conv_bn(8, 8, 3, 1, groups=8)
        self.pw = _conv_bn(8, 8, 1, act=False)
        self.expand = _conv_bn(8, 24, 1)
        self.classifier = nn.Linear(24, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.pw(self.dw(x))
        x = self.expand(x)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized images whose colour depends on the class, so classes differ in their BN statistics."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % CLASSES
    tint = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 0.0, 1.0], [0.0, 1.0, -1.0]])[y]
    x = 0.6 * torch.randn(n, 3, RES, RES, generator=g) + tint[:, :, None, None]
    return x.clamp(*fdda.BOUNDS), y


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    """Tiny, trained a little so its predictions and BN statistics carry the classes."""
    torch.manual_seed(0)
    net = Tiny()
    x, y = _images(96)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    net.train()
    for _ in range(30):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # settle the running statistics on the data
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        net(x)
    return net.eval()


def _ints(y: torch.Tensor, scale: float, zero_point: int) -> np.ndarray:
    return np.clip(np.round(y.numpy() / scale) + zero_point, -128, 127).astype(np.int64)


def _conv_reference(x: np.ndarray, w: np.ndarray, bias: np.ndarray, zx: int, stride: int, pad: int,
                    groups: int) -> np.ndarray:
    """int32 accumulation of one convolution, written out loop by loop (independent of quantize.reference)."""
    n, c, h, wd = x.shape
    o, cg, k, _ = w.shape
    xp = np.full((n, c, h + 2 * pad, wd + 2 * pad), zx, dtype=np.int64)
    xp[:, :, pad:pad + h, pad:pad + wd] = x
    oh, ow = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
    acc = np.zeros((n, o, oh, ow), dtype=np.int64)
    og = o // groups
    for oc in range(o):
        ci = (oc // og) * cg
        for i in range(oh):
            for j in range(ow):
                win = xp[:, ci:ci + cg, i * stride:i * stride + k, j * stride:j * stride + k] - zx
                acc[:, oc, i, j] = (win * w[oc].astype(np.int64)).sum((1, 2, 3)) + int(bias[oc])
    return acc


def _requantize(acc: np.ndarray, mult: np.ndarray, shift: np.ndarray, zo: int, lo: int, hi: int) -> np.ndarray:
    out = np.empty_like(acc)
    for c in range(acc.shape[1]):  # one float32 product per value, Python's round (half to even), then the clamp
        scale = np.float32(int(mult[c]) / 2 ** int(shift[c]))
        vals = acc[:, c]
        out[:, c] = np.reshape([round(float(np.float32(a) * scale)) for a in vals.ravel()], vals.shape)
    return np.clip(out + zo, lo, hi)


def test_int8_weights_are_per_channel_symmetric_and_round_trip_exactly():
    w = torch.randn(16, 8, 3, 3) * torch.rand(16, 1, 1, 1) * 3
    ints, scale = Q.quantize_weight(w, 8)
    assert ints.dtype == torch.int8
    np.testing.assert_allclose(scale.numpy(), w.abs().amax((1, 2, 3)).numpy() / 127, rtol=1e-6)
    assert (ints.reshape(16, -1).abs().amax(1) == 127).all()  # every channel reaches the end of its grid
    deq = ints.float() * scale.view(-1, 1, 1, 1)
    assert (deq - w).abs().max() <= scale.max() / 2 + 1e-6
    again, scale2 = Q.quantize_weight(deq, 8)  # on the grid already: exactly the same integers and scales
    assert torch.equal(again, ints)
    np.testing.assert_allclose(scale2.numpy(), scale.numpy(), rtol=1e-6)


def test_quantized_layers_export_the_grid_the_simulation_uses(tiny):
    x, _ = _images(24, seed=1)
    q = Q.quantize(tiny, x, bits=(8, 8))
    modules = dict(q.module.named_modules())
    assert set(q.layers) == {"stem.0", "dw.0", "pw.0", "expand.0", "classifier"}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.module.modules())
    folded = Q.fold_bn(tiny)
    for name, layer in q.layers.items():
        wf = dict(folded.named_modules())[name].weight.detach()
        np.testing.assert_allclose(layer.weight_scale, wf.reshape(len(wf), -1).abs().amax(1).numpy() / 127,
                                   rtol=1e-6)
        deq = torch.from_numpy(layer.weight.astype(np.float32)) * torch.from_numpy(layer.weight_scale).view(
            -1, *[1] * (wf.dim() - 1))
        assert torch.equal(modules[name].weight.detach(), deq)  # the simulation runs the exported integers
        assert layer.weight.dtype == np.int8 and layer.bias.dtype == np.int32
        assert np.all((layer.multiplier >= 2 ** 30) | (layer.multiplier == 0))
    assert q.layers["dw.0"].kind == "depthwise" and q.layers["pw.0"].kind == "pointwise"
    assert q.layers["stem.0"].activation == "relu6" and q.layers["pw.0"].activation == "none"
    plan = q.plan()
    assert {p.scheme for p in plan.values()} == {"int8"}
    assert {(p.weight_bits, p.act_bits) for p in plan.values()} == {(8, 8)}


def test_bn_folding_keeps_the_function(tiny):
    x, _ = _images(8, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(Q.fold_bn(tiny)(x), tiny(x), rtol=1e-4, atol=1e-4)
    assert any(isinstance(m, nn.BatchNorm2d) for m in tiny.modules())  # the original is left alone


@pytest.mark.parametrize("name", ["stem.0", "dw.0", "pw.0"])
def test_fake_quant_agrees_with_integer_arithmetic_within_one_step(tiny, name):
    calib, _ = _images(24, seed=3)
    q = Q.quantize(tiny, calib, bits=(8, 8))
    layer = q.layers[name]
    conv = dict(q.module.named_modules())[name]
    seen = {}
    handle = conv.register_forward_hook(lambda m, i, o: seen.update(x=i[0].detach(), y=o.detach()))
    with torch.no_grad():
        q.module(_images(4, seed=4)[0])
    handle.remove()
    x_int = _ints(seen["x"], layer.input_scale, layer.input_zero_point)
    # the simulated input is on the input grid exactly
    np.testing.assert_allclose((x_int - layer.input_zero_point) * layer.input_scale, seen["x"].numpy(), atol=1e-5)
    y = seen["y"].clamp(0, 6) if layer.activation == "relu6" else seen["y"]
    fake = _ints(y, layer.output_scale, layer.output_zero_point)
    acc = _conv_reference(x_int, layer.weight, layer.bias, layer.input_zero_point, conv.stride[0], conv.padding[0],
                          conv.groups)
    ours = _requantize(acc, layer.multiplier, layer.shift, layer.output_zero_point, layer.act_min, layer.act_max)
    assert np.abs(ours - fake).max() <= 1
    assert np.mean(ours == fake) > 0.95  # one step is the rare exception (ties, fp32 rounding), not the rule
    assert len(np.unique(ours)) > 8  # a real spread of values, not a saturated or constant output
    # the library's reference is the same arithmetic, bit for bit
    np.testing.assert_array_equal(Q.reference(layer, x_int.astype(np.int8)), ours)


def test_requantize_rounds_half_to_even_once_in_float32_and_fixed_point_half_up():
    mult, shift = Q.quantize_multiplier(np.array([0.5, 0.3, 1e-3, 1.5]))
    assert np.all((mult >= 2 ** 30) & (mult < 2 ** 31))
    np.testing.assert_allclose(mult / 2.0 ** shift, [0.5, 0.3, 1e-3, 1.5], rtol=2 ** -30)
    acc = np.array([[3, -3, 5, 7]]).T.repeat(4, 1)  # rows: accumulators, columns: channels
    out = Q.requantize(acc, mult, shift, zero_point=0, axis=1)  # a convolution's epilogue: float32, ties to even
    assert out[:, 0].tolist() == [2, -2, 2, 4]  # 1.5 -> 2, -1.5 -> -2, 2.5 -> 2, 3.5 -> 4
    assert out[:, 3].tolist() == [4, -4, 8, 10]  # 4.5 -> 4, -4.5 -> -4, 7.5 -> 8, 10.5 -> 10
    assert Q.requantize(np.array([[10 ** 6]]), mult[:1], shift[:1], 100).item() == 127  # saturates
    assert Q.requantize(np.array([[-(2 ** 31)]]), mult[:1], shift[:1], 0).item() == -128
    fixed = Q.requantize_fixed(acc, mult, shift, zero_point=0, axis=1)  # adds and means: int64, half up
    assert fixed[:, 0].tolist() == [2, -1, 3, 4] and fixed[:, 3].tolist() == [5, -4, 8, 11]


def test_4bit_scales_minimize_the_rounding_error():
    w = torch.randn(8, 64) * torch.rand(8, 1)
    w[:, 0] *= 6  # one outlier per channel: clipping it pays at 4 bits
    ints, scale = Q.quantize_weight(w, 4)
    err = ((ints.float() * scale[:, None] - w) ** 2).sum(1)
    naive = w.abs().amax(1) / 7
    err_naive = (((w / naive[:, None]).round().clamp(-7, 7) * naive[:, None] - w) ** 2).sum(1)
    assert (err <= err_naive + 1e-6).all() and err.sum() < 0.9 * err_naive.sum()
    assert (scale < naive).any() and (scale >= 0.5 * naive - 1e-6).all()


def test_w4a8_uses_15_levels_with_the_first_and_last_layers_at_8(tiny):
    calib, _ = _images(24, seed=5)
    q = Q.quantize(tiny, calib, bits=(4, 8))
    for name, layer in q.layers.items():
        levels = np.unique(layer.weight)
        if name in ("stem.0", "classifier"):
            assert layer.weight_bits == 8 and len(levels) > 16
        else:
            assert layer.weight_bits == 4 and levels.min() >= -8 and levels.max() <= 7 and len(levels) <= 16
    assert len(np.unique(q.layers["expand.0"].weight)) >= 15  # 192 weights use the whole 4-bit grid
    deq = dict(q.module.named_modules())["expand.0"].weight.detach()
    assert max(len(torch.unique(row)) for row in deq) <= 16  # so does the simulation, channel by channel
    every = Q.quantize(tiny, calib, bits=(4, 8), ends=None)
    assert {layer.weight_bits for layer in every.layers.values()} == {4}
    assert {p.weight_bits for p in every.plan().values()} == {4}


def test_fdda_losses_decrease_and_statistics_move_toward_the_class_centres(tiny):
    real, labels = _images(24, seed=6)
    centres = fdda.class_centres(tiny, real, labels, CLASSES, per_class=4)
    assert len(centres.means) == 4 and centres.means[0].shape == (CLASSES, 8)
    start = fdda.noise(CLASSES * 6, RES, seed=0)
    before = fdda.centre_distance(tiny, start.images, torch.arange(CLASSES).repeat_interleave(6), centres)
    steps = []
    syn = fdda.fdda(tiny, centres, RES, images_per_class=6, steps=30, lr=0.1, seed=0,
                    progress=lambda s, n, label, loss: steps.append((s, n, label)))
    assert steps[-1] == (30, 30, "fdda") and len(steps) == 30
    h = syn.history
    assert h[-1]["loss"] < 0.5 * h[0]["loss"]
    # the alignment terms do the work: cross-entropy alone brings them down only 3-7x here, FDDA 80-200x
    for term in ("centralized", "bns"):
        assert h[-1][term] < 0.1 * h[0][term], (term, h[0][term], h[-1][term])
    after = fdda.centre_distance(tiny, syn.images, syn.labels, centres)
    deep = range(fdda.start_layer(len(before)), len(before))  # the layers the class terms act on
    assert all(after[i] < 0.1 * before[i] for i in deep), (before, after)
    assert syn.images.min() >= fdda.BOUNDS[0] and syn.images.max() <= fdda.BOUNDS[1]
    assert all(p.requires_grad for p in tiny.parameters())  # the network is given back as it came


def test_zeroq_aligns_to_the_global_statistics(tiny):
    syn = fdda.zeroq(tiny, 12, RES, steps=30, lr=0.1)
    assert syn.history[-1]["loss"] < 0.6 * syn.history[0]["loss"]
    assert (syn.labels == -1).all()


def test_batchnorm_is_folded_after_the_synthetic_data_is_made(tiny, monkeypatch):
    calls = []
    synthesize, fold = fdda.fdda, Q.fold_bn

    def spy_synthesize(model, *a, **k):
        calls.append(("synthesize", sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())))
        return synthesize(model, *a, **k)

    def spy_fold(model):
        calls.append(("fold", sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())))
        return fold(model)

    monkeypatch.setattr(fdda, "fdda", spy_synthesize)
    monkeypatch.setattr(Q, "fold_bn", spy_fold)
    real, labels = _images(12, seed=7)
    pixels = ((real.permute(0, 2, 3, 1) * 64 + 127.5).clamp(0, 255)).to(torch.uint8).numpy()
    q = Q.ptq(tiny, RES, "fdda", pixels, labels.numpy(), bits=(8, 8), classes=CLASSES, steps=3)
    assert calls == [("synthesize", 4), ("fold", 4)]  # synthesized on the BN network, folded after
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.module.modules())
    # synthetic images, then the real ones of the centres (12 images: 4 of each class)
    assert q.calibration["source"] == "fdda" and q.calibration["images"] == CLASSES * (fdda.IMAGES_PER_CLASS + 4)
    with pytest.raises(UserError, match="BatchNorm"):  # and the other order is refused
        synthesize(Q.fold_bn(tiny), fdda.class_centres(tiny, real, labels, CLASSES), RES, steps=1)


def test_bad_input_is_named(tiny):
    x, _ = _images(4)
    with pytest.raises(ValueError, match="bits"):
        Q.quantize(tiny, x, bits=(4, 4))
    with pytest.raises(ValueError, match="calibration"):
        Q.quantize(tiny, x[0], bits=(8, 8))
    with pytest.raises(UserError, match="calibration source 'imagenet'"):
        Q.ptq(tiny, RES, "imagenet")
    with pytest.raises(UserError, match="needs real images"):
        Q.ptq(tiny, RES, "fdda")
    with pytest.raises(UserError, match="class"):
        fdda.class_centres(tiny, x, torch.zeros(4, dtype=torch.long), CLASSES)


@pytest.mark.parametrize("name", ["resnet_tiny", "grouped", "mobilenetv3", "shufflenet", "split_branches",
                                  "pooling", "gated_add"])
def test_zoo_networks_quantize_close_to_fp32(name):
    """Other graphs than MobileNetV2's: projection shortcuts, grouped convs, hardswish and squeeze-excite, split,
    chunk, cat and channel shuffle, padded pooling, gated branches. Every weighted layer is exported, and at W8A8
    the output stays within a few percent of fp32."""
    from edgeprune.models import zoo

    model, _ = zoo.make(name, zoo.ZOO[name][1][0])
    res = zoo.ZOO[name][1][0]
    calib = torch.randn(16, 3, res, res, generator=torch.Generator().manual_seed(0))
    q = Q.quantize(model, calib, bits=(8, 8))
    weighted = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert set(q.layers) == weighted
    with torch.no_grad():
        ref, out = model(calib[:4]), q.module(calib[:4])
    assert float((out - ref).norm() / ref.norm()) < 0.06


def test_each_calibration_source_gives_its_images(tiny):
    real, labels = _images(30, seed=8)
    pixels = ((real.permute(0, 2, 3, 1) * 64 + 127.5).clamp(0, 255)).to(torch.uint8).numpy()
    made = {s: Q.calibration_images(tiny, s, RES, pixels, labels.numpy(), steps=2) for s in Q.SOURCES}
    assert len(made["real"].images) == 30 and (made["real"].labels >= 0).all()
    count = CLASSES * (fdda.IMAGES_PER_CLASS + fdda.PER_CLASS)  # FDDA's synthetic images, then its real ones
    assert {len(made[s].images) for s in ("fdda", "zeroq", "noise")} == {count}
    synthetic = made["fdda"].labels[:CLASSES * fdda.IMAGES_PER_CLASS].tolist()
    assert synthetic == sorted(synthetic)  # each class's images together
    assert made["fdda"].labels[len(synthetic):].tolist() == [c for c in range(CLASSES) for _ in range(fdda.PER_CLASS)]
    noise = made["noise"].images
    assert abs(float(noise.mean())) < 0.1 and 0.8 < float(noise.std()) < 1.1
    q_noise, q_real = (Q.quantize(tiny, made[s].images) for s in ("noise", "real"))
    assert q_noise.layers["expand.0"].input_scale != q_real.layers["expand.0"].input_scale  # the source matters


def test_auto_keeps_in_fp32_the_layers_the_device_runs_no_faster_in_int8():
    """--quantize auto's per-layer speed rule: each layer's cost row (compress.layer_costs, one forward pass finds
    its map) priced by the device's model in fp32 and in int8; a layer timed slower in int8 on this device (here one
    measured row) stays fp32, and the program computes it as an fp32 layer between int8 tensors."""
    from edgeprune import api, data
    from edgeprune.artifacts import LayerPlan
    from edgeprune.compress import layer_costs, quantize_network
    from edgeprune.cost import model_for
    from edgeprune.pipeline import _no_faster_in_int8
    from edgeprune.targets import get_target

    net = api._builtin("mobilenetv2-0.35-96")
    fp32, int8 = layer_costs(net), layer_costs(net, LayerPlan("", "int8", 8, 8))
    weighted = [n for n, m in net.module.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert sorted(fp32) == sorted(int8) == sorted(weighted)
    assert all(int8[n].weight_bits == 8 and fp32[n].weight_bits == 32 for n in fp32)
    assert {fp32[n].op for n in fp32} == {"conv", "pointwise", "depthwise", "matmul"}
    model = model_for(get_target("host"))
    assert _no_faster_in_int8(net, model) == []  # the host's prior: int8 is faster everywhere
    slow = weighted[5]
    model.measured[int8[slow].key()] = 10 * model.layer_ms(fp32[slow])[0]  # as if timed on a device
    same_kernel = [n for n in weighted if int8[n].key() == int8[slow].key()]  # a row prices a kernel shape
    assert _no_faster_in_int8(net, model) == same_kernel and slow in same_kernel
    q, info = quantize_network(net, data.load(None, seed=0), calibration="noise", keep_float=same_kernel)
    assert info["fp32_where_faster"] == same_kernel and info["fp32_layers"] == same_kernel
    assert [op.name for op in q.integer.ops if op.kind == "fconv"] == same_kernel


def test_distillation_brings_w4a8_closer_to_fp32_and_exports_what_it_simulates(tiny):
    calib, _ = _images(24, seed=6)
    held_out, _ = _images(64, seed=7)
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    plain = Q.quantize(tiny, calib, bits=(4, 8), ends=None)
    distilled = Q.quantize(tiny, calib, bits=(4, 8), ends=None, distill_steps=60)
    first, last = distilled.calibration["distill_loss"]
    assert last < 0.5 * first  # the KD loss on the calibration images falls
    with torch.no_grad():
        ref = tiny(held_out)
        err = {name: (q.module(held_out) - ref).abs().mean().item() for name, q in
               (("plain", plain), ("distilled", distilled))}
    assert err["distilled"] < 0.8 * err["plain"], err  # and so does the error on images it never saw
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in before.items())  # the fp32 network is untouched
    modules = dict(distilled.module.named_modules())
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in modules.values())
    assert not any(getattr(m, "straight_through", False) for m in modules.values())
    for name, layer in distilled.layers.items():  # the simulation runs the exported 4-bit integers
        assert layer.weight_bits == 4 and np.abs(layer.weight).max() <= 7
        w = modules[name].weight.detach()
        deq = torch.from_numpy(layer.weight.astype(np.float32)) * torch.from_numpy(layer.weight_scale).view(
            -1, *[1] * (w.dim() - 1))
        assert torch.equal(w, deq)
    assert not torch.equal(modules["pw.0"].weight, dict(plain.module.named_modules())["pw.0"].weight)


def test_quantize_network_distills_below_8_bits_by_default_and_says_so(tiny):
    from edgeprune import data
    from edgeprune.artifacts import Network
    from edgeprune.compress import distill_steps_for, quantize_network

    assert distill_steps_for("w4a8") > 0 and distill_steps_for("int8") == 0
    rng = np.random.default_rng(0)
    split = [(rng.integers(0, 256, (n, RES, RES, 3), dtype=np.uint8), np.arange(n) % CLASSES) for n in (30, 12, 12)]
    ds = data.Dataset("toy", [str(c) for c in range(CLASSES)], *split)
    network = Network(tiny, (1, 3, RES, RES), "tiny")
    _, info = quantize_network(network, ds, precision="w4a8", calibration="real", distill_steps=4)
    _, undistilled = quantize_network(network, ds, precision="w4a8", calibration="real", distill_steps=0)
    assert info["distill_tried"] == 4 and info["distill_steps"] in (0, 4) and info["weight_bits"] == 4
    assert undistilled["distill_steps"] == 0
    assert info["val_quantized"] >= undistilled["val_quantized"]  # distillation is kept only when it helps
    _, info = quantize_network(network, ds, precision="int8", calibration="real")
    assert info["distill_steps"] == 0
    with pytest.raises(UserError, match="distillation steps are at least 0"):
        quantize_network(network, ds, precision="w4a8", calibration="real", distill_steps=-1)

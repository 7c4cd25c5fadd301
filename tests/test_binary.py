"""Binary convolutions (ReCU, SiMaN, sign): the values they compute with are exactly binary, gradients pass the
binarization, ReCU's clamp follows its tau schedule, SiMaN marks the top half by magnitude, the stem, classifier,
depthwise and shortcut layers stay full precision, what the kernels read reproduces the layer, and a short
training run lowers the loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from edgeprune import data, training
from edgeprune.compress import binary
from edgeprune.errors import UserError
from edgeprune.models.reference import ResNet18


class Tiny(nn.Module):
    """A stem, a Bi-Real-style block (binary 3x3 + identity), a depthwise conv, a strided block with a 1x1 projection,
    a ReLU-fed conv, and a linear classifier."""

    def __init__(self, classes: int = 2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.Hardtanh())
        self.conv1 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16))
        self.conv2 = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32))
        self.proj = nn.Sequential(nn.Conv2d(16, 32, 1, 2, bias=False), nn.BatchNorm2d(32))
        self.conv3 = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32))
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = self.stem(x)
        x = nn.functional.hardtanh(self.conv1(x) + x)
        x = nn.functional.hardtanh(self.dw(x))
        x = torch.relu(self.conv2(x) + self.proj(x))
        x = self.conv3(x) + x
        return self.fc(x.mean((2, 3)))


BINARY = ["conv1.0", "conv2.0", "conv3.0"]


def tiny(method: str, seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    model = Tiny()
    binary.convert(model, method, torch.randn(8, 3, 12, 12))
    return model


def toy_data(n: int = 256, size: int = 12, seed: int = 0) -> data.Dataset:
    """Two classes a binary network learns in a few dozen steps: the bright half of the image is left or right."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.integers(60, 120, (n, size, size, 3))
    for i in range(n):
        cols = slice(0, size // 2) if y[i] == 0 else slice(size // 2, size)
        x[i, :, cols] += 120
    x = x.astype(np.uint8)
    k = n * 3 // 4
    return data.Dataset("toy", ["left", "right"], (x[:k], y[:k]), (x[k:], y[k:]), (x[k:], y[k:]))


@pytest.mark.parametrize("method", binary.METHODS)
@pytest.mark.parametrize("train", [True, False])
def test_weights_and_activations_are_exactly_binary(method, train):
    model = tiny(method).train(train)
    x = torch.randn(4, 16, 12, 12)
    for name in BINARY:
        m = model.get_submodule(name)
        assert isinstance(m, binary.BinaryConv2d)
        w = m.effective_weight().detach()
        alpha = m.scale().detach()
        for o in range(w.shape[0]):
            values = set(torch.unique(w[o]).tolist())
            allowed = {0.0, float(alpha[o])} if m.code_set == "01" else {-float(alpha[o]), float(alpha[o])}
            assert values <= allowed and len(values) == 2, (name, o, values)
        a = m.binary_input(torch.randn(4, m.in_channels, 6, 6))
        assert set(torch.unique(a).tolist()) == {-1.0, 1.0}
    assert set(torch.unique(binary.SignConv2d(nn.Conv2d(16, 4, 3)).binary_input(x * 0)).tolist()) == {1.0}


def test_the_stem_classifier_depthwise_and_projection_stay_full_precision():
    for method in binary.METHODS:
        model = tiny(method)
        assert type(model.stem[0]) is nn.Conv2d and type(model.dw[0]) is nn.Conv2d and type(model.proj[0]) is nn.Conv2d
        assert type(model.fc) is nn.Linear
        assert sorted(binary.binary_modules(model)) == BINARY
    # the reference ResNet-18: the 7x7 stem, the three 1x1 shortcut projections and the classifier stay
    ref = ResNet18(10)
    names = binary.convert(ref, "recu", torch.randn(2, 3, 64, 64))
    assert len(names) == 16 and "stem.0" not in names and not any(".short." in n for n in names)
    assert type(ref.stem[0]) is nn.Conv2d and type(ref.fc) is nn.Linear
    # a conv head (the last weighted layer run) stays too
    head = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Hardtanh(), nn.Conv2d(8, 8, 3), nn.Hardtanh(), nn.Conv2d(8, 4, 1))
    assert binary.convert(head, "sign", torch.randn(2, 3, 10, 10)) == ["2"]


@pytest.mark.parametrize("method", binary.METHODS)
def test_gradients_pass_the_binarization(method):
    model = tiny(method).train()
    x = torch.randn(8, 3, 12, 12)
    nn.functional.cross_entropy(model(x), torch.tensor([0, 1] * 4)).backward()
    for name in BINARY:
        m = model.get_submodule(name)
        assert m.weight.grad is not None and int((m.weight.grad != 0).sum()) > m.weight.numel() // 4, name
        if method != "sign":
            assert m.alpha.grad is not None and bool((m.alpha.grad != 0).any())
    assert model.stem[0].weight.grad.abs().sum() > 0  # through every binary activation back to the stem


def test_the_activation_estimators():
    x = torch.tensor([-1.5, -0.75, -0.25, 0.0, 0.25, 1.0, 1.5], requires_grad=True)
    binary._SignBiReal.apply(x).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [0, 0.5, 1.5, 2, 1.5, 0, 0])  # max(0, 2 - 2|x|)
    x.grad = None
    binary._SignClipped.apply(x).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [0, 1, 1, 1, 1, 1, 0])
    assert binary._sign(x).tolist() == [-1, -1, -1, 1, 1, 1, 1]


def test_recu_tau_schedule_and_its_clamp():
    assert binary.recu_tau(0) == pytest.approx(0.85) and binary.recu_tau(1) == pytest.approx(0.99)
    a = 0.14 / (math.e - 1)
    assert binary.recu_tau(0.5) == pytest.approx(a * math.exp(0.5) + 0.85 - a)
    taus = [binary.recu_tau(p) for p in np.linspace(0, 1, 11)]
    steps = np.diff(taus)
    assert np.all(steps > 0) and np.all(np.diff(steps) > 0)  # rising, faster and faster (exponential)
    conv = nn.Conv2d(64, 64, 3, bias=False)
    with torch.no_grad():  # Laplace weights: the clamp at the tau-quantile clips a fraction 2 (1 - tau) of them
        conv.weight.copy_(torch.distributions.Laplace(0.0, 0.05).sample(conv.weight.shape))
    m = binary.ReCUConv2d(conv)
    for p in (0.0, 0.5, 1.0):
        m.progress.fill_(p)
        tau = binary.recu_tau(p)
        w2, q = m.clamped()
        w0 = conv.weight - conv.weight.mean((1, 2, 3), keepdim=True)
        w1 = w0 / (w0.std((1, 2, 3), keepdim=True) / (2 * math.sqrt(2)))
        assert q == pytest.approx(-float(w1.detach().abs().mean()) * math.log(2 - 2 * tau), rel=1e-3)
        assert float(w2.detach().abs().max()) == pytest.approx(q, rel=1e-5)
        clipped = float((w1.abs() > q).float().mean())  # Q is the tau-quantile of the signed Laplace: two tails
        assert clipped == pytest.approx(2 * (1 - tau), abs=0.01), (p, clipped)


def test_binarize_drives_the_schedule_step_by_step():
    model = Tiny()
    seen = []

    def progress(step, steps, label, loss):
        seen.append((step, float(model.conv1[0].progress), model.conv1[0].tau()))

    binary.binarize(model, "recu", toy_data(64), 12, 5, batch=16, progress=progress)
    assert [s[1] for s in seen] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert seen[-1][2] == pytest.approx(0.99) and not model.training


@pytest.mark.parametrize("method", binary.METHODS)
def test_two_stage_binarizes_activations_first_then_weights(method):
    """Two-stage training: the first stage computes with the method's binary activations and full-precision weights
    (ReCU's centred, as its standardization centres them), the second with both binary; the weight schedules run
    over the second stage only, and the steps add up to `steps`."""
    torch.manual_seed(0)
    model = Tiny()
    fp32 = {n: model.get_submodule(n).weight.detach().clone() for n in BINARY}
    binary.convert(model, method, torch.randn(8, 3, 12, 12), weights_binary=False)
    x = torch.randn(4, 16, 12, 12)
    m = model.conv1[0].eval()
    assert not bool(m.weights_binary)
    real = fp32["conv1.0"] - (fp32["conv1.0"].mean((1, 2, 3), keepdim=True) if method == "recu" else 0)
    torch.testing.assert_close(m.weight.detach(), fp32["conv1.0"])  # SiMaN: not yet in magnitude form
    torch.testing.assert_close(m(x), nn.functional.conv2d(m.binary_input(x), real, None, 1, 1))
    with pytest.raises(UserError, match="first stage of two-stage training"):
        binary.binary_layers(model)
    m.binarize_weights()
    assert bool(m.weights_binary) and set(torch.unique(m.codes()).tolist()) == {-1, 1}
    if method == "siman":  # the first codes are the top half of the fp32 weights by value
        torch.testing.assert_close(m.alpha.detach(), fp32["conv1.0"].abs().mean((1, 2, 3)))
        by_value = binary.SiMaNConv2d.top_half(fp32["conv1.0"].view(16, -1))
        assert float(((m.codes().view(16, -1) > 0).float() == by_value).float().mean()) > 0.99

    model = Tiny()
    seen = []

    def progress(step, steps, label, loss):
        c = model.conv1[0]
        seen.append((label, step, steps, bool(c.weights_binary), float(c.progress)))

    binary.binarize(model, method, toy_data(64), 12, 6, batch=16, activation_steps=2, progress=progress)
    assert [s[:4] for s in seen] == [(f"{method} (activations)", 1, 2, False), (f"{method} (activations)", 2, 2, False),
                                      (method, 1, 4, True), (method, 2, 4, True), (method, 3, 4, True),
                                      (method, 4, 4, True)]
    assert [s[4] for s in seen[2:]] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(bool(c.weights_binary) for c in binary.binary_modules(model).values()) and not model.training
    with pytest.raises(UserError, match="activation_steps must be between 0 and steps"):
        binary.binarize(Tiny(), method, toy_data(32), 12, 2, activation_steps=3)


def test_siman_marks_exactly_the_top_half_by_magnitude():
    conv = nn.Conv2d(3, 8, 3, bias=False)  # 27 weights per output channel: 13 ones
    m = binary.SiMaNConv2d(conv, codes="01").eval()
    codes = m.codes()
    assert set(torch.unique(codes).tolist()) == {0, 1}
    assert codes.view(8, -1).sum(1).tolist() == [13] * 8
    mag = (m.weight - m.weight.mean((1, 2, 3), keepdim=True)).detach().abs().view(8, -1)  # the latent weights
    ones = codes.view(8, -1).bool()
    for o in range(8):
        assert float(mag[o][ones[o]].min()) > float(mag[o][~ones[o]].max())
    with torch.no_grad():  # the sign of a weight does not decide its bit
        m.weight[0, 0, 0, 0] = -10.0
    assert int(m.codes()[0, 0, 0, 0]) == 1
    pm1 = binary.SiMaNConv2d(conv)
    assert pm1.code_set == "pm1" and set(torch.unique(pm1.codes()).tolist()) == {-1, 1}  # the released forward


def test_siman_starts_from_the_codes_of_the_full_precision_weights():
    """SiMaN's bit follows the magnitude, not the sign: converted as they are, the fp32 weights would give codes
    unrelated to the fp32 function. In magnitude form the first codes are the top half of w by value."""
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 16, 3, bias=False)
    with torch.no_grad():
        conv.weight.add_(0.004 * torch.randn(16, 1, 1, 1))  # channel means, as trained weights have
    w = conv.weight.detach().view(16, -1)
    by_value = binary.SiMaNConv2d.top_half(w)
    codes = binary.SiMaNConv2d(conv).eval().codes().view(16, -1)
    assert float(((codes > 0).float() == by_value).float().mean()) > 0.99
    sign_codes = (w >= 0).float()
    assert float(((codes > 0).float() == sign_codes).float().mean()) > 0.9  # close to sign's own starting codes
    # the latent weights keep w's scale, so a step of the optimizer flips codes as it does for sign
    latent = binary.SiMaNConv2d(conv).weight.detach()
    assert 0.5 < float(latent.std() / conv.weight.detach().std()) < 3
    torch.testing.assert_close(binary.SiMaNConv2d(conv).alpha.detach(), conv.weight.detach().abs().mean((1, 2, 3)))


def test_siman_clip_schedule_and_no_weight_decay_on_binary_layers():
    assert binary.siman_percent(0) == 15 and binary.siman_percent(1) == 0
    m = binary.SiMaNConv2d(nn.Conv2d(16, 16, 3, bias=False))
    m.progress.fill_(0.0)
    m.clip_magnitudes()
    mag = m.weight.detach().abs().flatten()
    assert float((mag == mag.min()).float().mean()) >= 0.14  # the bottom 15% lifted to the 15th percentile
    decayed = {}
    opts = []
    real = training.optimizer

    def spy(net, lr, wd, no_decay=None):
        opts.append(real(net, lr, wd, no_decay))
        return opts[-1]

    for method in ("siman", "recu"):
        model = Tiny()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(training, "optimizer", spy)
            binary.binarize(model, method, toy_data(32), 12, 1, batch=16)
        group = next(g for g in opts[-1].param_groups if g["weight_decay"] > 0)
        ids = {id(p) for p in group["params"]}
        decayed[method] = [n for n in BINARY if id(model.get_submodule(n).weight) in ids]
        assert id(model.stem[0].weight) in ids  # full-precision convs keep their decay
    assert decayed == {"siman": [], "recu": BINARY}


@pytest.mark.parametrize("method", binary.METHODS)
def test_what_the_kernels_read_reproduces_each_layer(method):
    model = tiny(method).eval()
    captured = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: captured.__setitem__(n, (a[0], o))) for n in BINARY]
    with torch.no_grad():
        model(torch.randn(4, 3, 12, 12))
    for h in hooks:
        h.remove()
    layers = binary.binary_layers(model)
    assert sorted(layers) == BINARY
    for name, bw in layers.items():
        x, out = captured[name]
        torch.testing.assert_close(bw.conv(x), out, rtol=1e-5, atol=1e-5)
        assert bw.codes.dtype == np.int8 and bw.scale.shape == (bw.codes.shape[0],)
        assert bw.code_set == "pm1"  # SiMaN too: its released forward computes with 2B - 1
        assert bw.act_mode == ("sample-mean" if method == "siman" else "static")
    assert layers["conv3.0"].bias is not None
    # conv3 reads a ReLU: a static method thresholds at its channels' medians, so both bits occur
    if method != "siman":
        assert np.all(layers["conv3.0"].act_threshold > 0) and np.all(layers["conv1.0"].act_threshold == 0)
        relu_out = captured["conv3.0"][0]
        assert float(relu_out.min()) >= 0
        ones = float((model.get_submodule("conv3.0").binary_input(relu_out) > 0).float().mean())
        assert 0.2 < ones < 0.8, ones
    plan = binary.plans(model)["conv2.0"]
    assert (plan.scheme, plan.weight_bits, plan.act_bits, plan.params["method"]) == ("binary", 1, 1, method)


def test_packing_along_input_channels():
    bits = np.zeros((1, 40), dtype=bool)
    bits[0, [0, 3, 31, 32, 39]] = True
    assert binary.pack_bits(bits, 32).tolist() == [[(1 << 0) | (1 << 3) | (1 << 31), (1 << 0) | (1 << 7)]]
    assert binary.pack_bits(bits, 64).tolist() == [[1 | 8 | (1 << 31) | (1 << 32) | (1 << 39)]]
    bw = binary.binary_layers(tiny("recu"))["conv2.0"]  # 32 x 16 x 3 x 3
    packed = bw.packed(32)
    assert packed.shape == (32, 3, 3, 1) and packed.dtype == np.uint32
    assert int(packed[5, 1, 2, 0]) == sum(1 << c for c in range(16) if bw.codes[5, c, 1, 2] > 0)
    assert bw.weight_bytes == 32 * 9 * 4 + 32 * 4  # one word per kernel position, plus the scales


def test_bad_input_is_named():
    with pytest.raises(UserError, match="unknown binarization method 'xnor'"):
        binary.binarize(Tiny(), "xnor", toy_data(32), 12, 1)
    with pytest.raises(UserError, match="steps must be >= 0"):
        binary.binarize(Tiny(), "recu", toy_data(32), 12, -1)
    with pytest.raises(UserError, match="no convolution to binarize"):
        binary.binarize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2)), "sign", toy_data(32), 12, 1)


@pytest.mark.parametrize("method", binary.METHODS)
def test_a_short_training_run_lowers_the_loss(method):
    torch.manual_seed(1)
    ds = toy_data()
    model = Tiny()
    losses = []
    binary.binarize(model, method, ds, 12, 60, batch=32, lr=3e-3,
                    progress=lambda step, steps, label, loss: losses.append(loss))
    assert len(losses) == 60
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.1, (losses[:10], losses[-10:])
    assert training.accuracy(model, *ds.val, 12) > 0.8

"""Binary convolutions: ReCU, SiMaN and a plain sign baseline (methods.md sections 6-8; issue 15, part 1).

A binary convolution computes with 1-bit weights and 1-bit activations, so a CPU can replace 32 multiply-adds with
one xnor (or and) and a popcount. Each method is a different way to pick the bits and to train through them:

    sign   XNOR-Net style: sign(w) times the per-channel mean |w|; activations sign(a); straight-through
           estimators (identity for weights, clipped identity for activations). The baseline the papers beat.
    recu   ReCU (Xu et al., ICCV 2021, z-hXu/ReCU): weights standardized per output channel to std 2*sqrt(2), clamped
           to the tau-quantile of a Laplace fit (the rectified clamp unit, tau rising exponentially from 0.85 to 0.99
           over training), then sign; a learnable per-channel scale alpha ~ U(0, 1); activations sign(a), divided
           by their per-sample std in training only (that only shapes the gradient), with the Bi-Real surrogate
           d sign(a)/da ~ max(0, 2 - 2|a|).
    siman  SiMaN (Lin et al., TPAMI 2023, lmbxmu/SiMaN): codes B in {0, +1}, B = 1 on the top half of each output
           channel's standardized weights by magnitude (exactly n // 2 of them, the released code's `quick` sort);
           gradients reach the magnitudes straight through; a magnitude clip of the latent weights from the
           [p, 100 - p] percentiles, p falling from 15 to 0; alpha learnable from mean |w|; no weight decay on binary
           layers; activations sign(a - mean over (C, H, W) of that sample), at inference as well, with the Bi-Real
           surrogate. The convolution runs with 2B - 1, as the released code's forward does (methods.md 7.1), so an
           xnor kernel runs it on the bits B: `codes="pm1"` (default). `codes="01"` computes with B itself (the
           and-popcount kernel); against ±1 activations that adds half the window sum of the activations, the same
           map for every output channel whatever the codes, and a network converted that way does not train (13% on
           the built-in digits after 300 steps from the fp32 weights, against 58% with "pm1").
           Since the sign of a latent weight never decides its bit, the fp32 weights enter in magnitude form
           (`magnitude_form`): latent weights whose magnitude order is the fp32 weights' value order, so the first
           codes are B = 1 on the top half of w by value, i.e. sign(w - median) as 2B - 1 (the released code
           initialises B = (sign(w) + 1) / 2 from the weights for the same reason). Converting the fp32 magnitudes
           instead would start from codes that are random with respect to the fp32 function (50% agreement).
Padding: a padded activation is 0, not -1 (PyTorch's zero padding of the ±1 map), so a kernel must correct for it.
sign(0) is +1 throughout (bit = a >= threshold, TVM's binarize_pack convention).

What stays at full precision (both papers: first conv, downsample and classifier; depthwise is not in their
networks and a 1-bit depthwise kernel has one input channel to pack, so nothing to gain):
  * the stem: every conv that reads the image (found by tracing one batch);
  * the classifier: the last weighted layer run (a Linear, or a conv head as in SqueezeNet);
  * grouped and depthwise convs;
  * shortcut projections: 1x1 convs with stride > 1, and any conv whose path contains `downsample` or `short`;
  * anything `keep(name, conv)` says.

A conv whose input is never negative (it reads a ReLU) would give all +1 under sign(a): for the static-threshold
methods (sign, recu) such a layer binarizes a - t with t the per-channel median of its input on one training batch
(or just above 0 where the median is 0: the bit is then "positive"), a fixed threshold a kernel folds into its
bit-packing. The networks of both papers have no such layer (Bi-Real blocks with Hardtanh / PReLU). SiMaN's
per-sample mean already centres its input.

Use:
    binarize(model, "recu", ds, resolution, steps, teacher=fp32_copy, progress=cb)   # convert + train, in place
    binarize(..., activation_steps=steps // 2)      # two-stage: binary activations first, then weights too
    binary_layers(model) -> {name: BinaryWeights}   # codes, scale, activation threshold, packing, a reference conv
    plans(model) -> {name: LayerPlan}               # scheme "binary", 1-bit weights and activations
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import data, training
from ..artifacts import LayerPlan
from ..errors import UserError
from .trace import forward_hooked

METHODS = ("sign", "recu", "siman")
RECU_TAU = (0.85, 0.99)  # tau_min, tau_max (z-hXu/ReCU imagenet/main.py cpt_tau)
SIMAN_PERCENT = 15.0  # the magnitude clip's starting percentile (lmbxmu/SiMaN imagenet/main.py)
EPS = 1e-5


# ---------------------------------------------------------------- sign and its gradients


def _sign(x: torch.Tensor) -> torch.Tensor:
    """±1 with sign(0) = +1: a bit is `x >= 0`, so there is no third value."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


class _SignSTE(torch.autograd.Function):
    """sign forward, identity backward (weights: ReCU's BinaryQuantize, XNOR-Net)."""

    @staticmethod
    def forward(ctx, x):
        return _sign(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _SignClipped(torch.autograd.Function):
    """sign forward, gradient 1 for |x| <= 1 and 0 outside (the classic BNN straight-through estimator)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _sign(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= 1).to(g.dtype)


class _SignBiReal(torch.autograd.Function):
    """sign forward, the Bi-Real surrogate max(0, 2 - 2|x|) backward (ReCU's and SiMaN's BinaryQuantize_a)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _sign(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (2 - 2 * x.abs()).clamp(min=0)


def recu_tau(progress: float, tau_min: float = RECU_TAU[0], tau_max: float = RECU_TAU[1]) -> float:
    """ReCU's exponential schedule tau(e) = A exp(e / E) + B with A = (tau_max - tau_min) / (e - 1), B = tau_min - A:
    tau_min at the start, tau_max at the end, clipping less and less as the weights settle."""
    a = (tau_max - tau_min) / (math.e - 1)
    return a * math.exp(min(max(progress, 0.0), 1.0)) + tau_min - a


def siman_percent(progress: float) -> float:
    """SiMaN's magnitude-clip percentile p = 15 (1 - e / E): 15% at the start, none at the end."""
    return SIMAN_PERCENT * (1 - min(max(progress, 0.0), 1.0))


# ---------------------------------------------------------------- the binary convolutions


class BinaryConv2d(nn.Conv2d):
    """A Conv2d computing conv(binary activations, binary weights x per-channel scale) + bias. Subclasses say how
    the bits are chosen. `progress` (0 at the first training step, 1 at the end) drives the schedules; the training
    loop sets it. `act_threshold` is the static per-input-channel threshold (0 unless the input is a ReLU's)."""

    method = ""
    code_set = "pm1"  # the weight codes: "pm1" = {-1, +1}, "01" = {0, 1}
    act_mode = "static"  # "static": bit = a >= act_threshold[c]; "sample-mean": bit = a >= mean of the sample

    def __init__(self, conv: nn.Conv2d, weights_binary: bool = True):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
        with torch.no_grad():
            self.weight.copy_(conv.weight)
            if conv.bias is not None:
                self.bias.copy_(conv.bias)
        self.register_buffer("progress", torch.tensor(0.0))
        self.register_buffer("act_threshold", torch.zeros(conv.in_channels))
        # False in the first stage of two-stage training: binary activations, full-precision weights
        self.register_buffer("weights_binary", torch.tensor(weights_binary))

    # subclasses: the forward weight (binary codes through their estimator), the scale, the activation bits
    def binary_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def scale(self) -> torch.Tensor:
        raise NotImplementedError

    def binary_input(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def effective_weight(self) -> torch.Tensor:
        """The weight the convolution runs with: codes x the output channel's scale ({-a, +a} or {0, a})."""
        return self.binary_weight() * self.scale().view(-1, 1, 1, 1)

    def real_weight(self) -> torch.Tensor:
        """The full-precision weight of the first stage of two-stage training (binary activations only)."""
        return self.weight

    @torch.no_grad()
    def binarize_weights(self) -> None:
        """From here on the weights are binary too (the second stage)."""
        self.weights_binary.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.effective_weight() if bool(self.weights_binary) else self.real_weight()
        return F.conv2d(self.binary_input(x), w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    @torch.no_grad()
    def codes(self) -> torch.Tensor:
        """The inference codes, int8, in {-1, +1} or {0, 1}, computed as in eval mode: reading them from a module
        left in training mode must not move SiMaN's latent weights (its training forward clips them)."""
        training = self.training
        self.train(False)
        try:
            return self.binary_weight().detach().round().to(torch.int8)
        finally:
            self.train(training)

    def _centred(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.act_threshold.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, method={self.method}"


class SignConv2d(BinaryConv2d):
    """The baseline: sign(w) x mean |w| per output channel; sign(a) with the clipped straight-through estimator."""

    method = "sign"

    def binary_weight(self) -> torch.Tensor:
        return _SignSTE.apply(self.weight)

    def scale(self) -> torch.Tensor:
        return self.weight.abs().mean((1, 2, 3))

    def binary_input(self, x: torch.Tensor) -> torch.Tensor:
        return _SignClipped.apply(self._centred(x))


class ReCUConv2d(BinaryConv2d):
    """ReCU: standardize, clamp at the tau-quantile, sign; learnable alpha; sign activations, Bi-Real surrogate."""

    method = "recu"

    def __init__(self, conv: nn.Conv2d, weights_binary: bool = True):
        super().__init__(conv, weights_binary)
        self.alpha = nn.Parameter(torch.rand(conv.out_channels))  # U(0, 1), as released (not mean |w|)

    def real_weight(self) -> torch.Tensor:
        """The centred weight: ReCU's codes are the signs of w - mean_c(w) (its standardization), so the first
        stage trains the function whose signs the second stage starts from."""
        return self.weight - self.weight.mean((1, 2, 3), keepdim=True)

    def tau(self) -> float:
        return recu_tau(float(self.progress))

    def clamped(self) -> tuple[torch.Tensor, float]:
        """The standardized weight after the rectified clamp unit, and the clamp Q(tau)."""
        w = self.weight
        w0 = w - w.mean((1, 2, 3), keepdim=True)
        w1 = w0 / (torch.sqrt(w0.var((1, 2, 3), keepdim=True) + EPS) / (2 * math.sqrt(2)))  # std 2 sqrt 2: b = 2
        b = float(w1.detach().abs().mean())  # the Laplace scale, estimated over the whole layer
        q = -b * math.log(2 - 2 * self.tau())  # the tau-quantile of Laplace(0, b): 2 (1 - tau) of |w1| is above
        return torch.clamp(w1, -q, q), q

    def binary_weight(self) -> torch.Tensor:
        return _SignSTE.apply(self.clamped()[0])

    def scale(self) -> torch.Tensor:
        return self.alpha

    def binary_input(self, x: torch.Tensor) -> torch.Tensor:
        a = self._centred(x)
        if self.training:  # scale-free for sign, so it only places the surrogate's window
            a = a / torch.sqrt(a.var((1, 2, 3), keepdim=True) + EPS)
        return _SignBiReal.apply(a)


class SiMaNConv2d(BinaryConv2d):
    """SiMaN: +1 on the top half of each channel's standardized weights by magnitude, 0 (or -1) elsewhere."""

    method = "siman"
    act_mode = "sample-mean"

    def __init__(self, conv: nn.Conv2d, codes: str = "pm1", weights_binary: bool = True):
        super().__init__(conv, False)
        if codes not in ("01", "pm1"):
            raise ValueError(f"SiMaN codes must be '01' or 'pm1', not {codes!r}")
        self.code_set = codes
        self.alpha = nn.Parameter(conv.weight.detach().abs().mean((1, 2, 3)).clone())  # from the fp32 weights
        if weights_binary:
            self.binarize_weights()

    @torch.no_grad()
    def binarize_weights(self) -> None:
        """The full-precision weights become SiMaN's latent weights (`magnitude_form`), alpha their mean |w|."""
        if not bool(self.weights_binary):
            self.alpha.copy_(self.weight.abs().mean((1, 2, 3)))
            self.weight.copy_(magnitude_form(self.weight))
        super().binarize_weights()

    @torch.no_grad()
    def clip_magnitudes(self) -> None:
        """The released code's projection of the latent weights: |w - mean_c(w)| clamped to the layer's
        [p, 100 - p] percentiles (p from `siman_percent`), sign kept. At p = 0 it only centres the channels."""
        w1 = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
        mag = w1.abs().flatten()
        k = int(siman_percent(float(self.progress)) / 100 * mag.numel())
        if k >= 1:  # order statistics (a selection, not a sort: this runs every training step)
            lo, hi = float(mag.kthvalue(k).values), float(mag.kthvalue(mag.numel() - k + 1).values)
            w1 = w1.abs().clamp(lo, hi) * torch.sign(w1)
        self.weight.copy_(w1)

    def magnitudes(self) -> torch.Tensor:
        w = self.weight
        w1 = w - w.mean((1, 2, 3), keepdim=True)
        return (w1 / torch.sqrt(w1.var((1, 2, 3), keepdim=True) + EPS)).abs().view(w.shape[0], -1)

    @staticmethod
    def top_half(x: torch.Tensor) -> torch.Tensor:
        """1 on exactly n // 2 entries of each row, the largest; 0 elsewhere."""
        b = torch.zeros_like(x)
        return b.scatter_(1, torch.topk(x.detach(), x.shape[1] // 2, dim=1).indices, 1.0)

    def binary_weight(self) -> torch.Tensor:
        if self.training:
            self.clip_magnitudes()
        x = self.magnitudes()
        b = self.top_half(x)
        if self.code_set == "pm1":
            b = 2 * b - 1
        return (x - x.detach() + b).view_as(self.weight)  # value b, gradient straight to the magnitudes

    def scale(self) -> torch.Tensor:
        return self.alpha

    def binary_input(self, x: torch.Tensor) -> torch.Tensor:
        a = x - x.mean((1, 2, 3), keepdim=True)
        return _SignBiReal.apply(a / torch.sqrt(a.var((1, 2, 3), keepdim=True) + EPS))


@torch.no_grad()
def magnitude_form(w: torch.Tensor) -> torch.Tensor:
    """SiMaN's latent weights for a full-precision weight `w` [Cout, ...]: their magnitudes about the channel mean
    are ordered as the values of w, so SiMaN's first codes put B = 1 on the top half of w by value (2B - 1 =
    sign(w - median), the sign code of w with SiMaN's balance). In SiMaN the sign of a latent weight never decides
    its bit (the magnitude rank does), so the fp32 weights taken as they are would give codes unrelated to the
    function they were trained for; the released code likewise starts its codes at B = (sign(w) + 1) / 2.

    Magnitude m_i = v_i - min(v) + std(v), with v = w - median(w) per channel: increasing in w, and the distance
    of a weight to the flip point (the channel's median magnitude) is |v_i|, in w's units, as sign's is |w_i|, so
    Adam's steps flip codes at the rate they do for sign. Signs alternate along the value order so the channel
    mean is near 0 and SiMaN's centring keeps the order (bar a tie at the median). The sign carries no code."""
    flat = w.reshape(w.shape[0], -1).float()
    n = flat.shape[1]
    v = flat - flat.median(1, keepdim=True).values
    m = v - v.min(1, keepdim=True).values + v.std(1, unbiased=False, keepdim=True)
    alternate = 1.0 - 2.0 * (torch.arange(n, device=w.device) % 2).to(flat.dtype)  # +1, -1, +1, ...
    signs = torch.empty_like(flat).scatter_(1, flat.argsort(1, descending=True), alternate.expand_as(flat).contiguous())
    latent = signs * m
    return (latent - latent.mean(1, keepdim=True)).view_as(w).to(w.dtype)


_CLASSES: dict[str, type[BinaryConv2d]] = {"sign": SignConv2d, "recu": ReCUConv2d, "siman": SiMaNConv2d}


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise UserError(f"unknown binarization method {method!r}; choose one of {', '.join(METHODS)}")


# ---------------------------------------------------------------- converting a network


def full_precision_by_default(name: str, conv: nn.Conv2d) -> bool:
    """The structural part of the keep rule (the stem and classifier are found by tracing): grouped and
    depthwise convs, and shortcut projections (1x1 with stride, or named downsample / short)."""
    if conv.groups != 1 or conv.padding_mode != "zeros":
        return True
    projection = tuple(conv.kernel_size) == (1, 1) and max(conv.stride) > 1
    return projection or any(part.startswith(("downsample", "short")) for part in name.split("."))


def _trace(model: nn.Module, example: torch.Tensor) -> tuple[list[str], dict[str, torch.Tensor], set[str]]:
    """Weighted layers in the order they run, each conv's input on `example`, and the convs reading the image."""
    order: list[str] = []
    inputs: dict[str, torch.Tensor] = {}
    reads_image: set[str] = set()

    def on_layer(name: str, mod: nn.Module, args: tuple) -> None:
        order.append(name)
        if isinstance(mod, nn.Conv2d):
            inputs.setdefault(name, args[0].detach())
            if args[0] is example:
                reads_image.add(name)

    forward_hooked(model, example, on_layer)
    if order and order[0] in inputs:
        reads_image.add(order[0])  # the first conv run is the stem even if the model preprocesses the image
    return order, inputs, reads_image


def convert(model: nn.Module, method: str, example: torch.Tensor,
            keep: Callable[[str, nn.Conv2d], bool] | None = None, siman_codes: str = "pm1",
            weights_binary: bool = True) -> list[str]:
    """Replace the model's convolutions by `method`'s binary ones, in place, starting from their weights; returns
    the names of the binarized layers. `example` (a batch of images as the model takes them) finds the stem (convs
    reading the image) and the classifier (the last weighted layer run), which stay full precision, and the inputs
    that are never negative (they get a static threshold, see the module's docstring)."""
    _check_method(method)
    if not isinstance(example, torch.Tensor) or example.ndim != 4:
        raise ValueError("example must be a batch of images, a 4-d tensor (N, C, H, W)")
    order, inputs, reads_image = _trace(model, example)
    if not order:
        raise UserError("the model ran no convolution or linear layer on the example; nothing to binarize")
    convs = dict(model.named_modules())
    chosen = []
    for name, m in convs.items():
        if type(m) is not nn.Conv2d or name not in inputs:
            continue  # already binary, another conv type, or never run
        if name in reads_image or name == order[-1] or full_precision_by_default(name, m) or (keep and keep(name, m)):
            continue
        chosen.append(name)
    for name in chosen:
        conv = convs[name]
        b = (SiMaNConv2d(conv, siman_codes, weights_binary) if method == "siman"
             else _CLASSES[method](conv, weights_binary))
        a = inputs[name]
        if b.act_mode == "static" and float(a.min()) >= 0:
            # the median balances the bits; where most of a channel is 0, the split is 0 against positive
            median = a.transpose(0, 1).flatten(1).median(1).values
            b.act_threshold.copy_(median.clamp(min=torch.finfo(median.dtype).tiny))
        _set(model, name, b.to(conv.weight.device))
    return chosen


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def binary_modules(model: nn.Module) -> dict[str, BinaryConv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BinaryConv2d)}


def set_progress(model: nn.Module, progress: float) -> None:
    """Where training is, 0 to 1: ReCU's tau and SiMaN's clip percentile follow it."""
    for m in binary_modules(model).values():
        m.progress.fill_(float(progress))


def binarize(model: nn.Module, method: str, ds: data.Dataset, resolution: int, steps: int, *,
             teacher: nn.Module | None = None, teacher_resolution: int | None = None, lr: float = 1e-3,
             batch: int = 32, weight_decay: float = 1e-2, kd_weight: float = 1.0, seed: int = 0,
             keep: Callable[[str, nn.Conv2d], bool] | None = None, siman_codes: str = "pm1",
             activation_steps: int = 0,
             progress: Callable[[int, int, str, float], None] | None = None) -> nn.Module:
    """Binarize a trained full-precision CNN in place (`convert`) and train it `steps` steps from its weights:
    labels plus distillation from `teacher` (the fp32 network, if given), AdamW with warm-up and cosine decay
    (training.distill), ReCU's tau and SiMaN's clip following the steps. Weight decay applies to conv and
    classifier weights (ReCU: not to BatchNorm or alpha), and for SiMaN not to binary layers. `progress(step,
    steps, method, loss)` is called after every step. Returns the model, BatchNorm recalibrated, in eval mode.

    Two-stage training (ReActNet; ReCU's `imagenet_two-stage`): the first `activation_steps` of the `steps` train
    with the method's binary activations and full-precision weights, the rest with both binary, each stage with
    its own optimizer and warm-up + cosine schedule; the weight schedules (tau, SiMaN's clip) run over the
    second stage."""
    _check_method(method)
    if steps < 0:
        raise UserError(f"binarization steps must be >= 0, not {steps}")
    if not 0 <= activation_steps <= steps:
        raise UserError(f"activation_steps must be between 0 and steps ({steps}), not {activation_steps}")
    if resolution <= 0:
        raise UserError(f"resolution must be positive, not {resolution}")
    example = data.tensors(ds.train[0][:batch], resolution)
    names = convert(model, method, example, keep, siman_codes, weights_binary=activation_steps == 0)
    if not names:
        raise UserError("no convolution to binarize: the model's convs are all stem, classifier, depthwise or "
                        "shortcut projections (kept at full precision)")
    binary = {f"{n}.weight" for n in names}
    no_decay = (lambda n, p: n in binary) if method == "siman" else None
    if activation_steps:
        training.distill(model, resolution, teacher, teacher_resolution or resolution, ds, activation_steps, lr=lr,
                         batch=batch, weight_decay=weight_decay, kd_weight=kd_weight, seed=seed,
                         opt=training.optimizer(model, lr, weight_decay, no_decay=no_decay),
                         progress=progress, label=f"{method} (activations)")
        for m in binary_modules(model).values():
            m.binarize_weights()
    weight_steps = steps - activation_steps
    opt = training.optimizer(model, lr, weight_decay, no_decay=no_decay)
    set_progress(model, 0.0)
    training.distill(model, resolution, teacher, teacher_resolution or resolution, ds, weight_steps, lr=lr,
                     batch=batch, weight_decay=weight_decay, kd_weight=kd_weight, seed=seed,
                     opt=opt, after_step=lambda step: set_progress(model, (step + 1) / weight_steps),
                     progress=progress, label=method)
    set_progress(model, 1.0)
    return model.eval()


# ---------------------------------------------------------------- what the kernels read


@dataclass
class BinaryWeights:
    """One binary layer as a kernel runs it:

        out[n, o] = scale[o] * sum over (c, i, j) of codes[o, c, i, j] * bit(x)[n, c, ...] + bias[o]

    bit(x) = +1 where x >= threshold, else -1; the threshold is `act_threshold[c]` ("static") or the mean of the
    sample over (C, H, W) ("sample-mean", SiMaN); padded positions are 0, not -1. codes are int8 in {-1, +1}
    ("pm1", an xnor-popcount kernel) or {0, 1} ("01", an and-popcount kernel plus popcount(codes) per channel)."""

    name: str
    method: str
    code_set: str
    codes: np.ndarray  # int8 [Cout, Cin, kh, kw]
    scale: np.ndarray  # float32 [Cout]
    bias: np.ndarray | None  # float32 [Cout]
    act_mode: str
    act_threshold: np.ndarray  # float32 [Cin] (static mode; zeros otherwise)
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    def packed(self, word_bits: int = 32) -> np.ndarray:
        """Codes packed along input channels: [Cout, kh, kw, ceil(Cin / word_bits)] uint32 or uint64, bit
        c % word_bits of word c // word_bits set where the code is +1 (LSB first); padding channels are 0."""
        return pack_bits(self.codes.transpose(0, 2, 3, 1) > 0, word_bits)

    @property
    def weight_bytes(self) -> int:
        """Flash for the packed codes plus the fp32 scale (and bias): about 1/32 of the fp32 weights."""
        return self.packed(32).nbytes + 4 * len(self.scale) * (1 if self.bias is None else 2)

    def conv(self, x: torch.Tensor) -> torch.Tensor:
        """The reference the kernels are checked against, from these fields alone."""
        if self.act_mode == "sample-mean":
            t = x.mean((1, 2, 3), keepdim=True)
        else:
            t = torch.from_numpy(self.act_threshold).view(1, -1, 1, 1)
        bits = torch.where(x >= t, 1.0, -1.0)
        w = torch.from_numpy(self.codes.astype(np.float32)) * torch.from_numpy(self.scale).view(-1, 1, 1, 1)
        bias = None if self.bias is None else torch.from_numpy(self.bias)
        return F.conv2d(bits, w, bias, self.stride, self.padding, self.dilation)


def pack_bits(bits: np.ndarray, word_bits: int = 32) -> np.ndarray:
    """Pack a boolean array along its last axis into words (LSB first), zero-padding the last word."""
    if word_bits not in (32, 64):
        raise ValueError(f"word_bits must be 32 or 64, not {word_bits}")
    n = bits.shape[-1]
    words = -(-n // word_bits)
    padded = np.zeros(bits.shape[:-1] + (words * word_bits,), dtype=np.uint64)
    padded[..., :n] = bits
    dtype = np.uint32 if word_bits == 32 else np.uint64
    shifts = np.arange(word_bits, dtype=np.uint64)
    packed = (padded.reshape(bits.shape[:-1] + (words, word_bits)) << shifts).sum(-1, dtype=np.uint64)
    return packed.astype(dtype)


def binary_layers(model: nn.Module) -> dict[str, BinaryWeights]:
    """Every binary layer's codes, per-channel scale and bias, and activation threshold, frozen from the current
    weights (SiMaN's top-half codes are recomputed, not read from the last training step)."""
    out = {}
    for name, m in binary_modules(model).items():
        if not bool(m.weights_binary):
            raise UserError(f"layer {name} is in the first stage of two-stage training (full-precision weights); "
                            "binarize_weights() makes its weights binary")
        with torch.no_grad():
            out[name] = BinaryWeights(
                name, m.method, m.code_set, m.codes().numpy(), m.scale().detach().float().numpy().copy(),
                None if m.bias is None else m.bias.detach().float().numpy().copy(), m.act_mode,
                m.act_threshold.detach().float().numpy().copy(), tuple(m.stride), tuple(m.padding),
                tuple(m.dilation))
    return out


def plans(model: nn.Module) -> dict[str, LayerPlan]:
    """The compress stage's plan for each binary layer: scheme "binary", 1-bit weights and activations."""
    return {name: LayerPlan(name, scheme="binary", weight_bits=1, act_bits=1,
                            params={"method": m.method, "codes": m.code_set, "activation": m.act_mode})
            for name, m in binary_modules(model).items()}


# ---------------------------------------------------------------- what the compiler reads


class ExportedBinaryConv(nn.Module):
    """A binary layer as the plain float operators it computes at inference (from its BinaryWeights):
    conv2d(where(x >= threshold, 1, -1), codes x scale) + bias, the threshold static or the sample's mean. Any
    runtime runs it; codegen/binarized.py finds the pattern and runs it as a bit-packed kernel."""

    def __init__(self, bw: BinaryWeights) -> None:
        super().__init__()
        self.stride, self.padding, self.dilation, self.mode = bw.stride, bw.padding, bw.dilation, bw.act_mode
        codes = torch.from_numpy(bw.codes.astype(np.float32))
        self.register_buffer("weight", codes * torch.from_numpy(bw.scale).view(-1, 1, 1, 1))
        self.register_buffer("threshold", torch.from_numpy(bw.act_threshold).view(1, -1, 1, 1))
        self.register_buffer("bias", None if bw.bias is None else torch.from_numpy(bw.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.mean((1, 2, 3), keepdim=True) if self.mode == "sample-mean" else self.threshold
        return F.conv2d(torch.where(x >= t, 1.0, -1.0), self.weight, self.bias, self.stride, self.padding,
                        self.dilation)


def export_form(model: nn.Module, layers: dict[str, BinaryWeights] | None = None) -> nn.Module:
    """A copy of `model`, in eval mode, with each binary convolution an ExportedBinaryConv (the same outputs).
    `layers` (binary_layers(model)) are used when given, so a caller holding them compiles exactly those."""
    import copy

    layers = binary_layers(model) if layers is None else layers
    if not layers:
        raise UserError("the model has no binary convolution (binarize or convert makes them)")
    out = copy.deepcopy(model).eval()
    for name, bw in layers.items():
        _set(out, name, ExportedBinaryConv(bw))
    return out

"""One forward pass with a hook on every convolution and linear layer: how compression learns the order layers run
in and what they read, for any PyTorch CNN (the first layer to run is the stem, the last the classifier)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def forward_hooked(model: nn.Module, example: torch.Tensor,
                   on_layer: Callable[[str, nn.Module, tuple], None]) -> None:
    """Run `model` on `example` once (eval mode, no gradients, its mode restored after), calling
    on_layer(name, module, inputs) as each Conv2d and Linear runs."""
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: on_layer(name, mod, args))
             for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)

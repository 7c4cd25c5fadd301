"""The compress stage: a Network in, the same Network with every layer's plan out.

1xN block pruning (block1xn.py: block scores, masks, filter rearrangement over coupled channels; its gradual
schedule with fine-tuning and its kernels come next), FDDA int8 quantization (quantize.py, fdda.py) and ReCU / SiMaN
binarization (binary.py) move in here. Until `build` uses them, compression is the identity: every convolution and
linear layer is planned dense fp32, so the plan codegen receives names every layer that has weights.
"""

from __future__ import annotations

from dataclasses import replace

from ..artifacts import LayerPlan, Network


def compress(network: Network, data=None) -> Network:
    """The network with a plan for each weighted layer (dense fp32 in this version); its module is untouched."""
    from torch import nn

    plan = dict(network.plan)
    for name, module in network.module.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and name not in plan:
            plan[name] = LayerPlan(name)
    return replace(network, plan=plan)

"""Per-layer kernel choice: for a layer whose weight has 1xN zero blocks, block-sparse or dense, and which N.

Sparse kernels lose to dense below a break-even density that depends on N, the layer's shape and the CPU, so the
choice is a price comparison, never assumed (architecture.md):
  auto     the device's latency model: its measured table when there is one, else the target's prior;
  sparse   every layer with 1xN zeros runs sparse, at the N the model prices best (benchmarks, tests);
  dense    sparsity is ignored.
"""

from __future__ import annotations

from ..artifacts import LatencyTable, LayerCost
from ..cost.model import model_for
from ..errors import UserError
from ..targets import Target
from .kernels import bsr

MODES = ("auto", "sparse", "dense")


def chooser(mode: str, target: Target, table: LatencyTable | None = None,
            threads: int | None = None) -> bsr.Chooser | None:
    """The choice function `bsr.sparsify` calls per layer, or None (dense) for mode "dense"."""
    if mode not in MODES:
        raise UserError(f"unknown sparse mode '{mode}'; one of: {', '.join(MODES)}")
    if mode == "dense":
        return None
    model = model_for(target, table, threads)

    def by_model(kernel: str, dense: LayerCost, options: list[tuple[str, LayerCost]]) -> str | None:
        # Options come in the family's order of preference, so a tie keeps the first (the kernel that suits
        # this CPU's vector width); min() keeps the first of equals.
        priced = [(model.layer_ms(row)[0], i, option) for i, (option, row) in enumerate(options)]
        best_ms, _, best = min(priced)
        if mode == "sparse" or best_ms < model.layer_ms(dense)[0]:
            return best
        return None

    return by_model

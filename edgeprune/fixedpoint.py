"""Fixed-point constants of int8 arithmetic, shared by the stages that write integer programs (compress) and those
that read quantized files (codegen's .tflite import): pure numpy, at the bottom layer so both may import it.

A real multiplier m is kept as (multiplier, shift): an int32 in [2**30, 2**31) and a right shift, m ~ multiplier /
2**shift. Adds, means and standalone requantizations apply it in fixed point, (acc * multiplier + 2**(shift-1)) >>
shift with the product in int64 (compress/quantize.py `requantize_fixed`). A convolution's epilogue, which runs once
per output and dominates layers with a short reduction, applies it in float32 (`requant_scale`, then
compress/quantize.py `requantize`): one int32 -> float conversion, one multiply, a clamp and a round to nearest even,
the same IEEE operations on every CPU, so the result is bit-exact everywhere and a third cheaper than int64 products.
"""

from __future__ import annotations

import math

import numpy as np

QMIN, QMAX = -128, 127  # int8 activations


def quantize_multiplier(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Real multipliers (> 0) as (int32 multiplier in [2**30, 2**31), right shift) with m ~ multiplier / 2**shift."""
    m = np.asarray(m, dtype=np.float64)
    if np.any(m <= 0) or np.any(m >= 2.0 ** 30):
        raise ValueError(f"requantization multipliers must be in (0, 2**30), got {m.min():g}..{m.max():g}")
    frac, exp = np.frexp(m)  # m = frac * 2**exp, frac in [0.5, 1)
    mult = np.round(frac * 2.0 ** 31).astype(np.int64)
    carry = mult == 2 ** 31
    mult[carry] //= 2
    exp = exp + carry
    shift = 31 - exp
    tiny = shift > 62  # below 2**-31: the product rounds to zero anyway
    mult[tiny], shift[tiny] = 0, 62
    return mult.astype(np.int32), shift.astype(np.int32)


def add_multipliers(scale_a: float, scale_b: float, scale_out: float) -> tuple[int, int, int]:
    """(ma, mb, shift) with ma / 2**shift ~ scale_a / scale_out (likewise b), the larger in [2**30, 2**31)."""
    (ma, mb), shift = sum_multipliers([scale_a, scale_b], scale_out)
    return ma, mb, shift


def sum_multipliers(scales: list[float], scale_out: float) -> tuple[tuple[int, ...], int]:
    """(multipliers, shift) of a sum of int8 tensors on `scales` onto `scale_out`: multiplier_i / 2**shift ~
    scales_i / scale_out, the largest in [2**30, 2**31)."""
    ratios = [s / scale_out for s in scales]
    shift = int(np.clip(30 - math.floor(math.log2(max(ratios))), 1, 62))
    return tuple(min(2 ** 31 - 1, int(round(r * 2.0 ** shift))) for r in ratios), shift


ROUND_MAGIC = 12582912.0  # 1.5 * 2**23: y + this rounds |y| < 2**22 to the nearest integer, ties to even,
ROUND_MAGIC_BITS = 0x4B400000  # and the sum's bits, read as an int32, are this + round(y)


def requant_scale(multiplier, shift) -> np.ndarray:
    """The float32 scale a convolution's epilogue multiplies its int32 accumulator by: multiplier / 2**shift (exact
    in float64), rounded once to float32."""
    return (np.asarray(multiplier, np.float64) * np.exp2(-np.asarray(shift, np.float64))).astype(np.float32)

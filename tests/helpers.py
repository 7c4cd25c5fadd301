"""Assertions shared by the tests (imported as ``helpers``: conftest.py puts this folder on sys.path)."""

from __future__ import annotations

import numpy as np


def assert_close(ours: np.ndarray, ref: np.ndarray) -> None:
    """Tolerance: 1e-4 relative to the output's scale (its largest magnitude, at least 1).

    float32 kernels that sum in another order than the reference differ by ~1e-7 of the scale; a wrong kernel
    (layout, padding, fold, fusion) differs by far more than 1e-4 of it.
    """
    ref = np.asarray(ref)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(ref).max())))


def assert_one_line_error(err: str, *needles: str) -> str:
    """stderr holds exactly one line, edgeprune's error, with no traceback; it contains every needle."""
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    line = lines[0]
    assert line.startswith("edgeprune: error: "), line
    assert "Traceback" not in err
    for n in needles:
        assert n in line, f"{n!r} not in {line!r}"
    return line

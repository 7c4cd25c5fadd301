"""Shared fixtures: the in-process CLI runner. Shared assertions live in helpers.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers.py, tflite_builder.py


@pytest.fixture(autouse=True, scope="session")
def edgeprune_home(tmp_path_factory):
    """A scratch $EDGEPRUNE_HOME for the whole run: tables and tuning records the tests write stay out of your data
    directory, and your own boards stay out of the tests."""
    patch = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("edgeprune-home")
    patch.setenv("EDGEPRUNE_HOME", str(home))
    yield home
    patch.undo()


@pytest.fixture(scope="session")
def scenes(tmp_path_factory) -> Path:
    """A quarter of the built-in digit scenes (every class), as a .npz for --data: builds whose tests are about
    what the pipeline does, not how accurate its subnet is, search and fine-tune on it in half the time."""
    import numpy as np

    from edgeprune import data

    ds = data.digit_scenes(0)
    parts = (ds.train, ds.val, ds.test)
    path = tmp_path_factory.mktemp("scenes") / "scenes.npz"
    np.savez(path, x=np.concatenate([x[::4] for x, _ in parts]), y=np.concatenate([y[::4] for _, y in parts]),
             classes=np.array(ds.classes))
    return path


@pytest.fixture
def cli(capfd):
    """Run ``edgeprune ARGS`` in this process; returns (exit code, stdout, stderr), read at the file descriptors so
    that anything TVM prints from C++ is seen too."""
    from edgeprune.cli import main

    def run(*argv: str | Path) -> tuple[int, str, str]:
        capfd.readouterr()
        rc = main([str(a) for a in argv])
        out, err = capfd.readouterr()
        return rc, out, err

    return run

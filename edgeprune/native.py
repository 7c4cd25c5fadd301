"""Native libraries (TVM's frontends, HiGHS) talk on stdout and stderr; we report errors ourselves."""

from __future__ import annotations

import contextlib
import io
import os
import sys


@contextlib.contextmanager
def quiet_native():
    """TVM's frontends print conversion failures to stdout and C++ warnings to stderr; we report errors ourselves."""
    import gc

    saved = [os.dup(1), os.dup(2)]
    sys.stdout.flush()
    sys.stderr.flush()
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                yield
        finally:
            gc.collect()  # a failed conversion's BlockBuilder warns when collected: let it happen here
            sys.stdout.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])

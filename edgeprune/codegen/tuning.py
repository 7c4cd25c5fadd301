"""Optional MetaSchedule tuning (`--tune-trials N`), with records cached per target.

Our schedule rules are the fast default; tuning searches further and needs the target's CPU to time candidates,
so it runs for the host target only. Records live in one directory per target and CPU under your data directory
(``<data dir>/tuning/<target>-<cpu>``; $EDGEPRUNE_HOME, else the platform's, see resources.py) and grow with every
tuning run.
MetaSchedule's best record can still lose to our hand-written schedule after few trials, so the caller keeps
whichever whole build measures faster (see build.compile_model).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import UserError
from ..resources import user_data_dir
from ..targets import Target


def records_dir(target: Target) -> Path:
    return user_data_dir() / "tuning" / f"{target.name}-{target.cpu}"


def tune(fused_mod, target: Target, trials: int) -> str:
    """Tune the fused module's kernels for `trials` trials in all; returns the records directory."""
    if not target.is_host:
        raise UserError(f"--tune-trials times candidates on the target's CPU; {target.name} is not this machine, "
                        "so tune with --target host (device tuning comes with the RPC device farm)")
    from tvm.s_tir import meta_schedule as ms

    work_dir = records_dir(target)
    work_dir.mkdir(parents=True, exist_ok=True)
    cost_model = "xgb" if importlib.util.find_spec("xgboost") else "random"
    ms.relax_integration.tune_relax(
        mod=fused_mod, params={}, target=target.tvm_target(), work_dir=str(work_dir),
        max_trials_global=trials, num_trials_per_iter=min(64, trials), cost_model=cost_model,
    )
    return str(work_dir)

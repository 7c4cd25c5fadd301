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
        builder=ms.builder.LocalBuilder(f_build=build_candidate),
    )
    return str(work_dir)


def build_candidate(mod, target, _params):
    """A candidate's build, in a builder process. MetaSchedule's default imports every tensor intrinsic TVM has
    first (tvm.s_tir.tensor_intrin: 33 s on our machines, in each fresh builder process, past the builder's 30 s
    timeout, so every candidate of a tuning run failed to build). A candidate arrives scheduled, any intrinsic
    already in its body, so the build needs none of them."""
    from tvm.driver import build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)

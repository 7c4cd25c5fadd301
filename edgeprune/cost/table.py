"""Latency tables on disk: <data dir>/calibrate/<device>.json, written atomically, read back typed.

Tables are written to your data directory ($EDGEPRUNE_HOME, else the platform's; see resources.py), never into the
installed package. Tables shipped with edgeprune (the repository's calibrate/) are read-only defaults: a device's
own table wins, and a shipped one that learns a measurement is written back as the device's own.

A table written by an earlier edgeprune (version 1: untyped kernel dicts) is read and converted, so a device's
calibration is not lost with an upgrade; it is written back in the current layout the next time it changes.
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
from math import prod
from pathlib import Path

from ..artifacts import TABLE_VERSION, Build, LatencyTable, LayerCost, Measurement, TableEntry
from ..errors import UserError
from ..resources import shipped_root, user_data_dir
from ..version import __version__
from .model import PRIOR_EFFICIENCY


def new_table(device: dict | None, threads: int | None = None) -> LatencyTable:
    """An empty table for the device of this identity, stamped with this version and now."""
    return LatencyTable(device=device, tool_version=__version__, threads=threads,
                        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def table_path(name: str) -> Path:
    """Where the table of the device called `name` is written by default: your data directory's calibrate/."""
    return user_data_dir() / "calibrate" / f"{name}.json"


def find_table(name: str) -> Path | None:
    """The table to read for the device called `name`: yours, else one shipped with edgeprune, else None."""
    for path in (table_path(name), shipped_root() / "calibrate" / f"{name}.json"):  # none may be shipped
        if path.is_file():
            return path
    return None


def load_table(path: str | Path) -> LatencyTable:
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        version = raw.get("version")
        if version not in (1, TABLE_VERSION) or not isinstance(raw.get("entries"), list):
            raise ValueError("unknown layout")
        if version == 1:
            raw["entries"] = [{**e, "layers": [_v1_row(r) for r in e["layers"]]} for e in raw["entries"]]
        return LatencyTable.from_json(raw)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not an edgeprune latency table ({e}); re-run edgeprune calibrate") from None


def save_table(path: str | Path, table: LatencyTable) -> None:
    """Atomically: a table is either the old one or the complete new one, never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(table.to_json(), f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _v1_row(r: dict) -> dict:
    """A version-1 kernel dict as a LayerCost: its class read from its FLOPs and shapes, as version 1 did."""
    kind, shapes = r["kind"], r["shapes"]
    op = {"matmul": "matmul", "pool": "pool", "reduce": "reduce"}.get(kind, "data")
    if kind in ("conv", "dwconv"):
        cin, cout = shapes[0][-1], shapes[-1][-1]
        outputs = max(1, prod(shapes[-1]))
        red = r["flops"] / (2 * outputs)
        op = "pointwise" if abs(red - cin) < 0.5 else \
            "depthwise" if cin == cout and abs(red - round(red ** 0.5) ** 2) < 0.5 else "conv"
    return LayerCost(op=op, shapes=tuple(tuple(s) for s in shapes), macs=r["flops"] // 2, act_bytes=r["act_bytes"],
                     weight_bytes=r["weight_bytes"], out_bytes=r["out_bytes"], kernel=r.get("kernel", "")).to_json()


def call_shares(rows: list[LayerCost]) -> list[float]:
    """Each row's share of its kernel call's time: 1, but for a kernel that runs several layers (codegen/dwpw.py:
    rows in a row naming the same kernel, a depthwise and a pointwise one, an expanding pointwise one first in a C
    package), whose one measured time is split between its rows by the prior's view of them (MACs over the class's
    efficiency: a depthwise MAC costs ~3x a pointwise one)."""
    shares = [1.0] * len(rows)
    i = 0
    while i < len(rows):
        for ops in (("pointwise", "depthwise", "pointwise"), ("depthwise", "pointwise")):
            run = rows[i:i + len(ops)]
            if len(run) == len(ops) and run[0].kernel and all(r.kernel == run[0].kernel for r in run) \
                    and tuple(r.op for r in run) == ops:
                weights = [r.macs / PRIOR_EFFICIENCY[r.op] for r in run]
                shares[i:i + len(ops)] = [w / sum(weights) for w in weights]
                i += len(ops) - 1
                break
        i += 1
    return shares


def entry_of(build: Build, m: Measurement, name: str | None = None) -> TableEntry:
    """A table entry from a build and its measurement; with a per-kernel profile, each kernel's share of the median."""
    per_kernel = None
    if m.layers:
        by_name = {row["name"]: row["ms"] / max(1, row["calls"]) for row in m.layers}
        # A data-movement kernel the profile never saw was elided by the VM (a reshape becomes a view): it costs 0.
        # A missing compute kernel means the profile is incomplete, and then no kernel's share is kept.
        complete = all(row.kernel in by_name or row.op == "data" for row in build.layers)
        raw = [by_name.get(row.kernel, 0.0) * share for row, share in zip(build.layers, call_shares(build.layers))]
        scale = m.median_ms / sum(raw) if sum(raw) > 0 else 0.0  # to this measurement's speed (see local.py)
        per_kernel = [r * scale for r in raw] if complete and scale > 0 else None
    return TableEntry(name or Path(build.directory).name, list(build.layers), m.median_ms, per_kernel)


def learn(table: LatencyTable, entries: list[TableEntry], path: str | Path | None = None) -> LatencyTable:
    """The learn stage: measurements enter the table (written atomically to `path` when given, and when the table
    knows its device); the caller refits with model_for(target, table)."""
    table.entries.extend(entries)
    if path is not None and table.device:
        save_table(path, table)
    return table

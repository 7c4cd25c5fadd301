"""Who measured a latency table: enough to tell that it belongs to another device.

A table from one board must not price another: the identity names the device URI and the target, and for this
machine its host name and CPU model; for an RPC key, the tracker, the key and how many boards shared the suite
(their times are pooled, so they should be the same kind of board)."""

from __future__ import annotations

import platform
from pathlib import Path

from ..targets import Target


def cpu_model() -> str:
    """This machine's CPU model, as /proc/cpuinfo names it ('' where it does not)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def device_identity(uri: str, target: Target, **details) -> dict:
    """The identity a table carries; `details` are what the device adds (see Device.identity)."""
    return {"uri": uri, "target": target.name, "cpu": target.cpu, **details}


def host_details(target: Target) -> dict:
    return {"host": platform.node(), "cpu_model": cpu_model(), "cores": target.cores}

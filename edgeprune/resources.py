"""Where edgeprune finds the files it ships, and where it writes what it learns.

Shipped and read-only: the target TOMLs, the device-side C (the runtime shim, the serial agent) and any default
calibration tables. In the repository they are its top-level ``targets/``, ``codegen/`` and ``calibrate/``; a wheel
carries the same files inside the package, under ``edgeprune/_data/`` (setup.py copies them there at build time),
so an install never reaches outside site-packages. `shipped` finds one either way.

Yours and writable: your own boards (``<config>/targets``), calibration tables and tuning records
(``<data>/calibrate``, ``<data>/tuning``). Both directories are ``$EDGEPRUNE_HOME`` when it is set, else the
platform's (Linux: ``~/.config/edgeprune`` and ``~/.local/share/edgeprune``, following XDG). Nothing is ever written
inside the installed package.

At the bottom of the house: this module imports nothing from edgeprune.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
INSTALLED = PACKAGE / "_data"  # filled by setup.py's build step; absent in a checkout and in an editable install
CHECKOUT = PACKAGE.parent
HOME_VARIABLE = "EDGEPRUNE_HOME"


def shipped_root() -> Path:
    """The folder holding targets/, codegen/ and calibrate/: the install's copy, else the checkout itself."""
    if INSTALLED.is_dir():
        return INSTALLED
    # Only a source tree: an install whose _data went missing must not pick up site-packages/targets by chance.
    if (CHECKOUT / "pyproject.toml").is_file() and (CHECKOUT / "targets").is_dir():
        return CHECKOUT
    raise FileNotFoundError(f"edgeprune's shipped files are missing: neither {INSTALLED} (an install) nor "
                            f"{CHECKOUT / 'targets'} (a checkout) exists; reinstall edgeprune")


def shipped(relative: str) -> Path:
    """A file or folder edgeprune ships, such as ``targets`` or ``codegen/runtime``; read it, never write to it."""
    path = shipped_root() / relative
    if not path.exists():
        raise FileNotFoundError(f"edgeprune's shipped {relative} is missing from {path.parent}; reinstall edgeprune")
    return path


def _home() -> Path | None:
    value = os.environ.get(HOME_VARIABLE, "").strip()
    return Path(value).expanduser().absolute() if value else None


def _platform_dir(kind: str) -> Path:
    """The platform's per-user directory for "config" or "data" (what platformdirs would say, without the
    dependency)."""
    home = Path.home()
    if sys.platform == "win32":
        variable, fallback = {"config": ("APPDATA", "AppData/Roaming"), "data": ("LOCALAPPDATA", "AppData/Local")}[kind]
        base = Path(os.environ.get(variable) or home / fallback)
    elif sys.platform == "darwin":
        base = home / "Library" / "Application Support"
    else:
        variable, fallback = {"config": ("XDG_CONFIG_HOME", ".config"), "data": ("XDG_DATA_HOME", ".local/share")}[kind]
        xdg = os.environ.get(variable, "")
        base = Path(xdg) if os.path.isabs(xdg) else home / fallback  # XDG: a relative value is to be ignored
    return base / "edgeprune"


def user_config_dir() -> Path:
    """Your settings: ``targets/`` holds your own boards. ``$EDGEPRUNE_HOME``, else the platform's config directory."""
    return _home() or _platform_dir("config")


def user_data_dir() -> Path:
    """What edgeprune learns on your machine: ``calibrate/`` (latency tables) and ``tuning/`` (MetaSchedule records).
    ``$EDGEPRUNE_HOME``, else the platform's data directory."""
    return _home() or _platform_dir("data")

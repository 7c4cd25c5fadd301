"""edgeprune as a user installs it: the sdist and the wheel built from it, installed into a fresh venv that reuses the
dependencies already here (--system-site-packages, --no-deps), and run from a folder outside the repository.

The installed `edgeprune` lists the shipped targets, compiles a C package for cortex-a7 that runs under qemu like
onnxruntime, takes a board of your own by path and from your folder, and writes nothing inside the installed package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from helpers import assert_close

from edgeprune.models import zoo

REPO = Path(__file__).resolve().parent.parent
# The repository's shipped folders, as the package must carry them (relative to edgeprune/_data in the wheel).
SHIPPED = sorted(str(p.relative_to(REPO)) for p in [*(REPO / "targets").glob("*.toml"),
                                                    *(REPO / "codegen" / "runtime").glob("*.[ch]"),
                                                    *(REPO / "codegen" / "agent").glob("*.[ch]"),
                                                    REPO / "codegen" / "agent" / "Makefile"])
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "out", "build", "dist", "_data", "*.egg-info", "__pycache__",
                                    ".pytest_cache", ".ruff_cache", "*.state")
RES = 32

pytestmark = pytest.mark.slow


def _run(cmd: list, cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n"
                    f"{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    """The sdist, built from a copy of the source tree, and the wheel built from that sdist (as `python -m build`
    does), both with this venv's setuptools and no network."""
    tmp = tmp_path_factory.mktemp("dist")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=NOT_SOURCE)
    out = tmp / "dist"
    name = _run([sys.executable, "-c", f"from setuptools import build_meta as b; print(b.build_sdist({str(out)!r}))"],
                cwd=src).stdout.split()[-1]
    sdist = out / name
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    unpacked = next((tmp / "unpacked").iterdir())
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", out,
          unpacked], cwd=tmp)
    return {"sdist": sdist, "wheel": next(out.glob("edgeprune-*.whl"))}


@pytest.fixture(scope="module")
def installed(dist, tmp_path_factory) -> dict:
    """A fresh venv with the wheel installed, a folder outside the repository to work in, and an EDGEPRUNE_HOME."""
    tmp = tmp_path_factory.mktemp("installed")
    assert REPO not in tmp.parents
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", venv], cwd=tmp)
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).stdout
                .strip())
    if sys.prefix != sys.base_prefix:
        # The dependencies live in this venv, which --system-site-packages does not see: add its site-packages as
        # plain path entries (their .pth files, such as the editable edgeprune's, are not run).
        paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
        (site / "zz_edgeprune_test_dependencies.pth").write_text("\n".join(sorted(paths)) + "\n")
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", dist["wheel"]], cwd=tmp)
    work = tmp / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["EDGEPRUNE_HOME"] = str(tmp / "home")
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    package = site / "edgeprune"
    return {"venv": venv, "python": python, "package": package, "work": work, "env": env,
            "snapshot": _snapshot(package), "home": tmp / "home"}


def _snapshot(package: Path) -> dict[str, tuple[int, int]]:
    """Every file of the installed package but bytecode caches (the interpreter's, not ours), with size and mtime."""
    return {str(p.relative_to(package)): (p.stat().st_size, p.stat().st_mtime_ns) for p in package.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


def _edgeprune(installed: dict, *args, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return _run([installed["venv"] / "bin" / "edgeprune", *args], cwd=installed["work"], env=env or installed["env"],
                check=check)


def test_sdist_and_wheel_carry_the_shipped_files(dist):
    with tarfile.open(dist["sdist"]) as tar:
        in_sdist = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert set(SHIPPED) | {"examples/firmware/main.c", "setup.py", "MANIFEST.in"} <= in_sdist
    in_wheel = set(zipfile.ZipFile(dist["wheel"]).namelist())
    assert {f"edgeprune/_data/{f}" for f in SHIPPED} <= in_wheel
    assert "edgeprune/search/assets/supernet-digit-scenes.pt" in in_wheel
    assert not any(n.startswith(("tests/", "targets/", "codegen/")) for n in in_wheel)


def test_the_installed_edgeprune_runs_from_the_install(installed):
    where = _run([installed["python"], "-c", "import edgeprune, edgeprune.resources as r; "
                  "print(edgeprune.__file__); print(r.shipped_root())"], cwd=installed["work"], env=installed["env"])
    module, root = (Path(line) for line in where.stdout.split())
    assert module == installed["package"] / "__init__.py"
    assert root == installed["package"] / "_data"

    listing = _edgeprune(installed, "targets").stdout
    rows = {line.split()[0]: line for line in listing.partition("\n\n")[0].splitlines()[1:]}
    assert set(rows) == {Path(f).stem for f in SHIPPED if f.startswith("targets/")}
    assert all(" shipped " in row for row in rows.values())
    assert f"shipped: {installed['package'] / '_data' / 'targets'}" in listing


def test_a_c_package_for_cortex_a7_runs_under_qemu_like_onnxruntime(installed):
    work = installed["work"]
    model, x = zoo.make("resnet_tiny", RES)
    onnx_path = zoo.export_onnx(model, x, work / "net.onnx")
    np.save(work / "x.npy", x.numpy())
    ref = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]

    _edgeprune(installed, "compile", "net.onnx", "--target", "cortex-a7", "--format", "c", "--name", "net", "-o", "a7")
    assert (work / "a7" / "edgeprune_rt.c").is_file()  # the runtime shim, copied from the install
    _edgeprune(installed, "run", "a7", "--device", "qemu://cortex-a7", "-i", "x.npy", "-o", "y.npy")
    assert_close(np.load(work / "y.npy"), ref)

    # Your own board, by path: compiled, then run under qemu naming the same file.
    board = work / "boards" / "myboard.toml"
    board.parent.mkdir()
    text = _edgeprune(installed, "targets", "--template", "cortex-a7").stdout
    board.write_text(text.replace("clock_mhz = 1000", "clock_mhz = 1200").replace(
        'description = "ARM Cortex-A7', 'description = "my board, a Cortex-A7'))
    _edgeprune(installed, "compile", "net.onnx", "--target", "boards/myboard.toml", "--format", "c", "--name", "net",
               "-o", "mine")
    assert '"target": "myboard"' in (work / "mine" / "build.json").read_text()
    _edgeprune(installed, "run", "mine", "--device", "qemu://boards/myboard.toml", "-i", "x.npy", "-o", "y2.npy")
    assert_close(np.load(work / "y2.npy"), ref)

    # A bad board file: one line naming the file and the field.
    board.write_text(text.replace("cores = 4", "cores = \"four\""))
    bad = _edgeprune(installed, "compile", "net.onnx", "--target", board, "-o", "bad", check=False)
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1
    assert str(board) in bad.stderr and "cores" in bad.stderr
    assert installed["snapshot"] == _snapshot(installed["package"]), "something was written into the package"


def test_your_targets_folder_defaults_to_the_platform_config_dir(installed, tmp_path):
    env = {k: v for k, v in installed["env"].items() if k not in ("EDGEPRUNE_HOME", "XDG_CONFIG_HOME")}
    env["HOME"] = str(tmp_path)
    folder = tmp_path / ".config" / "edgeprune" / "targets"
    folder.mkdir(parents=True)
    (folder / "board-b.toml").write_text(_edgeprune(installed, "targets", "--template", "cortex-a53").stdout)
    listing = _edgeprune(installed, "targets", env=env).stdout
    row = next(line for line in listing.splitlines() if line.startswith("board-b "))
    assert "aarch64-linux-gnu" in row and " yours " in row
    assert f"yours:   {folder}" in listing
    assert installed["snapshot"] == _snapshot(installed["package"]), "something was written into the package"

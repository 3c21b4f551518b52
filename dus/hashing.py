"""sha256 of source files, for provenance, without paying for it twice.

Hashes are cached by (path, size, mtime), and a file in the Hugging Face hub cache is a
symlink to a blob named by its sha256, which is used as is. The same cache remembers
checks a file passed (a tokenizer.json that parses), keyed alike. The build hashes in a
background thread while the kernel copies bytes, so on two cores the two overlap.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

HEX64 = re.compile(r"^[0-9a-f]{64}$")
HASH_BUFFER = 1 << 20
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


def sha256_file(path: Path) -> str:
    path = Path(path)
    if path.is_symlink():
        target = Path(os.readlink(path)).name
        if HEX64.match(target):
            return target
    real = path.resolve()
    key = _key(real)
    cached = _load_cache().get(key)
    if cached:
        return cached
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
    return result

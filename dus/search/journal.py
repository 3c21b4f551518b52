"""The search's journal: one JSON line per evaluation, appended and flushed as it
happens, after a header line with the settings. A search started again on the same
directory with the same settings replays it (scores, no model runs) and goes on; the
output directory of anything else is refused rather than overwritten."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from dus.errors import DusError

JOURNAL_NAME = "journal.jsonl"
FORMAT = "dus-search-journal/1"
RESULT_FILES = ("search.json", "search.png")
RECIPE_GLOB = "rank-*.yaml"


def read_journal(output: Path, settings: dict | None) -> list[dict]:
    """The evaluations already journalled in `output` for these settings ([] for a new
    or empty directory); a one-line error for a directory that is not this search's.
    With settings None only the kind of directory is checked."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise DusError(f"{output}: is a file; give -o a directory for the search")
    existing = next((p for p in (output, *output.parents) if p.exists()), None)
    if existing is not None and existing != output and not existing.is_dir():
        raise DusError(f"{output}: {existing} is a file, not a directory; choose another -o directory")
    journal = output / JOURNAL_NAME
    if not journal.is_file():
        if output.is_dir() and any(output.iterdir()):
            raise DusError(f"{output}: exists and is not a dus search directory (no {JOURNAL_NAME}); "
                           "choose a new or empty -o directory")
        return []
    data = journal.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DusError(f"{journal}:{line}: byte 0x{data[error.start]:02x} is not UTF-8 text; this journal was not written "
                       "by dus search (or was damaged): choose a new or empty -o directory") from None
    lines = text.split("\n")
    torn = lines.pop()  # "" after a final newline; else a line a kill cut short: dropped, evaluated again
    if not lines and torn:
        lines = [torn]  # a header with no newline after it is still read (and refused unless it is one)
    try:
        header = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        header = {}
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise DusError(f"{journal}: not a dus search journal; choose a new or empty -o directory")
    if settings is not None and header.get("settings") != settings:
        changed = _differences(header.get("settings", {}), settings)
        raise DusError(f"{output}: holds a search with other settings ({', '.join(changed)} differ); "
                       "rerun it with the same settings to continue it, or choose another -o directory")
    entries = []
    for number, line in enumerate(lines[1:], start=2):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            raise DusError(f"{journal}:{number}: damaged journal line; choose a new -o directory") from None
        entries.append(check_entry(entry, f"{journal}:{number}"))
    return entries


ENTRY_TYPES = {"i": int, "key": str, "candidate": dict, "metrics": dict, "feasible": bool, "cached": bool, "missing": list}


def check_entry(entry, where: str) -> dict:
    """One journalled evaluation, as the search wrote it; its score a finite number. A
    NaN or infinite score (json reads `NaN` and `Infinity`) is refused, never replayed
    into the ranking: sorting with NaN puts it anywhere."""
    if not isinstance(entry, dict) or any(not isinstance(entry.get(k), t) for k, t in ENTRY_TYPES.items()):
        raise DusError(f"{where}: damaged journal line (not an evaluation dus search wrote); choose a new -o directory")
    for name in ("value", "seconds"):
        value = entry.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DusError(f"{where}: damaged journal line ({name} is not a number); choose a new -o directory")
        if not math.isfinite(value):
            raise DusError(f"{where}: the journalled {'score' if name == 'value' else name} is {value}, not a finite number; "
                           "a search never ranks it: choose a new -o directory (the journal was edited or damaged)")
    return entry


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the settings that differ (`space.depth`, `seed`)."""
    names = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            names += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            names.append(f"{prefix}{key}")
    return names


class Journal:
    """Appends evaluations to `output`/journal.jsonl (the header written on first use)."""

    def __init__(self, output: Path, settings: dict, entries: list[dict]):
        self.path = Path(output) / JOURNAL_NAME
        self.settings = settings
        self.count = len(entries)
        self._file = None

    def append(self, entry: dict) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.is_file():
                _drop_torn_tail(self.path)
            fresh = not self.path.is_file() or self.path.stat().st_size == 0  # a header a kill left without its newline: written again
            self._file = open(self.path, "a", encoding="utf-8")
            if fresh:
                self._write({"format": FORMAT, "settings": self.settings})
            for name in (*RESULT_FILES, *(p.name for p in self.path.parent.glob(RECIPE_GLOB))):
                (self.path.parent / name).unlink(missing_ok=True)  # results of an earlier, shorter run
        self._write(entry)
        self.count += 1

    def _write(self, data: dict) -> None:
        self._file.write(json.dumps(data) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line that a kill left without its newline."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])

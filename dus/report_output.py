"""Where compare and scan write their reports, checked before anything is measured.

A report directory (`compare -o`, `scan -o`) is written into, not replaced: dus writes
its own files (report.md, metrics.json, plots ...) and a marker, `dus-report.json`,
listing them (a report of an earlier dus, without the marker, is known by its file
names and metrics file). An existing directory is used only when it is empty, or, with --force,
when it holds nothing but a previous dus report (the files its marker lists); it is
never a model the command reads, nor inside one (paths resolved: `..`, symbolic links).
`scan --write-recipes` never overwrites a YAML file without --force, and never one dus
scan did not propose.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from dus.errors import DusError

REPORT_MARKER = "dus-report.json"
# The first line of every recipe `dus scan --write-recipes` writes.
PROPOSAL_HEADER = "# Proposed by `dus scan`"
# The names a scan proposal can have (propose.Candidate.name + .yaml).
PROPOSAL_NAME = re.compile(r"^(solar-trim\d+|duplicate-\d+-\d+|prune-\d+-\d+)\.yaml$")


def check_not_inside_reads(output: Path, reads, flag: str) -> None:
    """`output` is none of the models this command reads, nor inside one."""
    resolved = Path(output).resolve()
    for read in reads:
        model = Path(read).resolve()
        if model == resolved or model in resolved.parents:
            where = "is" if model == resolved else "is inside"
            raise DusError(f"{flag} {output} {where} the model {read}, which this command reads; "
                           "write the report somewhere else")


def check_creatable(output: Path, flag: str) -> None:
    """A directory that does not exist yet can be made: its nearest existing ancestor is a
    writable directory (a file in the way is named)."""
    ancestor = Path(os.path.abspath(output))
    while not ancestor.exists() and not ancestor.is_symlink():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise DusError(f"{flag} {output}: {ancestor} is a file, not a directory; choose another {flag}")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise DusError(f"{flag} {output}: {ancestor} is not writable; check the permissions, or choose another {flag}")


# What compare and scan wrote before the marker existed: a report of an earlier dus is
# recognised by these names and the metrics file it always holds.
KNOWN_REPORTS = {
    "compare": ({"angular_distance.png", "angular_distance_relative.png", "hidden_norm.png", "perplexity.png",
                 "metrics.json", "report.md", "wandb"}, "metrics.json", "dus_version"),
    "scan": ({"scan.json", "scan_distances.png", "scan_layers.png"}, "scan.json", "proposal"),
}


def read_marker(output: Path) -> dict | None:
    """The report marker of `output`, or one made up for an earlier dus's report (only dus
    file names, and its metrics file says dus wrote it); None for anything else."""
    path = Path(output) / REPORT_MARKER
    if not path.is_file():
        return _earlier_report(Path(output))
    return _read_marker_file(path)


def _earlier_report(output: Path) -> dict | None:
    if not output.is_dir():
        return None
    entries = set(os.listdir(output))
    for command, (names, metrics, key) in KNOWN_REPORTS.items():
        if entries and entries <= names and metrics in entries:
            try:
                content = json.loads((output / metrics).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                return None
            if isinstance(content, dict) and key in content:
                return {"command": command, "files": sorted(entries)}
    return None


def _read_marker_file(path: Path) -> dict | None:
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), list):
        return None
    return marker


def check_report_directory(output: Path, force: bool, reads=(), flag: str = "-o") -> None:
    """Before anything is measured: `output` may receive a report (see the module doc)."""
    output = Path(output)
    check_not_inside_reads(output, reads, flag)
    if output.is_symlink() and not output.exists():
        raise DusError(f"{flag} {output}: a broken symbolic link; remove it or choose another {flag}")
    if not output.exists():
        check_creatable(output, flag)
        return
    if not output.is_dir():
        raise DusError(f"{flag} {output}: is a file, not a directory; choose another {flag}")
    entries = sorted(os.listdir(output))
    if not entries:
        check_creatable(output, flag)
        return
    marker = read_marker(output)
    if marker is None:
        raise DusError(f"{flag} {output} holds files dus did not write ({_some(entries)}); choose an empty or new "
                       f"directory")
    if not force:
        command = marker.get("command")
        kind = f"dus {command}" if isinstance(command, str) and command.isidentifier() else "dus"
        raise DusError(f"{flag} {output} holds a previous {kind} report; add --force to replace it, or choose "
                       f"another {flag}")
    foreign = [name for name in entries if name != REPORT_MARKER and name not in marker["files"]]
    if foreign:
        raise DusError(f"--force: {output} holds {_some(foreign)}, which dus did not write; dus replaces only its "
                       f"own report: move {'it' if len(foreign) == 1 else 'them'} away or choose another {flag}")
    check_creatable(output, flag)


def start_report(output: Path, command: str, files: list[str]) -> None:
    """Create `output` and write its marker, listing the files about to be written (and
    those of a previous dus report still there), before any of them is written."""
    from dus import __version__

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    previous = read_marker(output)
    kept = [name for name in (previous or {}).get("files", []) if isinstance(name, str) and (output / name).exists()]
    marker = {"command": command, "dus_version": __version__, "files": sorted({*kept, *files})}
    (output / REPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def check_recipe_directory(directory: Path, force: bool, reads=()) -> None:
    """Before anything is measured: `--write-recipes DIR` may receive the proposals. A YAML
    file there that a proposal could replace is replaced only with --force, and only when
    dus scan wrote it."""
    flag = "--write-recipes"
    directory = Path(directory)
    check_not_inside_reads(directory, reads, flag)
    if directory.exists() and not directory.is_dir():
        raise DusError(f"{flag} {directory}: is a file, not a directory; choose another {flag}")
    if not directory.exists():
        check_creatable(directory, flag)
        return
    clashing = sorted(path for path in directory.iterdir() if PROPOSAL_NAME.match(path.name))
    if clashing and not force:
        raise DusError(f"{flag} {directory} already holds recipes a proposal may replace "
                       f"({_some([p.name for p in clashing])}); add --force to replace earlier dus scan proposals, "
                       f"or choose another directory")
    for path in clashing:
        if not is_proposal(path):
            raise DusError(f"--force: {path} was not written by dus scan; dus replaces only its own proposals: move it "
                           f"away or choose another {flag}")
    check_creatable(directory, flag)


def is_proposal(path: Path) -> bool:
    """A plain file whose first line is the header dus scan writes."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.readline().startswith(PROPOSAL_HEADER)
    except (OSError, UnicodeDecodeError):
        return False


def _some(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")

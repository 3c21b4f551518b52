"""The top-level handler: whatever the command, an error the user can fix (a DusError, an
OSError such as an unwritable output, a file the libraries refuse) is one line and exit
2; `--debug` (or DUS_DEBUG=1) gives the traceback instead."""

from __future__ import annotations

import pytest


def _text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("The seam is where two copies of a model meet. " * 40)
    return path


def _blocked(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("in the way")
    return path / "out"


@pytest.mark.parametrize("command", [
    lambda model, out: ["build", "--solar", model, "--trim", 1, "-o", out, "-q"],
    lambda model, out: ["compare", model, "--data", _text(out.parent.parent), "-o", out, "--no-generate", "--window", 32],
    lambda model, out: ["scan", model, "--data", _text(out.parent.parent), "--window", 32, "-o", out],
])
def test_unwritable_output_is_one_line_in_every_command(command, tiny_models, tmp_path, run_cli):
    result = run_cli(*command(tiny_models("llama", 4), _blocked(tmp_path)))
    assert result.code == 2, result
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("dus: error:") and "a_file" in lines[-1], result.stderr
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback(tiny_models, tmp_path, run_cli, monkeypatch):
    from dus.errors import DusError

    with pytest.raises(DusError):
        run_cli("build", "--solar", tmp_path / "missing", "--trim", 1, "-o", tmp_path / "out", "--debug")
    monkeypatch.setenv("DUS_DEBUG", "1")
    with pytest.raises(DusError):
        run_cli("build", "--solar", tmp_path / "missing", "--trim", 1, "-o", tmp_path / "out")


def test_os_errors_name_the_path_and_a_fix():
    import errno

    from dus.cli import one_line

    message = one_line(PermissionError(errno.EACCES, "Permission denied", "/srv/models/out"))
    assert message == "/srv/models/out: Permission denied; check the permissions, or choose another path"
    assert "disk is full" in one_line(OSError(errno.ENOSPC, "No space left on device", "/x"))

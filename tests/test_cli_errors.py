"""The top-level handler: whatever the command, an error the user can fix (a DusError, an
OSError such as an unwritable output, a file the libraries refuse) is one line and exit
2; `--debug` (or DUS_DEBUG=1) gives the traceback instead."""

from __future__ import annotations

import json

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


@pytest.mark.parametrize("command", [
    lambda model, binary, tmp: ["build", binary, "-o", tmp / "out"],
    lambda model, binary, tmp: ["heal", model, "-c", binary, "-o", tmp / "out"],
    lambda model, binary, tmp: ["compare", model, "--data", binary, "-o", tmp / "out", "--no-generate"],
    lambda model, binary, tmp: ["compare", model, "--data", _text(tmp), "--prompts", binary, "-o", tmp / "out"],
])
def test_binary_files_where_text_is_expected_are_one_line(command, tiny_models, tmp_path, run_cli):
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81 not text")
    result = run_cli(*command(tiny_models("llama", 4), binary, tmp_path))
    assert result.code == 2, result
    assert result.stderr.strip().splitlines()[-1].startswith("dus: error:") and "not a UTF-8 text file" in result.stderr
    assert not (tmp_path / "out").exists()


def test_force_replaces_only_what_dus_wrote(tiny_models, tmp_path, run_cli):
    """--force never deletes a directory of the user's own, the source being read, a file or a
    symlink; it does replace an earlier dus output."""
    import shutil

    source = tmp_path / "source"
    shutil.copytree(tiny_models("llama", 4), source)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    a_file = tmp_path / "file.txt"
    a_file.write_text("keep me too")
    link = tmp_path / "link"
    link.symlink_to(mine)
    for target, expected in ((mine, "not written by dus"), (source, "a source of this command"), (a_file, "is a file"),
                             (link, "is a symlink"), (tmp_path, "the directory holding the source")):
        result = run_cli("build", "--solar", source, "--trim", 1, "-o", target, "--force", "-q")
        assert result.code == 2 and expected in result.stderr, (target, result)
    assert (mine / "notes.txt").read_text() == "keep me" and a_file.read_text() == "keep me too" and link.is_symlink()
    assert (source / "model.safetensors").is_file()
    assert not [p.name for p in tmp_path.iterdir() if ".dus-" in p.name]
    out = tmp_path / "out"
    assert run_cli("build", "--solar", source, "--trim", 1, "-o", out, "-q").code == 0
    assert run_cli("build", "--solar", source, "--trim", 2, "-o", out, "--force", "-q").code == 0
    assert json.loads((out / "dus-manifest.json").read_text())["recipe"]["solar"]["trim"] == 2


@pytest.mark.parametrize("args, line", [
    (["build", "--foo"], "dus: error: No such option: --foo (Possible options: --force) (see dus build --help)"),
    (["bogus"], "dus: error: No such command 'bogus'. (see dus --help)"),
    (["compare"], "dus: error: Missing argument 'models'. (see dus compare --help)"),
    (["scan", "m", "--top", "many"], "dus: error: Invalid value for '--top': "),
    (["export", "m", "--type"], "dus: error: Option '--type' requires an argument."),
])
def test_usage_errors_are_one_line(args, line, run_cli):
    result = run_cli(*args)
    assert result.code == 2 and result.stdout == "", result
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(line), result


def test_help_is_still_shown(run_cli):
    bare, helped = run_cli(), run_cli("build", "--help")
    assert bare.code == 2 and "Usage: dus [OPTIONS] COMMAND" in bare.stdout and bare.stderr == "", bare
    assert helped.code == 0 and "--shard-size" in helped.stdout, helped

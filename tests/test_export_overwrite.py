"""`dus export --force` replaces only what dus export wrote (issue 34): never a file of the
model it reads (any path that resolves into the model directory or onto one of its files,
through `..` or symbolic links), never a file, link or GGUF of the user's; `--ollama`'s
Modelfile is checked before the GGUF is written. Each refusal is one line, exit 2, and
every file is left as it was."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import gguf
import pytest


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from dus.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("export-overwrite") / "m", "llama", num_layers=2)


def _snapshot(*roots: Path) -> dict:
    """Every file (and link) under `roots`, with its bytes: what must not change."""
    seen = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_symlink():
                seen[str(path)] = ("link", os.readlink(path))
            elif path.is_file():
                seen[str(path)] = path.read_bytes()
    return seen


def _refused(result, fragment: str):
    assert result.code == 2, result
    assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def _copy(model: Path, target: Path) -> Path:
    return Path(shutil.copytree(model, target, symlinks=True))


def test_no_file_of_the_model_is_ever_written(model, tmp_path, run_cli):
    """Every file of the model, by its own path and through `..`, with and without --force;
    and a new file inside the model directory."""
    source = _copy(model, tmp_path / "m")
    names = sorted(p.name for p in source.iterdir())
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(names)
    before = _snapshot(tmp_path)
    for name in names:
        for out in (source / name, tmp_path / "m" / ".." / "m" / name, Path(os.path.relpath(source / name))):
            for force in ([], ["--force"], ["--force", "--ollama"]):
                _refused(run_cli("export", source, "-o", out, *force), "which dus export reads")
    _refused(run_cli("export", source, "-o", source / "new.gguf"), "is inside the model")
    _refused(run_cli("export", source, "-o", source / "sub" / ".." / "new.gguf", "--force"), "is inside the model")
    assert _snapshot(tmp_path) == before


def test_links_into_the_model_are_followed(model, tmp_path, run_cli):
    """A Hugging Face cache layout (the model's files are links to blobs elsewhere), a link
    to a model file, a directory link to the model: each resolves onto what export reads."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for path in model.iterdir():
        shutil.copyfile(path, blobs / f"blob-{path.name}")
        (snapshot / path.name).symlink_to(blobs / f"blob-{path.name}")
    (tmp_path / "link.gguf").symlink_to(snapshot / "model.safetensors")
    (tmp_path / "dirlink").symlink_to(snapshot, target_is_directory=True)
    before = _snapshot(tmp_path)
    for out in (blobs / "blob-model.safetensors", blobs / "blob-config.json", tmp_path / "link.gguf",
                tmp_path / "dirlink" / "model.safetensors", tmp_path / "dirlink" / "new.gguf"):
        _refused(run_cli("export", snapshot, "-o", out, "--force"), "which dus export reads")
    assert _snapshot(tmp_path) == before


def _foreign_gguf(path: Path) -> Path:
    """A valid GGUF that dus did not write (no `dus.version`)."""
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name("someone else's")
    writer.add_tensor("t", gguf.np.zeros(4, dtype=gguf.np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("kind, fragment", [
    ("text", "was not written by dus export"),
    ("empty", "was not written by dus export"),
    ("gguf magic only", "was not written by dus export"),
    ("someone else's gguf", "was not written by dus export"),
    ("link to a dus gguf", "is a symbolic link"),
    ("broken link", "is a symbolic link"),
    ("fifo", "is not a regular file"),
])
def test_force_replaces_only_a_previous_dus_export(kind, fragment, model, tmp_path, run_cli):
    ours = tmp_path / "ours.gguf"
    assert run_cli("export", model, "-o", ours).code == 0
    out = tmp_path / "out.gguf"
    if kind == "text":
        out.write_text("my notes\n")
    elif kind == "empty":
        out.touch()
    elif kind == "gguf magic only":
        out.write_bytes(b"GGUF\x03\x00\x00\x00 truncated, dus.version")
    elif kind == "someone else's gguf":
        _foreign_gguf(out)
    elif kind == "link to a dus gguf":
        out.symlink_to(ours)
    elif kind == "broken link":
        out.symlink_to(tmp_path / "nowhere.gguf")
    elif kind == "fifo":
        os.mkfifo(out)
    before = _snapshot(tmp_path)
    _refused(run_cli("export", model, "-o", out, "--force"), fragment)
    assert _snapshot(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["ours.gguf", "out.gguf"]
    result = run_cli("export", model, "-o", ours, "--force", "--type", "q8_0")  # ours: replaced
    assert result.code == 0 and ours.read_bytes() != before[str(ours)], result


def test_a_dus_imatrix_file_counts_as_dus_output(tmp_path):
    import numpy as np

    from dus.export import imatrix
    from dus.export.run import written_by_dus_export

    matrix = imatrix.Imatrix(datasets=["text"], chunk_count=1, chunk_size=512)
    matrix.sums["blk.0.attn_q.weight"] = np.ones((1, 8), dtype=np.float32)
    matrix.counts["blk.0.attn_q.weight"] = np.ones(1, dtype=np.float32)
    imatrix.write(matrix, tmp_path / "m.imatrix.gguf")
    assert written_by_dus_export(tmp_path / "m.imatrix.gguf")
    assert not written_by_dus_export(_foreign_gguf(tmp_path / "other.imatrix.gguf"))


@pytest.mark.parametrize("kind", ["user's", "edited", "link", "inside the model"])
def test_ollama_checks_its_modelfile_before_the_gguf_is_written(kind, model, tmp_path, run_cli):
    out = tmp_path / "m.gguf"
    assert run_cli("export", model, "-o", out, "--ollama").code == 0
    modelfile = tmp_path / "m.Modelfile"
    fragment = "was not written by dus export"
    if kind == "user's":
        modelfile.write_text("FROM ./m.gguf\nSYSTEM You are a pirate.\n")
    elif kind == "edited":
        modelfile.write_text(modelfile.read_text() + 'PARAMETER temperature 0.2\n')
    elif kind == "link":
        modelfile.unlink()
        (tmp_path / "mine.Modelfile").write_text("FROM ./m.gguf\n")
        modelfile.symlink_to(tmp_path / "mine.Modelfile")
        fragment = "is a symbolic link"
    elif kind == "inside the model":
        source = _copy(model, tmp_path / "source")
        out = tmp_path / "elsewhere.gguf"
        (tmp_path / "elsewhere.Modelfile").symlink_to(source / "README.md")
        fragment = "which dus export reads"
        model = source
    before = _snapshot(tmp_path)
    _refused(run_cli("export", model, "-o", out, "--force", "--ollama"), fragment)
    assert _snapshot(tmp_path) == before  # the GGUF neither replaced nor written
    assert not list(tmp_path.glob(".*partial"))


def test_ollama_replaces_its_own_modelfile_and_refuses_one_path_for_both(model, tmp_path, run_cli):
    out = tmp_path / "m.gguf"
    assert run_cli("export", model, "-o", out, "--ollama").code == 0
    result = run_cli("export", model, "-o", out, "--ollama")
    _refused(result, "already exists; pass --force")
    assert run_cli("export", model, "-o", out, "--ollama", "--force").code == 0
    _refused(run_cli("export", model, "-o", tmp_path / "x.Modelfile", "--ollama"), "both the GGUF and its Modelfile")
    assert sorted(os.listdir(tmp_path)) == ["m.Modelfile", "m.gguf"]

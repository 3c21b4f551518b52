"""Digests from the Hugging Face hub cache (issue 44): a source whose weights are symlinks
into `models--*/blobs/<sha256>` gets the blob's name as its sha256 without its data being
read, the manifest says which digests came from the cache and which were computed,
`--verify-hashes` (DUS_VERIFY_HASHES=1) hashes anyway; a blob whose size is not the one its
header implies is not trusted (hashed; the build refuses the file); a source outside the
cache is hashed as before."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from dus.errors import DusError

FAKE = "ab" * 32  # a sha256-shaped blob name that is not the sha256 of the bytes


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def hub_layout(model: Path, cache: Path, weights_blob: str | None = None, repo: str = "models--org--tiny") -> Path:
    """`model` laid out as huggingface_hub lays a download: every file a blob (the
    safetensors named by its sha256, or `weights_blob`; other files by a 40-digit name, as
    the hub names files not in LFS), linked from snapshots/<rev>/ by a relative symlink."""
    root = cache / repo
    blobs, snapshot = root / "blobs", root / "snapshots" / ("0" * 40)
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0" * 40)
    for file in sorted(model.iterdir()):
        if file.suffix == ".safetensors":
            name = weights_blob or _sha256(file)
        else:
            name = hashlib.sha1(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blobs / name)
        (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / name)
    return snapshot


@pytest.fixture
def dus_cache(tmp_path, monkeypatch):
    """An empty sha256 cache of dus's own, so nothing is remembered from other tests."""
    monkeypatch.setenv("DUS_CACHE", str(tmp_path / "dus-cache"))
    monkeypatch.delenv("DUS_VERIFY_HASHES", raising=False)
    return tmp_path / "dus-cache"


def manifest_sources(output: Path) -> dict:
    return json.loads((output / "dus-manifest.json").read_text())["sources"]


def test_a_hub_cache_source_gets_its_blob_name_unread_and_verify_hashes_computes_the_true_one(
        tiny_models, tmp_path, dus_cache, run_cli):
    model = tiny_models("llama", num_layers=4)
    # The blob's name is not the sha256 of its bytes: had dus read and hashed the file, the
    # manifest would hold the true digest.
    snapshot = hub_layout(model, tmp_path / "hub", weights_blob=FAKE)
    true = _sha256(model / "model.safetensors")

    result = run_cli("build", "--solar", snapshot, "--trim", "1", "-o", tmp_path / "from-cache", "-q")
    assert result.code == 0, result
    (record,) = manifest_sources(tmp_path / "from-cache").values()
    assert record["files"]["model.safetensors"] == FAKE
    assert record["sha256_from"]["model.safetensors"] == "hub-cache"
    # files the hub does not name by their sha256 (config, tokenizer) are hashed
    assert record["files"]["config.json"] == _sha256(model / "config.json")
    assert record["sha256_from"]["config.json"] == "computed"
    assert set(record["sha256_from"]) == set(record["files"])

    result = run_cli("build", "--solar", snapshot, "--trim", "1", "-o", tmp_path / "verified", "-q", "--verify-hashes")
    assert result.code == 0, result
    (record,) = manifest_sources(tmp_path / "verified").values()
    assert record["files"]["model.safetensors"] == true
    assert set(record["sha256_from"].values()) == {"computed"}


def test_the_blob_is_not_hashed_and_the_setting_hashes_it(tiny_models, tmp_path, dus_cache, monkeypatch):
    import dus.hashing as hashing

    snapshot = hub_layout(tiny_models("llama", num_layers=4), tmp_path / "hub")
    weights = snapshot / "model.safetensors"
    opened = []
    real_open = open

    def spy(file, mode="r", *args, **kwargs):
        opened.append((str(file), kwargs.get("buffering", args[0] if args else -1)))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy)
    assert hashing.file_digest(weights) == (os.readlink(weights).rsplit("/", 1)[1], "hub-cache")
    # the only read is of its header, for the size check (an unbuffered open is the hash's)
    assert all(buffering != 0 for _, buffering in opened)
    monkeypatch.setenv("DUS_VERIFY_HASHES", "1")
    opened.clear()
    assert hashing.file_digest(weights) == (_sha256(weights), "computed")
    assert any(buffering == 0 for _, buffering in opened)


def test_a_blob_whose_size_does_not_match_its_header_is_hashed_and_the_build_refuses_it(
        tiny_models, tmp_path, dus_cache, run_cli):
    from dus.hashing import sha256_file

    model = tiny_models("llama", num_layers=4)
    snapshot = hub_layout(model, tmp_path / "hub")
    weights = snapshot / "model.safetensors"
    named = os.readlink(weights).rsplit("/", 1)[1]
    with open(weights.resolve(), "ab") as handle:  # bytes appended to the blob after the hub checked it
        handle.write(b"\0" * 16)
    assert sha256_file(weights) == _sha256(weights) != named  # not trusted: hashed

    result = run_cli("build", "--solar", snapshot, "--trim", "1", "-o", tmp_path / "out")
    assert result.code == 2, result
    assert "truncated or padded" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["no-models-dir", "no-snapshots", "not-blobs"])
def test_a_sha_named_link_outside_the_hub_layout_is_hashed(tiny_models, tmp_path, dus_cache, where):
    from dus.hashing import file_digest

    model = tiny_models("llama", num_layers=4)
    repo = {"no-models-dir": "datasets--org--tiny", "no-snapshots": "models--org--tiny", "not-blobs": "models--org--tiny"}[where]
    snapshot = hub_layout(model, tmp_path / "hub", weights_blob=FAKE, repo=repo)
    root = snapshot.parent.parent
    if where == "no-snapshots":
        (root / "snapshots").rename(root / "elsewhere")
        snapshot = root / "elsewhere" / snapshot.name
    if where == "not-blobs":
        (root / "blobs").rename(root / "objects")
        for link in snapshot.iterdir():
            target = os.readlink(link).replace("blobs", "objects")
            link.unlink()
            link.symlink_to(target)
    assert file_digest(snapshot / "model.safetensors") == (_sha256(model / "model.safetensors"), "computed")


def test_a_source_outside_the_cache_is_hashed_as_before(tiny_models, tmp_path, dus_cache):
    from dus.build import build_model
    from dus.recipe import load_recipe

    model = tiny_models("llama", num_layers=4)
    build_model(load_recipe({"solar": {"model": str(model), "trim": 1}}), tmp_path / "out")
    (record,) = manifest_sources(tmp_path / "out").values()
    for relative, digest in record["files"].items():
        assert digest == _sha256(model / relative)
        assert record["sha256_from"][relative] == "computed"


def test_build_help_lists_verify_hashes(run_cli):
    result = run_cli("build", "--help")
    assert result.code == 0 and "--verify-hashes" in result.stdout


def test_a_teacher_check_with_verify_hashes_sees_a_blob_whose_name_lies(tiny_models, tmp_path, dus_cache, monkeypatch):
    """heal's check that a source is the one the build read trusts the blob name as the
    build did; with DUS_VERIFY_HASHES=1 it hashes, and the lie is found."""
    from dus.build import build_model
    from dus.heal.teachers import check_built_from
    from dus.manifest import read_manifest
    from dus.recipe import load_recipe

    snapshot = hub_layout(tiny_models("llama", num_layers=4), tmp_path / "hub", weights_blob=FAKE)
    build_model(load_recipe({"solar": {"model": str(snapshot), "trim": 1}}), tmp_path / "out")
    manifest = read_manifest(tmp_path / "out")
    (name,) = manifest.sources
    check_built_from(manifest, name, snapshot)  # the same name as at build time
    monkeypatch.setenv("DUS_VERIFY_HASHES", "1")
    with pytest.raises(DusError, match="changed since the build"):
        check_built_from(manifest, name, snapshot)

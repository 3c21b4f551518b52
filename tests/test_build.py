"""`dus build`: SOLAR builds of every supported architecture, checked against a
reference stacked in memory from the source's own layer modules."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dus.build import build_model
from dus.tiny import ARCHITECTURES
from reference import assemble, load, logits, sample_ids


def solar_order(n: int, trim: int) -> list[tuple[str, int]]:
    return [("m", i) for i in range(n - trim)] + [("m", i) for i in range(trim, n)]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_solar_build_matches_reference_exactly(arch, tiny_models, tmp_path):
    source_dir = tiny_models(arch, num_layers=6)
    result = build_model({"solar": {"model": str(source_dir), "trim": 2}}, tmp_path / "out")
    assert result.plan.num_layers == 8
    assert result.plan.seams == [4]

    built = load(tmp_path / "out")
    source = load(source_dir)
    reference = assemble({"m": source}, solar_order(6, 2), base="m")
    ids = sample_ids(source.config.vocab_size)
    assert built.config.num_hidden_layers == 8
    assert torch.equal(logits(built, ids), logits(reference, ids))
    # ...and the seam really changed the function (the test can fail).
    assert not torch.allclose(logits(built, ids), logits(source, ids))


@pytest.mark.parametrize("arch", ["qwen2", "gemma2", "gemma3_text"])
def test_per_layer_config_fields_follow_source_layers(arch, tiny_models, tmp_path):
    source_dir = tiny_models(arch, num_layers=6)
    build_model({"solar": {"model": str(source_dir), "trim": 2}}, tmp_path / "out")
    source_types = json.loads((source_dir / "config.json").read_text())["layer_types"]
    out_config = json.loads((tmp_path / "out" / "config.json").read_text())
    order = [i for _, i in solar_order(6, 2)]
    assert out_config["layer_types"] == [source_types[i] for i in order]
    if arch == "qwen2":
        # layers below max_window_layers (3) use full attention: 0,1,2 then 2 -> four of them.
        assert out_config["max_window_layers"] == 4


def test_sharded_bf16_source_and_sharded_output(tiny_models, tmp_path):
    source_dir = tiny_models("llama", num_layers=4, dtype="bfloat16", max_shard_size="50KB")
    assert (source_dir / "model.safetensors.index.json").exists()
    build_model({"solar": {"model": str(source_dir), "trim": 1}}, tmp_path / "out", shard_size="40KB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    for shard in shards:
        with safe_open(tmp_path / "out" / shard, "pt") as handle:
            for name in handle.keys():
                assert index["weight_map"][name] == shard
                assert handle.get_tensor(name).dtype == torch.bfloat16
    built = load(tmp_path / "out", dtype=torch.bfloat16)
    reference = assemble({"m": load(source_dir, torch.bfloat16)}, solar_order(4, 1), base="m")
    ids = sample_ids(built.config.vocab_size)
    assert torch.equal(logits(built, ids), logits(reference, ids))


def test_dtype_conversion(tiny_models, tmp_path):
    source_dir = tiny_models("llama", num_layers=4)
    build_model({"solar": {"model": str(source_dir), "trim": 1}, "dtype": "bfloat16"}, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as handle:
        out = handle.get_tensor("model.layers.3.mlp.down_proj.weight")
    with safe_open(source_dir / "model.safetensors", "pt") as handle:
        original = handle.get_tensor("model.layers.1.mlp.down_proj.weight")  # output 3 <- source 1 (trim 1)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, original.to(torch.bfloat16))


@pytest.mark.parametrize("tied", [True, False])
def test_tied_and_untied_embeddings(tied, tiny_models, tmp_path):
    source_dir = tiny_models("llama", num_layers=4, tie_word_embeddings=tied)
    build_model({"solar": {"model": str(source_dir), "trim": 1}}, tmp_path / "out")
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as handle:
        names = set(handle.keys())
    assert ("lm_head.weight" in names) == (not tied)
    built = load(tmp_path / "out")
    assert built.config.tie_word_embeddings == tied
    if tied:
        assert built.lm_head.weight.data_ptr() == built.model.embed_tokens.weight.data_ptr()
    reference = assemble({"m": load(source_dir)}, solar_order(4, 1), base="m")
    ids = sample_ids(built.config.vocab_size)
    assert torch.equal(logits(built, ids), logits(reference, ids))


def _digests(directory: Path) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.iterdir())
        if path.is_file()
    }


def test_rebuild_is_byte_identical(tiny_models, tmp_path):
    source_dir = tiny_models("qwen3", num_layers=4)
    recipe = {"solar": {"model": str(source_dir), "trim": 1}}
    build_model(recipe, tmp_path / "a")
    build_model(recipe, tmp_path / "b")
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")


def test_tokenizer_chat_template_generation_config_copied(tiny_models, tmp_path):
    source_dir = tiny_models("llama", num_layers=4)
    build_model({"solar": {"model": str(source_dir), "trim": 1}}, tmp_path / "out")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (source_dir / name).read_bytes()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user" in text


def test_manifest_and_model_card(tiny_models, tmp_path):
    source_dir = tiny_models("llama", num_layers=4)
    build_model({"solar": {"model": str(source_dir), "trim": 1}}, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "dus-manifest.json").read_text())
    assert manifest["format"] == "dus-manifest/2"
    assert manifest["plan"]["seams"] == [3] and "seams" not in manifest  # stored once, in the plan
    assert manifest["plan"]["num_layers"] == 6
    assert [(entry["layer"], entry["transform"]) for entry in manifest["plan"]["layers"]] == [
        (0, "copy"), (1, "copy"), (2, "copy"), (1, "copy"), (2, "copy"), (3, "copy")
    ]
    source = manifest["sources"][str(source_dir)]
    assert source["license"] == "apache-2.0"
    expected = hashlib.sha256((source_dir / "model.safetensors").read_bytes()).hexdigest()
    assert source["files"]["model.safetensors"] == expected
    assert "config.json" in source["files"]
    assert manifest["recipe"] == {"solar": {"model": str(source_dir), "trim": 1}}
    card = (tmp_path / "out" / "README.md").read_text()
    from huggingface_hub import ModelCard

    assert ModelCard(card).data.license == "apache-2.0" and card.startswith("---\n")
    assert "| 0-2 |" in card and "| 3-5 |" in card and "Seams" in card


def test_existing_output_needs_force(tiny_models, tmp_path, run_cli):
    source_dir = tiny_models("llama", num_layers=4)
    out = tmp_path / "out"
    assert run_cli("build", "--solar", source_dir, "--trim", 1, "-o", out, "-q").code == 0
    before = _digests(out)
    result = run_cli("build", "--solar", source_dir, "--trim", 2, "-o", out, "-q")
    assert result.code == 2 and "--force" in result.stderr
    assert _digests(out) == before
    result = run_cli("build", "--solar", source_dir, "--trim", 2, "-o", out, "-q", "--force")
    assert result.code == 0, result
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporaries left


def test_failure_midway_leaves_nothing(tiny_models, tmp_path, monkeypatch):
    import dus.build

    source_dir = tiny_models("llama", num_layers=4)

    def explode(*args, **kwargs):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C while tensors were written

    monkeypatch.setattr(dus.build, "write_config", explode)
    with pytest.raises(KeyboardInterrupt):
        build_model({"solar": {"model": str(source_dir), "trim": 1}}, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_killed_build_leaves_only_a_hidden_temporary_that_the_next_build_removes(tiny_models, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    source_dir = tiny_models("llama", num_layers=4)
    script = (
        "import time, dus.build as b\n"
        "original = b.write_config\n"
        "def slow(*a, **k):\n    time.sleep(60)\n"
        "b.write_config = slow\n"
        f"b.build_model({{'solar': {{'model': {str(source_dir)!r}, 'trim': 1}}}}, {str(tmp_path / 'out')!r})\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.startswith(".out.dus-tmp-") for p in tmp_path.iterdir()):
        time.sleep(0.2)
    time.sleep(1.0)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert "out" not in leftovers
    assert all(name.startswith(".out.dus-tmp-") for name in leftovers) and leftovers
    build_model({"solar": {"model": str(source_dir), "trim": 1}}, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_dry_run_prints_plan_and_writes_nothing(tiny_models, tmp_path, run_cli):
    source_dir = tiny_models("llama", num_layers=4)
    result = run_cli("build", "--solar", source_dir, "--trim", 1, "-o", tmp_path / "out", "--dry-run")
    assert result.code == 0, result
    assert "seam" in result.stdout and "seams: [3]" in result.stdout
    assert not (tmp_path / "out").exists()


def test_manifest_reads_back_typed_and_version_1_still_reads(tiny_models, tmp_path):
    """The typed Manifest derives seams from the plan; a /1 manifest (seams repeated at the
    top level) reads the same; damaged or unknown manifests are one-line errors."""
    from dus.errors import DusError
    from dus.manifest import read_manifest

    source_dir = tiny_models("llama", num_layers=4)
    out = tmp_path / "out"
    build_model({"solar": {"model": str(source_dir), "trim": 1}}, out)
    manifest = read_manifest(out)
    assert (manifest.seams, manifest.num_layers, manifest.new_layers) == ([3], 6, [])
    path = out / "dus-manifest.json"
    data = json.loads(path.read_text())
    data.update(format="dus-manifest/1", seams=[3], num_layers=6, new_layers=[])
    path.write_text(json.dumps(data))
    assert read_manifest(out).seams == [3]
    for text, expected in (("{not json", "not valid JSON"), ('{"format": "dus-manifest/9"}', "dus-manifest/9"),
                           ('{"plan": {"layers": 3}}', "plan is damaged")):
        path.write_text(text)
        with pytest.raises(DusError, match=expected) as error:
            read_manifest(out)
        assert "\n" not in str(error.value) and "dus-manifest.json" in str(error.value)


def _copy_with(tmp_path, monkeypatch, src_offset, dst_offset, length, calls):
    """copy_range of `length` random bytes from src_offset of one file to dst_offset of
    another (after a prefix of ones), counting the kernel calls made."""
    import os

    import dus.safetensors_io as io

    data = os.urandom(src_offset + length + 4096)
    source, output = tmp_path / "source.bin", tmp_path / "output.bin"
    source.write_bytes(data)
    output.write_bytes(b"\1" * dst_offset)
    for name in ("copy_file_range", "splice"):
        real = getattr(os, name, None)
        if real is not None:
            def counted(*args, _real=real, _name=name, **kwargs):
                calls.append(_name)
                return _real(*args, **kwargs)
            monkeypatch.setattr(os, name, counted)
    src_fd, dst_fd = os.open(source, os.O_RDONLY), os.open(output, os.O_WRONLY)
    try:
        io.copy_range(src_fd, src_offset, dst_fd, dst_offset, length)
    finally:
        os.close(src_fd)
        os.close(dst_fd)
    assert output.read_bytes() == b"\1" * dst_offset + data[src_offset:src_offset + length]


@pytest.mark.parametrize("src_offset, dst_offset, kernel_call", [
    (1704, 1704 + 65536, "copy_file_range"),  # offsets agree modulo 64 KiB: one copy_file_range
    (1704, 3528, "splice"),  # they do not: spliced through the pipe, 1 MiB a step
    (0, 8, "splice"),
])
def test_copy_range_moves_the_same_bytes_each_way(src_offset, dst_offset, kernel_call, tmp_path, monkeypatch):
    import os

    if not hasattr(os, kernel_call):
        pytest.skip(f"no os.{kernel_call} here")
    calls: list[str] = []
    _copy_with(tmp_path, monkeypatch, src_offset, dst_offset, (3 << 20) + 12345, calls)
    assert calls and set(calls) == {kernel_call}


def test_copy_range_without_splice_or_kernel_copy_falls_back(tmp_path, monkeypatch):
    import errno
    import os

    def unsupported(*args, **kwargs):
        raise OSError(errno.EINVAL, "not here")

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.setattr(os, "splice", unsupported, raising=False)
    _copy_with(tmp_path / "a", monkeypatch, 1704, 3528, 3 << 20, [])  # by copy_file_range
    monkeypatch.setattr(os, "copy_file_range", unsupported, raising=False)
    _copy_with(tmp_path / "b", monkeypatch, 1704, 3528, 3 << 20, [])  # through a buffer


def test_copy_range_of_a_truncated_source_is_one_clear_error(tmp_path):
    import os

    from dus.errors import DusError
    from dus.safetensors_io import copy_range

    (tmp_path / "source.bin").write_bytes(b"x" * (2 << 20))
    src_fd = os.open(tmp_path / "source.bin", os.O_RDONLY)
    dst_fd = os.open(tmp_path / "output.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with pytest.raises(DusError, match="shorter than its safetensors header says"):
            copy_range(src_fd, 100, dst_fd, 7, 3 << 20)
    finally:
        os.close(src_fd)
        os.close(dst_fd)


def test_large_shards_start_their_data_aligned_with_the_source(tiny_models, tmp_path, monkeypatch):
    """A shard with enough byte copies pads its header (spaces, < 4 KiB) so that more
    copied bytes sit at the same offset modulo the 4 KiB block as in their source (a
    reflink can share them); the tensors are the same and the file still reads."""
    import dus.writer as writer

    def tensors(path: Path) -> dict[str, tuple[int, bytes]]:
        raw = path.read_bytes()
        length = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + length])
        header.pop("__metadata__", None)
        return {name: (8 + length + entry["data_offsets"][0],
                       raw[8 + length + entry["data_offsets"][0]:8 + length + entry["data_offsets"][1]])
                for name, entry in header.items()}

    def aligned_bytes(output: Path) -> int:
        where = {data: start for start, data in tensors(source_dir / "model.safetensors").values()}
        return sum(len(data) for start, data in tensors(output).values()
                   if data in where and (start - where[data]) % 4096 == 0)

    source_dir = tiny_models("llama", num_layers=4)
    recipe = {"solar": {"model": str(source_dir), "trim": 1}}
    build_model(recipe, tmp_path / "plain")
    monkeypatch.setattr(writer, "ALIGN_AT_LEAST", 1)
    build_model(recipe, tmp_path / "aligned")
    plain, aligned = tmp_path / "plain" / "model.safetensors", tmp_path / "aligned" / "model.safetensors"
    assert int.from_bytes(aligned.read_bytes()[:8], "little") % 8 == 0
    assert 0 < aligned.stat().st_size - plain.stat().st_size < 4096  # spaces at the end of the header
    assert {n: d for n, (_, d) in tensors(plain).items()} == {n: d for n, (_, d) in tensors(aligned).items()}
    assert aligned_bytes(aligned) > aligned_bytes(plain)
    with safe_open(aligned, "pt") as handle:
        assert len(handle.keys()) == len(tensors(plain))


@pytest.mark.skipif(not __import__("os").environ.get("DUS_REFLINK_DIR"),
                    reason="set DUS_REFLINK_DIR to a directory on Btrfs or XFS (reflink=1) to test shared extents")
def test_copy_range_shares_blocks_on_a_reflink_filesystem(tmp_path, monkeypatch):
    """On a filesystem with reflinks the block-aligned middle of a copy is shared
    (FICLONERANGE), the bytes either side are copied; the output reads the same."""
    import fcntl
    import os
    import shutil

    import dus.safetensors_io as io

    where = Path(os.environ["DUS_REFLINK_DIR"]) / f"dus-test-{os.getpid()}"
    where.mkdir(parents=True)
    try:
        clones = []
        real = fcntl.ioctl

        def ioctl(fd, request, *args):
            result = real(fd, request, *args)
            clones.append(request)
            return result

        monkeypatch.setattr(fcntl, "ioctl", ioctl)
        calls: list[str] = []
        _copy_with(where, monkeypatch, 4096 + 100, 8192 + 100, (8 << 20) + 5, calls)  # agree modulo the block
        assert clones == [io.FICLONERANGE]
    finally:
        shutil.rmtree(where)

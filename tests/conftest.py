"""Shared fixtures: tiny random models made on the spot (no hub), and a CLI runner."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from a second thread, and two threads spinning against other
# processes on a 2-core machine make forwards many times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    import torch

    torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run tests marked slow (real-model pipeline)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Factory: tiny_models(arch, num_layers=4, seed=0, **kw) -> directory, cached per session."""
    from dus.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    made: dict[tuple, Path] = {}

    def make(arch: str = "llama", num_layers: int = 4, seed: int = 0, **kwargs) -> Path:
        key = (arch, num_layers, seed, tuple(sorted(kwargs.items())))
        if key not in made:
            name = f"{arch}-{num_layers}-{seed}-{len(made)}"
            made[key] = make_tiny_model(root / name, arch, num_layers=num_layers, seed=seed, **kwargs)
        return made[key]

    return make



class CliResult:
    def __init__(self, code: int, stdout: str, stderr: str):
        self.code, self.stdout, self.stderr = code, stdout, stderr

    def __repr__(self):
        return f"CliResult(code={self.code}, stdout={self.stdout[-2000:]!r}, stderr={self.stderr[-2000:]!r})"


@pytest.fixture
def run_cli(capsys):
    """Run `dus ARGS...` in-process; returns CliResult(code, stdout, stderr)."""
    from dus.cli import main

    def run(*args) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        out = capsys.readouterr()
        return CliResult(code, out.out, out.err)

    return run


def write_addition_chats(path: Path, count: int = 48) -> Path:
    """A small chat data set of sums ("add 3 and 4" / "3 plus 4 is 7."), the same every time."""
    import json
    import random

    rng = random.Random(0)
    rows = []
    for _ in range(count):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"messages": [
            {"role": "user", "content": f"add {a} and {b}"},
            {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
        ]})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def tensors(directory: Path) -> dict:
    """Every tensor of a checkpoint directory, all shards merged."""
    from safetensors.torch import load_file

    merged = {}
    for shard in sorted(Path(directory).glob("*.safetensors")):
        merged.update(load_file(shard))
    return merged


def changed_layers(before: Path, after: Path) -> dict[str, set[str]]:
    """Which tensors differ, grouped by layer index ('-' for non-layer tensors)."""
    import torch

    a, b = tensors(before), tensors(after)
    assert a.keys() == b.keys()
    changed: dict[str, set[str]] = {}
    for name in a:
        if not torch.equal(a[name], b[name]):
            layer = name.split(".layers.")[1].split(".")[0] if ".layers." in name else "-"
            changed.setdefault(layer, set()).add(name)
    return changed


def copy_with_two_token_ids_swapped(source: Path, target: Path, first_id: int = 65) -> tuple[Path, str, str]:
    """A copy of a model whose tokenizer gives two ids (`first_id` and the next) to each
    other's tokens: the same vocabulary size, a different tokenizer. Returns the copy and the
    two tokens that were at those ids."""
    import shutil

    shutil.copytree(source, target)
    tokenizer = json.loads((target / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[first_id:first_id + 2]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (target / "tokenizer.json").write_text(json.dumps(tokenizer))
    return target, first, second

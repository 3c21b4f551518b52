"""`dus heal --force` replaces a previous heal output, never what the same run reads: the
model (or a checkpoint inside OUT), its build's sources, the data, the teacher; and a
teacher that tokenizes differently is refused before OUT is touched."""

from __future__ import annotations

import json
import shutil

import pytest

from dus.build import build_model


@pytest.fixture(scope="module")
def healed(tmp_path_factory):
    """H1: a finished heal output (one step), and what it was made from."""
    from dus.cli import main
    from dus.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("heal-output")
    source = make_tiny_model(root / "source", "llama", num_layers=4, seed=2)
    build_model({"solar": {"model": str(source), "trim": 1}}, root / "built")
    (root / "text.txt").write_text("\n\n".join(f"Sentence number {i} of a small text." for i in range(80)) + "\n")
    try:
        main(["heal", str(root / "built"), "-o", str(root / "H1"), "--data", str(root / "text.txt"), *FAST,
              "--save-steps", "1"])
    except SystemExit as exit_:
        assert exit_.code in (0, None)
    return root


FAST = ["--steps", "1", "--batch-size", "1", "--max-length", "32", "--report-to", "none",
        "--set", "calibrate.tokens=64", "--set", "calibrate.window=32"]


def snapshot(directory):
    return sorted((p.relative_to(directory).as_posix(), p.stat().st_size) for p in directory.rglob("*") if p.is_file())


def test_force_never_deletes_what_the_run_reads(healed, tmp_path, run_cli):
    H1 = healed / "H1"
    before = snapshot(H1)
    # a model built from H1 (H1 is its source and its teacher)
    build_model({"solar": {"model": str(H1), "trim": 1}}, tmp_path / "B2")
    result = run_cli("heal", tmp_path / "B2", "-o", H1, "--force", "--data", healed / "text.txt", *FAST)
    assert result.code == 2 and "which this run reads" in result.stderr and result.stderr.count("\n") == 1, result
    # the data inside OUT, reached through `..`
    shutil.copy(healed / "text.txt", H1 / "mine.txt")
    before = snapshot(H1)
    result = run_cli("heal", healed / "built", "-o", H1 / ".." / "H1", "--force", "--data", H1 / "mine.txt", *FAST)
    assert result.code == 2 and "which this run reads" in result.stderr, result
    # a checkpoint inside OUT as the model
    checkpoint = next((H1 / "checkpoints").glob("checkpoint-*"))
    result = run_cli("heal", checkpoint, "-o", H1, "--force", "--teacher", healed / "source", "--data",
                     healed / "text.txt", *FAST)
    assert result.code == 2 and "holds the input model" in result.stderr, result
    assert snapshot(H1) == before


def test_a_teacher_with_another_tokenizer_is_refused_before_out_is_touched(healed, tmp_path, run_cli):
    teacher = tmp_path / "teacher"
    shutil.copytree(healed / "source", teacher)
    tokenizer = json.loads((teacher / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[70:72]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # same size, two ids swapped
    (teacher / "tokenizer.json").write_text(json.dumps(tokenizer))
    H1 = healed / "H1"
    before = snapshot(H1)
    result = run_cli("heal", healed / "built", "-o", H1, "--force", "--teacher", teacher, "--data",
                     healed / "text.txt", *FAST)
    assert result.code == 2 and "does not tokenize as" in result.stderr and "token id 70" in result.stderr, result
    assert snapshot(H1) == before

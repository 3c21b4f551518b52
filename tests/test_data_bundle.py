"""The data bundled in data/: it parses, has the chat schema, and held-out stays held out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent.parent / "data"
CHAT_SPLITS = {"train": DATA / "chat" / "train.jsonl", "heldout": DATA / "chat" / "heldout.jsonl"}
SELFINSTRUCT = DATA / "selfinstruct" / "train.jsonl"


def _rows(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        assert line.strip(), f"{path}:{number} is blank"
        rows.append(json.loads(line))
    return rows


def _check_conversation(row: dict, where: str) -> None:
    messages = row["messages"]
    assert isinstance(messages, list) and len(messages) >= 2, where
    for index, message in enumerate(messages):
        assert set(message) == {"role", "content"}, where
        assert message["role"] == ("user" if index % 2 == 0 else "assistant"), f"{where}: roles must alternate from user"
        assert isinstance(message["content"], str) and message["content"].strip() == message["content"] != "", where
    assert messages[-1]["role"] == "assistant", f"{where}: must end with an assistant turn"


def _key(row: dict) -> tuple:
    return tuple(" ".join(m["content"].lower().split()) for m in row["messages"])


@pytest.fixture(scope="module")
def chat():
    return {name: _rows(path) for name, path in CHAT_SPLITS.items()}


def test_chat_splits_have_the_messages_schema(chat):
    for name, rows in chat.items():
        for number, row in enumerate(rows, 1):
            assert set(row) == {"id", "messages"}, f"{name}:{number}"
            _check_conversation(row, f"{name}:{number}")
    assert 2000 <= len(chat["train"]) <= 4000
    assert 150 <= len(chat["heldout"]) <= 300
    assert CHAT_SPLITS["train"].stat().st_size < 3_200_000


def test_train_and_heldout_share_no_conversation(chat):
    ids = {name: {row["id"] for row in rows} for name, rows in chat.items()}
    keys = {name: {_key(row) for row in rows} for name, rows in chat.items()}
    assert len(ids["train"]) == len(chat["train"]) and len(ids["heldout"]) == len(chat["heldout"]), "duplicate ids"
    assert len(keys["train"]) == len(chat["train"]), "duplicate conversations in train"
    assert not ids["train"] & ids["heldout"]
    assert not keys["train"] & keys["heldout"]


def test_heldout_text_is_the_heldout_conversations(chat):
    """data/heldout.txt is the held-out split rendered as dialogue, and none of train."""
    text = (DATA / "heldout.txt").read_text(encoding="utf-8")
    assert 40_000 <= len(text.encode()) <= 120_000
    blocks = text.strip("\n").split("\n\n")
    assert len(blocks) == len(chat["heldout"])
    for block, row in zip(blocks, chat["heldout"]):
        lines = block.split("\n")
        assert len(lines) == len(row["messages"])
        for line, message in zip(lines, row["messages"]):
            label = "A: " if message["role"] == "user" else "B: "
            assert line == label + message["content"].replace("\n", " ")
    train_lines = {
        " ".join(m["content"].split()) for row in chat["train"] for m in row["messages"] if len(m["content"]) > 80
    }
    heldout_lines = {line[3:] for block in blocks for line in block.split("\n") if len(line) > 83}
    assert len(heldout_lines & train_lines) <= 2  # long turns are unique to a conversation


def test_prepare_script_rebuilds_the_committed_files():
    """The committed files are exactly what data/prepare_chat.py makes from the package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare_chat", DATA / "prepare_chat.py")
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    found = prepare.load_raw(allow_download=False)
    if found is None:
        pytest.skip("chitchat-dataset is neither installed nor in a local cache (this check uses no network)")
    raw, origin = found
    import hashlib

    digest = hashlib.sha256(raw).hexdigest()  # a checksum mismatch fails: the source changed
    assert digest == prepare.DATASET_SHA256, f"{prepare.MEMBER} from {origin} has sha256 {digest}"
    files, stats = prepare.outputs(raw)
    for path, expected in files.items():
        assert path.read_text(encoding="utf-8") == expected, f"{path} is stale: run python data/prepare_chat.py"
    assert stats["train"] == len(_rows(CHAT_SPLITS["train"]))


def test_licenses_are_bundled():
    readme = (DATA / "README.md").read_text()
    assert "chitchat-dataset" in readme and "MIT" in readme
    assert "MIT License" in (DATA / "LICENSES" / "chitchat-dataset.txt").read_text()


@pytest.mark.skipif(not SELFINSTRUCT.exists(), reason="no self-distillation set bundled")
def test_selfinstruct_set_has_the_messages_schema(chat):
    rows = _rows(SELFINSTRUCT)
    assert len(rows) >= 100
    prompts = [row["messages"][0]["content"] for row in rows]
    assert len(set(prompts)) == len(prompts)
    for number, row in enumerate(rows, 1):
        _check_conversation(row, f"selfinstruct:{number}")
        assert len(row["messages"]) == 2
    readme = (DATA / "README.md").read_text()
    assert "Apache-2.0" in readme and "BSD" in readme
    assert "Gunther Cox" in (DATA / "LICENSES" / "chatterbot-corpus.txt").read_text()

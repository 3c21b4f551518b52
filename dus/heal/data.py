"""Training data: load it from wherever it is, recognise its format, hand TRL one of its own.

TRL's SFTTrainer understands three shapes: conversations (`messages`), prompt/completion
pairs and plain `text`. Data in the wild comes as alpaca rows, sharegpt conversations and
the like, so everything is converted here into one of TRL's shapes, and the rest of the
heal stage never looks at formats again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dus.errors import DusError

FORMATS = {
    "messages": "chat: a `messages` list of {role, content}",
    "alpaca": "`instruction`, optional `input`, `output`",
    "sharegpt": "`conversations`: a list of {from, value}",
    "prompt-completion": "`prompt` and `completion`",
    "text": "plain `text` (continued pretraining)",
}
FILE_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "system": "system",
    "tool": "tool",
}
CHAT_ROLES = {"system", "user", "assistant", "tool"}


@dataclass
class LoadedData:
    dataset: Any  # datasets.Dataset in one of TRL's shapes
    format: str  # the format found in the source
    shape: str  # "messages", "prompt-completion" or "text": what TRL receives
    source: str
    rows: int
    files: tuple[str, ...] = ()  # several files, concatenated (source then lists them with " + ")

    def describe(self) -> str:
        converted = "" if self.format == self.shape else f", converted to {self.shape}"
        return f"{self.source}: {self.rows} rows, format {self.format}{converted}"


def accepted_formats() -> str:
    return "; ".join(f"{name} ({what})" for name, what in FORMATS.items())


def load_raw(spec: str, split: str | None = "train"):
    """A `datasets.Dataset` from a local file, a save_to_disk directory, or a hub name."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(spec).expanduser()
    if path.is_dir():
        if not any((path / marker).exists() for marker in ("dataset_info.json", "state.json", "dataset_dict.json")):
            raise DusError(
                f"data {spec}: a directory, but not one written by datasets' save_to_disk; give a "
                "JSONL/JSON/parquet/CSV/TXT file or a save_to_disk directory"
            )
        loaded = datasets.load_from_disk(str(path))
        return _pick_split(loaded, split, spec)
    if path.is_file():
        loader = FILE_LOADERS.get(path.suffix.lower())
        if loader is None:
            raise DusError(
                f"data {spec}: unknown file type '{path.suffix}'; accepted: {', '.join(FILE_LOADERS)}"
                " or a save_to_disk directory"
            )
        if _blank(path):
            raise DusError(f"data {spec}: the file is empty{' (only blank lines)' if path.stat().st_size else ''}; "
                           "give a file of training examples (.jsonl: one JSON object per line)")
        kwargs = {"sample_by": "paragraph"} if loader == "text" else {}
        try:
            return datasets.load_dataset(loader, data_files=str(path), split="train", **kwargs)
        except Exception as error:  # noqa: BLE001 - any parser failure is a bad file
            raise DusError(f"data {spec}: could not be read as {loader} ({_first_line(error)})") from None
    if path.suffix.lower() in FILE_LOADERS or spec.startswith((".", "/", "~")):
        raise DusError(f"data {spec}: no such file or directory (relative paths are read from {Path.cwd()})")
    try:
        return datasets.load_dataset(spec, split=split or "train")
    except Exception as error:  # noqa: BLE001 - hub failures come in many types
        raise DusError(
            f"data {spec}: not a local file or directory, and loading it from the Hugging Face Hub failed "
            f"({_first_line(error)}); give a local JSONL/JSON/parquet/CSV/TXT file or a save_to_disk directory"
        ) from None


BLANK_CHECK_BYTES = 1 << 20


def _blank(path: Path) -> bool:
    """An empty file, or one of only whitespace (read only when small: a big file is not blank
    in practice, and its loader says what is wrong with it)."""
    size = path.stat().st_size
    if size == 0:
        return True
    if size > BLANK_CHECK_BYTES:
        return False
    return not path.read_bytes().strip()


def _kind(value) -> str:
    """A JSON value's kind, for messages: `a list (['a', 'b'])`, `null`, `a number (3)`."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return "an empty string"
    kind = {list: "a list", tuple: "a list", dict: "an object", bool: "a boolean"}.get(type(value), "a number")
    return f"{kind} ({str(value)[:40]})"


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _pick_split(loaded, split: str | None, spec: str):
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DusError(f"data {spec}: no split '{split}'; splits: {', '.join(loaded)} (set data.split)")
        return loaded[split]
    return loaded


def detect_format(columns: list[str], first: dict) -> str:
    """The format of a dataset from its columns (and, for chats, the first row's shape)."""
    cols = set(columns)
    if "messages" in cols:
        return "messages"
    if "conversations" in cols:
        turns = first.get("conversations") or []
        if turns and isinstance(turns[0], dict) and "from" in turns[0]:
            return "sharegpt"
        if turns and isinstance(turns[0], dict) and "role" in turns[0]:
            return "messages-conversations"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if {"prompt", "completion"} <= cols:
        return "prompt-completion"
    if "text" in cols:
        return "text"
    raise DusError(
        f"data: unknown format; columns found: {', '.join(sorted(cols)) or '(none)'}; "
        f"accepted: {accepted_formats()}"
    )


def _check_messages(messages: Any, where: str) -> list[dict]:
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise DusError(f"data {where}: `messages` is a string, not a list of {{role, content}}") from None
    if not isinstance(messages, list) or not messages:
        raise DusError(f"data {where}: `messages` must be a non-empty list of {{role, content}}")
    clean = []
    for message in messages:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DusError(f"data {where}: each message needs `role` and `content`, got {str(message)[:80]}")
        if message["role"] not in CHAT_ROLES:
            raise DusError(
                f"data {where}: unknown role '{message['role']}'; use {', '.join(sorted(CHAT_ROLES))}"
            )
        clean.append({"role": message["role"], "content": str(message["content"] or "")})
    opening = next((m["role"] for m in clean if m["role"] != "system"), None)
    if opening == "assistant":
        raise DusError(f"data {where}: the conversation starts with an assistant turn; chat templates expect the user "
                       "to speak first: drop the opening assistant message or add the user turn before it")
    if not any(m["role"] == "assistant" for m in clean):
        raise DusError(f"data {where}: a conversation without an assistant turn has nothing to learn from")
    return clean


def _convert(row: dict, fmt: str, index: int) -> dict:
    where = f"row {index}"
    if fmt in ("messages", "messages-conversations"):
        key = "messages" if fmt == "messages" else "conversations"
        return {"messages": _check_messages(row[key], where)}
    if fmt == "sharegpt":
        messages = []
        turns = row["conversations"]
        if not isinstance(turns, list) or not turns:
            raise DusError(f"data {where}: `conversations` must be a non-empty list of {{from, value}} turns, "
                           f"got {str(turns)[:80]}")
        for turn in turns:
            if not isinstance(turn, dict):
                raise DusError(f"data {where}: each sharegpt turn needs `from` and `value`, got {str(turn)[:80]}")
            speaker = str(turn.get("from", "")).lower()
            if speaker not in SHAREGPT_ROLES:
                raise DusError(
                    f"data {where}: unknown sharegpt speaker '{turn.get('from')}'; known: "
                    f"{', '.join(sorted(SHAREGPT_ROLES))}"
                )
            messages.append({"role": SHAREGPT_ROLES[speaker], "content": str(turn.get("value") or "")})
        return {"messages": _check_messages(messages, where)}
    if fmt == "alpaca":
        instruction = str(row["instruction"] or "").strip()
        extra = str(row.get("input") or "").strip()
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        return {
            "messages": [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": str(row["output"] or "")},
            ]
        }
    if fmt == "prompt-completion":
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, list) and isinstance(completion, list):
            both = _check_messages(prompt + completion, where)
            return {"prompt": both[: len(prompt)], "completion": both[len(prompt) :]}
        return {"prompt": str(prompt or ""), "completion": str(completion or "")}
    if fmt == "text":
        text = row["text"]
        if text is not None and not isinstance(text, str):
            raise DusError(f"data {where}: `text` must be a string, got {type(text).__name__} {str(text)[:40]!r}; "
                           "fix the training data (quote numbers as text)")
        return {"text": text or ""}
    raise AssertionError(fmt)


def shape_of(fmt: str) -> str:
    if fmt in ("messages", "messages-conversations", "sharegpt", "alpaca"):
        return "messages"
    return fmt


def load_data(spec: str, fmt: str = "auto", split: str | None = "train", max_samples: int | None = None,
              keep: str | None = None) -> LoadedData:
    """Load `spec` and convert it to one of TRL's shapes (messages / prompt-completion / text).
    `keep` names a column carried through as it is (routing: the teacher of each example)."""
    import datasets

    raw = load_raw(spec, split)
    if len(raw) == 0:
        raise DusError(f"data {spec}: the data set is empty")
    if max_samples:
        raw = raw.select(range(min(int(max_samples), len(raw))))
    first = raw[0]
    found = detect_format(raw.column_names, first)
    if fmt != "auto":
        wanted = "messages" if fmt == "chat" else fmt
        if wanted not in FORMATS:
            raise DusError(f"data.format '{fmt}' is not one of auto, {', '.join(FORMATS)}")
        if wanted != found and not (wanted == "messages" and found == "messages-conversations"):
            raise DusError(
                f"data {spec}: data.format is '{fmt}' but the columns ({', '.join(raw.column_names)}) "
                f"look like {found}; fix data.format or use auto"
            )
    rows = [_convert(row, found, i) for i, row in enumerate(raw)]
    if keep is not None:
        if keep not in raw.column_names:
            raise DusError(f"data {spec}: routing reads each example's teacher from a `{keep}` field, which this data "
                           f"lacks; add it, or name the file's teacher: --data {spec}:TEACHER")
        for index, (row, value) in enumerate(zip(rows, raw[keep])):  # rows counted from 0, as _convert's
            if not isinstance(value, str) or not value:
                raise DusError(f"data {spec}: row {index}'s `{keep}` is {_kind(value)}, not a teacher's name; give "
                               f"every row's `{keep}` as one teacher name (a string), or name the file's teacher: "
                               f"--data {spec}:TEACHER")
            row[keep] = value
    if shape_of(found) == "text":
        rows = [row for row in rows if row["text"].strip()]
        if not rows:
            raise DusError(f"data {spec}: every `text` row is empty")
    dataset = datasets.Dataset.from_list(rows)
    label = "messages" if found == "messages-conversations" else found
    return LoadedData(dataset, label, shape_of(found), spec, len(dataset))

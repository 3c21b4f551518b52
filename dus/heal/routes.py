"""Routing: each kind of training data taught by the parent that was fine-tuned for it.

`--data code.jsonl:A --data prose.jsonl:B` (or a `teacher` field in each example) gives every
row a teacher. The rows carry the teacher's index in a `dus_teacher` column; TRL prepares
(tokenizes and packs) each teacher's rows on their own, so no packed sequence mixes two
teachers' tokens, and the collator hands the loss one teacher index per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dus.errors import DusError

ROUTE_COLUMN = "dus_teacher"


@dataclass(frozen=True)
class DataSpec:
    """One training data source and, when routed, the teacher it names."""

    path: str
    teacher: str | None = None

    def __str__(self) -> str:
        return f"{self.path}:{self.teacher}" if self.teacher else self.path


def parse_data_spec(text: str) -> DataSpec:
    """`FILE` or `FILE:TEACHER`. A path that exists as written is never split (a file name may
    hold a colon); otherwise the text after the last colon is a teacher name when it holds
    no path separator."""
    if ":" not in text or Path(text).expanduser().exists():
        return DataSpec(text)
    path, teacher = text.rsplit(":", 1)
    if not teacher or "/" in teacher or "\\" in teacher or not path:
        return DataSpec(text)
    return DataSpec(path, teacher)


def data_specs(value) -> list[DataSpec]:
    """`data.path` as a list of specs: a string, or a list of strings."""
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(item, str) and item for item in items):
        raise DusError(f"data.path must be a data file (or a list of them, each FILE or FILE:TEACHER), got {value!r}")
    specs = [parse_data_spec(item) for item in items]
    seen: dict = {}
    for spec in specs:
        key = Path(spec.path).expanduser().resolve() if Path(spec.path).expanduser().exists() else spec.path
        if key in seen:
            first = seen[key]
            routed = (f" (routed to {first.teacher} and to {spec.teacher})" if first.teacher and spec.teacher
                      and first.teacher != spec.teacher else "")
            raise DusError(f"data {spec.path} is given twice{routed}; give each file once (one file teaches with one "
                           "teacher: split it into one file per teacher to route its parts)")
        seen[key] = spec
    return specs


def prepare_routed(dataset, prepare, seed: int):
    """`prepare` (TRL's tokenize-and-pack) applied to each teacher's rows on their own; the
    prepared rows get their teacher's index back as a column, all concatenated and shuffled."""
    import datasets

    routes = dataset[ROUTE_COLUMN]
    parts = []
    for index in sorted(set(routes)):
        rows = [i for i, route in enumerate(routes) if route == index]
        prepared = prepare(dataset.select(rows).remove_columns(ROUTE_COLUMN))
        parts.append(prepared.add_column(ROUTE_COLUMN, [int(index)] * len(prepared)))
    return datasets.concatenate_datasets(parts).shuffle(seed=seed)


class RoutedCollator:
    """TRL's collator, plus each token's teacher index (`dus_teacher`, shaped like input_ids:
    one row per example, or one flattened row when TRL packs padding-free)."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, examples):
        import torch

        if not examples or ROUTE_COLUMN not in examples[0]:
            return self.inner(examples)
        routes = [int(example.pop(ROUTE_COLUMN)) for example in examples]
        batch = self.inner(examples)
        ids = batch["input_ids"]
        if ids.shape[0] == len(examples):  # one row per example; its padding has no label, so any index does
            per_token = torch.tensor(routes, dtype=ids.dtype).unsqueeze(1).expand_as(ids).clone()
        else:  # padding-free: the examples' tokens one after another in one row
            lengths = [len(example["input_ids"]) for example in examples]
            per_token = torch.cat([torch.full((length,), route, dtype=ids.dtype) for route, length in
                                   zip(routes, lengths)]).reshape(1, -1)
            per_token = torch.nn.functional.pad(per_token, (0, ids.shape[1] - per_token.shape[1]))
        batch[ROUTE_COLUMN] = per_token
        return batch


def load_training_data(data_cfg: dict, teachers: list, mix, route_field: str):
    """`data.path` (one spec or several) loaded and concatenated; when the teachers' rule is
    route, every row carries its teacher's index in the `dus_teacher` column."""
    import datasets

    from dus.heal.data import LoadedData, load_data
    from dus.heal.teachers import route_index
    from dus.resources import local_or_shipped

    specs = data_specs(data_cfg["path"])
    routing = mix is not None and mix.rule == "route"
    parts = []
    for spec in specs:
        keep = route_field if routing and spec.teacher is None else None
        loaded = load_data(str(local_or_shipped(spec.path)), data_cfg["format"], data_cfg["split"],
                           data_cfg["max_samples"], keep=keep)
        if routing:
            if spec.teacher is not None:
                index = route_index(teachers, spec.teacher, f"data {spec}")
                routes = [index] * loaded.rows
                dataset = loaded.dataset
            else:
                where = f"data {spec.path}"
                routes = [route_index(teachers, str(name), f"{where}, field `{route_field}`")
                          for name in loaded.dataset[route_field]]
                dataset = loaded.dataset.remove_columns(route_field)
            loaded.dataset = dataset.add_column(ROUTE_COLUMN, routes)
        parts.append(loaded)
    if len(parts) == 1:
        return parts[0]
    shapes = {part.shape for part in parts}
    if len(shapes) > 1:
        raise DusError(f"data: the files are of different shapes ({', '.join(f'{p.source}: {p.shape}' for p in parts)});"
                       " give files of one kind (all plain text, or all chats)")
    dataset = datasets.concatenate_datasets([part.dataset for part in parts])
    source = " + ".join(str(spec) for spec in specs)
    return LoadedData(dataset, "+".join(sorted({p.format for p in parts})), parts[0].shape, source, len(dataset),
                      files=tuple(part.source for part in parts))


def data_digest(loaded) -> str | None:
    """The training data's sha256: the file's, or for several files one over theirs in order
    (None where a source is no local file: a hub name or a directory)."""
    import hashlib

    from dus.heal.merge import file_sha256

    files = loaded.files or (loaded.source,)
    digests = [file_sha256(Path(path)) for path in files]
    if any(d is None for d in digests):
        return None
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("\n".join(f"{p}:{d}" for p, d in zip(files, digests)).encode()).hexdigest()

"""YAML loading that remembers where each value was written.

Recipe and config errors name the file, line and column of the offending value, so a
user with a 40-line recipe does not have to hunt for the mistake.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from dus.errors import DusError, read_user_text


class LocatedDict(dict):
    """A mapping that knows the position of its own start and of each value."""

    where: str = "?"
    value_where: dict

    def at(self, key) -> str:
        return self.value_where.get(key, self.where)


class LocatedList(list):
    where: str = "?"
    item_where: list

    def at(self, index: int) -> str:
        return self.item_where[index] if index < len(self.item_where) else self.where


def _mark(loader, node) -> str:
    return f"{loader.source_name}:{node.start_mark.line + 1}:{node.start_mark.column + 1}"


class _Loader(yaml.SafeLoader):
    source_name = "<recipe>"


def _construct_mapping(loader, node):
    loader.flatten_mapping(node)
    result = LocatedDict()
    result.where = _mark(loader, node)
    result.value_where = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in result:
            raise DusError(f"{_mark(loader, key_node)}: key {key!r} appears twice; keep one")
        result[key] = loader.construct_object(value_node, deep=True)
        result.value_where[key] = _mark(loader, value_node)
    return result


def _construct_sequence(loader, node):
    result = LocatedList(loader.construct_object(child, deep=True) for child in node.value)
    result.where = _mark(loader, node)
    result.item_where = [_mark(loader, child) for child in node.value]
    return result


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def load_located(text: str, source_name: str = "<recipe>"):
    """Parse YAML text into LocatedDict/LocatedList values; a syntax error is a DusError."""
    loader_class = type("Loader", (_Loader,), {"source_name": source_name})
    try:
        return yaml.load(text, Loader=loader_class)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        place = f"{source_name}:{mark.line + 1}:{mark.column + 1}" if mark else source_name
        problem = getattr(error, "problem", None) or str(error)
        raise DusError(f"{place}: not valid YAML ({problem}); check indentation and quoting") from None


def load_located_file(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise DusError(f"{path} does not exist; give the path of a YAML file")
    return load_located(read_user_text(path, "a YAML recipe"), str(path))


def plain(value):
    """Strip the location wrappers (for JSON output and comparisons)."""
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


def where(container, key) -> str:
    """Position of container[key] when known, else of the container itself."""
    if isinstance(container, (LocatedDict, LocatedList)):
        return container.at(key)
    return getattr(container, "where", "<recipe>")

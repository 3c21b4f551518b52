"""YAML loading that remembers where each value was written.

Recipe and config errors name the file, line and column of the offending value, so a
user with a 40-line recipe does not have to hunt for the mistake.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

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


def _construct_mapping(loader, node):
    loader.flatten_mapping(node)
    result = LocatedDict()
    result.where = _mark(loader, node)
    result.value_where = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            raise DusError(f"{_mark(loader, key_node)}: key {plain(key)!r} is not a name; the keys of a recipe are words "
                           "like `slices` or `model`")
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


@lru_cache(maxsize=None)
def _loader_class():
    """yaml's SafeLoader building located values (yaml is imported on the first recipe
    file read: a build from a preset given on the command line never needs it)."""
    import yaml

    class _Loader(yaml.SafeLoader):
        source_name = "<recipe>"

    _Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
    _Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)
    return _Loader


# A recipe is a few hundred lines; these bounds refuse what would only exhaust memory or
# time: a file of nested aliases (8 levels of 10 is 10^8 values from 600 bytes), deep nesting.
MAX_BYTES = 1 << 20
MAX_VALUES = 100_000
MAX_DEPTH = 50


def _check_bounds(node, source_name: str) -> None:
    """The values the document expands to (aliases counted at every use) and its depth,
    computed once per node, before anything is constructed."""
    import yaml

    sizes: dict[int, tuple[int, int]] = {}

    def measure(current, seen) -> tuple[int, int]:
        if id(current) in sizes:
            return sizes[id(current)]
        if id(current) in seen:
            raise DusError(f"{source_name}: an alias refers to itself; a recipe cannot contain itself")
        children = []
        if isinstance(current, yaml.SequenceNode):
            children = current.value
        elif isinstance(current, yaml.MappingNode):
            children = [child for pair in current.value for child in pair]
        total, depth = 1, 0
        for child in children:
            size, child_depth = measure(child, seen | {id(current)})
            total, depth = total + size, max(depth, child_depth)
            if total > MAX_VALUES or depth + 1 > MAX_DEPTH:
                break
        sizes[id(current)] = (total, depth + 1)
        return sizes[id(current)]

    total, depth = measure(node, frozenset())
    if depth > MAX_DEPTH:
        raise DusError(f"{source_name}: nested more than {MAX_DEPTH} levels deep; a recipe is a few levels of slices and sources")
    if total > MAX_VALUES:
        raise DusError(f"{source_name}: expands to more than {MAX_VALUES:,} values (aliases count at every use); "
                       "write the recipe out without nested aliases")


def load_located(text: str, source_name: str = "<recipe>"):
    """Parse YAML text into LocatedDict/LocatedList values; a syntax error, or a document
    too large or too deep once its aliases are expanded, is a DusError."""
    if len(text) > MAX_BYTES:
        raise DusError(f"{source_name}: {len(text):,} characters is not a recipe (at most {MAX_BYTES:,})")
    import yaml

    loader = type("Loader", (_loader_class(),), {"source_name": source_name})(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_bounds(node, source_name)
        return loader.construct_document(node)
    except RecursionError:
        raise DusError(f"{source_name}: nested too deeply to read; a recipe is a few levels of slices and sources") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        place = f"{source_name}:{mark.line + 1}:{mark.column + 1}" if mark else source_name
        problem = getattr(error, "problem", None) or str(error)
        raise DusError(f"{place}: not valid YAML ({problem}); check indentation and quoting") from None
    finally:
        loader.dispose()


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

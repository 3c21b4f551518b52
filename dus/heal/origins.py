"""Where each value of a heal config came from, so that a bad value is blamed on what the
user typed: `--set distill.hidden=.nan`, `--lr`, or `my.yaml:12` (the config file and line),
never the shipped defaults for a value the user gave.

config.py validates the merged config with messages that start `SOURCE: section.key ...`
(SOURCE: the config file, or the built-in defaults); `blame` puts the origin of that key in
SOURCE's place when the user set it."""

from __future__ import annotations

import re
from typing import Any

from dus.errors import DusError

SCALAR_KEYS = ("mode", "merge", "in_memory")


def shown(value: Any) -> str:
    """A value as the user would type it after `=` (YAML flow style): `.nan`, `[-1, 2]`, `bogus`."""
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("...").strip()


def set_origins(overrides: dict, option: str = "--set") -> dict[str, str]:
    """Each override as the option that gave it: `--set distill.hidden=.nan`."""
    return {dotted: f"{option} {dotted}={shown(value)}" for dotted, value in overrides.items()}


def file_origins(text: str, path) -> dict[str, str]:
    """`section.key` (and the top-level scalars) -> `PATH:LINE` of the value in a config file;
    {} when the text is not a mapping of sections (config.py says what is wrong with it)."""
    import yaml

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    found: dict[str, str] = {}
    if not isinstance(root, yaml.MappingNode):
        return found
    for key_node, value_node in root.value:
        if not isinstance(key_node, yaml.ScalarNode):
            continue
        section = key_node.value
        found[section] = f"{path}:{value_node.start_mark.line + 1}"
        if isinstance(value_node, yaml.MappingNode):
            for inner_key, inner_value in value_node.value:
                if isinstance(inner_key, yaml.ScalarNode):
                    found[f"{section}.{inner_key.value}"] = f"{path}:{inner_value.start_mark.line + 1}"
    return found


_KEY = re.compile(r"'?([A-Za-z_]\w*)\.([A-Za-z_]\w*)'?|(" + "|".join(SCALAR_KEYS) + r")\b")


def blame(error: DusError, source: str, origins: dict[str, str]) -> DusError:
    """`error` (a message `SOURCE: KEY ...`) with SOURCE replaced by where KEY's value came
    from, when the user gave it (an option, or a line of the config file); else unchanged."""
    message = str(error)
    prefix = f"{source}: "
    if not message.startswith(prefix):
        return error
    rest = message[len(prefix):]
    match = _KEY.match(rest)
    if match is None:
        return error
    dotted = match[3] or f"{match[1]}.{match[2]}"
    origin = origins.get(dotted)
    if origin is None or origin == source:
        return error
    return DusError(f"{origin}: {rest}")

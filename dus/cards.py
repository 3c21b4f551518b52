"""Model cards: YAML front matter (what the Hub and `huggingface_hub` read: license, tags,
library) and a markdown body. Written with PyYAML, in the layout huggingface_hub's
`ModelCardData.to_yaml` gives (sorted keys, lists as `- item`), because importing
huggingface_hub's card module costs more than a second, longer than a small build's copying;
read with huggingface_hub's ModelCard, where that import is paid anyway (heal)."""

from __future__ import annotations

from pathlib import Path


def card_text(body: str, license_id: str | None, tags: list[str] | None = None) -> str:
    """A model card: YAML front matter (license, tags, library_name) and a markdown body."""
    import yaml

    data = {"library_name": "transformers", "license": license_id, "tags": tags or None}
    front = yaml.safe_dump({k: v for k, v in data.items() if v is not None}, sort_keys=True,
                           default_flow_style=False, allow_unicode=True).strip()
    return f"---\n{front}\n---\n\n{body.strip()}\n"


def read_card(path: Path):
    """The ModelCard in `path` (a README.md), or None when there is none or it cannot be parsed."""
    from huggingface_hub import ModelCard

    if not Path(path).is_file():
        return None
    try:
        return ModelCard.load(path)
    except Exception:  # noqa: BLE001 - a card that does not parse is treated as no card
        return None


def front_matter(path: Path) -> dict:
    """The YAML front matter of a model card (`---` ... `---` at its top), or {} when there
    is none or it does not parse; without importing huggingface_hub."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    try:
        end = next(i for i, line in enumerate(lines[1:], 1) if line.strip() == "---")
        data = yaml.safe_load("\n".join(lines[1:end]))
    except (StopIteration, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}

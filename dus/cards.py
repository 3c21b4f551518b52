"""Model cards, through huggingface_hub's ModelCard: its front matter is what the Hub and
`huggingface_hub` read (license, tags, library), so dus writes and reads it with the same
code rather than by hand."""

from __future__ import annotations

from pathlib import Path


def card_text(body: str, license_id: str | None, tags: list[str] | None = None) -> str:
    """A model card: YAML front matter (license, tags, library_name) and a markdown body."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(license=license_id, tags=tags or None, library_name="transformers")
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body.strip()}\n"))


def read_card(path: Path):
    """The ModelCard in `path` (a README.md), or None when there is none or it cannot be parsed."""
    from huggingface_hub import ModelCard

    if not Path(path).is_file():
        return None
    try:
        return ModelCard.load(path)
    except Exception:  # noqa: BLE001 - a card that does not parse is treated as no card
        return None

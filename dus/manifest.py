"""Provenance written beside the weights: `dus-manifest.json` and a model card.

The manifest is the machine-readable record every later stage reads (plan, seams, new
blocks, sources with sha256 and license); the card is the same story for people, with
the layer map as runs ("output 0-23 <- A layers 0-23").
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from dus import __version__
from dus.cards import card_text
from dus.checkpoint import read_json
from dus.errors import DusError
from dus.plan import MANIFEST_NAME, LayerPlan, OutputLayer

# /2 stores the seams and new layers once, inside the plan (derived from its layers on
# reading); /1 also repeated them at the top level. Both read.
MANIFEST_FORMAT = "dus-manifest/2"
READABLE_FORMATS = ("dus-manifest/1", MANIFEST_FORMAT)


@dataclass
class Manifest:
    """`dus-manifest.json`, typed: the LayerPlan of a build plus its provenance and the
    history of what later stages (heal) did. Every stage reads seams, new blocks and the
    teacher from here, never from the raw JSON."""

    plan: LayerPlan | None  # None: a model dus healed but did not build
    recipe: dict | None = None
    recipe_file: str | None = None
    architecture: str | None = None
    model_type: str | None = None
    sources: dict = field(default_factory=dict)
    output_files: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    history: list = field(default_factory=list)
    dus_version: str = __version__
    note: str | None = None

    @property
    def seams(self) -> list[int]:
        return self.plan.seams if self.plan else []

    @property
    def new_layers(self) -> list[int]:
        return self.plan.new_layers if self.plan else []

    @property
    def num_layers(self) -> int | None:
        return self.plan.num_layers if self.plan else None

    @property
    def calibration(self) -> dict | None:
        """The calibration of the latest heal that calibrated, if any."""
        found = [r["calibration"] for r in self.history if isinstance(r, dict) and r.get("calibration")]
        return found[-1] if found else None

    @property
    def gates(self) -> dict | None:
        """The learned gates of the latest heal that trained them (dus.heal.gates), if any."""
        found = [r["gates"] for r in self.history if isinstance(r, dict) and r.get("gates")]
        return found[-1] if found else None

    def with_record(self, record: dict) -> "Manifest":
        """A copy with one more history entry (a heal record)."""
        extended = copy.deepcopy(self)
        extended.history.append(record)
        return extended

    def to_dict(self) -> dict:
        data = {
            "format": MANIFEST_FORMAT,
            "dus_version": self.dus_version,
            "recipe": self.recipe,
            "recipe_file": self.recipe_file,
            "architecture": self.architecture,
            "model_type": self.model_type,
            "plan": self.plan.to_dict() if self.plan else None,
            "sources": self.sources,
            "output_files": self.output_files,
            "warnings": self.warnings,
            "history": self.history,
        }
        if self.note:
            data["note"] = self.note
        return data

    @classmethod
    def from_dict(cls, data: dict, where: str = MANIFEST_NAME) -> "Manifest":
        fmt = data.get("format", "dus-manifest/1") if isinstance(data, dict) else None
        if fmt not in READABLE_FORMATS:
            raise DusError(f"{where}: manifest format {fmt!r} is not one this dus reads ({', '.join(READABLE_FORMATS)}); "
                           "upgrade dus, or delete the file to treat the model as a plain checkpoint")
        try:
            plan = LayerPlan.from_dict(data["plan"]) if data.get("plan") else None
        except (KeyError, TypeError, ValueError) as error:
            raise DusError(f"{where}: its plan is damaged ({type(error).__name__}: {error}); rebuild the model with "
                           "dus build, or delete the file to treat the model as a plain checkpoint") from None
        return cls(
            plan=plan,
            recipe=data.get("recipe"),
            recipe_file=data.get("recipe_file"),
            architecture=data.get("architecture"),
            model_type=data.get("model_type"),
            sources=dict(data.get("sources") or {}),
            output_files=list(data.get("output_files") or []),
            warnings=list(data.get("warnings") or []),
            history=list(data.get("history") or []),
            dus_version=data.get("dus_version", "?"),
            note=data.get("note"),
        )


def read_manifest(model_dir: str | Path) -> Manifest | None:
    """The manifest of a dus-built (or dus-healed) model directory, or None for any other model."""
    path = Path(model_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    data = read_json(path, "the dus manifest", "rebuild the model with dus build, or delete the file to treat the model as a plain checkpoint")
    if not isinstance(data, dict):
        raise DusError(f"{path}: the dus manifest is not a JSON object; rebuild the model or delete the file")
    manifest = Manifest.from_dict(data, str(path))
    if manifest.plan is not None:
        manifest.plan.models = {name: str(locate_source(Path(model_dir), raw, manifest.sources.get(name) or {}))
                                for name, raw in manifest.plan.models.items()}
    return manifest


def locate_source(model_dir: Path, raw: str, record: dict) -> Path:
    """Where a build's source is now, found from the model's own place: the path relative to
    the output that the build recorded, then its absolute path; a relative path as written in
    the recipe (manifests before both were recorded) is taken from the current directory last,
    and only if nothing else is there. Unchanged when none exists (the caller says so)."""
    candidates = []
    if record.get("from_output"):
        candidates.append(Path(os.path.normpath(model_dir / record["from_output"])))
    if record.get("absolute"):
        candidates.append(Path(record["absolute"]))
    candidates.append(Path(raw).expanduser())
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    return Path(raw)


def build_manifest(
    recipe_raw: dict,
    recipe_file: str | None,
    plan: LayerPlan,
    config: dict,
    sources: dict[str, dict],
    output_files: list[str],
    warnings: list[str],
) -> Manifest:
    return Manifest(
        plan=plan,
        recipe=recipe_raw,
        recipe_file=recipe_file,
        architecture=(config.get("architectures") or ["?"])[0],
        model_type=config.get("model_type"),
        sources=sources,
        output_files=output_files,
        warnings=warnings,
        history=[{"stage": "build", "dus_version": __version__, "recipe_kind": plan.recipe_kind}],
    )


def write_manifest(manifest: Manifest, directory: Path) -> None:
    (Path(directory) / MANIFEST_NAME).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")


def layer_runs(layers: list[OutputLayer]) -> list[tuple[int, int, OutputLayer, OutputLayer]]:
    """Group output layers into runs of consecutive source layers of one model with one
    transform: (first output index, last output index, first layer, last layer)."""
    runs: list[tuple[int, int, OutputLayer, OutputLayer]] = []
    for index, layer in enumerate(layers):
        if runs:
            start, end, first, last = runs[-1]
            if (
                end == index - 1
                and layer.model == last.model
                and layer.layer == last.layer + 1
                and layer.transform == last.transform == first.transform
            ):
                runs[-1] = (start, index, first, layer)
                continue
        runs.append((index, index, layer, layer))
    return runs


def _span(a: int, b: int) -> str:
    return f"{a}" if a == b else f"{a}-{b}"


def model_card(manifest: Manifest, plan: LayerPlan) -> str:
    import yaml

    licenses = sorted({source["license"] for source in manifest.sources.values()})
    license_id = licenses[0] if len(licenses) == 1 and licenses[0] != "unknown" else "other"
    lines: list[str] = []
    lines += [
        f"# Depth up-scaled {manifest.architecture} ({plan.num_layers} layers)",
        "",
        f"Built by dus {manifest.dus_version} (depth up-scaling) from a "
        f"`{plan.recipe_kind}` recipe. This model has not been trained since it was assembled; "
        "its seams usually cost quality until it is healed (`dus heal`).",
        "",
        "## Layer map",
        "",
        "| output layers | source | source layers | transform |",
        "|---|---|---|---|",
    ]
    for start, end, first, last in layer_runs(plan.layers):
        lines.append(f"| {_span(start, end)} | `{first.model}` | {_span(first.layer, last.layer)} | {first.transform} |")
    seams = ", ".join(str(s) for s in plan.seams) or "none"
    lines += [
        "",
        f"Seams (output layers that do not follow their predecessor in a source): {seams}.",
        f"Embeddings from `{plan.embeddings.model}`; final norm and lm_head from `{plan.head.model}`; "
        f"config from `{plan.config_from}`; tokenizer from `{plan.tokenizer_from}`.",
        "",
        "## Sources",
        "",
        "| model | architecture | layers | license |",
        "|---|---|---|---|",
    ]
    for name, source in manifest.sources.items():
        lines.append(f"| `{name}` | {source['architecture']} | {source['num_layers']} | {source['license']} |")
    lines += [
        "",
        "Each source's license applies to the weights taken from it. sha256 of every file read "
        "is in `dus-manifest.json`.",
        "",
        "## Recipe",
        "",
        "```yaml",
        yaml.safe_dump(manifest.recipe, sort_keys=False).strip(),
        "```",
        "",
    ]
    if plan.notes or manifest.warnings:
        lines += ["## Notes", ""] + [f"- {note}" for note in plan.notes + manifest.warnings] + [""]
    tags = ["dus", "depth-up-scaling", "merge", f"dus-{plan.recipe_kind}"]
    return card_text("\n".join(lines), license_id, tags)

"""Provenance written beside the weights: `dus-manifest.json` and a model card.

The manifest is the machine-readable record every later stage reads (plan, seams, new
blocks, sources with sha256 and license); the card is the same story for people, with
the layer map as runs ("output 0-23 <- A layers 0-23").
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from dus import __version__
from dus.plan import MANIFEST_NAME, LayerPlan, OutputLayer

MANIFEST_FORMAT = "dus-manifest/1"


def build_manifest(
    recipe_raw: dict,
    recipe_file: str | None,
    plan: LayerPlan,
    config: dict,
    sources: dict[str, dict],
    output_files: list[str],
    warnings: list[str],
) -> dict:
    architecture = (config.get("architectures") or ["?"])[0]
    return {
        "format": MANIFEST_FORMAT,
        "dus_version": __version__,
        "recipe": recipe_raw,
        "recipe_file": recipe_file,
        "architecture": architecture,
        "model_type": config.get("model_type"),
        "num_layers": plan.num_layers,
        "seams": plan.seams,
        "new_layers": plan.new_layers,
        "plan": plan.to_dict(),
        "sources": sources,
        "output_files": output_files,
        "warnings": warnings,
        "history": [{"stage": "build", "dus_version": __version__, "recipe_kind": plan.recipe_kind}],
    }


def write_manifest(manifest: dict, directory: Path) -> None:
    (Path(directory) / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


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


def model_card(manifest: dict, plan: LayerPlan) -> str:
    licenses = sorted({source["license"] for source in manifest["sources"].values()})
    license_id = licenses[0] if len(licenses) == 1 and licenses[0] != "unknown" else "other"
    front = {
        "license": license_id,
        "tags": ["dus", "depth-up-scaling", "merge", f"dus-{plan.recipe_kind}"],
        "library_name": "transformers",
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", ""]
    lines += [
        f"# Depth up-scaled {manifest['architecture']} ({plan.num_layers} layers)",
        "",
        f"Built by dus {manifest['dus_version']} (depth up-scaling) from a "
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
    for name, source in manifest["sources"].items():
        lines.append(f"| `{name}` | {source['architecture']} | {source['num_layers']} | {source['license']} |")
    lines += [
        "",
        "Each source's license applies to the weights taken from it. sha256 of every file read "
        "is in `dus-manifest.json`.",
        "",
        "## Recipe",
        "",
        "```yaml",
        yaml.safe_dump(manifest["recipe"], sort_keys=False).strip(),
        "```",
        "",
    ]
    if plan.notes or manifest["warnings"]:
        lines += ["## Notes", ""] + [f"- {note}" for note in plan.notes + manifest["warnings"]] + [""]
    return "\n".join(lines)

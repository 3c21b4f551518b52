"""Log a comparison to a W&B run: the same numbers, tables and plots as the report.

The mode follows dus.wandb_mode (as heal does): offline unless the user is logged in or
chose WANDB_MODE; an offline run is a directory the user can `wandb sync` later.
"""

from __future__ import annotations

import os
from pathlib import Path

from dus.wandb_mode import choose_mode


def log_run(kind: str, name: str, metrics: dict, plots: dict[str, Path], tables: dict[str, tuple[list[str], list[list]]], summary: dict, output_dir: Path) -> str:
    """Start a run, log everything, finish; return where it lives (URL or offline dir)."""
    import wandb

    run = wandb.init(
        project=os.environ.get("WANDB_PROJECT", "dus"),
        name=name,
        job_type=kind,
        dir=str(output_dir),
        mode=choose_mode(),
        config=metrics.get("settings", {}),
        reinit="finish_previous",
    )
    try:
        payload = {f"plots/{key}": wandb.Image(str(path)) for key, path in plots.items()}
        for key, (columns, rows) in tables.items():
            payload[f"tables/{key}"] = wandb.Table(columns=columns, data=rows)
        run.log(payload)
        for key, value in summary.items():
            run.summary[key] = value
        where = run.url if run.settings.mode == "online" and run.url else str(Path(run.dir).parent)
    finally:
        run.finish()
    return where


def log_compare(metrics: dict, plots: dict[str, Path], output_dir: Path) -> str:
    models = metrics["models"]
    summary, ppl_rows, layer_rows, generation_rows = {}, [], [], []
    for model in models:
        label = model["label"]
        if model.get("perplexity"):
            summary[f"perplexity/{label}"] = model["perplexity"]["perplexity"]
            ppl_rows.append([label, model["num_layers"], model["perplexity"]["perplexity"], model["perplexity"]["tokens_scored"]])
        layers = model["layers"]
        depth = model["num_layers"]
        for index, (distance, norm) in enumerate(zip(layers["angular_distance"], layers["output_norm"])):
            layer_rows.append([label, index, (index + 0.5) / depth, distance, norm, index in model["seams"]])
        for generation in model.get("generations", []):
            generation_rows.append([label, generation["prompt"], generation["output"]])
        for task, scores in ((model.get("lm_eval") or {}).get("results") or {}).items():
            for metric, value in scores.items():
                summary[f"lm_eval/{label}/{task}/{metric}"] = value
    tables = {
        "perplexity": (["model", "layers", "perplexity", "tokens_scored"], ppl_rows),
        "layers": (["model", "layer", "relative_depth", "angular_distance", "output_norm", "seam"], layer_rows),
        "generations": (["model", "prompt", "output"], generation_rows),
    }
    name = "compare-" + "-vs-".join(model["label"] for model in models)
    return log_run("compare", name[:120], metrics, plots, tables, summary, output_dir)

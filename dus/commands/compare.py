"""`dus compare MODEL [MODEL ...] --data FILE -o DIR`: base vs unhealed vs healed."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("compare")(compare)


def compare(
    models: list[Path] = typer.Argument(..., help="Model directories (HF format, safetensors), e.g. BASE out/solar out/solar-healed."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for report.md, the PNG plots and metrics.json."),
    data: list[Path] = typer.Option([], "--data", help="Held-out text, one file per domain (repeat --data): .txt or .jsonl with a 'text' field. Default: data/heldout/*.txt and data/heldout.txt."),
    label: list[str] = typer.Option([], "--label", "-l", help="Name of each model in the report, in order (default: directory names)."),
    window: Optional[int] = typer.Option(None, help="Sliding-window length in tokens (default: 1024 or the smallest context length)."),
    stride: Optional[int] = typer.Option(None, help="Tokens the window advances each step (default: window / 2)."),
    max_tokens: Optional[int] = typer.Option(None, help="Only use the first N tokens of the text."),
    prompts: Optional[Path] = typer.Option(None, help="Prompts for greedy generations: .jsonl with 'prompt' or .txt, one per line. Default: data/prompts.jsonl."),
    generate: bool = typer.Option(True, "--generate/--no-generate", help="Run the greedy generations."),
    max_new_tokens: int = typer.Option(64, help="New tokens per generation."),
    skip_perplexity: bool = typer.Option(False, "--skip-perplexity", help="Only layer diagnostics and generations (allows models whose tokenizers differ)."),
    dtype: str = typer.Option("auto", help="auto (the checkpoint's) | float32 | bfloat16 | float16."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="lm-evaluation-harness tasks, comma-separated (needs `pip install lm-eval`; its own tasks download their datasets)."),
    task_limit: Optional[int] = typer.Option(None, "--tasks-limit", "--task-limit", help="lm-eval: only the first N documents of each task (quick checks)."),
    tasks_include: Optional[Path] = typer.Option(None, "--tasks-include", help="A directory of your own lm-eval task YAML files (and the local data they name), as dus search takes it."),
    wandb: bool = typer.Option(False, "--wandb", help="Also log metrics, tables and plots to a W&B run (offline unless logged in)."),
    base: Optional[str] = typer.Option(None, "--base", help="Label of the model healing should return to, for recovery (default: the first)."),
    unhealed: Optional[str] = typer.Option(None, "--unhealed", help="Label of the model before healing, for recovery (default: the second)."),
    parents: list[str] = typer.Option([], "--parents", help="Labels of the parents, comma-separated or repeated: every model is also shown against the parent with the lowest perplexity on each text."),
    force: bool = typer.Option(False, "--force", help="Replace a previous dus report in --output (never files dus did not write)."),
) -> None:
    """Compare models side by side: held-out perplexity, layer curves, generations.

    Example: dus compare BASE out/solar out/solar-healed -o reports/solar

    Perplexity per held-out text with the recovery healing won, per-layer angular distance and norm
    (seams marked), greedy generations; report.md, plots and metrics.json in -o. Guide: docs/compare.md.
    """
    from dus.compare.lm_eval_hook import parse_tasks
    from dus.compare.run import CompareOptions, compare_models, default_heldout_files
    from dus.errors import DusError

    parent_labels = list(dict.fromkeys(name.strip() for value in parents for name in value.split(",") if name.strip()))
    if parents and not parent_labels:
        raise DusError("--parents: give at least one model label")
    options = CompareOptions(
        data=list(data) or default_heldout_files(),
        output=output,
        labels=label,
        window=window,
        stride=stride,
        max_tokens=max_tokens,
        prompts=prompts,
        generate=generate,
        max_new_tokens=max_new_tokens,
        perplexity=not skip_perplexity,
        dtype=dtype,
        device=device,
        tasks=parse_tasks(tasks),
        task_limit=task_limit,
        tasks_include=tasks_include,
        wandb=wandb,
        base=base,
        unhealed=unhealed,
        parents=parent_labels,
        force=force,
    )
    compare_models(models, options)

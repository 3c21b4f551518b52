"""`dus scan MODEL --data FILE`: which layers are redundant, and where to cut."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("scan")(scan)


def scan(
    model: Path = typer.Argument(..., help="Model directory (HF format, safetensors)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Held-out text: .txt or .jsonl with a 'text' field. Default: data/heldout.txt."),
    trim: Optional[int] = typer.Option(None, help="SOLAR trim m (default: layers / 4, as SOLAR's 8 of 32)."),
    duplicate: Optional[int] = typer.Option(None, help="Size of the block to duplicate (default: layers - 2*trim, SOLAR's output depth)."),
    prune: Optional[int] = typer.Option(None, help="Size of the block to prune (default: trim)."),
    window: Optional[int] = typer.Option(None, help="Window length in tokens (default: 1024 or the model's context length)."),
    max_tokens: int = typer.Option(4096, help="Tokens of the text to use."),
    top: int = typer.Option(5, help="Candidates to list per kind."),
    write_recipes: Optional[Path] = typer.Option(None, "--write-recipes", help="Write the proposals as recipe YAML files into this directory."),
    rank: int = typer.Option(0, help="Build the top K duplication candidates (plus SOLAR's cut) and rank them by unhealed perplexity."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Also write scan.json and plots into this directory."),
    dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    force: bool = typer.Option(False, "--force", help="Replace a previous dus scan report in --output and earlier dus scan proposals in --write-recipes (never files dus did not write)."),
    base: Optional[Path] = typer.Option(None, "--base", help="Instead of the redundancy scan: how much MODEL (and each --parent) moved each layer from this base model, a table (and changes.json + a plot with -o). Choose a parents recipe's layers by it."),
    parent: list[Path] = typer.Option([], "--parent", help="With --base: another fine-tune of the base, reported beside MODEL."),
) -> None:
    """Find the most redundant layers and propose the cut that should hurt least.

    Example: dus scan MODEL --write-recipes recipes/proposed --rank 3

    Angular distance between layer inputs (Gromov et al. 2024) and block influence (ShortGPT);
    the proposals as recipes for dus build. Guide: docs/scan.md.
    """
    if base is not None:
        from dus.scan.changes import scan_changes

        scan_changes([model, *parent], base, output, force)
        return
    if parent:
        from dus.errors import DusError

        raise DusError("--parent compares fine-tunes against a base: give --base BASE too")
    from dus.compare.run import default_data_file
    from dus.scan.run import ScanOptions
    from dus.scan.run import scan as run_scan

    options = ScanOptions(
        data=data or default_data_file("heldout.txt"), trim=trim, duplicate=duplicate, prune=prune,
        window=window, max_tokens=max_tokens, top=top, write_recipes=write_recipes, rank=rank,
        output=output, dtype=dtype, device=device, force=force,
    )
    run_scan(model, options)

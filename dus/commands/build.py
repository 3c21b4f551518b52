"""`dus build`: assemble a deeper model from layers of existing ones."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

from dus.errors import DusError


def run(
    recipe: Optional[Path] = None,
    output: Optional[Path] = None,
    solar: Optional[str] = None,
    trim: Optional[int] = None,
    force: bool = False,
    shard_size: str = "5GB",
    dtype: Optional[str] = None,
    dry_run: bool = False,
    quiet: bool = False,
    verify_hashes: bool = False,
) -> None:
    """`dus build` itself, with its arguments parsed (by typer, or by dus.cli for a plain
    command line, without importing typer)."""
    from dus.build import build_model
    from dus.recipe import dtype_name, load_recipe

    if (recipe is None) == (solar is None):
        raise DusError("give either a RECIPE file or --solar MODEL --trim M (not both)")
    if solar is not None:
        if trim is None:
            raise DusError("--solar needs --trim M (the number of layers dropped from each copy)")
        parsed = load_recipe({"solar": {"model": solar, "trim": trim}})
    else:
        parsed = load_recipe(recipe)
    if dtype is not None:
        parsed.out_dtype = dtype_name(dtype, "--dtype")
    started = time.perf_counter()
    plain = _plain_stdout()
    result = build_model(parsed, output, force=force, shard_size=shard_size, dry_run=dry_run,
                         show_progress=not quiet and sys.stderr.isatty(),
                         beside_copy=() if quiet or plain else (_import_rich,),
                         verify_hashes=True if verify_hashes else None)
    if quiet and not result.warnings and not dry_run:
        return  # nothing to print: rich is not even imported
    if plain and not result.warnings and not dry_run:
        # To a pipe or file: the summary as one plain line (rich would only wrap it at 80
        # columns; importing it takes longer than a small build's tail).
        print(_summary(result, time.perf_counter() - started))
        return
    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=False)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)  # one line, taken literally
    if dry_run:
        print_plan(result.plan, console)
        return
    if not quiet:
        console.print(f"[green]built[/] {escape(_summary(result, time.perf_counter() - started)[len('built '):])}")


def _summary(result, seconds: float) -> str:
    return (f"built {result.output}: {result.plan.num_layers} layers, seams at {result.plan.seams or 'none'}, "
            f"{result.bytes_written / 1e9:.2f} GB in {seconds:.1f} s")


def _plain_stdout() -> bool:
    """stdout is a pipe or a file and nothing asks for rich's terminal output there."""
    import os

    forced = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "JUPYTER_COLUMNS")
    try:
        return not sys.stdout.isatty() and not any(os.environ.get(name) for name in forced)
    except (AttributeError, ValueError):  # no stdout, or a closed one
        return False


def _import_rich() -> None:
    """The summary's printer, imported beside the copy rather than after it."""
    import rich.console  # noqa: F401
    import rich.markup  # noqa: F401


def print_plan(plan, console) -> None:
    """The plan as a table: one row per output layer, seams highlighted."""
    from rich.table import Table

    seams = set(plan.seams)
    table = Table(title=f"Layer plan: {plan.num_layers} layers ({plan.recipe_kind})")
    table.add_column("out", justify="right")
    table.add_column("source model")
    table.add_column("layer", justify="right")
    table.add_column("transform")
    for index, layer in enumerate(plan.layers):
        marker = "  [bold red]<- seam[/]" if index in seams else ""
        table.add_row(str(index), layer.model, str(layer.layer), layer.transform + marker)
    console.print(table)
    console.print(f"seams: {plan.seams or 'none'}")
    if plan.new_layers:
        console.print(f"new (zero-init) blocks: {plan.new_layers}")
    console.print(f"embeddings from {plan.embeddings.model}; final norm and lm_head from {plan.head.model}")
    console.print(f"config from {plan.config_from}; tokenizer from {plan.tokenizer_from}")
    console.print(f"dtype: {plan.output_dtype or 'as in the sources'}")
    for note in plan.notes:
        console.print(f"note: {note}")


def register(app) -> None:
    import typer

    def build(
        recipe: Optional[Path] = typer.Argument(None, help="Recipe YAML (mergekit passthrough or a dus preset)."),
        output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output model directory."),
        solar: Optional[str] = typer.Option(None, "--solar", help="Shortcut: SOLAR build of this model directory."),
        trim: int = typer.Option(None, "--trim", help="With --solar: layers dropped from each copy (SOLAR used n/4)."),
        force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
        shard_size: str = typer.Option("5GB", "--shard-size", help="Largest shard, like 5GB or 500MB."),
        dtype: Optional[str] = typer.Option(None, "--dtype", help="Output dtype (float32, float16, bfloat16); overrides the recipe."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved layer plan and write nothing."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar (shown only on a terminal) or summary."),
        verify_hashes: bool = typer.Option(False, "--verify-hashes", help="Hash every source file, even those the Hugging Face hub cache names by their sha256 (also: DUS_VERIFY_HASHES=1)."),
    ) -> None:
        """Build a deeper model from layers of existing ones: a RECIPE or --solar.

        Example: dus build recipes/solar.yaml -o out/solar

        RECIPE is mergekit passthrough YAML or a dus preset (solar, duplicate, interleave, stack,
        parents, graft, expand); --dry-run prints the layer plan and writes nothing; --solar MODEL --trim M
        needs no YAML. Guide: docs/build.md.
        """
        run(recipe, output, solar, trim, force, shard_size, dtype, dry_run, quiet, verify_hashes)

    app.command("build")(build)

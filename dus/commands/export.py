"""`dus export`: a model directory -> a GGUF file for llama.cpp (and Ollama, LM Studio ...)."""

from __future__ import annotations

from pathlib import Path

import typer

from dus.export.quantize import LLAMA_TYPES

TYPE_HELP = ("Tensor type. Written by dus: f32 (lossless), f16, bf16, q8_0. Through llama.cpp's quantizer "
             f"(needs `pip install 'dus\\[llama]'`): {', '.join(LLAMA_TYPES)}.")


def export_command(
    model: Path = typer.Argument(..., metavar="MODEL", help="A model directory (a dus build, a healed model, any HF checkpoint)."),
    output: Path = typer.Option(..., "-o", "--output", help="The GGUF file to write."),
    type_name: str = typer.Option("f16", "--type", "-t", help=TYPE_HELP),
    imatrix: str = typer.Option(None, "--imatrix", metavar="TEXT",
                                help="Quantize with an importance matrix computed on this text (.txt, or .jsonl with "
                                     "'text'; 'default' for the bundled data/text/train.jsonl); saved as OUT.imatrix.gguf "
                                     "(llama.cpp's format). Only for the llama.cpp-quantized types."),
    imatrix_tokens: int = typer.Option(8192, "--imatrix-tokens", min=1,
                                       help="Calibration tokens for --imatrix, in 512-token windows spread over the text."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file (and its imatrix file)."),
    ollama: bool = typer.Option(False, "--ollama", help="Also write OUT.Modelfile for `ollama create`."),
) -> None:
    """Export MODEL as one GGUF file for llama.cpp, Ollama and LM Studio.

    Example: dus export out/solar-healed -o solar.q8_0.gguf --type q8_0

    llama.cpp runs it like the checkpoint; streamed, atomic. Guide: docs/export.md.
    """
    from rich.console import Console
    from rich.markup import escape

    from dus.export.run import export_gguf

    console = Console(stderr=True)
    result = export_gguf(model, output, type_name, force=force, ollama=ollama, imatrix_text=imatrix,
                         imatrix_tokens=imatrix_tokens)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)  # one line, taken literally
    for note in result.notes:
        console.print(f"note: {note}")
    console.print(
        f"[green]exported[/] {result.path}: {result.architecture}, {result.tensors} tensors, {result.type}, "
        f"{result.bytes / 1e6:.1f} MB in {result.seconds:.1f} s"
    )
    if result.imatrix:
        console.print(f"importance matrix: {result.imatrix} (llama-quantize --imatrix reads it)")
    if result.modelfile:
        console.print(f"Ollama: ollama create {result.path.stem} -f {result.modelfile}")
    console.print(f"llama.cpp: llama-cli -m {result.path} -cnv   (or: python -m llama_cpp.server --model {result.path})")


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)

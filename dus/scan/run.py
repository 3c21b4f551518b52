"""`dus scan` as a function: measure, propose, print, and optionally write recipes,
rank built candidates, and save scan.json with plots."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DEFAULT_SCAN_TOKENS = 4096


@dataclass
class ScanOptions:
    data: Path
    trim: int | None = None
    duplicate: int | None = None
    prune: int | None = None
    window: int | None = None
    max_tokens: int | None = DEFAULT_SCAN_TOKENS
    top: int = 5
    write_recipes: Path | None = None
    rank: int = 0
    output: Path | None = None
    dtype: str = "auto"
    device: str = "auto"
    force: bool = False  # replace a previous dus report at `output`, and earlier proposals in `write_recipes`


def scan(model_dir: str | Path, options: ScanOptions, console=None) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from dus.checkpoint import ModelDir, resolve_device, resolve_dtype
    from dus.compare.run import choose_window
    from dus.measure.text import read_text, tokenize_stream
    from dus.errors import DusError
    from dus.measure.text import check_max_tokens
    from dus.report_output import check_recipe_directory, check_report_directory
    from dus.scan.measure import measure_model
    from dus.scan.propose import block_sizes, propose, rank_pool, write_recipes

    console = console or Console(stderr=True)  # progress and notes
    results = Console()  # tables on stdout
    model = ModelDir(model_dir)
    model.check_weights()  # config against weights, before anything is measured
    model_dir = model.path
    if options.rank < 0 or options.top < 1:
        raise DusError("--rank must be >= 0 and --top >= 1")
    block_sizes(model.num_layers, options.trim, options.duplicate, options.prune, str(model_dir))
    check_max_tokens(options.max_tokens)
    if options.output:
        check_report_directory(Path(options.output), options.force, reads=[model_dir])
    if options.write_recipes:
        check_recipe_directory(Path(options.write_recipes), options.force, reads=[model_dir])
    text = read_text(options.data)
    window, _ = choose_window([model], options.window, None)
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, model, device)
    ids = tokenize_stream(model.tokenizer(), text, options.max_tokens)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        measurement = measure_model(model_dir, ids, window, dtype, device, progress)
    proposal = propose(measurement, options.trim, options.duplicate, options.prune)
    result = {
        "model": str(model_dir),
        "data": str(options.data),
        "settings": {"window": window, "max_tokens": options.max_tokens, "dtype": str(dtype).removeprefix("torch."), "device": str(device)},
        "measurement": measurement.to_dict(),
        "proposal": proposal.to_dict(),
    }
    print_scan(results, measurement, proposal, options.top)
    if options.write_recipes:
        written = write_recipes(proposal, model_dir, options.write_recipes, Path(options.data).name,
                                force=options.force)
        result["recipes"] = [str(path) for path in written]
        results.print("recipes written: " + ", ".join(str(path) for path in written), soft_wrap=True)
    if options.rank:
        from dus.scan.rank import rank_candidates

        pool = rank_pool(proposal, options.rank)
        with Progress(*columns, console=console) as progress:
            ranked = rank_candidates(model_dir, pool, measurement.num_layers, ids, window, dtype, device, progress)
        result["ranked"] = ranked
        print_ranking(results, ranked, measurement.perplexity)
    if options.output:
        save_scan(result, measurement, proposal, Path(options.output))
        results.print(f"scan written to {options.output}", soft_wrap=True)
    return result


def print_scan(console, measurement, proposal, top: int) -> None:
    from rich.table import Table

    n_dup, n_prune = proposal.duplicate_size, proposal.prune_size
    table = Table(title=f"Per layer ({measurement.tokens:,} tokens; lower = more redundant)")
    table.add_column("layer", justify="right")
    table.add_column("d(h_l, h_l+1)", justify="right")
    table.add_column("block influence", justify="right")
    table.add_column(f"d(h_l, h_l+{n_prune}) prune", justify="right")
    table.add_column(f"d(h_l, h_l+{n_dup}) dup", justify="right")
    table.add_column("rank", justify="right")
    rank = {layer: i + 1 for i, layer in enumerate(proposal.layer_ranking)}
    for layer in range(measurement.num_layers):
        cells = [str(layer), f"{measurement.distances[1][layer]:.4f}", f"{measurement.block_influence[layer]:.4f}"]
        for size in (n_prune, n_dup):
            values = measurement.distances[size]
            cells.append(f"{values[layer]:.4f}" if layer < len(values) else "")
        cells.append(str(rank[layer]))
        table.add_row(*cells)
    console.print(table)

    proposals = Table(title=f"Proposals (model perplexity on these tokens: {measurement.perplexity['perplexity']:.3f})")
    proposals.add_column("kind")
    proposals.add_column("block", justify="right")
    proposals.add_column("layers out", justify="right")
    proposals.add_column("seam mismatch d", justify="right")
    proposals.add_column("note")
    proposals.add_row("solar", f"trim {proposal.trim}", str(proposal.solar.output_layers), f"{proposal.solar.distance:.4f}", f"repeats [{proposal.solar.start}, {proposal.solar.end})")
    for kind, candidates in (("duplicate", proposal.duplicates), ("prune", proposal.prunes)):
        for i, candidate in enumerate(candidates[:top]):
            note = "best" if i == 0 else ""
            if kind == "duplicate" and (candidate.start, candidate.end) == (proposal.solar.start, proposal.solar.end):
                note = (note + ", same as SOLAR").lstrip(", ")
            proposals.add_row(kind, f"[{candidate.start}, {candidate.end})", str(candidate.output_layers), f"{candidate.distance:.4f}", note)
    console.print(proposals)

    trims = Table(title="SOLAR trim: output depth vs seam mismatch")
    trims.add_column("trim", justify="right")
    trims.add_column("layers out", justify="right")
    trims.add_column("d(h_m, h_L-m)", justify="right")
    for candidate in proposal.solar_by_trim:
        trims.add_row(str(candidate.start), str(candidate.output_layers), f"{candidate.distance:.4f}")
    console.print(trims)


def print_ranking(console, ranked: list[dict], base: dict) -> None:
    from rich.table import Table

    table = Table(title=f"Built candidates by unhealed perplexity (model itself: {base['perplexity']:.3f})")
    for name, justify in (("rank", "right"), ("candidate", "left"), ("layers", "right"), ("seam mismatch d", "right"), ("perplexity", "right"), ("vs model", "right")):
        table.add_column(name, justify=justify)
    for i, entry in enumerate(ranked, start=1):
        change = 100 * (entry["perplexity"] / base["perplexity"] - 1)
        table.add_row(str(i), entry["name"], str(entry["output_layers"]), f"{entry['distance']:.4f}", f"{entry['perplexity']:.3f}", f"{change:+.1f}%")
    console.print(table)


def save_scan(result: dict, measurement, proposal, output: Path) -> None:
    from dus.compare import plots
    from dus.report_output import start_report

    start_report(output, "scan", ["scan.json", "scan_distances.png", "scan_layers.png"])
    name = Path(measurement.model).name
    plots.plot_distance_heatmap(measurement.distances, measurement.num_layers, output / "scan_distances.png", f"{name}: " + r"$d(h_l, h_{l+n})$" + ", darker = more redundant block")
    plots.plot_scan_layers(
        measurement.distances[1], measurement.block_influence, output / "scan_layers.png",
        f"{name}: how much each layer changes its input", marked=proposal.layer_ranking[:1],
    )
    result["plots"] = ["scan_distances.png", "scan_layers.png"]
    (output / "scan.json").write_text(json.dumps(result, indent=2) + "\n")

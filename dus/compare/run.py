"""`dus compare` as a function: measure each model in turn (one in memory at a time),
then write plots, metrics.json and report.md, and optionally log to W&B."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from dus.errors import DusError
from dus.hashing import sha256_file
from dus.report_output import check_report_directory, start_report

DEFAULT_WINDOW = 1024


@dataclass
class CompareOptions:
    data: list[Path] | Path  # one held-out text per domain (the domain is the file's stem)
    output: Path
    labels: list[str] = field(default_factory=list)
    window: int | None = None  # default: min(1024, smallest max_position_embeddings)
    stride: int | None = None  # default: window // 2
    max_tokens: int | None = None
    prompts: Path | None = None  # default: data/prompts.jsonl
    generate: bool = True
    max_new_tokens: int = 64
    perplexity: bool = True
    dtype: str = "auto"
    device: str = "auto"
    tasks: list[str] = field(default_factory=list)
    task_limit: int | None = None
    tasks_include: Path | None = None  # the user's own lm-eval task directory, as `dus search --tasks-include`
    wandb: bool = False
    base: str | None = None  # label of the model healing should return to (default: the first)
    unhealed: str | None = None  # label of the model before healing (default: the second)
    parents: list[str] = field(default_factory=list)  # labels of the parents: every model is also judged against the best one per text
    force: bool = False  # replace a previous dus report at `output`


def default_heldout_files() -> list[Path]:
    """Every bundled held-out domain: data/heldout/*.txt plus the chat text data/heldout.txt."""
    from dus.resources import local_or_shipped

    folder = local_or_shipped("data/heldout")
    return sorted(folder.glob("*.txt")) + [default_data_file("heldout.txt")]


def domain_names(paths: list[Path]) -> list[str]:
    """A short name per held-out file: its stem ("heldout" is the chat text), unique."""
    names = ["chat" if path.stem == "heldout" else path.stem for path in paths]
    if len(set(names)) != len(names):
        names = [f"{path.parent.name}/{path.stem}" for path in paths]
    if len(set(names)) != len(names):
        raise DusError(f"--data names one file twice: {', '.join(map(str, paths))}")
    return names


def recovery_of(metrics: dict, base: str | None, unhealed: str | None) -> dict | None:
    """Per domain, (unhealed - model) / (unhealed - base) for every other model: the share
    of what the seam cost that healing won back. None with fewer than three models."""
    models = {m["label"]: m for m in metrics["models"] if m.get("perplexity")}
    labels = list(models)
    if len(labels) < 3:
        return None
    base = base or labels[0]
    unhealed = unhealed or labels[1]
    for label, flag in ((base, "--base"), (unhealed, "--unhealed")):
        if label not in models:
            raise DusError(f"{flag} {label}: no model has that label; labels: {', '.join(labels)}")
    table = {}
    for label in labels:
        if label in (base, unhealed):
            continue
        table[label] = {}
        for domain, scored in models[label]["perplexity"]["domains"].items():
            low = models[base]["perplexity"]["domains"][domain]["perplexity"]
            high = models[unhealed]["perplexity"]["domains"][domain]["perplexity"]
            table[label][domain] = (high - scored["perplexity"]) / (high - low) if high != low else float("nan")
    return {"base": base, "unhealed": unhealed, "models": table}


def vs_parents_of(metrics: dict, parents: list[str]) -> dict:
    """Per text and pooled (`all`): the parent with the lowest perplexity there, and every
    model's perplexity / that parent's - 1. A child of two parents should be judged against
    whichever of them is better on each text, not against the first model alone."""
    scores = {}
    for m in metrics["models"]:
        p = m["perplexity"]
        scores[m["label"]] = {**{d: r["perplexity"] for d, r in p["domains"].items()}, "all": p["perplexity"]}
    best = {text: min(parents, key=lambda parent: scores[parent][text]) for text in scores[parents[0]]}
    models = {label: {text: value / scores[best[text]][text] - 1 for text, value in values.items()}
              for label, values in scores.items()}
    return {"parents": list(parents), "best": best, "models": models}


def default_data_file(name: str) -> Path:
    """`data/NAME` in the working directory, else the one shipped in the repository."""
    from dus.resources import local_or_shipped

    return local_or_shipped(Path("data") / name)


def model_labels(model_dirs: list[Path], labels: list[str]) -> list[str]:
    """Given labels, else directory names (made unique with their parent's name)."""
    if labels:
        if len(labels) != len(model_dirs):
            raise DusError(f"{len(labels)} --label values for {len(model_dirs)} models; give one label per model or none")
        if len(set(labels)) != len(labels):
            raise DusError("--label values must be distinct")
        return list(labels)
    names = [path.resolve().name for path in model_dirs]
    if len(set(names)) == len(names):
        return names
    names = [f"{path.resolve().parent.name}/{path.resolve().name}" for path in model_dirs]
    if len(set(names)) == len(names):
        return names
    return [f"{i}:{name}" for i, name in enumerate(names)]


def choose_window(models: list, window: int | None, stride: int | None) -> tuple[int, int]:
    limits = [(limit, model.path) for model in models if (limit := model.max_positions)]
    smallest = min(limits) if limits else None
    if window is None:
        window = min(DEFAULT_WINDOW, smallest[0]) if smallest else DEFAULT_WINDOW
    elif smallest and window > smallest[0]:
        raise DusError(f"--window {window} exceeds {smallest[1]}'s max_position_embeddings ({smallest[0]}); use --window {smallest[0]} or less")
    if stride is None:
        stride = max(1, window // 2)
    return window, stride


def seams_of(model) -> tuple[list[int], list[int], dict | None]:
    """(seams, new layers, short build info) from the dus manifest, or empty for other models."""
    manifest = model.manifest
    if manifest is None:
        return [], [], None
    built = {"recipe_kind": manifest.plan.recipe_kind if manifest.plan else None,
             "sources": sorted(manifest.sources or (manifest.plan.models if manifest.plan else {}))}
    if manifest.history:
        built["history"] = [record.get("stage", "?") if isinstance(record, dict) else str(record) for record in manifest.history]
    calibration = manifest.calibration
    if calibration and calibration.get("layers"):
        built["calibration"] = {k: calibration[k] for k in ("layers", "factor", "scores")}
    if manifest.gates:
        built["gates"] = {k: manifest.gates[k] for k in ("trained_layers", "initial", "final")}
    return manifest.seams, manifest.new_layers, built


def seam_layer_stats(distances: list[float], seams: list[int]) -> list[dict]:
    """For each seam i: layer i's angular distance against the median of non-seam layers."""
    others = sorted(value for index, value in enumerate(distances) if index not in seams)
    median = others[len(others) // 2] if others else float("nan")
    spikes = []
    for seam in seams:
        if 0 <= seam < len(distances):
            value = distances[seam]
            spikes.append({"seam": seam, "angular_distance": value, "median_other_layers": median, "ratio": value / median if median else float("nan")})
    return spikes


def check_options(options: CompareOptions, labels: list[str]) -> None:
    """Every setting that cannot be honoured, refused before anything is measured."""
    from dus.measure.text import check_max_tokens

    if options.max_new_tokens < 1 and options.generate:
        raise DusError(f"--max-new-tokens {options.max_new_tokens}: must be at least 1 (or pass --no-generate)")
    check_max_tokens(options.max_tokens)
    for label, flag in ((options.base, "--base"), (options.unhealed, "--unhealed")):
        if label is not None and label not in labels:
            raise DusError(f"{flag} {label}: no model has that label; labels: {', '.join(labels)}")
    if options.parents and not options.perplexity:
        raise DusError("--parents compares perplexities: drop --skip-perplexity (or --parents)")
    for label in options.parents:
        if label not in labels:
            raise DusError(f"--parents {label}: no model has that label; labels: {', '.join(labels)}")
    if options.task_limit is not None and options.task_limit < 1:
        raise DusError(f"--tasks-limit {options.task_limit}: give at least 1 document per task")
    if options.tasks_include is not None and not options.tasks:
        raise DusError("--tasks-include adds task definitions: name the tasks to run with --tasks")


def report_files(options: CompareOptions) -> list[str]:
    """What compare writes into its output directory."""
    files = ["angular_distance.png", "angular_distance_relative.png", "hidden_norm.png", "metrics.json", "report.md"]
    if options.perplexity:
        files.append("perplexity.png")
    if options.wandb:
        files.append("wandb")
    return files


def compare_models(model_dirs: list[str | Path], options: CompareOptions, console=None) -> dict:
    """Measure every model and write the report; returns the metrics dict (also in metrics.json)."""
    from rich.console import Console

    from dus import __version__
    from dus.compare import lm_eval_hook
    from dus.compare.generate import generations_to_dicts, load_prompts
    from dus.checkpoint import ModelDir, resolve_device
    from dus.measure.tokenizers import check_same_tokenizer
    from dus.measure.text import read_text

    console = console or Console(stderr=True)
    if not model_dirs:
        raise DusError("no models given; pass one or more model directories")
    model_dirs = [ModelDir(path) for path in model_dirs]
    for model in model_dirs:
        model.check_weights()  # config against weights, before anything is measured
    labels = model_labels([model.path for model in model_dirs], options.labels)
    check_options(options, labels)
    check_report_directory(Path(options.output), options.force, reads=[model.path for model in model_dirs])
    data_paths = [Path(p) for p in (options.data if isinstance(options.data, list) else [options.data])]
    texts = dict(zip(domain_names(data_paths), (read_text(path) for path in data_paths)))
    window, stride = choose_window(model_dirs, options.window, options.stride)
    device = resolve_device(options.device)
    prompts_path = options.prompts or default_data_file("prompts.jsonl")
    generate = options.generate
    if generate and options.prompts is None and not prompts_path.is_file():
        console.print(f"[yellow]no generations:[/] the default prompt file {prompts_path} is missing; pass --prompts FILE")
        generate = False
    prompts = load_prompts(prompts_path) if generate else []

    tokenizers = {label: model.tokenizer() for label, model in zip(labels, model_dirs)}
    if options.perplexity:
        check_same_tokenizer(tokenizers)
    task_manager = None
    if options.tasks:
        from dus.search.lm_eval_score import check_include, task_manager as load_task_manager

        check_include(options.tasks_include)
        if lm_eval_hook.available():  # unknown tasks are one line now, before any model is loaded
            task_manager = load_task_manager(options.tasks, options.tasks_include)
        else:
            console.print(f"[yellow]--tasks ignored:[/] {lm_eval_hook.INSTALL_HINT}")

    settings = {
        "window": window, "stride": stride, "max_tokens": options.max_tokens, "dtype": options.dtype,
        "device": str(device), "max_new_tokens": options.max_new_tokens,
        "prompts": str(prompts_path) if generate else None, "perplexity": options.perplexity,
        "tasks": options.tasks,
        "tasks_include": str(Path(options.tasks_include).resolve()) if options.tasks and options.tasks_include else None,
    }
    metrics = {
        "dus_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": {name: {"path": str(path), "sha256": sha256_file(path), "characters": len(texts[name])}
                 for name, path in zip(texts, data_paths)},
        "settings": settings,
        "models": [],
    }
    setup = Measuring(texts, prompts, window, stride, device, options, console)
    # matplotlib imports in a thread while the models are measured (torch releases the GIL)
    threading.Thread(target=_import_plotting, daemon=True).start()
    for index, (label, path) in enumerate(zip(labels, model_dirs)):
        setup.more_models = index + 1 < len(model_dirs)
        measured = measure_model(label, path, tokenizers[label], setup)
        seams, new_layers, built = seams_of(path)
        measured.update({"seams": seams, "new_layers": new_layers, "built": built})
        measured["seam_layers"] = seam_layer_stats(measured["layers"]["angular_distance"], seams)
        if options.tasks:
            started = time.perf_counter()
            with console.status(f"lm-eval {','.join(options.tasks)} on {label}"):
                measured["lm_eval"] = lm_eval_hook.run_tasks(str(path.path), options.tasks, str(device), options.dtype, options.task_limit,
                                                               task_manager=task_manager)
            measured["seconds"]["lm_eval"] = time.perf_counter() - started
            if measured["lm_eval"]["status"] not in ("ok", "not-installed"):
                console.print(f"[yellow]{label}:[/] {measured['lm_eval']['message']}")
        if measured["num_layers"] != path.num_layers:
            raise DusError(f"{path.path}: measured {measured['num_layers']} layers but config.json says {path.num_layers}")
        metrics["models"].append(measured)
    if options.tasks:
        statuses = {model["lm_eval"]["status"] for model in metrics["models"]}
        metrics["lm_eval"] = {"tasks": options.tasks, "statuses": sorted(statuses)}
        if statuses == {"not-installed"}:
            metrics["lm_eval"]["message"] = lm_eval_hook.INSTALL_HINT
    metrics["tokens"] = {model["label"]: model["tokens"] for model in metrics["models"]}
    if options.perplexity:
        metrics["recovery"] = recovery_of(metrics, options.base, options.unhealed)
        if options.parents:
            metrics["vs_parents"] = vs_parents_of(metrics, options.parents)
    for model in metrics["models"]:
        model["generations"] = generations_to_dicts(model.pop("_generations"))
    write_outputs(metrics, Path(options.output), options, console)
    return metrics


@dataclass
class Measuring:
    """What every model of one comparison is measured on, and how."""

    texts: dict[str, str]  # domain -> held-out text
    prompts: list
    window: int
    stride: int
    device: object
    options: CompareOptions
    console: object
    more_models: bool = True  # another model is measured after this one


def _import_plotting() -> None:
    from dus.compare.plots import _pyplot

    _pyplot()


def measure_model(label: str, path, tokenizer, setup: Measuring) -> dict:
    """Load one model, measure it on every domain's text (layer statistics pooled over
    all of them), free it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from dus.compare.generate import generate_greedy
    from dus.measure.layerwise import LayerStats
    from dus.checkpoint import free, resolve_dtype
    from dus.measure.perplexity import PerplexityResult, count_windows, evaluate_stream
    from dus.measure.text import tokenize_stream

    options, device, console, window, stride = setup.options, setup.device, setup.console, setup.window, setup.stride
    dtype = resolve_dtype(options.dtype, path, device)
    streams = {name: tokenize_stream(tokenizer, text, options.max_tokens) for name, text in setup.texts.items()}
    tokens = sum(len(ids) for ids in streams.values())
    seconds = {}
    started = time.perf_counter()
    with console.status(f"loading {label} ({dtype}, {device})"):
        model = path.load_model(dtype, device, quiet=True).eval()
    seconds["load"] = time.perf_counter() - started
    stats = LayerStats(max_skip=1)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        windows = sum(count_windows(len(ids), window, stride) for ids in streams.values())
        task = progress.add_task(f"{label}: {tokens} tokens, {len(streams)} texts", total=windows)
        started = time.perf_counter()
        results = {name: evaluate_stream(model, ids, window, stride, stats=stats, score=options.perplexity,
                                         on_window=lambda: progress.advance(task)) for name, ids in streams.items()}
        seconds["measure"] = time.perf_counter() - started
        generations = []
        if setup.prompts:
            gen_task = progress.add_task(f"{label}: greedy generations", total=len(setup.prompts))
            started = time.perf_counter()
            generations = generate_greedy(model, tokenizer, setup.prompts, options.max_new_tokens,
                                          on_prompt=lambda: progress.advance(gen_task))
            seconds["generate"] = time.perf_counter() - started
    measured = {
        "label": label,
        "path": str(path.path),
        "architecture": (model.config.architectures or [type(model).__name__])[0],
        "num_layers": stats.num_layers,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "tokens": tokens,
        "perplexity": None,
        "layers": stats.summary(),
        "seconds": seconds,
        "_generations": generations,
    }
    if options.perplexity:
        pooled = PerplexityResult(sum(r.nll_sum for r in results.values()), sum(r.tokens for r in results.values()))
        measured["perplexity"] = {**pooled.to_dict(), "domains": {name: r.to_dict() for name, r in results.items()}}
    if setup.more_models:  # give the memory back before the next model loads
        free(model)
    return measured


def write_outputs(metrics: dict, output: Path, options: CompareOptions, console) -> None:
    from rich.console import Console

    from dus.compare import plots
    from dus.compare.report import render_report, terminal_table, write_json

    start_report(output, "compare", report_files(options))
    models = metrics["models"]
    made = {}
    curves = [plots.Curve(m["label"], m["layers"]["angular_distance"], m["seams"]) for m in models]
    made["angular_distance"] = plots.plot_layer_curves(
        curves, output / "angular_distance.png", "Angular distance between a layer's input and output (seams dashed)", "arccos(cos(h_l, h_l+1)) / pi")
    made["angular_distance_relative"] = plots.plot_layer_curves(
        curves, output / "angular_distance_relative.png", "Angular distance by relative depth (seams dashed)", "arccos(cos(h_l, h_l+1)) / pi", relative=True)
    norms = [plots.Curve(m["label"], m["layers"]["output_norm"], m["seams"]) for m in models]
    made["hidden_norm"] = plots.plot_layer_curves(
        norms, output / "hidden_norm.png", "Mean norm of each layer's output (before the final norm)", "||h_l+1||")
    if options.perplexity:
        domains = list(models[0]["perplexity"]["domains"])
        values = {d: [m["perplexity"]["domains"][d]["perplexity"] for m in models] for d in domains}
        made["perplexity"] = plots.plot_perplexity([m["label"] for m in models], values, output / "perplexity.png")
    metrics["plots"] = {key: path.name for key, path in made.items()}
    if options.wandb:
        from dus.compare.wandb_log import log_compare

        with console.status("logging to W&B"):
            metrics["wandb"] = log_compare(metrics, made, output)
        console.print(f"W&B run: {metrics['wandb']}")
    write_json(metrics, output / "metrics.json")
    (output / "report.md").write_text(render_report(metrics))
    results = Console()  # results on stdout, progress and notes on stderr
    results.print(terminal_table(metrics))
    results.print(f"report: {output / 'report.md'}", soft_wrap=True)

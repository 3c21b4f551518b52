"""report.md, metrics.json and the terminal summary of a comparison."""

from __future__ import annotations

import json
import math
from pathlib import Path


def write_json(data: dict, path: Path) -> Path:
    path.write_text(json.dumps(data, indent=2, default=_plain, allow_nan=True) + "\n")
    return path


def _plain(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _cell(text) -> str:
    """Text safe inside a markdown table cell (control characters shown as escapes)."""
    text = str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text) or " "


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:.4g}"
    return str(value)


def _delta(value: float, reference: float) -> str:
    if not reference or math.isnan(reference) or math.isnan(value):
        return "n/a"
    return f"{100 * (value / reference - 1):+.1f}%"


def render_report(metrics: dict) -> str:
    models = metrics["models"]
    settings = metrics["settings"]
    data = metrics["data"]
    out = [f"# dus compare: {' vs '.join(m['label'] for m in models)}", ""]
    texts = "; ".join(f"{name}: `{d['path']}` ({d['characters']:,} characters, sha256 `{d['sha256'][:12]}`)"
                      for name, d in data.items())
    out.append(
        f"Held-out texts: {texts}. Sliding window {settings['window']} tokens with stride {settings['stride']}; "
        f"dtype {settings['dtype']}, device {settings['device']}; dus {metrics['dus_version']}, {metrics['created']}."
    )
    out.append("")
    out += _models_section(models)
    if settings["perplexity"]:
        out += _perplexity_section(models, metrics["plots"].get("perplexity"), metrics.get("recovery"), metrics.get("vs_parents"))
    out += _layers_section(models, metrics["plots"])
    if any(m.get("generations") for m in models):
        out += _generations_section(models, settings)
    if settings.get("tasks"):
        out += _lm_eval_section(models, settings["tasks"], metrics.get("lm_eval", {}))
    out += _time_section(models)
    if metrics.get("wandb"):
        out += ["", f"W&B run: {metrics['wandb']}"]
    return "\n".join(out) + "\n"


def _models_section(models) -> list[str]:
    out = ["## Models", "", "| model | path | architecture | layers | dtype | seams | new (zero-init) layers |", "|---|---|---|---:|---|---|---|"]
    for m in models:
        out.append(
            f"| {_cell(m['label'])} | `{_cell(m['path'])}` | {m['architecture']} | {m['num_layers']} | {m['dtype']} | "
            f"{', '.join(map(str, m['seams'])) or '-'} | {', '.join(map(str, m['new_layers'])) or '-'} |"
        )
    for m in models:
        gates = (m.get("built") or {}).get("gates")
        if gates:
            moved = [f"{i}.{'attn' if b == 'attention' else 'mlp'} {gates['initial'][i][b]:g}->{v:.3f}"
                     for i, row in gates["final"].items() for b, v in row.items() if int(i) in gates["trained_layers"]]
            out += ["", f"{_cell(m['label'])} learned per-layer gates while healing (the output of o_proj / down_proj "
                    f"times a trained scalar, folded into the weights): {', '.join(moved)}."]
        calibration = (m.get("built") or {}).get("calibration")
        if calibration:
            scores = ", ".join(f"x{factor}: {value:.2f}" for factor, value in calibration["scores"].items())
            out += ["", f"{_cell(m['label'])} was calibrated before healing: output projections (o_proj, down_proj) of "
                    f"the repeated layers {calibration['layers']} scaled by {calibration['factor']:g}, the best of "
                    f"the factors tried on calibration text (perplexity {scores})."]
    return out + [""]


def _vs_parent(vs_parents: dict, label: str, text: str) -> str:
    """`+3.1% (A)`: the model's perplexity against the best parent on that text, named."""
    value = vs_parents["models"][label][text]
    change = "n/a" if math.isnan(value) else f"{100 * value:+.1f}%"
    return f"{change} ({vs_parents['best'][text]})"


def _perplexity_section(models, plot, recovery, vs_parents=None) -> list[str]:
    domains = list(models[0]["perplexity"]["domains"])
    reference = models[0]
    out = [
        "## Perplexity",
        "",
        "Per held-out text, each token after the first is scored once with the context of its sliding window "
        f"(the strided method of the transformers docs); lower is better. In brackets: the change against "
        f"{_cell(reference['label'])}. `all` pools every text's tokens.",
        "",
        "| model | layers | " + " | ".join(_cell(d) for d in domains) + " | all | tokens scored |",
        "|---|---:|" + "---:|" * (len(domains) + 2),
    ]
    for m in models:
        p = m["perplexity"]
        cells = []
        for d in domains:
            value, ref = p["domains"][d]["perplexity"], reference["perplexity"]["domains"][d]["perplexity"]
            cells.append(f"{_fmt(value, 3)} ({_delta(value, ref)})" if m is not reference else _fmt(value, 3))
        pooled = f"{_fmt(p['perplexity'], 3)}" + ("" if m is reference else f" ({_delta(p['perplexity'], reference['perplexity']['perplexity'])})")
        out.append(f"| {_cell(m['label'])} | {m['num_layers']} | " + " | ".join(cells) + f" | {pooled} | {p['tokens_scored']:,} |")
    if recovery and recovery["models"]:
        out += ["", f"Recovery per text: (unhealed - model) / (unhealed - base), with base = {_cell(recovery['base'])} and "
                f"unhealed = {_cell(recovery['unhealed'])}: 100% is all of the seam's cost won back, 0% none.", "",
                "| model | " + " | ".join(_cell(d) for d in domains) + " |", "|---|" + "---:|" * len(domains)]
        for label, values in recovery["models"].items():
            out.append(f"| {_cell(label)} | " + " | ".join(f"{100 * values[d]:.0f}%" for d in domains) + " |")
    if vs_parents:
        texts = domains + ["all"]
        out += ["", f"Against the best parent per text: each model's perplexity relative to whichever parent "
                f"({', '.join(map(_cell, vs_parents['parents']))}) has the lowest perplexity on that text, named in brackets; "
                "below 0% the model beats every parent there.", "",
                "| model | " + " | ".join(_cell(t) for t in texts) + " |", "|---|" + "---:|" * len(texts)]
        for m in models:
            out.append(f"| {_cell(m['label'])} | " + " | ".join(_cell(_vs_parent(vs_parents, m["label"], t)) for t in texts) + " |")
    if plot:
        out += ["", f"![perplexity]({plot})"]
    return out + [""]


def _layers_section(models, plots) -> list[str]:
    out = [
        "## Per-layer diagnostics",
        "",
        "Angular distance of layer l is arccos(cos(h_l, h_l+1)) / pi averaged over the scored tokens: how far "
        "the layer turns the residual stream (0 = identity). A seam (dashed line, between the two layers that "
        "were not adjacent in their source) shows as a break in the curve of an unhealed model: the layers after it "
        "get a residual stream they were not trained on (a spike where they over-react, a step down where the stream "
        "has grown larger than they expect and their updates turn it less); healing should bring the curve back "
        "towards the base's. The norm is the mean L2 norm of each layer's output, before the final norm.",
        "",
        f"![angular distance]({plots['angular_distance']})",
        "",
        f"![angular distance by relative depth]({plots['angular_distance_relative']})",
        "",
        f"![hidden-state norm]({plots['hidden_norm']})",
        "",
    ]
    spikes = [(m["label"], spike) for m in models for spike in m["seam_layers"]]
    if spikes:
        out += ["### Seams", "", "| model | seam (layer) | angular distance there | median of other layers | seam / median (>1 spike, <1 dip) |", "|---|---:|---:|---:|---:|"]
        for label, spike in spikes:
            out.append(f"| {_cell(label)} | {spike['seam']} | {_fmt(spike['angular_distance'])} | {_fmt(spike['median_other_layers'])} | {_fmt(spike['ratio'], 2)} |")
        out.append("")
    depth = max(m["num_layers"] for m in models)
    header = "| layer | " + " | ".join(f"{_cell(m['label'])} distance | {_cell(m['label'])} norm" for m in models) + " |"
    out += ["<details><summary>Per-layer values (seam layers marked *)</summary>", "", header, "|---:|" + "---:|---:|" * len(models)]
    for index in range(depth):
        cells = []
        for m in models:
            layers = m["layers"]
            if index < m["num_layers"]:
                mark = "*" if index in m["seams"] else ""
                cells += [f"{_fmt(layers['angular_distance'][index])}{mark}", _fmt(layers["output_norm"][index], 3)]
            else:
                cells += ["", ""]
        out.append(f"| {index} | " + " | ".join(cells) + " |")
    return out + ["", "</details>", ""]


def _generations_section(models, settings) -> list[str]:
    out = ["## Greedy generations", "", f"Up to {settings['max_new_tokens']} new tokens, greedy, prompts from `{settings['prompts']}`."]
    if any(not g["chat_template"] for m in models for g in m.get("generations", [])):
        templated = [m["label"] for m in models if m.get("generations") and not m["generations"][0]["chat_template"]]
        out.append(f"No chat template in {', '.join(templated)}: those models got the raw prompt followed by a newline.")
    out.append("")
    prompts = [g["prompt"] for g in models[0]["generations"]]
    for number, prompt in enumerate(prompts):
        out += [f"### {number + 1}. {_cell(prompt)}", "", "| model | output |", "|---|---|"]
        for m in models:
            generation = m["generations"][number]
            out.append(f"| {_cell(m['label'])} | {_cell(generation['output'])} |")
        out.append("")
    return out


def _lm_eval_section(models, tasks, summary) -> list[str]:
    out = ["## lm-evaluation-harness", ""]
    scored = [(m["label"], m["lm_eval"]["results"]) for m in models if (m.get("lm_eval") or {}).get("status") == "ok"]
    for m in models:
        result = m.get("lm_eval") or {}
        if result.get("status") != "ok" and result.get("message"):
            out.append(f"- {_cell(m['label'])}: {result['message']}")
    if scored:
        from dus.compare.lm_eval_hook import with_stderr

        scores = [(label, {task: with_stderr(metrics) for task, metrics in results.items()}) for label, results in scored]
        keys = sorted({(task, metric) for _, results in scores for task, metrics in results.items() for metric in metrics})
        out += ["", "Each score ± the standard error lm-eval gives for it.",
                "", "| model | " + " | ".join(f"{task} {metric}" for task, metric in keys) + " |", "|---|" + "---:|" * len(keys)]
        for label, results in scores:
            out.append(f"| {_cell(label)} | " + " | ".join(_score(results.get(task, {}).get(metric)) for task, metric in keys) + " |")
    return out + [""]


def _score(entry: dict | None) -> str:
    if not entry:
        return "-"
    if entry.get("stderr") is None:
        return _fmt(entry["value"])
    return f"{_fmt(entry['value'])} ± {_fmt(entry['stderr'])}"


def _time_section(models) -> list[str]:
    out = ["## Time", "", "| model | load (s) | perplexity + layers (s) | tokens/s | generations (s) |", "|---|---:|---:|---:|---:|"]
    for m in models:
        seconds = m["seconds"]
        rate = m["tokens"] / seconds["measure"] if seconds.get("measure") else float("nan")
        out.append(f"| {_cell(m['label'])} | {seconds['load']:.1f} | {seconds['measure']:.1f} | {rate:.0f} | {_fmt(seconds.get('generate'), 1)} |")
    return out


def terminal_table(metrics: dict):
    """The rich table printed at the end of `dus compare`."""
    from rich.table import Table

    models = metrics["models"]
    with_ppl = metrics["settings"]["perplexity"]
    vs_parents = metrics.get("vs_parents")
    texts = list(models[0]["perplexity"]["domains"]) + ["all"] if vs_parents else []
    table = Table(title=f"dus compare (change: perplexity vs {models[0]['label']})")
    table.add_column("model", overflow="fold")
    table.add_column("layers", justify="right")
    if with_ppl:
        table.add_column("perplexity", justify="right", no_wrap=True)
        table.add_column("change", justify="right")
        table.add_column("tokens", justify="right")
    for text in texts:  # the report's columns against the best parent per text
        table.add_column(f"{text}\nvs parent", justify="right", no_wrap=True)
    table.add_column("seams", justify="right")
    table.add_column("seam/median", justify="right")
    table.add_column("s", justify="right")
    reference = models[0]["perplexity"]["perplexity"] if with_ppl else None
    for m in models:
        row = [m["label"], str(m["num_layers"])]
        if with_ppl:
            p = m["perplexity"]
            row += [f"{p['perplexity']:.3f}", _delta(p["perplexity"], reference), f"{p['tokens_scored']:,}"]
        row += [_vs_parent(vs_parents, m["label"], text) for text in texts]
        ratios = ", ".join(f"{spike['ratio']:.2f}" for spike in m["seam_layers"])
        row += [", ".join(map(str, m["seams"])) or "-", ratios or "-", f"{sum(m['seconds'].values()):.1f}"]
        table.add_row(*row)
    return table

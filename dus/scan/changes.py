"""`dus scan MODEL --base BASE [--parent B]`: how much each fine-tune moved each layer.

Users stacking, swapping or gating two fine-tunes choose layers by where each fine-tune
changed the weights (the `parents` preset does it for them): the relative change
||model - base|| / ||base|| of every layer, read from the safetensors one tensor at a time,
as a table, and with `-o` as changes.json and a plot.
"""

from __future__ import annotations

import json
from pathlib import Path

from dus.errors import DusError


def scan_changes(models: list[Path], base: Path, output: Path | None = None, force: bool = False) -> dict:
    from dus.parents import change_table, layer_changes, plot_changes, relative
    from dus.report_output import check_report_directory, start_report
    from dus.sources import check_compatible, load_source

    if output is not None:
        check_report_directory(Path(output), force, reads=[*models, base])
    opened = [load_source(str(path), str(path)) for path in models]
    base_source = load_source(str(base), str(base))
    check_compatible([base_source, *opened])
    for source in opened:
        if source.num_layers != base_source.num_layers:
            raise DusError(f"--base {base} has {base_source.num_layers} layers, {source.path} {source.num_layers}; "
                           "a fine-tune has its base's depth")
    changes = {str(source.path): layer_changes(base_source, source) for source in opened}
    result = {"base": str(base), "changes": changes, "relative": {k: relative(v) for k, v in changes.items()}}
    if len(opened) == 2:
        spec = {"models": list(changes), "base": str(base)}
        print("\n".join(change_table(spec, changes)))
    else:
        for name, values in changes.items():
            print(f"change of {name} against {base} (||model - base|| / ||base||), per layer:")
            print("  " + " ".join(f"{i}:{v:.2e}" for i, v in enumerate(values)))
    if output is not None:
        start_report(Path(output), "scan", ["changes.json", "changes.png"])
        plot_changes({Path(k).name: v for k, v in changes.items()}, Path(output) / "changes.png",
                     f"how much each fine-tune moved each layer from {Path(base).name}")
        (Path(output) / "changes.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {Path(output) / 'changes.json'} and changes.png")
    return result

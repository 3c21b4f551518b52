"""dus as an installed package: a wheel built from the repository, installed (not
editable) into a fresh virtual environment, finds its shipped defaults from an empty
directory: `dus heal MODEL -o OUT`, `dus heal MODEL -c full -o OUT`, `dus compare A B -o R`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("package")
    wheels = root / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(REPO)],
                   check=True, capture_output=True, timeout=300)
    wheel = next(wheels.glob("dus-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in ("dus/_shipped/train/lora-seam.yaml", "dus/_shipped/train/full.yaml", "dus/_shipped/data/prompts.jsonl",
                    "dus/_shipped/data/text/train.jsonl", "dus/_shipped/recipes/solar.yaml", "dus/templates/fallback_chat.jinja"):
        assert shipped in names, shipped
    venv = root / "venv"
    # The packages of the environment running the tests (torch, transformers ...: a venv's own
    # when run inside one, which `--system-site-packages` would miss) are made visible by a .pth
    # listing its site directories; dus is installed into the venv from the wheel, and must be
    # the one imported (a .pth adds directories without running their own .pth files, so an
    # editable install of the checkout stays out).
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    inner = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                           capture_output=True, text=True).stdout.strip()
    import site

    outer = [*site.getsitepackages(), site.getusersitepackages()]
    (Path(inner) / "_dus_test_outer_packages.pth").write_text("".join(f"{path}\n" for path in outer))
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True, capture_output=True, timeout=300)
    return venv


def dus(venv: Path, cwd: Path, *args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(WANDB_MODE="disabled", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}")
    return subprocess.run([str(venv / "bin" / "dus"), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_installed_wheel_runs_on_its_shipped_defaults(installed, tiny_models, tmp_path):
    from dus.build import build_model

    source = tiny_models("llama", 4)
    built = tmp_path / "built"
    build_model({"solar": {"model": str(source), "trim": 1}}, built)
    empty = tmp_path / "empty"
    empty.mkdir()
    where = subprocess.run([str(installed / "bin" / "python"), "-c", "import dus, sys; print(dus.__file__)"], cwd=empty,
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    assert str(installed) in where.stdout, where  # the wheel's dus, not the checkout's

    fast = ["--steps", 1, "--batch-size", 2, "--max-length", 32, "--report-to", "none", "--set", "calibrate.tokens=64",
            "--set", "calibrate.window=32"]
    healed = dus(installed, empty, "heal", built, "-o", tmp_path / "healed", *fast)
    assert healed.returncode == 0, healed.stderr[-3000:]
    record = json.loads((tmp_path / "healed" / "dus-manifest.json").read_text())["history"][-1]
    assert "_shipped/data/" in record["data"]["path"]

    full = dus(installed, empty, "heal", built, "-c", "full", "-o", tmp_path / "full", *fast)
    assert full.returncode == 0, full.stderr[-3000:]
    assert "_shipped/train/full.yaml" in json.loads((tmp_path / "full" / "dus-manifest.json").read_text())["history"][-1]["config_file"]

    compared = dus(installed, empty, "compare", source, built, "-o", tmp_path / "report", "--window", 32, "--max-tokens", 96,
                   "--max-new-tokens", 4)
    assert compared.returncode == 0, compared.stderr[-3000:]
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert "chat" in metrics["data"] and len(metrics["data"]) >= 3  # every shipped held-out text
    assert metrics["models"][0]["generations"]  # the shipped default prompts

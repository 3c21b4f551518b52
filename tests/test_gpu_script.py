"""The GPU run's script (benchmarks/gpu/run.sh), dry-run on the CPU with a tiny shape.

The device run happens only in the sessions that are lent a GPU; this keeps the same script,
stage by stage, working in between. Only QLoRA (bitsandbytes needs CUDA) is skipped here, and
wandb, bitsandbytes and deepspeed are hidden from the stages, as they are absent on the device.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "benchmarks" / "gpu" / "run.sh"
STEPS, BATCH, SEQ = 3, 2, 64
TRAINING = ["heal_band", "trl_band", "heal_lora_student", "heal_default"]

pytestmark = pytest.mark.gpu_script


def dry_run(tmp: Path, **settings) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "SHAPE": "tiny", "DEVICE": "cpu", "DTYPE": "float32", "STEPS": str(STEPS),
           "BATCH": str(BATCH), "SEQ": str(SEQ), "WHEELS": "none", "PYTHON": sys.executable,
           "OUT": str(tmp / "out"), "WORK": str(tmp / "work"), "OMP_NUM_THREADS": "1",
           "DUS_GPU_HIDE_MODULES": "wandb,bitsandbytes,deepspeed",
           # the device's time limits would cut a dry run on a busy CPU short
           "DEADLINE_S": "3000", "STAGE_TIMEOUT_S": "600", **settings}
    done = subprocess.run(["bash", str(RUN)], env=env, capture_output=True, text=True, timeout=1500)
    results = tmp / "out" / "gpu.json"
    assert results.is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    return done, json.loads(results.read_text())


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    return dry_run(tmp_path_factory.mktemp("gpu-dry-run"))


def test_every_stage_runs_and_only_qlora_stages_are_skipped(full_run):
    done, results = full_run
    assert done.returncode == 0, done.stdout[-3000:]
    stages = results["stages"]
    assert list(stages) == ["environment", "source", "build", "heal_band", "trl_band", "heal_qlora",
                            "heal_default", "heal_lora_student", "compare", "trl_qlora"]
    failed = {name: stage.get("error") for name, stage in stages.items() if stage["status"] == "failed"}
    assert not failed, failed
    qlora = ("heal_qlora", "trl_qlora")
    assert all(stages[name]["status"] == "skipped" and "CUDA" in stages[name]["reason"] for name in qlora)
    assert all(stage["status"] == "ok" for name, stage in stages.items() if name not in qlora)
    assert Path(stages["environment"]["dus"]).is_relative_to(REPO)  # this checkout's dus ran
    log = (Path(results["settings"]["out"]) / "gpu.log").read_text()
    assert "=== compare: ok" in log


def test_training_stages_measure_the_same_work_and_save_models_that_reload(full_run):
    _, results = full_run
    stages = results["stages"]
    assert stages["build"]["layers"] == 12  # SOLAR 8 -> 2 x (8 - 2)
    for name in TRAINING:
        stage = stages[name]
        assert stage["logged_steps"] == STEPS, name
        assert stage["tokens_per_step"] == BATCH * SEQ, name  # packed: every sequence full
        assert stage["tokens_per_second"] > 0, name
        if name != "trl_band":  # the TRL reference saves nothing
            assert stage["reloaded"] and stage["reload_layers"] == 12, name
        assert 0 < stage["trainable_parameters"] < stage["parameters_seen"], name
        # forward of student and teacher at least; no MFU against a GPU peak on a CPU
        assert stage["model_flops_per_token"] > 2 * stage["parameters_seen"] and stage["mfu"] is None, name
    band, trl = stages["heal_band"], stages["trl_band"]
    assert band["trains"] == "band" and stages["heal_lora_student"]["trains"] == "lora"
    assert band["teacher"] and band["steps"] == STEPS
    assert band["calibration"] is None and stages["heal_default"]["calibration"]["layers"]  # only the default calibrates
    assert stages["heal_default"]["trainable_parameters"] == band["trainable_parameters"]
    assert trl["trainable_parameters"] == band["trainable_parameters"]  # the same layers train
    assert trl["dus_over_trl_tokens_per_second"] > 0
    assert stages["heal_lora_student"]["trainable_parameters"] < band["trainable_parameters"]


def test_compare_scores_both_models_and_times_the_bare_loop(full_run):
    _, results = full_run
    compare = results["stages"]["compare"]
    assert len(compare["perplexities"]) == 2 and all(math.isfinite(p) and p > 1 for p in compare["perplexities"])
    assert compare["bare_perplexities"] == pytest.approx(compare["perplexities"], rel=1e-4)  # the same windows
    assert compare["bare"]["process_seconds"] > 0 and compare["bare_over_dus_throughput"] > 0


def test_a_failing_stage_is_recorded_and_the_next_still_runs(tmp_path):
    # a 1 s cap stops making the source (python and torch take longer to start); build then has
    # no source; trl_band has no heal_band to take its layers from
    done, results = dry_run(tmp_path, STAGES="source,build,trl_band", STAGE_TIMEOUT_S="1")
    assert done.returncode == 0
    source, build, trl = (results["stages"][name] for name in ("source", "build", "trl_band"))
    assert source["status"] == "failed" and "stopped after 1 s" in source["error"]
    assert build["status"] == "failed" and build["error"] and "output_tail" in build
    assert trl["status"] == "skipped" and "heal_band" in trl["reason"]


def test_the_mfu_formula():
    sys.path.insert(0, str(REPO / "benchmarks" / "gpu"))
    from gpu_bench import flops_per_token

    student = {"total": 100, "layers": [10] * 8, "top": 15}
    teacher = {"total": 60}
    # forward 2 x 100, teacher 2 x 60, backprop through layers 5..7 and the top, weights of 20 trained
    assert flops_per_token(student, [5, 6], 20, teacher) == 200 + 120 + 2 * (30 + 15) + 40

"""Every CPU launch config really runs what it says: DDP, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3,
full fine-tuning and LoRA, a resumed sharded run, two simulated nodes (launch/multi-node.yaml)
and launch/slurm.sh with stub SLURM tools.

Each run is a real `accelerate launch` of two gloo processes on a tiny model. What ran is read
from the heal record, which takes it from the trainer's accelerator; an exit code proves
nothing (accelerate's fallbacks to DDP or to lone processes all exit 0). Runs are shared
between tests through module-scoped fixtures; each takes 10-20 s on two busy cores.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import changed_layers, tensors, write_addition_chats

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SEAM_BAND = {"1", "2", "3", "4"}  # SOLAR of a 4-layer model with trim 1: 6 layers, seam at 3, radius 2
TIMEOUT = 600  # the first DeepSpeed run compiles a small C++ op (about a minute)

try:
    import deepspeed  # noqa: F401

    DEEPSPEED_MISSING = None
except Exception as error:  # noqa: BLE001 - any import failure means: no DeepSpeed here
    DEEPSPEED_MISSING = f"DeepSpeed is not importable ({type(error).__name__}: {error}); pip install deepspeed"

# kind -> (launch config, distributed_type the record must show, fsdp_version, zero_stage)
KINDS = {
    "ddp": ("cpu-2proc.yaml", "MULTI_CPU", None, None),
    "fsdp": ("cpu-fsdp.yaml", "FSDP", 2, None),
    "zero2": ("cpu-zero2.yaml", "DEEPSPEED", None, 2),
    "zero3": ("cpu-zero3.yaml", "DEEPSPEED", None, 3),
}
MODES = {
    # 4 steps at a constant rate, so that a 2-step run resumed to 4 must end at the same place
    "full": ["-c", "full", "--lr", "1e-3"],
    "lora": ["-c", "lora-seam", "--lr", "1e-2"],
}
COMMON = [
    "--report-to", "none", "--max-length", "64", "--batch-size", "4", "--seed", "7",
    "--set", "sft.activation_checkpointing=false", "--set", "sft.logging_steps=1",
    "--set", "sft.warmup_steps=0", "--set", "sft.lr_scheduler_type=constant",
    # calibration before training: under ZeRO-3 it must gather (and change) partitioned weights,
    # and a sharded LoRA run must re-apply it to the base it merges into
    "--set", "calibrate.enabled=true", "--set", "calibrate.tokens=256", "--set", "calibrate.window=64",
    # no 1.0 among the candidates: on a random model any factor may score best, and the
    # tests need a scaled base to check that it survives sharding and merging
    "--set", "calibrate.factors=[0.8, 0.6]",
]
CPU_FSDP_LINE = "FSDP launch without a GPU: dus runs FSDP on the CPU over gloo"


def kind_param(kind: str):
    marks = [pytest.mark.skipif(DEEPSPEED_MISSING is not None, reason=DEEPSPEED_MISSING or "")] \
        if kind.startswith("zero") else []
    return pytest.param(kind, marks=marks, id=kind)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update({
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline",
    })
    env.update(extra)
    return env


def launch_command(config: str, *dus_args, launch_flags=()) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH / config),
            "--main_process_port", str(free_port()), *launch_flags, "-m", "dus", "heal", *map(str, dus_args)]


class Run:
    def __init__(self, out: Path, done: subprocess.CompletedProcess, seconds: float):
        self.out, self.stderr, self.seconds = out, done.stderr, seconds

    @property
    def record(self) -> dict:
        return json.loads((self.out / "dus-manifest.json").read_text())["history"][-1]


def launch(out: Path, config: str, *dus_args, launch_flags=(), expect_ok: bool = True):
    started = time.time()
    done = subprocess.run(launch_command(config, *dus_args, launch_flags=launch_flags), env=child_env(),
                          capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO)
    if expect_ok:
        assert done.returncode == 0, done.stderr[-4000:]
    return Run(out, done, time.time() - started)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    from dus.build import build_model
    from dus.tiny import make_tiny_model

    source = make_tiny_model(root / "source", "llama", num_layers=4, seed=1)
    build_model({"solar": {"model": str(source), "trim": 1}}, root / "built")
    write_addition_chats(root / "chat.jsonl")
    return root


@pytest.fixture(scope="module")
def runs(workspace):
    """runs(kind, mode) -> the Run of `accelerate launch --config_file launch/cpu-<kind>.yaml
    ... -c <mode>`, launched once per module."""
    done: dict[tuple[str, str], Run] = {}

    def get(kind: str, mode: str) -> Run:
        if (kind, mode) not in done:
            out = workspace / f"{kind}-{mode}"
            done[kind, mode] = launch(out, KINDS[kind][0], workspace / "built", "-o", out,
                                      "--data", workspace / "chat.jsonl", *MODES[mode], *COMMON, "--steps", "4")
        return done[kind, mode]

    return get


def max_difference(a: Path, b: Path) -> float:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    return max((ta[name].float() - tb[name].float()).abs().max().item() for name in ta)


def assert_ran_as(run: Run, kind: str) -> None:
    _, distributed_type, fsdp_version, zero_stage = KINDS[kind]
    record = run.record
    assert (record["distributed_type"], record["fsdp_version"], record["zero_stage"]) == (
        distributed_type, fsdp_version, zero_stage), record
    assert record["world_size"] == 2 and record["backend"] == "gloo" and record["device"].startswith("cpu")
    assert record["global_batch"] == 4 * 2 * 1 and record["mixed_precision"] == "no"
    # rank 0 alone says that it corrected accelerate's choice, and only for FSDP
    assert run.stderr.count(CPU_FSDP_LINE) == (1 if kind == "fsdp" else 0), run.stderr[-3000:]


def assert_digests_fit(record: dict, kind: str) -> None:
    """Ranks holding whole weights hash them and agree; ranks holding shards do not pretend
    to: the gathered weights are hashed once, on rank 0."""
    if kind in ("fsdp", "zero3"):
        assert record["rank_digests"] is None and record["ranks_agree"] is None
        assert len(record["gathered_digest"]) == 64
    else:
        assert len(record["rank_digests"]) == 2 and record["ranks_agree"] is True
        assert "gathered_digest" not in record


# --- what ran, and what it produced -----------------------------------------------------

def test_ddp_reference_runs_as_multi_cpu_and_trains(runs, workspace):
    run = runs("ddp", "full")
    assert_ran_as(run, "ddp")
    assert_digests_fit(run.record, "ddp")
    assert run.record["steps"] == 4
    # far above the tolerance the sharded runs are held to below (5e-6)
    assert max_difference(workspace / "built", run.out) > 1e-3


@pytest.mark.parametrize("kind", [kind_param(k) for k in ("fsdp", "zero2", "zero3")])
def test_sharded_full_fine_tuning_ends_with_the_ddp_weights(kind, runs):
    run = runs(kind, "full")
    assert_ran_as(run, kind)
    assert_digests_fit(run.record, kind)
    assert run.record["steps"] == 4 and run.record["calibration"]["layers"] == [3, 4]
    # same seed, same global batch: the same model, to float32 rounding (sharded reductions
    # sum in another order; seen up to 1.8e-6 after 4 steps at lr 1e-3), 1000x below training's change
    assert max_difference(runs("ddp", "full").out, run.out) <= 5e-6


@pytest.mark.parametrize("kind", [kind_param(k) for k in ("ddp", "fsdp", "zero2", "zero3")])
def test_lora_changes_the_seam_band_and_nothing_else(kind, runs, workspace):
    run = runs(kind, "lora")
    assert_ran_as(run, kind)
    assert_digests_fit(run.record, kind)
    # DDP heals the build plan in memory; sharded launches heal the checkpoint as built, saying so once
    assert run.record["in_memory"] is (kind == "ddp"), run.record["built_because"]
    assert run.stderr.count("healing the checkpoint as built: FSDP and DeepSpeed shard") == (kind != "ddp")
    changed = changed_layers(workspace / "built", run.out)
    assert set(changed) == SEAM_BAND
    assert not any("norm" in name for names in changed.values() for name in names)
    adapter = load_file(run.out / "adapter" / "adapter_model.safetensors")
    assert adapter and not any("_fsdp_wrapped_module" in name for name in adapter)
    assert {name.split(".layers.")[1].split(".")[0] for name in adapter} == SEAM_BAND
    assert run.record["calibration"]["factor"] < 1  # merged onto the calibrated base, sharded or not
    if kind != "ddp":  # the gathered adapter, reloaded and merged, is the DDP run's
        assert max_difference(runs("ddp", "lora").out, run.out) <= 1e-6


@pytest.mark.parametrize("kind", [kind_param(k) for k in ("fsdp", "zero3")])
def test_resumed_sharded_run_ends_where_an_uninterrupted_run_does(kind, runs, workspace):
    out = workspace / f"{kind}-resumed"
    base = [workspace / "built", "-o", out, "--data", workspace / "chat.jsonl", *MODES["full"], *COMMON]
    config = KINDS[kind][0]
    first = launch(out, config, *base, "--steps", "2", "--save-steps", "2")
    assert first.record["steps"] == 2 and (out / "checkpoints" / "checkpoint-2").is_dir()
    resumed = launch(out, config, *base, "--steps", "4", "--save-steps", "2", "--resume")
    record = resumed.record
    assert_ran_as(resumed, kind)
    assert record["resumed_from"].endswith("checkpoint-2") and record["steps_this_run"] == 2
    assert record["steps"] == 4
    assert max_difference(runs(kind, "full").out, out) <= 1e-6


# --- what dus refuses or corrects --------------------------------------------------------

def test_fsdp1_with_lora_is_refused_before_training(workspace):
    out = workspace / "fsdp1-lora"
    run = launch(out, "cpu-fsdp.yaml", workspace / "built", "-o", out, "--data", workspace / "chat.jsonl",
                 *MODES["lora"], *COMMON, "--steps", "4", launch_flags=("--fsdp_version", "1"), expect_ok=False)
    errors = [line for line in run.stderr.splitlines() if line.startswith("dus: error:")]
    assert errors and all("LoRA under FSDP1 saves an empty adapter" in line for line in errors), run.stderr[-3000:]
    assert not out.exists()


def pretend_a_gpu(monkeypatch):
    """Make accelerate's backend choice see a CUDA device, through what it consults: torch's
    accelerator API by way of `get_torch_accelerator_backend` (accelerate 1.16 on), or
    `torch.cuda.is_available` (earlier releases)."""
    import accelerate.state

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    if hasattr(accelerate.state, "get_torch_accelerator_backend"):
        monkeypatch.setattr(accelerate.state, "get_torch_accelerator_backend", lambda *a, **k: ("cuda", torch.cuda))


def test_cpu_fsdp_correction_only_without_a_gpu(monkeypatch):
    """The correction is for an FSDP launch on a machine without an accelerator, and the
    patched backend choice leaves accelerate's own answer alone whenever it found a GPU."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    from dus.errors import DusError
    from dus.heal.distributed import check_supported, enable_fsdp_on_cpu, needs_cpu_fsdp

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert not needs_cpu_fsdp(None)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert needs_cpu_fsdp(None) and not needs_cpu_fsdp("cuda") and not needs_cpu_fsdp("mps")

    monkeypatch.setattr(PartialState, "_prepare_backend", PartialState._prepare_backend)  # restored afterwards
    monkeypatch.setenv("ACCELERATE_TORCH_DEVICE", "cpu")
    monkeypatch.setenv("LOCAL_RANK", "0")
    enable_fsdp_on_cpu()
    state = object.__new__(PartialState)
    assert PartialState._prepare_backend(state) == ("gloo", DistributedType.MULTI_GPU)  # no GPU here
    pretend_a_gpu(monkeypatch)
    assert PartialState._prepare_backend(state) == ("nccl", DistributedType.MULTI_GPU)  # accelerate's own

    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(DusError, match="FSDP1 without a GPU"):
        check_supported("full", None)
    check_supported("full", "cuda")
    with pytest.raises(DusError, match="LoRA under FSDP1"):
        check_supported("lora", "cuda")
    monkeypatch.setenv("FSDP_VERSION", "2")
    check_supported("lora", None)


# --- several nodes, simulated on loopback ------------------------------------------------

def listening(port: int) -> bool:
    """Whether some process on this machine listens on TCP `port` (read from /proc, no connection)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        if any(row.split()[1].endswith(f":{port:04X}") and row.split()[3] == "0A" for row in rows):
            return True
    return False


def test_two_nodes_from_multi_node_yaml(workspace):
    """Two `accelerate launch` commands, one per "node", meeting over 127.0.0.1.

    On one machine both nodes see the loopback address as their own and would both try to
    host the rendezvous store; node 1 therefore starts once node 0 listens on the port
    (on a real cluster only node 0 has that address)."""
    out, port = workspace / "two-nodes", free_port()
    commands = [
        launch_command("multi-node.yaml", workspace / "built", "-o", out, "--data", workspace / "chat.jsonl",
                       *MODES["full"], *COMMON, "--steps", "2",
                       launch_flags=("--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip",
                                     "127.0.0.1", "--main_process_port", str(port), "--num_processes", "2"))
        for rank in (0, 1)
    ]
    nodes = []
    try:
        for command in commands:
            nodes.append(subprocess.Popen(command, env=child_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, text=True))
            deadline = time.time() + 120
            while len(nodes) == 1 and not listening(port) and nodes[0].poll() is None and time.time() < deadline:
                time.sleep(0.2)
        errors = [node.communicate(timeout=TIMEOUT)[1] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node, stderr in zip(nodes, errors):
        assert node.returncode == 0, stderr[-4000:]
    record = json.loads((out / "dus-manifest.json").read_text())["history"][-1]
    assert (record["distributed_type"], record["world_size"], record["global_batch"]) == ("MULTI_CPU", 2, 8)
    assert record["ranks_agree"] is True and record["steps"] == 2
    assert record["mixed_precision"] == "bf16"  # the yaml's, which wins over dus's float32 CPU default


STUB_SRUN = r"""#!/bin/bash
# stub srun: one `bash -c CMD` per fake node (SLURM_NODEID 0..SLURM_NNODES-1). Node 0 goes first
# and the others follow once it listens on MAIN_PORT: on one machine every node would take the
# loopback address for its own and try to host the rendezvous. A failed node stops the others
# (--kill-on-bad-exit).
echo "srun $*" >> "$STUB_LOG"
while [[ "$1" == --* ]]; do shift; done
[ -n "$STUB_DRY" ] && exit 0
port=$(printf '%04X' "${MAIN_PORT:-29500}")
listening() { awk -v p=":$port" '$2 ~ p"$" && $4 == "0A" {found=1} END {exit !found}' /proc/net/tcp /proc/net/tcp6; }
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
  SLURM_NODEID=$node "$@" &
  pids+=($!)
  for ((try = 0; node == 0 && try < 1200; try++)); do
    listening && break
    kill -0 "${pids[0]}" 2>/dev/null || break
    sleep 0.1
  done
done
status=0
for _ in "${pids[@]}"; do
  if ! wait -n; then status=1; kill "${pids[@]}" 2>/dev/null; fi
done
exit $status
"""
STUB_SCONTROL = """#!/bin/bash
# stub scontrol: the job's nodes are loopback addresses
echo "scontrol $*" >> "$STUB_LOG"
[ "$1 $2" = "show hostnames" ] || exit 1
echo 127.0.0.1
echo 127.0.0.2
"""


def test_slurm_script_launches_every_node_at_the_first_nodes_address(workspace, tmp_path):
    """launch/slurm.sh under fake SLURM_* variables and stub scontrol/srun: the main address
    is the first host of the node list, each node gets its machine rank, the job trains as
    two ranks, and a requeued job adds --resume by itself."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL),
                       ("accelerate", f'#!/bin/bash\nexec "{sys.executable}" -m accelerate.commands.accelerate_cli "$@"\n')):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    out, log, port = workspace / "slurm", tmp_path / "stub.log", free_port()
    env = child_env(PATH=f"{stubs}{os.pathsep}{os.environ['PATH']}", STUB_LOG=str(log), SLURM_JOB_NODELIST="node[1-2]",
                    SLURM_NNODES="2", SLURM_GPUS_ON_NODE="1", MAIN_PORT=str(port))
    command = ["bash", str(LAUNCH / "slurm.sh"), str(workspace / "built"), str(out), "full",
               "--data", str(workspace / "chat.jsonl"), "--steps", "2", "--save-steps", "2", "--report-to", "none",
               "--max-length", "64", "--set", "sft.activation_checkpointing=false", "--set", "calibrate.enabled=false"]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-4000:]
    calls = log.read_text().splitlines()
    assert calls[0] == "scontrol show hostnames node[1-2]"
    srun = calls[1]
    for flag in ("--num_machines 2", "--num_processes 2", "--machine_rank $SLURM_NODEID",
                 "--main_process_ip 127.0.0.1", f"--main_process_port {port}", "--rdzv_backend c10d"):
        assert flag in srun, srun
    assert "--resume" not in srun
    record = json.loads((out / "dus-manifest.json").read_text())["history"][-1]
    assert (record["distributed_type"], record["world_size"], record["ranks_agree"]) == ("MULTI_CPU", 2, True)

    requeued = subprocess.run(command, env={**env, "STUB_DRY": "1"}, cwd=REPO, capture_output=True, text=True,
                              timeout=60)
    assert requeued.returncode == 0, requeued.stderr
    assert f"-o {out} --resume " in log.read_text().splitlines()[-1]

"""The GPU run's stages: make a random Llama, `dus build` it, heal it four ways, compare.

Started by benchmarks/gpu/run.sh (read it first); settings come from the environment:

    SHAPE=7b|tiny        7b: Llama-2-7B's shape (32 layers, hidden 4096, intermediate 11008,
                         32 heads, vocabulary 32000); tiny: the same structure, small (CPU dry run)
    DEVICE=cuda|cpu      where the model is made (training goes where torch finds a GPU)
    DTYPE=bfloat16       the source model's dtype; bf16 training is on when DEVICE=cuda
    STEPS=5 BATCH=2 SEQ=512   every training stage runs STEPS steps of BATCH x SEQ tokens
    TRIM                 SOLAR trim (default: a quarter of the layers: 32 -> 48)
    COMPARE_TOKENS       held-out tokens each model scores in the compare stage
    WORK                 scratch directory for the models (the device's own disk)
    DEADLINE_S=420       no stage starts after this many seconds, and a running one is stopped
    STAGE_TIMEOUT_S=200  no one stage (process) runs longer than this
    STAGES               comma-separated subset of stage names (default: all, in order)
    PEAK_TFLOPS=989      the MFU denominator: H200 dense bf16 by the datasheet
    OUT                  results: OUT/gpu.json (rewritten after every stage)

Each stage runs in its own process under measure.py (so peak memory is that stage's own) and
is independent: one that fails records its error and the next one still runs. Trained
outputs are reloaded (one forward pass must give finite logits) and then deleted, to keep
the device's disk free for the next stage.

MFU: model FLOPs per trained token, counted from the configs (attention's sequence-length
terms left out, under 3% at SEQ 512 and hidden 4096):
    2 * N_student            forward of the whole student
  + 2 * N_teacher            forward of the teacher (distillation stages)
  + 2 * N_backprop           gradients w.r.t. activations, through every layer from the lowest
                             trained one up, the final norm and the LM head
  + 2 * N_trainable          gradients w.r.t. the trained weights (LoRA: the adapters)
divided by PEAK_TFLOPS. Recomputation (activation checkpointing) is not counted: it is cost,
not model work. 4-bit weights count at their full size.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {
    "7b": dict(num_layers=32, hidden_size=4096, intermediate_size=11008, num_heads=32, num_kv_heads=32),
    "tiny": dict(num_layers=8, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=4),
}
VOCAB = 32000
# In order of what matters most should the deadline cut the run short: the default heal's training
# and its TRL counterpart, the CUDA-only QLoRA path, the default heal exactly as users run it
# (calibration included, which dus runs on the CPU before the Trainer moves the model to the GPU:
# possibly minutes at 10B, hence after the training figures and capped by STAGE_TIMEOUT_S; the
# log's stamped lines time each calibration factor even if it is stopped), the LoRA student, compare.
STAGES = ["environment", "source", "build", "heal_band", "trl_band", "heal_qlora", "heal_default",
          "heal_lora_student", "compare", "trl_qlora"]


class Skip(Exception):
    """A stage that cannot run here; the reason goes into the JSON."""


def settings() -> dict:
    env = os.environ
    shape = env.get("SHAPE", "7b")
    device = env.get("DEVICE", "cuda")
    layers = SHAPES[shape]["num_layers"]
    return {
        "shape": shape, "device": device, "dtype": env.get("DTYPE", "bfloat16"),
        "steps": int(env.get("STEPS", 5)), "batch": int(env.get("BATCH", 2)), "seq": int(env.get("SEQ", 512)),
        "trim": int(env.get("TRIM", layers // 4)),
        "compare_tokens": int(env.get("COMPARE_TOKENS", 16384 if shape == "7b" else 512)),
        "work": env.get("WORK", "/tmp/dus-gpu"), "out": env.get("OUT", "out/gpu"),
        "deadline_s": float(env.get("DEADLINE_S", 420)), "stage_timeout_s": float(env.get("STAGE_TIMEOUT_S", 200)),
        "peak_tflops": float(env.get("PEAK_TFLOPS", 989)),
        "stages": [s for s in env.get("STAGES", ",".join(STAGES)).split(",") if s],
    }


class Run:
    """Settings, paths, the results so far, and the subprocess runner."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.began = time.perf_counter()
        self.work, self.out = Path(cfg["work"]), Path(cfg["out"])
        self.work.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.source, self.built = self.work / "source", self.work / "built"
        self.results: dict = {"settings": cfg, "stages": {}}
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                    "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
                    "PYTHONUNBUFFERED": "1", "HF_DATASETS_CACHE": str(self.work / "datasets-cache")}

    def left(self) -> float:
        return self.cfg["deadline_s"] - (time.perf_counter() - self.began)

    @property
    def cuda(self) -> bool:
        return self.cfg["device"] == "cuda"

    def measured(self, name: str, target: list[str], reload: Path | None = None, train: bool = False) -> dict:
        """Run `target` under measure.py, streaming its output; its metrics, or an error with its tail.
        `process_seconds` is the whole process, start-up and imports included."""
        metrics = self.work / f"metrics-{name}.json"
        metrics.unlink(missing_ok=True)
        command = [sys.executable, str(HERE / "measure.py"), str(metrics), *(["--train"] if train else []),
                   *(["--reload", str(reload)] if reload else []), "--", *target]
        print("$ " + " ".join(arg if len(arg) < 120 else " ".join(arg[:60].split()) + "..." for arg in target),
              flush=True)
        started = time.perf_counter()
        tail: collections.deque = collections.deque(maxlen=40)
        process = subprocess.Popen(command, env=self.env, cwd=REPO, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, errors="replace")
        # killed at the deadline, so that gpu.json is written before the device call's own limit
        allowed = max(min(self.left(), self.cfg["stage_timeout_s"]), 1.0)
        stopped = threading.Event()
        watchdog = threading.Timer(allowed, lambda: (stopped.set(), process.kill()))
        watchdog.start()
        try:
            for line in process.stdout:  # stamped with the stage's seconds: the log shows where time goes
                print(f"{time.perf_counter() - started:7.1f} | {line}", end="", flush=True)
                tail.append(line)
            process.wait()
        finally:
            watchdog.cancel()
        self.last_output = list(tail)
        result = json.loads(metrics.read_text()) if metrics.is_file() else {}
        result["process_seconds"] = time.perf_counter() - started
        if process.returncode != 0 or "error" in result:
            result.setdefault("error", f"stopped after {allowed:.0f} s (STAGE_TIMEOUT_S or DEADLINE_S)"
                              if stopped.is_set() else f"exit status {process.returncode}")
            result["output_tail"] = "".join(tail)[-3000:]
            raise StageFailed(result)
        return result

    def save(self) -> None:
        self.results["elapsed_seconds"] = time.perf_counter() - self.began
        (self.out / "gpu.json").write_text(json.dumps(self.results, indent=2) + "\n")


class StageFailed(Exception):
    def __init__(self, result: dict):
        super().__init__(result.get("error"))
        self.result = result


# --- parameter counts and MFU --------------------------------------------------------------

def sizes(model_dir: Path) -> dict:
    """Parameter counts per part, from the config alone (the model is made on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    layers = [count(layer) for layer in model.model.layers]
    return {"total": count(model), "layers": layers,
            "top": count(model.lm_head) + count(model.model.norm)}  # above the stack


def flops_per_token(student: dict, trained_layers: list[int], trainable: int, teacher: dict | None) -> float:
    """The module docstring's formula."""
    lowest = min(trained_layers) if trained_layers else len(student["layers"])
    backprop = sum(student["layers"][lowest:]) + student["top"]
    return 2 * student["total"] + 2 * (teacher["total"] if teacher else 0) + 2 * backprop + 2 * trainable


def add_mfu(run: Run, result: dict, layers: list[int], distill: bool) -> None:
    if "tokens_per_second" not in result:
        return
    flops = flops_per_token(sizes(run.built), layers, result.get("trainable_parameters", 0),
                            sizes(run.source) if distill else None)
    result["model_flops_per_token"] = flops
    result["tflops"] = result["tokens_per_second"] * flops / 1e12
    # an MFU against the GPU's bf16 peak means nothing on a CPU
    result["mfu"] = result["tflops"] / run.cfg["peak_tflops"] if run.cuda else None


# --- stages --------------------------------------------------------------------------------

PROBE = r"""
import importlib, importlib.metadata as md, json, platform, sys
import torch
out = {"python": platform.python_version(), "cuda_available": torch.cuda.is_available(), "versions": {},
       "import_errors": {}}
for name in ["torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "gguf", "safetensors",
             "numpy", "pyarrow", "fsspec", "huggingface_hub", "dill", "multiprocess", "wandb"]:
    try:
        out["versions"][name] = md.version(name)
    except md.PackageNotFoundError:
        out["versions"][name] = None
needed = ["trl", "datasets", "peft", "gguf", "dus.cli"] + (["bitsandbytes"] if torch.cuda.is_available() else [])
for name in needed:
    try:
        importlib.import_module(name)
    except Exception as error:
        out["import_errors"][name] = f"{type(error).__name__}: {error}"
import dus
out["dus"] = dus.__file__  # the repository's own dus (PYTHONPATH), not one installed elsewhere
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    out.update(gpu=props.name, gpu_memory_gb=props.total_memory / 2**30, cuda=torch.version.cuda)
print(json.dumps(out))
"""


def stage_environment(run: Run) -> dict:
    """Versions, the GPU, free disk, and whether everything the stages import imports (in a child
    process, so that this one never holds a CUDA context)."""
    done = subprocess.run([sys.executable, "-c", PROBE], env=run.env, cwd=REPO, capture_output=True, text=True,
                          timeout=max(run.left(), 1.0))
    if done.returncode != 0:
        raise RuntimeError(f"the environment probe failed: {done.stderr[-2000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["work_disk_free_gb"] = shutil.disk_usage(run.work).free / 1e9
    if run.cuda and not out["cuda_available"]:
        raise RuntimeError("DEVICE=cuda but torch sees no GPU")
    if out["import_errors"]:
        raise RuntimeError(f"imports failed: {out['import_errors']}")
    return out


def stage_source(run: Run) -> dict:
    if (run.source / "model.safetensors.index.json").is_file() or (run.source / "model.safetensors").is_file():
        return {"reused": str(run.source)}  # a warm machine keeps WORK between calls
    shutil.rmtree(run.source, ignore_errors=True)
    cfg = run.cfg
    result = run.measured("source", [str(HERE / "gpu_bench.py"), "make-source", str(run.source), cfg["shape"],
                                     cfg["device"], cfg["dtype"]])
    result["parameters"] = sizes(run.source)["total"]
    return result


def stage_build(run: Run) -> dict:
    if (run.built / "dus-manifest.json").is_file():
        return {"reused": str(run.built)}
    shutil.rmtree(run.built, ignore_errors=True)
    result = run.measured("build", ["-m", "dus", "build", "--solar", str(run.source), "--trim", str(run.cfg["trim"]),
                                    "-o", str(run.built), "--quiet"])
    config = json.loads((run.built / "config.json").read_text())
    result.update(layers=config["num_hidden_layers"], parameters=sizes(run.built)["total"],
                  gigabytes=sum(f.stat().st_size for f in run.built.glob("*.safetensors")) / 1e9)
    return result


def heal_flags(run: Run) -> list[str]:
    """The same steps, batch, length, learning rate and logging for every dus heal stage."""
    cfg = run.cfg
    bf16 = "true" if run.cuda and cfg["dtype"] == "bfloat16" else "false"
    return ["--steps", str(cfg["steps"]), "--batch-size", str(cfg["batch"]), "--max-length", str(cfg["seq"]),
            "--lr", "2e-4", "--report-to", "none",
            "--set", f"sft.bf16={bf16}", "--set", "sft.lr_scheduler_type=constant", "--set", "sft.warmup_steps=0",
            "--set", "sft.logging_steps=1", "--set", "sft.save_steps=100000", "--set", "sft.seed=0",
            "--set", "sft.dataloader_num_workers=0"]


def heal_record(out: Path) -> dict:
    """The last history entry of the healed model's manifest: what dus says it did."""
    return json.loads((out / "dus-manifest.json").read_text())["history"][-1]


def dus_heal(run: Run, name: str, extra: list[str]) -> dict:
    out = run.work / name
    shutil.rmtree(out, ignore_errors=True)
    try:
        result = run.measured(name, ["-m", "dus", "heal", str(run.built), "-o", str(out), *heal_flags(run), *extra],
                              reload=out, train=True)
        record = heal_record(out)
        result.update({key: record.get(key) for key in ("mode", "trains", "layers", "lora_modules", "teacher", "steps",
                                                        "tokens", "final_loss", "calibration")})
        result["settings_used"] = {key: record["config"]["sft"].get(key) for key in
                                   ("bf16", "activation_checkpointing", "per_device_train_batch_size", "max_length")}
        add_mfu(run, result, record["layers"], distill=bool(record.get("teacher")))
        return result
    finally:
        shutil.rmtree(out, ignore_errors=True)  # 20 GB at 7B: the next stage needs the disk


def stage_heal_band(run: Run) -> dict:
    """The default heal's training: distillation from the source into the seam band, all their
    parameters; calibration off (heal_default has it), so that its cost cannot starve the rest."""
    return dus_heal(run, "heal_band", ["--set", "calibrate.enabled=false"])


def stage_heal_default(run: Run) -> dict:
    """`dus heal` exactly as users run it: calibration, then distillation into the seam band."""
    return dus_heal(run, "heal_default", [])


def stage_trl_band(run: Run) -> dict:
    """bench_heal.py's plain TRL script (band unfrozen, KL to the teacher in compute_loss), same
    settings. It saves nothing: TRL's save_model is not under test, and 20 GB written and read
    back would cost the stages after it their device time."""
    band = run.results["stages"].get("heal_band", {})
    if band.get("status") != "ok":
        raise Skip("needs the layers and teacher heal_band recorded, and heal_band did not succeed")
    cfg, out = run.cfg, run.work / "trl_band"
    spec = {"model": str(run.built), "data": str(REPO / "data" / "text" / "train.jsonl"), "batch_size": cfg["batch"],
            "max_length": cfg["seq"], "packing": True, "steps": cfg["steps"], "out": str(out),
            "layers": band["layers"], "teacher": band["teacher"], "device": cfg["device"],
            "dtype": cfg["dtype"], "bf16": run.cuda and cfg["dtype"] == "bfloat16", "save": False}
    result = trl_child(run, "trl_band", "trl-distill", spec, out)
    add_mfu(run, result, band["layers"], distill=True)
    return with_trl_ratios(band, result)


def with_trl_ratios(dus: dict, trl: dict) -> dict:
    """The TRL stage's result with dus/TRL ratios of tokens/s and peak GPU memory, where both have them."""
    for key, ratio in (("tokens_per_second", "dus_over_trl_tokens_per_second"),
                       ("peak_gpu_allocated_gb", "dus_over_trl_peak_gpu")):
        if dus.get(key) and trl.get(key):
            trl[ratio] = dus[key] / trl[key]
    return trl


def stage_heal_lora_student(run: Run) -> dict:
    """Distillation with a LoRA student on the band instead of its full parameters. Calibration
    off: heal_band has measured it, it is not in tokens/s, and dus runs it before the Trainer
    moves the model to the GPU (on the CPU, minutes at this size)."""
    return dus_heal(run, "heal_lora_student", ["--set", "distill.student=lora", "--set", "calibrate.enabled=false"])


def stage_heal_qlora(run: Run) -> dict:
    """train/qlora.yaml: the model in 4 bits through bitsandbytes, LoRA on the seam (SFT on the text)."""
    import torch

    if not torch.cuda.is_available():
        raise Skip("QLoRA loads the model in 4 bits with bitsandbytes, which needs a CUDA GPU")
    try:
        return dus_heal(run, "heal_qlora", ["-c", "qlora"])
    except StageFailed as failed:
        # QLoRA heals in memory with calibration (scale rules on the 4-bit layers' outputs), a
        # path first run on a GPU here: once more without calibration, so that a failure there
        # still leaves QLoRA's own figures
        if run.left() > 60:
            try:
                failed.result["retry_without_calibration"] = dus_heal(
                    run, "heal_qlora", ["-c", "qlora", "--set", "calibrate.enabled=false"])
            except StageFailed as again:
                failed.result["retry_without_calibration"] = {"status": "failed", **again.result}
        raise


def stage_trl_qlora(run: Run) -> dict:
    """bench_heal.py's plain TRL LoRA script with the model in 4 bits, on the layers and modules
    heal_qlora recorded, the same data, steps and activation checkpointing: QLoRA's dus/TRL ratios."""
    import torch

    if not torch.cuda.is_available():
        raise Skip("QLoRA loads the model in 4 bits with bitsandbytes, which needs a CUDA GPU")
    qlora = run.results["stages"].get("heal_qlora", {})
    done = qlora if qlora.get("status") == "ok" else qlora.get("retry_without_calibration") or {}
    if not done.get("layers") or "error" in done:
        raise Skip("needs the layers and LoRA modules heal_qlora recorded, and heal_qlora did not succeed")
    cfg, out = run.cfg, run.work / "trl_qlora"
    spec = {"model": str(run.built), "data": str(REPO / "data" / "text" / "train.jsonl"), "batch_size": cfg["batch"],
            "max_length": cfg["seq"], "packing": True, "steps": cfg["steps"], "out": str(out),
            "layers": done["layers"], "lora_modules": done["lora_modules"], "device": cfg["device"],
            "dtype": cfg["dtype"], "bf16": True, "load_in_4bit": True,
            "activation_checkpointing": bool(done["settings_used"]["activation_checkpointing"])}
    result = trl_child(run, "trl_qlora", "trl", spec, out)  # the adapter it saves is small: no reload check
    add_mfu(run, result, done["layers"], distill=False)
    return with_trl_ratios(done, result)


def trl_child(run: Run, stage: str, kind: str, spec: dict, out: Path) -> dict:
    """bench_heal.py's plain TRL script (`--child KIND`) measured as a training stage, its
    output directory removed before and after."""
    shutil.rmtree(out, ignore_errors=True)
    try:
        return run.measured(stage, [str(REPO / "benchmarks" / "bench_heal.py"), "--child", kind,
                                    "--spec", json.dumps(spec)], train=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def stage_compare(run: Run) -> dict:
    """`dus compare` of source and build against bench_compare.py's bare loop over the same windows
    (one process per model), each timed as a whole process, imports and loading included, as
    bench_compare.py times them."""
    from benchmarks.bench_compare import BARE

    cfg, text = run.cfg, REPO / "data" / "heldout.txt"
    window, tokens = str(min(512, cfg["seq"])), str(cfg["compare_tokens"])
    report = run.work / "compare"
    shutil.rmtree(report, ignore_errors=True)
    dus = run.measured("compare", ["-m", "dus", "compare", str(run.source), str(run.built), "--data", str(text),
                                   "--window", window, "--stride", window, "--max-tokens", tokens, "--no-generate",
                                   "-o", str(report)])
    metrics = json.loads((report / "metrics.json").read_text())
    # the bare loop once per model, both in one process, as dus compare scores both in one
    both = (f"BARE = {BARE!r}\nimport sys\nmodels, rest = sys.argv[1:3], sys.argv[3:]\n"
            "for model in models:\n    sys.argv = ['-c', model, *rest]\n    exec(BARE, {'__name__': '__main__'})\n")
    bare = run.measured("compare_bare", ["-c", both, str(run.source), str(run.built), str(text), window, tokens,
                                         cfg["device"]])
    # the bare loop prints "perplexity tokens" per model: the same windows must give the same numbers
    printed = [line.split() for line in run.last_output]
    bare_perplexities = [float(words[0]) for words in printed if len(words) == 2 and words[1].isdigit()]
    return {"dus": dus, "bare": bare, "perplexities": [m["perplexity"]["perplexity"] for m in metrics["models"]],
            "bare_perplexities": bare_perplexities, "tokens_per_model": int(tokens),
            "bare_over_dus_throughput": bare["process_seconds"] / dus["process_seconds"]}


# --- the model maker (run as `gpu_bench.py make-source DIR SHAPE DEVICE DTYPE`) -----------------

def make_source(path: str, shape: str, device: str, dtype: str) -> None:
    """A random-init Llama, initialised on DEVICE (seconds on a GPU, where 6.7B on a CPU takes
    minutes), saved as safetensors with dus.tiny's local byte-level tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from dus.tiny import tiny_config, tiny_tokenizer

    config = tiny_config("llama", vocab_size=VOCAB, max_position_embeddings=4096, tie_word_embeddings=False,
                         **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(path, max_shard_size="5GB")
    tiny_tokenizer().save_pretrained(path)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(path)
    Path(path, "README.md").write_text("---\nlicense: apache-2.0\n---\nRandom-init Llama made by benchmarks/gpu.\n")
    print(f"made {path}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, {dtype}")


def main() -> None:
    if sys.argv[1:2] == ["make-source"]:
        make_source(*sys.argv[2:6])
        return
    run = Run(settings())
    print(f"settings: {json.dumps(run.cfg)}", flush=True)
    functions = {name: globals()[f"stage_{name}"] for name in STAGES}
    for name in run.cfg["stages"]:
        began = time.perf_counter()
        print(f"\n=== {name} ({run.left():.0f} s left)", flush=True)
        if run.left() < 0:
            entry = {"status": "skipped", "reason": f"past the {run.cfg['deadline_s']:.0f} s deadline"}
        else:
            try:
                entry = {"status": "ok", **functions[name](run)}
            except Skip as skip:
                entry = {"status": "skipped", "reason": str(skip)}
            except StageFailed as failed:
                entry = {"status": "failed", **failed.result}
            except Exception as error:  # noqa: BLE001 - a failing stage must not stop the others
                entry = {"status": "failed", "error": f"{type(error).__name__}: {error}",
                         "traceback": traceback.format_exc()[-3000:]}
        entry["stage_seconds"] = time.perf_counter() - began
        run.results["stages"][name] = entry
        run.save()
        print(f"=== {name}: {entry['status']} in {entry['stage_seconds']:.1f} s "
              f"{entry.get('error') or entry.get('reason') or ''}", flush=True)
    statuses = {name: entry["status"] for name, entry in run.results["stages"].items()}
    print(f"\nstages: {statuses}\nresults: {run.out / 'gpu.json'}", flush=True)


if __name__ == "__main__":
    main()

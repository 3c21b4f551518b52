"""Benchmark `dus heal`'s overhead: `dus heal` against a plain TRL SFTTrainer script on
the same model, data, trained layers and SFTConfig, in the same run. Each training runs in
its own process (so peak memory is its own), the two alternate, and the figures are
ratios dus / TRL: training tokens per second (measured between the first and last logged
step, so model loading and the warm-up step do not count) and peak resident memory.
Aim: dus at >= 0.95x TRL's throughput. (Which healing works is benchmarks/bench_healing.py.)

Two modes. `--mode lora` (LoRA SFT on the seam, the first default): the TRL script is
SFTTrainer with the same PEFT targets. `--mode distill` (the default heal: the seam band's
full parameters learn the source model's token distributions on packed plain text): the TRL
script is SFTTrainer with the same layers unfrozen and a `compute_loss` that adds one teacher
forward and a KL, as a user would write it; a third contender, the same script with plain
cross-entropy and no teacher, shows what the teacher costs per step.

    python benchmarks/bench_heal.py --mode distill --threads 1   # the default heal vs TRL
    python benchmarks/bench_heal.py                       # SmolLM2 SOLAR 30->44 if models/ has it
    python benchmarks/bench_heal.py --source DIR --trim 8 # any source model
    python benchmarks/bench_heal.py --tiny                # a random tiny Llama: quick smoke run

Writes WORKDIR/results.json and WORKDIR/bench_heal.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_SOURCE = REPO / "models" / "SmolLM2-135M-Instruct"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=None, help="Source model directory (SOLAR-built here).")
    parser.add_argument("--tiny", action="store_true", help="Use a random tiny Llama (8 layers) instead.")
    parser.add_argument("--trim", type=int, default=None, help="SOLAR trim (default: a quarter of the layers).")
    parser.add_argument("--workdir", type=Path, default=REPO / "out" / "bench-heal")
    parser.add_argument("--mode", choices=["lora", "distill"], default="lora")
    parser.add_argument("--data", default=None,
                        help="default: data/chat/train.jsonl (lora), data/text/train.jsonl (distill)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--throughput-steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="dus/TRL pairs for the overhead ratio.")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per training process (default: torch's choice; 1 is steadier on a busy machine)")
    parser.add_argument("--child", choices=["dus", "trl", "dus-distill", "trl-distill", "trl-ce"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --- shared pieces (used by the child processes) ---------------------------------------

def sft_fields(spec: dict) -> dict:
    """The SFTConfig fields both throughput contenders share."""
    return {
        "learning_rate": 2e-4,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "max_steps": spec["steps"],
        "per_device_train_batch_size": spec["batch_size"],
        "max_length": spec["max_length"],
        "packing": spec.get("packing", False),
        **({"packing_strategy": "wrapped"} if spec.get("packing") else {}),
        "assistant_only_loss": False,
        "activation_checkpointing": spec.get("activation_checkpointing", False),
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": 0,
        # CPU float32 unless the spec says otherwise (benchmarks/gpu runs these children on CUDA in bf16)
        "use_cpu": spec.get("device", "cpu") == "cpu",
        "bf16": spec.get("bf16", False),
        "dataloader_num_workers": 0,
    }


def make_meter():
    """A TrainerCallback recording (time, cumulative training tokens) at every log."""
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        def __init__(self):
            self.marks: list[tuple[float, float]] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "num_tokens" in logs and "loss" in logs:
                self.marks.append((time.perf_counter(), float(logs["num_tokens"])))

        def tokens_per_second(self) -> float:
            (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]  # from the end of step 1 to the last step
            return (n1 - n0) / (t1 - t0)

    return Meter()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_dus(spec: dict) -> dict:
    from dus.heal.config import load_config
    from dus.heal.run import heal

    meter = make_meter()
    overrides = {f"sft.{k}": v for k, v in sft_fields(spec).items()}
    overrides.update({"data.path": spec["data"], "merge": False, "lora.r": 16, "lora.lora_alpha": 32,
                      "lora.lora_dropout": 0.05, "seam.radius": 2})
    result = heal(spec["model"], spec["out"], load_config("lora-seam", overrides), callbacks=[meter])
    return {"tokens_per_second": meter.tokens_per_second(), "peak_rss_mb": peak_rss_mb(),
            "layers": result.record["layers"], "lora_modules": result.record["lora_modules"],
            "final_loss": result.final_loss}


def child_trl(spec: dict) -> dict:
    """What a user would write with TRL alone, given the same layers and settings."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    meter = make_meter()
    quantized = {}
    if spec.get("load_in_4bit"):  # QLoRA as TRL's docs write it (benchmarks/gpu; needs CUDA and bitsandbytes)
        from transformers import BitsAndBytesConfig

        quantized = {"device_map": {"": 0}, "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True)}
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=getattr(torch, spec.get("dtype", "float32")),
                                                 **quantized)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    dataset = load_dataset("json", data_files=spec["data"], split="train")
    peft_config = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
        target_modules=spec["lora_modules"], layers_to_transform=spec["layers"], layers_pattern="layers",
    )
    args = SFTConfig(output_dir=spec["out"], **sft_fields(spec))
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[meter])
    trainer.train()
    trainer.save_model(spec["out"])
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"tokens_per_second": meter.tokens_per_second(), "peak_rss_mb": peak_rss_mb(),
            "final_loss": losses[-1] if losses else None}


def child_dus_distill(spec: dict) -> dict:
    """`dus heal` with the default config (distill into the seam band), calibration off:
    it is forward passes before training and would not count in tokens/s anyway."""
    from dus.heal.config import load_config
    from dus.heal.run import heal

    meter = make_meter()
    overrides = {f"sft.{k}": v for k, v in sft_fields(spec).items()}
    overrides.update({"data.path": spec["data"], "calibrate.enabled": False})
    result = heal(spec["model"], spec["out"], load_config("heal", overrides), callbacks=[meter])
    return {"tokens_per_second": meter.tokens_per_second(), "peak_rss_mb": peak_rss_mb(),
            "layers": result.record["layers"], "teacher": result.record.get("teacher"),
            "final_loss": result.final_loss}


def trl_band_trainer(spec: dict, meter, teacher_dir: str | None):
    """A plain TRL script: the band's layers unfrozen, everything else frozen; with a
    teacher, `compute_loss` is forward KL to it (one no-grad teacher forward per step)."""
    import torch
    import torch.nn.functional as F
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=getattr(torch, spec.get("dtype", "float32")))
    model.requires_grad_(False)
    for index in spec["layers"]:
        model.model.layers[index].requires_grad_(True)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    dataset = load_dataset("json", data_files=spec["data"], split="train")
    args = SFTConfig(output_dir=spec["out"], **sft_fields(spec))
    if teacher_dir is None:
        return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                          callbacks=[meter])
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=getattr(torch, spec.get("dtype", "float32")))
    teacher = teacher.to(spec.get("device", "cpu")).eval().requires_grad_(False)  # the Trainer moves only the student
    seconds = [0.0]

    class KDTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            outputs = model(**inputs, use_cache=False)
            began = time.perf_counter()
            with torch.no_grad():
                target = teacher(**inputs, use_cache=False).logits
            seconds[0] += time.perf_counter() - began
            mask = labels[:, 1:] != -100
            log_q = F.log_softmax(outputs.logits[:, :-1][mask], dim=-1)
            log_p = F.log_softmax(target[:, :-1][mask], dim=-1)
            loss = (log_p.exp() * (log_p - log_q)).sum() / mask.sum()
            self._total_train_tokens += inputs["input_ids"].numel()
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return (loss, outputs) if return_outputs else loss

    trainer = KDTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[meter])
    trainer.teacher_seconds = seconds
    return trainer


def child_trl_band(spec: dict, teacher: bool) -> dict:
    meter = make_meter()
    trainer = trl_band_trainer(spec, meter, spec["teacher"] if teacher else None)
    trainer.train()
    if spec.get("save", True):  # benchmarks/gpu leaves it out: 20 GB of device time, not dus's path
        trainer.save_model(spec["out"])  # dus saves its result too: peak memory includes writing it
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    result = {"tokens_per_second": meter.tokens_per_second(), "peak_rss_mb": peak_rss_mb(),
              "final_loss": losses[-1] if losses else None}
    if teacher:
        result["teacher_seconds_per_step"] = trainer.teacher_seconds[0] / spec["steps"]
        result["seconds_per_step"] = spec["batch_size"] * spec["max_length"] / result["tokens_per_second"]
    return result


# --- the parent: prepare, run children, report ------------------------------------------

def run_child(kind: str, spec: dict, threads: int | None = None) -> dict:
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--spec", json.dumps(spec)],
        env=env, capture_output=True, text=True,
    )
    for line in done.stdout.splitlines():
        if line.startswith("[") and "ppl" in line:
            print("   ", line, flush=True)
    if done.returncode != 0:
        raise SystemExit(f"{kind} child failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def prepare_models(args) -> tuple[Path, Path]:
    from dus.build import build_model

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        from dus.tiny import make_tiny_model

        source = work / "tiny-source"
        if not source.exists():
            make_tiny_model(source, "llama", num_layers=8, hidden_size=64, intermediate_size=128)
    else:
        source = (args.source or DEFAULT_SOURCE).resolve()
        if not (source / "config.json").is_file():
            raise SystemExit(f"no source model at {source}: run `dus import --smollm2 -o {DEFAULT_SOURCE}` or use --tiny")
    depth = json.loads((source / "config.json").read_text())["num_hidden_layers"]
    trim = args.trim or depth // 4
    built = work / f"solar-{depth}-trim{trim}"
    if not built.exists():
        build_model({"solar": {"model": str(source), "trim": trim}}, built)
    return source, built


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        spec = json.loads(args.spec)
        if os.environ.get("OMP_NUM_THREADS"):
            import torch

            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        result = {"dus": child_dus, "trl": child_trl, "dus-distill": child_dus_distill,
                  "trl-distill": lambda spec: child_trl_band(spec, teacher=True),
                  "trl-ce": lambda spec: child_trl_band(spec, teacher=False)}[args.child](spec)
        print(json.dumps(result))
        return

    import shutil

    source, built = prepare_models(args)
    distill = args.mode == "distill"
    data = args.data or str(REPO / "data" / ("text" if distill else "chat") / "train.jsonl")
    base = {"model": str(built), "data": data, "batch_size": args.batch_size, "max_length": args.max_length,
            "packing": distill}
    results: dict = {}
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results.update({"source": str(source), "built": str(built), "settings": {**settings, "data": data}})
    print(f"source {source.name}, SOLAR build {built.name}, mode {args.mode}", flush=True)

    # dus runs first (it chooses the layers, and the teacher, that the TRL scripts get), then
    # the order alternates so that neither side always runs on a warmer machine.
    kinds = ["dus-distill", "trl-distill", "trl-ce"] if distill else ["dus", "trl"]
    pairs = []
    chosen: dict = {}
    for repeat in range(args.repeats):
        order = kinds if repeat % 2 == 0 else kinds[::-1]
        pair = {}
        for kind in order:
            out = args.workdir / f"throughput-{kind}"
            shutil.rmtree(out, ignore_errors=True)
            spec = {**base, "steps": args.throughput_steps, "out": str(out), **chosen}
            pair[kind] = run_child(kind, spec, args.threads)
            if kind == kinds[0] and not chosen:
                found = pair[kind]
                chosen = ({"layers": found["layers"], "teacher": found["teacher"]} if distill
                          else {"layers": found["layers"], "lora_modules": found["lora_modules"]})
            print(f"  run {repeat + 1} {kind}: {pair[kind]['tokens_per_second']:.1f} tokens/s, "
                  f"peak {pair[kind]['peak_rss_mb']:.0f} MB", flush=True)
        pairs.append({"dus": pair[kinds[0]], "trl": pair[kinds[1]], **({"trl-ce": pair["trl-ce"]} if distill else {})})
    speed = [p["dus"]["tokens_per_second"] / p["trl"]["tokens_per_second"] for p in pairs]
    memory = [p["dus"]["peak_rss_mb"] / p["trl"]["peak_rss_mb"] for p in pairs]
    results["throughput"] = {
        "mode": args.mode, "runs": pairs, "speed_ratios": speed, "memory_ratios": memory,
        "speed_ratio_median": statistics.median(speed), "memory_ratio_median": statistics.median(memory),
        "layers": chosen["layers"],
    }
    print(f"dus/TRL tokens/s: median {statistics.median(speed):.3f} ({', '.join(f'{r:.3f}' for r in speed)}); "
          f"peak memory: median {statistics.median(memory):.3f}", flush=True)
    if distill:
        # What the teacher costs: the KD script's step time over the same script without a
        # teacher, and the teacher's forward time (mean over every step, the first included)
        # as a share of a step (between the first and last logged step).
        teacher_cost = [p["trl-ce"]["tokens_per_second"] / p["trl"]["tokens_per_second"] for p in pairs]
        teacher_share = [p["trl"]["teacher_seconds_per_step"] / p["trl"]["seconds_per_step"] for p in pairs]
        results["throughput"].update(step_time_with_teacher_over_without=teacher_cost,
                                     teacher_forward_share_of_step=teacher_share)
        print(f"teacher: step time x{statistics.median(teacher_cost):.3f} of the script without it; its forward is "
              f"{statistics.median(teacher_share):.1%} of a step", flush=True)

    (args.workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.workdir / "bench_heal.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    lines = [f"# dus heal benchmark\n\nsource `{Path(results['source']).name}`, SOLAR build "
             f"`{Path(results['built']).name}`; settings: {json.dumps(results['settings'])}\n"]
    if "throughput" in results:
        t = results["throughput"]
        lines.append("## dus heal vs a plain TRL SFTTrainer script (same model, data, trained layers, SFTConfig)\n")
        lines.append("| run | dus tokens/s | TRL tokens/s | ratio | dus peak MB | TRL peak MB | ratio |")
        lines.append("|---|---|---|---|---|---|---|")
        for i, pair in enumerate(t["runs"]):
            d, r = pair["dus"], pair["trl"]
            lines.append(f"| {i + 1} | {d['tokens_per_second']:.1f} | {r['tokens_per_second']:.1f} | "
                         f"{t['speed_ratios'][i]:.3f} | {d['peak_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
                         f"{t['memory_ratios'][i]:.3f} |")
        what = "LoRA" if t.get("mode", "lora") == "lora" else "distillation into the band of"
        lines.append(f"\nmedian throughput ratio dus/TRL **{t['speed_ratio_median']:.3f}**, "
                     f"median peak-memory ratio **{t['memory_ratio_median']:.3f}** ({what} layers {t['layers']})\n")
        if "step_time_with_teacher_over_without" in t:
            cost = statistics.median(t["step_time_with_teacher_over_without"])
            share = statistics.median(t["teacher_forward_share_of_step"])
            ce = ", ".join(f"{p['trl-ce']['tokens_per_second']:.1f}" for p in t["runs"])
            lines.append(f"the teacher: the TRL script without it (cross-entropy, same band) runs at {ce} tokens/s; "
                         f"with it a step takes **{cost:.3f}x** as long, its no-grad forward being "
                         f"**{share:.1%}** of the step (median)\n")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

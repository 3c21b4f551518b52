"""Run one command inside this process and write what it cost to a JSON file.

    python benchmarks/gpu/measure.py METRICS.json --train [--reload DIR] -- -m dus heal MODEL -o OUT ...
    python benchmarks/gpu/measure.py METRICS.json --train -- benchmarks/bench_heal.py --child trl-distill --spec ...
    python benchmarks/gpu/measure.py METRICS.json -- -c "CODE" ARGS ...

The command runs unchanged (the dus CLI or a plain script, as a user would run it); this
wrapper only watches from outside:
- with `--train`, every transformers Trainer the command makes gets one extra callback, added by wrapping
  `Trainer.__init__`, that timestamps each logged step and the cumulative `num_tokens` TRL
  logs (so run heals with `logging_steps=1`); tokens/s is taken between the first and the
  last logged step, leaving out model loading and the first (warm-up) step;
- the trainer's parameter counts (all, and those that train);
- peak GPU memory (`torch.cuda.max_memory_allocated` / `max_memory_reserved`) and peak RSS;
- with `--reload DIR`: after the command, DIR is loaded again with `from_pretrained` and one
  forward pass must give finite logits (the saved model is usable, not just written).
"""

from __future__ import annotations

import gc
import json
import math
import os
import resource
import runpy
import sys
import time
import traceback


class Meter:
    """Timestamps of logged steps, (seconds, cumulative tokens), and the trainer's sizes."""

    def __init__(self):
        self.began = time.perf_counter()
        self.marks: list[tuple[float, float]] = []
        self.params: dict = {}
        self.trainer_ready: float | None = None

    def callback(self):
        from transformers import TrainerCallback

        meter = self

        class Watch(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "num_tokens" in logs and "loss" in logs:
                    meter.marks.append((time.perf_counter(), float(logs["num_tokens"])))

        return Watch()

    def watch_trainers(self) -> None:
        from transformers import Trainer

        original = Trainer.__init__
        meter = self

        def init(trainer, *args, **kwargs):
            original(trainer, *args, **kwargs)
            meter.trainer_ready = time.perf_counter()
            trainer.add_callback(meter.callback())
            params = list(trainer.model.parameters())
            meter.params = {"parameters_seen": sum(p.numel() for p in params),  # 4-bit weights count packed
                            "trainable_parameters": sum(p.numel() for p in params if p.requires_grad)}

        Trainer.__init__ = init

    def summary(self) -> dict:
        out: dict = {"logged_steps": len(self.marks), **self.params}
        if self.trainer_ready is not None:  # loading, calibration, teacher, data: all before the Trainer
            out["seconds_before_trainer"] = self.trainer_ready - self.began
        if self.marks:  # saving (and merging) after the last step
            out["seconds_after_last_step"] = time.perf_counter() - self.marks[-1][0]
        if len(self.marks) >= 2:
            (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]
            gaps = [b[0] - a[0] for a, b in zip(self.marks, self.marks[1:])]
            out.update(tokens_per_second=(n1 - n0) / (t1 - t0), tokens_per_step=(n1 - n0) / len(gaps),
                       seconds_per_step=sorted(gaps)[len(gaps) // 2])
        return out


def memory() -> dict:
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    torch = sys.modules.get("torch")  # a command that never imported torch (a copy build) used no GPU
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out.update(peak_gpu_allocated_gb=torch.cuda.max_memory_allocated() / 2**30,
                   peak_gpu_reserved_gb=torch.cuda.max_memory_reserved() / 2**30)
    return out


def run_target(target: list[str]) -> None:
    """Run `-m MODULE args`, `-c CODE args` or `SCRIPT args` as `python` would."""
    if target[0] == "-m":
        sys.argv = [target[1], *target[2:]]
        runpy.run_module(target[1], run_name="__main__", alter_sys=True)
    elif target[0] == "-c":
        sys.argv = ["-c", *target[2:]]
        exec(compile(target[1], "<measure -c>", "exec"), {"__name__": "__main__"})
    else:
        sys.argv = list(target)
        runpy.run_path(target[0], run_name="__main__")


def reload_check(path: str) -> dict:
    """Load the saved model again, on the GPU when there is one, and run one forward pass."""
    import torch
    from transformers import AutoModelForCausalLM

    gc.collect()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.empty_cache()
    began = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", device_map=device).eval()
    with torch.inference_mode():
        logits = model(torch.arange(2, 34, device=device).unsqueeze(0)).logits
    finite = bool(torch.isfinite(logits).all())
    result = {"reloaded": finite, "reload_seconds": time.perf_counter() - began,
              "reload_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
              "reload_layers": model.config.num_hidden_layers}
    if not finite:
        raise RuntimeError(f"{path} reloads but its logits are not finite")
    return result


def hide_modules() -> None:
    """DUS_GPU_HIDE_MODULES=wandb,...: make those packages look absent (import fails, find_spec is
    None), as on the device image, so that the CPU dry run catches an import the device lacks."""
    for name in filter(None, os.environ.get("DUS_GPU_HIDE_MODULES", "").split(",")):
        sys.modules[name] = None


def main(argv: list[str]) -> int:
    hide_modules()
    split = argv.index("--")
    metrics_path, options, target = argv[0], argv[1:split], argv[split + 1:]
    reload_dir = options[options.index("--reload") + 1] if "--reload" in options else None
    meter = Meter()
    if "--train" in options:  # importing Trainer costs seconds: only where there is training
        meter.watch_trainers()
    result: dict = {"command": target}
    began = meter.began
    code = 0
    try:
        try:
            run_target(target)
        except SystemExit as stop:  # the dus CLI ends with sys.exit
            if stop.code not in (None, 0):
                raise RuntimeError(f"exited with status {stop.code}") from None
        result.update(wall_seconds=time.perf_counter() - began, **meter.summary(), **memory())
        if reload_dir:
            result.update(reload_check(reload_dir))
    except BaseException as error:  # recorded, then a non-zero exit: the stage runner reads both
        result.update(wall_seconds=time.perf_counter() - began, **meter.summary(), **memory(),
                      error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc()[-4000:])
        code = 1
    for key, value in list(result.items()):  # JSON has no NaN
        if isinstance(value, float) and not math.isfinite(value):
            result[key] = None
    with open(metrics_path, "w") as handle:
        json.dump(result, handle, indent=2)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""A fitness measured after a short heal, spent only on the candidates that earn it.

Why: a search that ranks unhealed models optimises what no user who heals ships (SOLAR's
trim costs +53.9% unhealed and +5.2% healed on SmolLM2, README). Healing every candidate
would cost minutes each, so the heal is a multi-fidelity schedule: Optuna's successive
halving pruner over rungs whose resource grows by `factor` each rung. Rung 0 is the
unhealed score (what every candidate costs today); rung k >= 1 is the same candidate
healed for `steps / factor ** (rungs - k)` steps, afresh from the unhealed model each time
(so a rung's score is exactly "the heal with that many steps", learning-rate schedule
included), and reported at step `factor ** k`. At each rung the pruner stops a trial that
is not in the best 1/factor of the trials that reached that rung; the rest go on.

The heal is `dus heal`'s own in-memory heal (dus.heal.student._in_memory_student and
run.make_trainer) over the sources the search already loaded: the student is assembled
from the candidate's plan, its trained band private copies, each teacher a loaded source.
Nothing is written (the trainer's output directory is a temporary one that is removed),
and a heal of the same candidate built and healed on disk with the same config, seed and
steps gives the same score (tests/test_search_healed.py)."""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from dus.errors import DusError


@dataclass(frozen=True)
class HealSchedule:
    """The rungs of the healed fitness: `steps` heal steps at the top rung, `rungs` healed
    rungs above the unhealed score, successive halving by `factor`."""

    steps: int
    rungs: int = 1
    factor: int = 3
    config: str = "heal"  # the heal config (dus heal -c), its sft.max_steps replaced per rung
    overrides: tuple = ()  # (dotted key, value) pairs over the config (--heal-set)

    def heal_steps(self, rung: int) -> int:
        return 0 if rung == 0 else max(1, round(self.steps / self.factor ** (self.rungs - rung)))

    def resource(self, rung: int) -> int:
        """The step a rung's score is reported at: the pruner's resource."""
        return self.factor ** rung

    def pruner(self):
        import optuna

        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=self.factor,
                                                       min_early_stopping_rate=0)

    def describe(self) -> dict:
        return {"steps": [self.heal_steps(k) for k in range(1, self.rungs + 1)], "factor": self.factor,
                "config": self.config, "overrides": {key: value for key, value in self.overrides},
                "pruner": "successive halving (optuna)"}


def check_schedule(steps: int, rungs: int, factor: int) -> None:
    """One line for a schedule that cannot run: no steps, no rung, a factor that halves nothing."""
    if steps < 1:
        raise DusError(f"--heal-steps {steps}: give at least 1 heal step (or leave --heal-steps out for the unhealed score)")
    if rungs < 1:
        raise DusError(f"--heal-rungs {rungs}: give at least 1 healed rung")
    if factor < 2:
        raise DusError(f"--halving {factor}: successive halving keeps 1 in FACTOR trials per rung; give 2 or more")
    most = max_rungs(steps, factor)
    if rungs > most:
        readable = (rungs - 1) * math.log10(factor) < 16  # else the power, not its digits
        need = f"{factor ** (rungs - 1):,}" if readable else f"{factor}^{rungs - 1}"
        raise DusError(f"--heal-steps {steps} with --heal-rungs {rungs} and --halving {factor}: the lowest rung would "
                       f"heal less than 1 step (--heal-steps / {factor}^{rungs - 1}); give --heal-rungs {most} or fewer, "
                       f"or --heal-steps >= {need}")


def max_rungs(steps: int, factor: int) -> int:
    """The most rungs a schedule of `steps` heal steps halved by `factor` can have: its lowest
    rung heals steps // factor^(rungs - 1) >= 1 step (counted without forming a huge power)."""
    rungs = 1
    while steps >= factor:
        steps //= factor
        rungs += 1
    return rungs


def read_heal_inputs(schedule: HealSchedule, tokenizer):
    """The heal's data in TRL's shape (dus.heal.run.Inputs), read once per search, before the
    first candidate: a missing or unreadable data file is one line before any trial."""
    from dus.heal.run import read_inputs

    return read_inputs(_PlannedModel(None, tokenizer, "float32", Path(".")), load_heal_config(schedule, 1))


def check_heal_config(schedule: HealSchedule) -> None:
    """The heal config and overrides read and validated, and one that cannot heal over the
    search's loaded sources refused, each in one line before anything is loaded."""
    cfg = load_heal_config(schedule, 1)
    if cfg.quantized or cfg.trains == "full":
        raise DusError(f"--heal-config {schedule.config}: a search heals over the sources it loaded once "
                       f"(in --dtype), so {cfg.mode} ({cfg.trains}) cannot run there; use heal, distill, "
                       "lora-seam or a config with a band or LoRA student")
    if not cfg.in_memory:
        raise DusError(f"--heal-config {schedule.config} sets in_memory: false; the search heals in memory only")
    if cfg.section("distill")["combine"] == "route":
        raise DusError(f"--heal-config {schedule.config}: distill.combine route sends data to teachers by name, and a "
                       "search's candidates have no named teachers; use ensemble or best")


class _PlannedModel:
    """What the heal reads of a model directory, for a candidate that exists only as a plan
    over the loaded sources: its manifest (the plan), its tokenizer, its dtype."""

    def __init__(self, plan, tokenizer, stored_dtype: str, path: Path):
        from dus.manifest import Manifest

        self.manifest = Manifest(plan=plan)
        self._tokenizer, self.stored_dtype, self.path = tokenizer, stored_dtype, path
        self.name = "candidate"

    def tokenizer(self):
        return self._tokenizer

    def __str__(self) -> str:
        return "the candidate (in memory)"


def load_heal_config(schedule: HealSchedule, steps: int):
    """The heal config with the user's overrides and the rung's steps, nothing saved or reported."""
    from dus.heal.config import load_config

    overrides = {**dict(schedule.overrides), "sft.max_steps": steps, "sft.report_to": "none", "sft.save_strategy": "no",
                 "sft.disable_tqdm": True, "sft.logging_strategy": "no", "merge": False}
    from dus.heal.origins import set_origins

    return load_config(schedule.config, overrides, set_origins(dict(schedule.overrides), "--heal-set"))


class CandidateHealer:
    """Heals candidates over an Evaluator's loaded sources and scores them with its scorer."""

    def __init__(self, evaluator, schedule: HealSchedule, first_model: Path):
        from dus.checkpoint import ModelDir

        self.evaluator, self.schedule = evaluator, schedule
        self.first = ModelDir(first_model)
        self.cache: dict[tuple[str, int], tuple[float, dict, float]] = {}
        self.inputs = read_heal_inputs(schedule, evaluator.tokenizer)
        self.fits_checked = False  # some example fits max_length: checked on the first heal (it needs TRL's args)

    def _planned(self, plan) -> _PlannedModel:
        return _PlannedModel(plan, self.evaluator.tokenizer, self.first.stored_dtype or "float32", self.first.path)

    def __call__(self, candidate, rung: int) -> tuple[float, dict, float]:
        """(value, metrics, seconds) of `candidate` healed for the rung's steps (cached)."""
        key = (candidate.key(), rung)
        if key not in self.cache:
            self.cache[key] = self._heal_and_score(candidate, self.schedule.heal_steps(rung))
        return self.cache[key]

    def _heal_and_score(self, candidate, steps: int) -> tuple[float, dict, float]:
        import gc

        import torch

        from dus.search.fitness import check_finite

        started = time.perf_counter()
        plan = self.evaluator.plan(candidate)
        with tempfile.TemporaryDirectory(prefix="dus-search-heal-") as folder, _sources_untouched(self.evaluator.sources):
            model, record = heal_in_memory(self, plan, steps, Path(folder))
            model.eval()
            with torch.inference_mode():
                value, metrics = self.evaluator.scorer(model, self.evaluator.tokenizer)
            del model
            gc.collect()
        check_finite(value, candidate, f"{getattr(self.evaluator.scorer, 'name', 'the score')} after {steps} heal steps")
        metrics = {**metrics, "heal_steps": steps, "final_loss": record["final_loss"],
                   "calibration": record["calibration"]}
        return value, metrics, time.perf_counter() - started


def heal_in_memory(healer: CandidateHealer, plan, steps: int, folder: Path):
    """`dus heal`'s in-memory heal of `plan` for `steps` steps over the loaded sources;
    the trained model (LoRA unmerged: the sources are shared) and a short record."""
    from transformers import PrinterCallback, ProgressCallback

    from dus.checkpoint import accelerator_type
    from dus.heal.config import build_sft_config
    from dus.heal.run import HealRun, StopWhenNotFinite, make_trainer
    from dus.heal.student import _in_memory_student, add_hidden_match
    from dus.heal.teachers import teacher_mix
    from dus.heal.template import check_some_example_fits

    cfg = load_heal_config(healer.schedule, steps)
    teachers = plan_teachers(plan) if cfg.mode == "distill" else []
    mix = teacher_mix(cfg.section("distill"), teachers) if teachers else None
    inputs = healer.inputs
    use_cpu = accelerator_type() is None
    args = build_sft_config(cfg, folder, "dus-search-heal", use_cpu, extra={"assistant_only_loss": inputs.assistant_only_loss})
    if not healer.fits_checked:
        check_some_example_fits(inputs.train_set, inputs.tokenizer, inputs.assistant_only_loss, args.max_length,
                                args.packing, args.truncation_mode, f"data {inputs.train_data.source}",
                                getattr(args, "packing_strategy", "bfd"))
        healer.fits_checked = True
    run = HealRun(healer._planned(plan), folder, cfg, False, False, None, inputs, args, "dus-search-heal", use_cpu,
                  teachers, mix, [])
    student = _in_memory_student(run, _quiet, sources=healer.evaluator.sources)
    add_hidden_match(run, student)
    trainer = make_trainer(cfg, student, args, inputs, [StopWhenNotFinite()], mix)
    for quiet in (PrinterCallback, ProgressCallback):  # the search's progress bar speaks, not each heal
        trainer.remove_callback(quiet)
    result = trainer.train()
    if hasattr(trainer, "restore_head"):
        trainer.restore_head()
    model = trainer.accelerator.unwrap_model(trainer.model)
    loss = getattr(result, "training_loss", None)
    record = {"final_loss": loss if loss is None or math.isfinite(loss) else None,
              "calibration": student.calibration.factor if student.calibration and student.calibration.layers else None}
    return model, record


def plan_teachers(plan) -> list:
    """`distill.teachers: auto` for a plan over the search's sources: every source that gives
    the candidate layers, config_from first (the search already compared their tokenizers)."""
    from dus.heal.teachers import Teacher

    used = {layer.model for layer in plan.layers}
    order = [plan.config_from, *(name for name in plan.models if name != plan.config_from)]
    return [Teacher(name, Path(plan.models[name])) for name in order if name == plan.config_from or name in used]


def _quiet(_message: str) -> None:
    """The search's heals say nothing per candidate: the search's progress bar speaks."""


class _sources_untouched:
    """The loaded sources are every later candidate's weights: a heal must leave them as it
    found them. Every source tensor's version counter is compared after the heal (an in-place
    change is a bug, named in one line), and requires_grad flags, train or eval modes and hooks are put back."""

    def __init__(self, sources):
        self.sources = sources

    def __enter__(self):
        self.params = [(p, p._version, p.requires_grad) for m in self.sources.models.values() for p in m.parameters()]
        self.hooks = [(module, dict(module._forward_hooks), dict(module._forward_pre_hooks), module.training)
                      for m in self.sources.models.values() for module in m.modules()]
        return self

    def __exit__(self, *exc):
        changed = sum(1 for p, version, _ in self.params if p._version != version)
        for p, _, flag in self.params:
            p.requires_grad_(flag)
        for module, forward, pre, training in self.hooks:
            module.training = training
            module._forward_hooks.clear()
            module._forward_hooks.update(forward)
            module._forward_pre_hooks.clear()
            module._forward_pre_hooks.update(pre)
        if changed and exc[0] is None:
            raise DusError(f"healing a candidate changed {changed} source tensors in place; the search's later scores "
                           "would be wrong (a bug in dus: please report it with the heal config)")
        return False

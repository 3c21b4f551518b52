"""Which models teach a distillation heal, and how their lessons are combined.

A build from one source has one teacher: that source (today's heal, unchanged). A build from
several parents (a stack or interleave of two fine-tunes) is taught by every parent that
tokenizes as the child does, so healing keeps what each parent knew instead of pulling the
child toward the first. Everything here is decided and checked before any output exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from dus.errors import DusError
from dus.heal.mix import AVERAGES, RULES, TeacherMix


@dataclass(frozen=True)
class Teacher:
    """A teacher: its name in the build plan (or the path given) and its directory."""

    name: str
    path: Path


def _plan_source_path(raw: str) -> Path | None:
    """A plan source's directory (read_manifest has already found it from the model's own
    place, dus.manifest.locate_source), or None when it is gone."""
    path = Path(raw).expanduser()
    return path if (path / "config.json").is_file() else None


def check_built_from(manifest, name: str, path: Path) -> None:
    """Refuse a teacher taken from the build's sources whose weights are not the ones the
    build read (changed, swapped, or another model at a relative path): the sha256 of each
    weight file against the manifest's record (cached, dus.hashing)."""
    from dus.hashing import sha256_file

    recorded = ((manifest.sources or {}).get(name) or {}).get("files") or {}
    for relative, digest in sorted(recorded.items()):
        if not relative.endswith(".safetensors"):
            continue
        file = path / relative
        if not file.is_file() or sha256_file(file) != digest:
            what = "is missing" if not file.is_file() else "changed since the build"
            raise DusError(f"teacher '{name}' at {path} is not the model this build came from ({relative} {what}); "
                           f"distil from it anyway with --teacher {path}, or rebuild from it")


def _other_tokenizer(model_dir: Path, path: Path, difference: str) -> DusError:
    return DusError(f"the teacher {path} does not tokenize as {model_dir} does ({difference}); distillation "
                    "compares token distributions, so give a teacher with the same tokenizer (--teacher)")


def _named(plan, text: str) -> Teacher:
    """A teacher given by the user: a plan source's name, or a model directory."""
    if plan is not None and text in plan.models:
        path = _plan_source_path(plan.models[text])
        if path is None:
            raise DusError(f"teacher '{text}' from the manifest is not at {plan.models[text]} any more; "
                           "pass --teacher PATH to its directory")
        return Teacher(text, path)  # named: the user's choice, not checked against the build's record
    path = Path(text).expanduser()
    if path.is_file():
        from dus.errors import file_not_model_directory

        raise DusError(f"teacher {file_not_model_directory(path)}")
    if not (path / "config.json").is_file():
        known = f"; the build's sources are: {', '.join(plan.models)}" if plan is not None else ""
        raise DusError(f"teacher {text}: not a model directory (no config.json){known}")
    if plan is not None:  # a path that is one of the plan's sources keeps the plan's name (shares its layers)
        for name, raw in plan.models.items():
            source = _plan_source_path(raw)
            if source is not None and source.resolve() == path.resolve():
                return Teacher(name, path)
    return Teacher(text, path)


def requested_teachers(distill: dict, cli: list[str] | None) -> list[str] | None:
    """The teachers the user named (--teacher, distill.teachers, distill.teacher), or None for auto."""
    if cli:
        return list(cli)
    teachers = distill.get("teachers", "auto")
    if teachers not in ("auto", None):
        return [teachers] if isinstance(teachers, str) else list(teachers)
    single = distill.get("teacher", "auto")
    if single not in ("auto", None):
        return [single]
    return None


def resolve_teachers(model_dir: Path, manifest, distill: dict, cli: list[str] | None,
                     tokenizes_alike) -> tuple[list[Teacher], list[str]]:
    """The teachers, in order (the plan's `config_from` first), and notes on sources left out.
    `tokenizes_alike(path)` returns None when a model tokenizes as the student does, else the
    first difference; a named teacher that differs is refused, an automatic one left out."""
    plan = manifest.plan if manifest is not None else None
    named = requested_teachers(distill, cli)
    notes: list[str] = []
    if named is not None:
        teachers = [_named(plan, text) for text in named]
        if len({t.path.resolve() for t in teachers}) != len(teachers):
            raise DusError(f"teachers {', '.join(named)}: a teacher is named twice; name each once")
        for teacher in teachers:
            difference = tokenizes_alike(teacher.path)
            if difference:
                raise _other_tokenizer(model_dir, teacher.path, difference)
        return teachers, notes
    if plan is None:
        raise DusError(f"distill needs a teacher: {model_dir} has no dus-manifest.json naming its source; "
                       "pass --teacher PATH (a model with the same tokenizer)")
    if plan.config_from not in plan.models:
        raise DusError(f"dus-manifest.json: plan.config_from '{plan.config_from}' is not in plan.models; "
                       "pass --teacher PATH")
    order = [plan.config_from, *(name for name in plan.models if name != plan.config_from)]
    used = {layer.model for layer in plan.layers}
    teachers = []
    for name in order:
        if name != plan.config_from and name not in used:
            continue  # a source that gives the child no layer (a tokenizer or config source) is no parent
        path = _plan_source_path(plan.models[name])
        if path is None:
            raise DusError(f"teacher '{name}' from the manifest is not at {plan.models[name]} any more; "
                           "pass --teacher PATH to its directory")
        check_built_from(manifest, name, path)
        difference = tokenizes_alike(path)
        if difference and name == plan.config_from:
            raise _other_tokenizer(model_dir, path, difference)
        if difference:
            notes.append(f"source {name!r} does not tokenize as the model does ({difference}); it does not teach")
            continue
        teachers.append(Teacher(name, path))
    return teachers, notes


def teacher_mix(distill: dict, teachers: list[Teacher]) -> TeacherMix | None:
    """The combining rule for several teachers (None for one), checked against them."""
    rule, average, weights = distill["combine"], distill["average"], distill["teacher_weights"]
    if rule == "route" and len(teachers) < 2:
        raise DusError(f"distill.combine: route sends each kind of data to its own teacher, but this heal has one "
                       f"teacher ({teachers[0].name}); name several (--teacher A --teacher B) or use ensemble")
    if weights is not None and len(weights) != len(teachers):
        raise DusError(f"distill.teacher_weights has {len(weights)} weights for {len(teachers)} teachers "
                       f"({', '.join(t.name for t in teachers)}); give one weight per teacher, in that order")
    if len(teachers) < 2:
        return None
    return TeacherMix(rule, average, tuple(float(w) for w in weights) if weights is not None else ())


def check_distill_section(distill: dict, source: str) -> None:
    """The multi-teacher keys of `distill:` (the rest are checked in config.py)."""
    if distill["combine"] not in RULES:
        raise DusError(f"{source}: distill.combine must be one of {', '.join(RULES)}, got {distill['combine']!r}")
    if distill["average"] not in AVERAGES:
        raise DusError(f"{source}: distill.average must be one of {', '.join(AVERAGES)}, got {distill['average']!r}")
    teachers = distill["teachers"]
    if teachers not in ("auto", None) and not (
        isinstance(teachers, str) or (isinstance(teachers, list) and teachers
                                      and all(isinstance(t, str) and t for t in teachers))):
        raise DusError(f"{source}: distill.teachers must be auto or a list of source names or model directories, "
                       f"got {teachers!r}")
    weights = distill["teacher_weights"]
    if weights is not None:
        if not isinstance(weights, list) or not weights or not all(_finite_number(w) and w >= 0 for w in weights) \
                or sum(weights) <= 0:
            raise DusError(f"{source}: distill.teacher_weights must be a list of finite numbers >= 0, not all 0 (one "
                           f"per teacher), got {weights!r}")
    hidden = distill["hidden"]
    if not _finite_number(hidden) or hidden < 0:
        raise DusError(f"{source}: distill.hidden (the activation-matching weight) must be a finite number >= 0, "
                       f"got {hidden!r}")
    layers = distill["hidden_layers"]
    if layers != "auto" and not (isinstance(layers, list) and layers and all(
            isinstance(i, int) and not isinstance(i, bool) for i in layers)):
        raise DusError(f"{source}: distill.hidden_layers must be auto or a list of output layer indices, got {layers!r}")
    field = distill["route_field"]
    if not isinstance(field, str) or not field:
        raise DusError(f"{source}: distill.route_field must name a data field, got {field!r}")


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def route_index(teachers: list[Teacher], name: str, where: str) -> int:
    """The index of the teacher a route names (by plan name, directory name or path)."""
    for index, teacher in enumerate(teachers):
        if name in (teacher.name, teacher.path.name, str(teacher.path)) or Path(name).name == teacher.name:
            return index
    raise DusError(f"{where}: routes to teacher {name!r}, which is not among this heal's teachers "
                   f"({', '.join(t.name for t in teachers)}); name one of them, or add it with --teacher")

"""The heal YAML: a few dus sections around TRL's and PEFT's own config objects.

A config file has top-level sections; `sft:` holds fields of `trl.SFTConfig` and `lora:`
fields of `peft.LoraConfig`, passed through unchanged, so anything TRL or PEFT document
works here. dus adds only what it decides itself: the training mode, where the data is,
how wide the seam band is, distillation, W&B placement and whether to merge.
Every key is checked against the object it feeds; a typo is an error that names the
key, its section, and the closest valid spelling.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dus.errors import DusError, read_user_text

MODES = ("lora", "qlora", "full", "band", "expand", "distill")
DISTILL_STUDENTS = ("lora", "qlora", "full", "band", "expand", "gates")

DEFAULT_CONFIG = "train/heal.yaml"


def _read_defaults() -> dict[str, Any]:
    """The built-in defaults are the shipped train/heal.yaml itself (one source: `dus heal
    MODEL -o OUT` without `-c` behaves exactly like `-c heal`)."""
    from dus.resources import shipped

    path = shipped(DEFAULT_CONFIG)
    if path is None:
        raise DusError(f"{DEFAULT_CONFIG} is missing from this dus installation; reinstall dus")
    return yaml.safe_load(path.read_text())


DEFAULTS: dict[str, Any] = _read_defaults()

DUS_SECTIONS = {
    "data": "dus data source",
    "seam": "dus seam selection",
    "distill": "dus distillation",
    "calibrate": "dus seam calibration",
    "gates": "dus learned per-layer gates",
    "wandb": "dus W&B placement",
}
SCALARS = {"mode", "merge", "in_memory"}

# sft fields that dus sets itself; a config that sets them would be silently overridden.
SFT_OWNED = {
    "output_dir": "dus writes checkpoints to OUT/checkpoints; choose OUT with -o",
    "resume_from_checkpoint": "use --resume, which continues from the latest checkpoint in OUT",
    "run_name": "set wandb.name instead",
}
LORA_OWNED = {"task_type": "dus heals causal LMs (CAUSAL_LM)"}


@dataclass
class HealConfig:
    """A resolved heal config: the merged YAML plus where it came from."""

    raw: dict[str, Any]
    source: str = f"built-in defaults (= {DEFAULT_CONFIG})"
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return self.raw["mode"]

    @property
    def merge(self) -> bool:
        return bool(self.raw["merge"])

    @property
    def in_memory(self) -> bool:
        return bool(self.raw["in_memory"])

    def section(self, name: str) -> dict[str, Any]:
        return self.raw[name]

    @property
    def trains(self) -> str:
        """Which parameters train: lora, band, full or expand (qlora trains LoRA too)."""
        trains = self.raw["distill"]["student"] if self.mode == "distill" else self.mode
        return "lora" if trains == "qlora" else trains

    @property
    def gates_train(self) -> bool:
        """Per-layer gates train: alone (distill.student: gates) or beside the weights (gates.train)."""
        return self.trains == "gates" or bool(self.raw["gates"]["train"])

    @property
    def quantized(self) -> bool:
        """The frozen weights load in 4 bits (mode qlora, or a distillation's qlora student),
        as the `quantization` section says."""
        return self.mode == "qlora" or (self.mode == "distill" and self.raw["distill"]["student"] == "qlora")

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.raw)


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _sft_fields() -> set[str]:
    from trl import SFTConfig

    return _field_names(SFTConfig)


def _lora_fields() -> set[str]:
    from peft import LoraConfig

    return _field_names(LoraConfig)


def _quantization_fields() -> set[str]:
    import inspect

    from transformers import BitsAndBytesConfig

    return {p for p in inspect.signature(BitsAndBytesConfig.__init__).parameters if p not in ("self", "kwargs")}


def _unknown_key(key: str, section: str, known: set[str], what: str) -> DusError:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; see the {what} documentation for valid keys"
    return DusError(f"unknown key '{key}' in section '{section}' ({what}){hint}")


PARENTS_CONFIG = "parents"  # train/parents.yaml: the heal of a `parents` build when no -c is given


def default_config_for(model_dir: str | Path) -> str | None:
    """The heal config a model gets without -c: train/parents.yaml for a child of two
    fine-tunes (its manifest's recipe kind is `parents`), else None (train/heal.yaml)."""
    import json

    manifest = Path(model_dir) / "dus-manifest.json"
    try:
        kind = json.loads(manifest.read_text())["plan"]["recipe_kind"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return PARENTS_CONFIG if kind == "parents" else None


def resolve_config_path(config: str | Path) -> Path:
    """A config path as given, or a short name (`full`, `qlora.yaml`) looked up in ./train/
    and in the train/ directory shipped beside the dus package."""
    path = Path(config)
    if path.is_file():
        return path
    name = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
    if len(path.parts) == 1:
        from dus.resources import local_or_shipped

        candidate = local_or_shipped(Path("train") / name)
        if candidate.is_file():
            return candidate
    raise DusError(
        f"heal config {config} not found; give a YAML path or one of the names in train/ "
        "(heal, lora-seam, full, qlora, expand, distill)"
    )


def load_config(config: str | Path | dict | None = None, overrides: dict[str, Any] | None = None,
                origins: dict[str, str] | None = None) -> HealConfig:
    """Defaults, then the YAML (or dict), then CLI overrides given as dotted keys
    (`{"sft.learning_rate": 1e-4}`); everything validated against TRL/PEFT fields. A bad
    value is blamed on where it came from (dus.heal.origins): `origins` names the option
    of each override (default `--set KEY=VALUE`), a config file's values their line."""
    from dus.heal.origins import blame, file_origins, set_origins

    raw = copy.deepcopy(DEFAULTS)
    source = f"built-in defaults (= {DEFAULT_CONFIG})"
    located: dict[str, str] = {}
    if config is not None:
        if isinstance(config, dict):
            user, source = config, "dict"
        else:
            path = resolve_config_path(config)
            text = read_user_text(path, "a YAML heal config")
            try:
                user = yaml.safe_load(text) or {}
            except yaml.YAMLError as error:
                raise DusError(f"{path}: not valid YAML ({error.__class__.__name__}: {error})") from None
            source = str(path)
            located = file_origins(text, path)
        if not isinstance(user, dict):
            raise DusError(f"{source}: a heal config is a mapping of sections (mode, data, sft, lora, ...)")
        _merge_into(raw, user, source)
    for dotted, value in (overrides or {}).items():
        _apply_override(raw, dotted, value)
    located.update(set_origins(overrides or {}))
    located.update(origins or {})
    try:
        _validate(raw, source)
    except DusError as error:
        raise blame(error, source, located) from None
    return HealConfig(raw=raw, source=source, overrides=dict(overrides or {}))


def _merge_into(raw: dict, user: dict, source: str) -> None:
    known_top = set(DEFAULTS)
    for key, value in user.items():
        if key not in known_top:
            close = difflib.get_close_matches(str(key), sorted(known_top), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise DusError(
                f"{source}: unknown top-level key '{key}'; known: {', '.join(sorted(known_top))}{hint}"
            )
        if key in SCALARS:
            raw[key] = value
        elif value is None:
            continue
        elif not isinstance(value, dict):
            raise DusError(f"{source}: section '{key}' must be a mapping of keys, got {type(value).__name__}")
        else:
            # The user's keys replace or extend the defaults of that section.
            raw[key].update(value)


def _apply_override(raw: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if len(parts) == 1:
        if parts[0] not in SCALARS:
            raise DusError(f"override '{dotted}': give section.key (e.g. sft.learning_rate=1e-4) or mode/merge/in_memory")
        raw[parts[0]] = value
        return
    if len(parts) != 2 or parts[0] not in raw or parts[0] in SCALARS:
        raise DusError(
            f"override '{dotted}': the section must be one of {', '.join(sorted(set(DEFAULTS) - SCALARS))}"
        )
    raw[parts[0]][parts[1]] = value


def _validate(raw: dict, source: str) -> None:
    if not isinstance(raw["in_memory"], bool):
        raise DusError(f"{source}: in_memory must be true or false, got {raw['in_memory']!r}")
    if raw["mode"] not in MODES:
        raise DusError(f"{source}: mode '{raw['mode']}' is not one of {', '.join(MODES)}")
    for section, what in DUS_SECTIONS.items():
        known = set(DEFAULTS[section])
        for key in raw[section]:
            if key not in known:
                raise _unknown_key(key, section, known, what)
    checks = (
        ("sft", _sft_fields(), "fields of trl.SFTConfig", SFT_OWNED),
        ("lora", _lora_fields(), "fields of peft.LoraConfig", LORA_OWNED),
        ("quantization", _quantization_fields(), "arguments of transformers.BitsAndBytesConfig", {}),
    )
    for section, known, what, owned in checks:
        for key in raw[section]:
            if key in owned:
                raise DusError(f"{source}: '{section}.{key}' is set by dus: {owned[key]}")
            if key not in known:
                raise _unknown_key(key, section, known, what)
    if raw["distill"]["student"] not in DISTILL_STUDENTS:
        raise DusError(
            f"{source}: distill.student '{raw['distill']['student']}' is not one of {', '.join(DISTILL_STUDENTS)}"
        )
    from dus.heal.teachers import check_distill_section

    check_distill_section(raw["distill"], source)
    if raw["distill"]["logits"] not in ("chunked", "whole"):
        raise DusError(f"{source}: distill.logits must be chunked or whole, got {raw['distill']['logits']!r}")
    alpha = raw["distill"]["alpha"]
    if not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise DusError(f"{source}: distill.alpha must be a number in [0, 1] (1 = pure KL), got {alpha!r}")
    temperature = raw["distill"]["temperature"]
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise DusError(f"{source}: distill.temperature must be a positive finite number, got {temperature!r}")
    radius = raw["seam"]["radius"]
    if not isinstance(radius, int) or isinstance(radius, bool) or radius < 1:
        raise DusError(f"{source}: seam.radius must be a whole number >= 1, got {radius!r}")
    layers = raw["seam"]["layers"]
    if layers != "auto" and not (
        isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
    ):
        raise DusError(f"{source}: seam.layers must be 'auto' or a list of layer indices, got {layers!r}")
    _validate_sft_values(raw["sft"], source)
    _validate_lora_values(raw["lora"], source)
    _validate_calibrate(raw["calibrate"], source)
    _validate_gates(raw, source)
    for key in ("max_samples", "eval_max_samples"):
        value = raw["data"][key]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise DusError(f"{source}: data.{key} must be a whole number >= 1 (or null for all rows), got {value!r}")
    if not raw["data"]["path"]:
        raise DusError(f"{source}: data.path is empty; give a data file, a save_to_disk directory or a hub name")
    from dus.heal.routes import data_specs

    data_specs(raw["data"]["path"])


# sft fields that must be positive: a typo here would fail deep inside training (or train
# something else) after OUT was created.
POSITIVE_SFT = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "learning_rate", "max_length", "logging_steps", "save_steps", "eval_steps", "num_train_epochs")


def _validate_sft_values(section: dict, source: str) -> None:
    """Each `sft:` value has its SFTConfig field's type (a YAML typo like `fast` for a
    number is caught here), and sizes and rates are positive."""
    import typing

    from trl import SFTConfig

    hints = typing.get_type_hints(SFTConfig)
    for key, value in section.items():
        wanted = hints.get(key)
        if value is None or wanted is None:
            continue
        allowed = tuple(t for t in (typing.get_args(wanted) or (wanted,)) if t in (int, float, bool, str))
        if not allowed or str in allowed:
            continue
        if isinstance(value, str) and (float in allowed or int in allowed):
            # YAML reads 3e-4 (no dot) as a string: take it as the number it spells
            try:
                number = float(value)
            except ValueError:
                number = None
            if number is not None:
                value = section[key] = int(number) if int in allowed and float not in allowed and number.is_integer() else number
        if isinstance(value, bool) and bool not in allowed:
            ok = False
        else:
            ok = isinstance(value, allowed) or (float in allowed and isinstance(value, int))
        if not ok:
            names = " or ".join(t.__name__ for t in allowed)
            raise DusError(f"{source}: sft.{key} must be a {names}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise DusError(f"{source}: sft.{key} must be a finite number, got {value!r}")
        if key in POSITIVE_SFT and not isinstance(value, bool) and value <= 0:
            raise DusError(f"{source}: sft.{key} must be positive, got {value!r}")
    max_steps = section.get("max_steps")
    if isinstance(max_steps, int) and max_steps < -1:
        raise DusError(f"{source}: sft.max_steps must be >= 0 (or -1 to train num_train_epochs), got {max_steps}")


def _validate_lora_values(section: dict, source: str) -> None:
    """LoRA's sizes and rates have the right sign (peft accepts some wrong ones and fails later)."""
    rank = section.get("r")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise DusError(f"{source}: lora.r (the LoRA rank) must be a whole number >= 1, got {rank!r}")
    alpha = section.get("lora_alpha")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha)
                              or alpha <= 0):
        raise DusError(f"{source}: lora.lora_alpha must be a positive number, got {alpha!r}")
    dropout = section.get("lora_dropout")
    if dropout is not None and (isinstance(dropout, bool) or not isinstance(dropout, (int, float))
                                or not 0 <= dropout < 1):
        raise DusError(f"{source}: lora.lora_dropout must be a number in [0, 1), got {dropout!r}")


def _validate_calibrate(section: dict, source: str) -> None:
    from dus.heal.calibrate import COPIES, MIN_FACTOR

    if section["copies"] not in COPIES:
        raise DusError(f"{source}: calibrate.copies must be one of {', '.join(COPIES)}, got {section['copies']!r}")
    if not isinstance(section["enabled"], bool):
        raise DusError(f"{source}: calibrate.enabled must be true or false, got {section['enabled']!r}")
    for key in ("tokens", "window"):
        value = section[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 2:
            raise DusError(f"{source}: calibrate.{key} must be a whole number >= 2, got {value!r}")
    factors = section["factors"]
    if not isinstance(factors, list) or not factors or not all(
        isinstance(f, (int, float)) and not isinstance(f, bool) and MIN_FACTOR <= f <= 1.0 for f in factors
    ):
        raise DusError(
            f"{source}: calibrate.factors must be a non-empty list of numbers in [{MIN_FACTOR}, 1] "
            f"(a repeated layer keeps at least {MIN_FACTOR} of its source norm), got {factors!r}"
        )


def _validate_gates(raw: dict, source: str) -> None:
    gates = raw["gates"]
    if not isinstance(gates["train"], bool):
        raise DusError(f"{source}: gates.train must be true or false, got {gates['train']!r}")
    lr = gates["lr"]
    if isinstance(lr, str):
        try:
            lr = gates["lr"] = float(lr)
        except ValueError:
            pass
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise DusError(f"{source}: gates.lr must be a positive finite number, got {gates['lr']!r}")
    trains = raw["distill"]["student"] if raw["mode"] == "distill" else raw["mode"]
    if gates["train"] and trains in ("lora", "qlora", "full"):
        raise DusError(f"{source}: gates.train works with the band, expand or gates students (the in-memory plan), "
                       f"not {trains}; use distill.student band or gates, or drop the gates (gates.train: false)")


def parse_set_option(item: str) -> tuple[str, Any]:
    """`section.key=value` from `--set`, the value read as YAML (numbers, booleans, lists)."""
    if "=" not in item:
        raise DusError(f"--set {item}: expected section.key=value, e.g. --set sft.warmup_steps=0")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def build_sft_config(cfg: HealConfig, output_dir: Path, run_name: str, use_cpu: bool, extra=None):
    """The `trl.SFTConfig` from the `sft:` section plus what dus decides."""
    from trl import SFTConfig

    kwargs = dict(cfg.section("sft"))
    kwargs.pop("model_init_kwargs", None)  # dus loads the model itself with these
    kwargs["output_dir"] = str(output_dir)
    kwargs["run_name"] = run_name
    if use_cpu:
        kwargs.setdefault("use_cpu", True)
        # No bf16 autocast on CPU unless asked: fp32 is the faster and safer default there.
        kwargs.setdefault("bf16", False)
    report_to = kwargs.get("report_to")
    if report_to in (None, "none", []) or report_to == ["none"]:
        kwargs["report_to"] = "none"
    kwargs.update(extra or {})
    try:
        return SFTConfig(**kwargs)
    except (ValueError, TypeError) as error:
        raise DusError(f"sft: {error}".splitlines()[0]) from None


def build_lora_config(cfg: HealConfig, target_modules: list[str] | str, layers: list[int] | None, layers_pattern: str):
    """A `peft.LoraConfig` from the `lora:` section; `target_modules: auto` and the layer
    list come from the seam selection (targets.py)."""
    from peft import LoraConfig

    kwargs = dict(cfg.section("lora"))
    if kwargs.get("target_modules") in ("auto", None):
        kwargs["target_modules"] = target_modules
    if "layers_to_transform" not in kwargs and layers is not None:
        kwargs["layers_to_transform"] = layers
        kwargs.setdefault("layers_pattern", layers_pattern)
    try:
        return LoraConfig(task_type="CAUSAL_LM", **kwargs)
    except (ValueError, TypeError) as error:
        raise DusError(f"lora: {error}".splitlines()[0]) from None

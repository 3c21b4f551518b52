"""Writing the healed model: one standalone Hugging Face checkpoint plus its history.

LoRA adapters are merged into the weights (PEFT's merge_and_unload), so the result loads
with a plain `from_pretrained` and feeds `dus compare` like any model. The build manifest
travels along, extended by a record of the healing (data, steps, config, final loss), so
the directory says how it was made. Files are written into a temporary directory first
and moved in with config.json last: a crash leaves no directory that looks loadable.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from dus.hashing import sha256_file
from dus.plan import MANIFEST_NAME

WEIGHT_PATTERNS = ("*.safetensors", "model.safetensors.index.json")
LAST_FILES = ("config.json", MANIFEST_NAME)  # moved in last: they make the directory a model


def weights_digest(model, trainable_only: bool = True) -> str:
    """sha256 over parameter names and bytes, to check that every rank ended identical."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if trainable_only and not param.requires_grad:
            continue
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    return sha256_file(path)


def standalone_model(model, base_dir: Path | None = None, dtype=None):
    """The plain transformers model: LoRA merged in when there is an adapter.

    A quantized (QLoRA) base is not merged into: its weights would be rounded back to 4
    bits. The adapter goes onto a fresh full-precision copy of the base and merges there."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return model
    base = model.get_base_model()
    if getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False):
        from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
        from transformers import AutoModelForCausalLM

        adapter = get_peft_model_state_dict(model)
        fresh = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype or "auto", use_safetensors=True)
        fresh = get_peft_model(fresh, model.peft_config["default"])
        set_peft_model_state_dict(fresh, adapter)
        return fresh.merge_and_unload()
    return model.merge_and_unload()


def healed_manifest(source_manifest, record: dict):
    """The source's build manifest (or a minimal one) with the heal record appended."""
    from dus.manifest import Manifest

    base = source_manifest or Manifest(plan=None, note="not built by dus build; this manifest records the healing only")
    return base.with_record(record)


def _teachers_line(record: dict) -> str:
    """The card's line on who taught the model and by which rule (distillation only)."""
    teachers = record.get("teachers")
    if not teachers:
        return ""
    rule = record.get("teacher_rule") or {}
    how = rule.get("rule", "single")
    if how == "ensemble":
        how += f" of {'probabilities' if rule.get('average') == 'prob' else 'log-probabilities'}"
        if rule.get("weights"):
            how += f", weights {rule['weights']}"
    names = ", ".join(f"{t['name']} ({t['path']})" if t["name"] != t["path"] else t["path"] for t in teachers)
    matching = record.get("activation_matching")
    extra = f"; activation matching, weight {matching['weight']}" if matching else ""
    return f"- teachers: {names}; rule: {how}{extra}\n"


def _gates_line(record: dict) -> str:
    """The card's line on the learned gates (folded into o_proj / down_proj), when they trained."""
    gates = record.get("gates")
    if not gates:
        return ""
    moved = [(int(i), b, gates["initial"][i][b], v) for i, row in gates["final"].items() for b, v in row.items()
             if int(i) in gates["trained_layers"]]
    shown = ", ".join(f"{i}.{'attn' if b == 'attention' else 'mlp'} {a:g}->{v:.3f}" for i, b, a, v in moved[:12])
    more = f" (+{len(moved) - 12} more)" if len(moved) > 12 else ""
    return (f"- learned gates (attention and MLP output of each trained layer, folded into o_proj / down_proj): "
            f"{shown}{more}\n")


def model_card(source_dir: Path, record: dict) -> str:
    """The source's card (front matter and text kept) with a section on the healing."""
    from dus.cards import card_text, read_card

    source = read_card(source_dir / "README.md")
    loss = record.get("final_loss")
    loss_text = f"{loss:.4f}" if isinstance(loss, float) else "n/a"
    healed = (
        "## Healed with dus heal\n\n"
        + f"- mode: {record['mode']}\n"
        + f"- layers trained: {record.get('layers', 'all')}\n"
        + f"- data: {record['data']['path']} ({record['data']['rows']} rows, {record['data']['format']})\n"
        + f"- steps: {record['steps']}, final training loss: {loss_text}\n"
        + _teachers_line(record)
        + _gates_line(record)
        + "- full record: the last entry of `history` in dus-manifest.json\n"
    )
    if source is None:
        return card_text(healed, None, ["dus", "dus-heal"])
    source.text = source.text.rstrip() + "\n\n" + healed
    return str(source)


def write_healed_model(model, tokenizer, source_dir: Path, out_dir: Path, manifest: dict, record: dict, dtype=None):
    """Save `model` (merged if LoRA) with tokenizer, card and manifest into `out_dir`."""
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".tmp-model-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        plain = standalone_model(model, source_dir, torch_dtype)
        if torch_dtype is not None:
            plain = plain.to(torch_dtype)
        plain.config.use_cache = True
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(source_dir, record))
        (tmp / MANIFEST_NAME).write_text(json.dumps(healed_manifest(manifest, record).to_dict(), indent=2) + "\n")
        move_into(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def move_into(tmp: Path, out_dir: Path) -> None:
    """Move a finished model from `tmp` into `out_dir`: the previous model's config and
    manifest go first, its weights next, then the new files with config.json and the
    manifest last, so no moment shows a directory that loads with mixed weights."""
    for stale in LAST_FILES:
        (out_dir / stale).unlink(missing_ok=True)
    for pattern in WEIGHT_PATTERNS:
        for old in out_dir.glob(pattern):
            old.unlink()
    names = sorted(p.name for p in tmp.iterdir())
    for name in [n for n in names if n not in LAST_FILES] + [n for n in LAST_FILES if n in names]:
        os.replace(tmp / name, out_dir / name)

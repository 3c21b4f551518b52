"""Heal by distillation: the source model shows the student what the seam broke.

In a DUS build the source model computes exactly the function the seam disturbed, and it
shares the student's tokenizer, so its next-token distribution on any text is a dense
training signal: no labels, no instruction data, plain text heals. The loss is

    alpha * T^2 * KL(teacher_T || student_T)  +  (1 - alpha) * NLL(student)

over the same tokens SFT would train on (`labels != -100`), with T the temperature.

Why a subclass of SFTTrainer and not TRL's GKDTrainer: GKD (trl.experimental) takes chat
data only, mixes in on-policy generation, and has no SFT term; this subclass keeps every
SFTTrainer data format and feature (packing, assistant-only loss, PEFT, accelerate) and
changes only `compute_loss`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from trl import SFTTrainer

from dus.errors import DusError


def teacher_path(model_dir: str | Path, manifest, teacher: str | None) -> Path:
    """The teacher: `--teacher`/`distill.teacher` if given, else the plan's `config_from`
    source (the model whose layers were stacked)."""
    if teacher and teacher != "auto":
        path = Path(teacher).expanduser()
        if not (path / "config.json").is_file():
            raise DusError(f"teacher {teacher}: not a model directory (no config.json)")
        return path
    if manifest is None or manifest.plan is None:
        raise DusError(
            f"distill needs a teacher: {model_dir} has no dus-manifest.json naming its source; "
            "pass --teacher PATH (a model with the same tokenizer)"
        )
    plan = manifest.plan
    if plan.config_from not in plan.models:
        raise DusError(f"dus-manifest.json: plan.config_from '{plan.config_from}' is not in plan.models; pass --teacher PATH")
    raw = Path(plan.models[plan.config_from]).expanduser()
    for candidate in (raw, Path(model_dir) / raw):
        if (candidate / "config.json").is_file():
            return candidate
    raise DusError(
        f"teacher '{plan.config_from}' from the manifest is not at {raw} any more; pass --teacher PATH to its directory"
    )


def distillation_loss(student_logits, teacher_logits, labels, alpha: float, temperature: float):
    """Summed (not averaged) KL and NLL over positions whose next token has a label.

    Returns (loss_sum, kl_sum, nll_sum, count); the caller divides by the token count
    of the whole (accumulated, multi-rank) batch, as Trainer expects."""
    target = labels[:, 1:]
    mask = target != -100
    student = student_logits[:, :-1][mask].float()
    teacher = teacher_logits[:, :-1][mask].float()
    count = mask.sum()
    scaled_student, scaled_teacher = student, teacher
    if temperature != 1.0:  # a division over the whole vocabulary, forward and backward: only when needed
        scaled_student, scaled_teacher = student / temperature, teacher / temperature
    log_q = F.log_softmax(scaled_student, dim=-1)
    log_p = F.log_softmax(scaled_teacher, dim=-1)
    kl_sum = (log_p.exp() * (log_p - log_q)).sum() * temperature**2
    if alpha < 1.0 or temperature != 1.0:
        nll_sum = F.cross_entropy(student, target[mask], reduction="sum")
    else:  # only logged: log_q already holds the student's log-probabilities (a second softmax costs ~2% of a step)
        nll_sum = -log_q.detach().gather(1, target[mask].unsqueeze(1)).sum()
    loss_sum = alpha * kl_sum + (1.0 - alpha) * nll_sum if alpha < 1.0 else kl_sum
    return loss_sum, kl_sum.detach(), nll_sum.detach(), count


class DistillSFTTrainer(SFTTrainer):
    """SFTTrainer with a teacher: the loss is KL to the teacher's token distributions,
    optionally mixed with SFT's NLL (see the module docstring)."""

    _tag_names = ["trl", "sft", "dus", "distill"]

    def __init__(self, *args, teacher_model, alpha: float = 1.0, temperature: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        student_vocab = self.model.config.get_text_config().vocab_size
        teacher_vocab = teacher_model.config.get_text_config().vocab_size
        if student_vocab != teacher_vocab:
            raise DusError(
                f"the teacher's vocabulary ({teacher_vocab}) differs from the student's ({student_vocab}); "
                "distillation compares token distributions, so the teacher must share the tokenizer"
            )
        teacher_model.eval()
        teacher_model.requires_grad_(False)
        if self.is_deepspeed_enabled:
            # An inference engine of its own: under ZeRO-3 the teacher was loaded partitioned
            # (deepspeed.zero.Init) and only an engine gathers its weights for each forward.
            from trl.models.utils import prepare_deepspeed

            self.teacher_model = prepare_deepspeed(teacher_model, self.accelerator)
        else:
            self.teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)
        self.alpha = float(alpha)
        self.temperature = float(temperature)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        labels = inputs["labels"]
        forward = {k: v for k, v in inputs.items() if k != "labels"}
        forward["use_cache"] = False
        outputs = model(**forward)
        with torch.no_grad():
            teacher_logits = self.teacher_model(**forward).logits
        loss_sum, kl_sum, nll_sum, count = distillation_loss(
            outputs.logits, teacher_logits, labels, self.alpha, self.temperature
        )
        denominator = num_items_in_batch if num_items_in_batch is not None else count
        loss = loss_sum / torch.as_tensor(denominator, device=loss_sum.device).clamp(min=1)
        # Like SFTTrainer: num_items_in_batch counts every rank's tokens and DDP averages gradients.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes

        tokens = self.accelerator.gather_for_metrics(count.detach().reshape(1)).sum()
        kl = self.accelerator.gather_for_metrics(kl_sum.reshape(1)).sum()
        nll = self.accelerator.gather_for_metrics(nll_sum.reshape(1)).sum()
        if tokens > 0:
            self._metrics[mode]["distill_kl"].append((kl / tokens).item())
            self._metrics[mode]["nll"].append((nll / tokens).item())
        if mode == "train":
            if "attention_mask" in inputs:
                seen = inputs["attention_mask"].sum()
            else:
                seen = torch.tensor(inputs["input_ids"].numel(), device=inputs["input_ids"].device)
            self._total_train_tokens += self.accelerator.gather_for_metrics(seen.reshape(1)).sum().item()
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return (loss, outputs) if return_outputs else loss

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
import torch.nn as nn
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


def _loss_terms(student, teacher, target, alpha: float, temperature: float):
    """Summed loss, KL and NLL over rows of float logits `student`/`teacher` (tokens x
    vocabulary) whose next tokens are `target`."""
    scaled_student, scaled_teacher = student, teacher
    if temperature != 1.0:  # a division over the whole vocabulary, forward and backward: only when needed
        scaled_student, scaled_teacher = student / temperature, teacher / temperature
    log_q = F.log_softmax(scaled_student, dim=-1)
    log_p = F.log_softmax(scaled_teacher, dim=-1)
    kl_sum = (log_p.exp() * (log_p - log_q)).sum() * temperature**2
    if alpha < 1.0 or temperature != 1.0:
        nll_sum = F.cross_entropy(student, target, reduction="sum")
    else:  # only logged: log_q already holds the student's log-probabilities (a second softmax costs ~2% of a step)
        nll_sum = -log_q.detach().gather(1, target.unsqueeze(1)).sum()
    loss_sum = alpha * kl_sum + (1.0 - alpha) * nll_sum if alpha < 1.0 else kl_sum
    return loss_sum, kl_sum.detach(), nll_sum.detach()


def distillation_loss(student_logits, teacher_logits, labels, alpha: float, temperature: float):
    """Summed (not averaged) KL and NLL over positions whose next token has a label, from
    whole logits (batch x sequence x vocabulary). Returns (loss_sum, kl_sum, nll_sum, count);
    the caller divides by the token count of the whole (accumulated, multi-rank) batch, as
    Trainer expects. `chunked_distillation_loss` gives the same values without the logits."""
    target = labels[:, 1:]
    mask = target != -100
    student = student_logits[:, :-1][mask].float()
    teacher = teacher_logits[:, :-1][mask].float()
    return (*_loss_terms(student, teacher, target[mask], alpha, temperature), mask.sum())


# Tokens per chunk: about this many logits (x 4 bytes) of each model exist at a time. A
# chunk's softmaxes and gradients are three such tensors in the fused chunk (`_fused_chunk`,
# the default heal) and about seven under autograd (a softcap, T != 1, a trained head). On
# the CPU the smaller chunk costs nothing measurable and saved ~300 MB of a step's peak
# (SmolLM2, 49K vocabulary, under autograd); on an accelerator the larger one keeps the
# head's matmuls big enough to fill the device.
CHUNK_LOGITS = 1 << 24
CHUNK_LOGITS_CPU = 1 << 22


def chunk_tokens(vocab: int, device: torch.device) -> int:
    budget = CHUNK_LOGITS_CPU if device.type == "cpu" else CHUNK_LOGITS
    return max(1, budget // vocab)


def head_logits(hidden, weight, softcap: float | None):
    """What a causal LM's head does to its last hidden states (Gemma caps them with tanh),
    in the model's dtype, then float32 for the loss."""
    logits = F.linear(hidden, weight)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.float()


def _log_softmax_(logits: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Rows of `logits` made their log-softmax in place; `scratch` (same shape) ends holding
    the probabilities."""
    logits.sub_(logits.amax(dim=-1, keepdim=True))
    torch.exp(logits, out=scratch)
    logits.sub_(scratch.sum(dim=-1, keepdim=True).log_())
    torch.exp(logits, out=scratch)
    return logits


class _ChunkBuffers:
    """The three float32 (tokens x vocabulary) tensors a fused chunk works in, made once per
    loss and reused by every chunk, plus one in the head's dtype when that is not float32."""

    def __init__(self, chunk: int, vocab: int, like: torch.Tensor):
        self.float = [torch.empty(chunk, vocab, dtype=torch.float32, device=like.device) for _ in range(3)]
        self.native = None if like.dtype == torch.float32 else torch.empty(chunk, vocab, dtype=like.dtype,
                                                                             device=like.device)

    def head(self, hidden, weight, out: torch.Tensor) -> torch.Tensor:
        """`head_logits` without a softcap, into `out` (float32)."""
        if self.native is None:
            return torch.mm(hidden, weight.t(), out=out)
        native = torch.mm(hidden, weight.t(), out=self.native[: hidden.shape[0]])
        return out.copy_(native)


def _fused_chunk(hidden, weight, teacher_hidden, teacher_weight, target, alpha, buffers, grad_hidden):
    """The loss of one chunk at temperature 1 without softcaps, and its gradient for the
    student's hidden states written into `grad_hidden` (unless None), in the three reused buffers:

        d(loss)/d(student logits) = softmax(student) - alpha * p - (1 - alpha) * onehot(target)

    Returns the float32 sums (loss, kl, nll)."""
    rows = hidden.shape[0]
    student, teacher, scratch = (buffer[:rows] for buffer in buffers.float)
    log_q = _log_softmax_(buffers.head(hidden, weight, out=student), scratch)
    log_p = _log_softmax_(buffers.head(teacher_hidden, teacher_weight, out=teacher), scratch)
    p = scratch
    nll = -log_q.gather(1, target.unsqueeze(1)).sum()
    kl = log_p.sub_(log_q).mul_(p).sum()  # p (log p - log q); the teacher buffer is free after this
    if grad_hidden is not None:  # None: no gradient wanted (evaluation)
        grad = log_q.exp_().sub_(p, alpha=alpha)
        if alpha < 1.0:
            grad[torch.arange(rows, device=grad.device), target] -= 1.0 - alpha
        if buffers.native is None:
            torch.mm(grad, weight, out=grad_hidden)
        else:
            grad_hidden.copy_(torch.mm(buffers.native[:rows].copy_(grad), weight))
    loss = alpha * kl + (1.0 - alpha) * nll if alpha < 1.0 else kl
    return loss, kl, nll


class _ChunkedDistillation(torch.autograd.Function):
    """The distillation loss from last hidden states, a chunk of tokens at a time.

    Each chunk's logits (student and teacher), softmaxes and gradients exist only while
    that chunk is computed: the gradients with respect to the student's hidden states (and
    head weight, if it trains) are summed during the forward pass, and backward only scales
    them. Memory is a chunk's logits instead of a batch's, with no recomputation.

    At temperature 1 without softcaps (the default heal) and with a frozen head, the chunk
    is computed in three buffers made once and reused (`_fused_chunk`, the gradient written
    by hand); otherwise autograd differentiates each chunk, making its tensors afresh."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, target, alpha, temperature, softcap,
                teacher_softcap, chunk):
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        totals = torch.zeros(3, dtype=torch.float32, device=hidden.device)
        fused = temperature == 1.0 and not softcap and not teacher_softcap and grad_weight is None
        buffers = _ChunkBuffers(min(chunk, hidden.shape[0]), weight.shape[0], hidden) if fused else None
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            if fused:
                out = None if grad_hidden is None else grad_hidden[rows]
                loss, kl, nll = _fused_chunk(hidden[rows], weight, teacher_hidden[rows], teacher_weight, target[rows],
                                             alpha, buffers, out)
                totals += torch.stack([loss, kl, nll])
                continue
            with torch.no_grad():
                teacher = head_logits(teacher_hidden[rows], teacher_weight, teacher_softcap)
            with torch.enable_grad():
                h = hidden[rows].detach().requires_grad_(grad_hidden is not None)
                w = weight.detach().requires_grad_(grad_weight is not None)
                loss, kl, nll = _loss_terms(head_logits(h, w, softcap), teacher, target[rows], alpha, temperature)
                wanted = [t for t, g in ((h, grad_hidden), (w, grad_weight)) if g is not None]
                grads = torch.autograd.grad(loss, wanted) if wanted else ()
            grads = list(grads)
            if grad_hidden is not None:
                grad_hidden[rows] = grads.pop(0)
            if grad_weight is not None:
                grad_weight += grads.pop(0)
            totals += torch.stack([loss.detach(), kl, nll])
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight) if g is not None))
        ctx.has = (grad_hidden is not None, grad_weight is not None)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return totals[0], totals[1], totals[2]

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_nll):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) * grad_loss.to(next_dtype) if has else None
                 for has, next_dtype in zip(ctx.has, ctx.dtypes)]
        return (*grads, None, None, None, None, None, None, None, None)


def chunked_distillation_loss(hidden, weight, teacher_hidden, teacher_weight, labels, alpha: float,
                              temperature: float, softcap: float | None = None, teacher_softcap: float | None = None,
                              chunk: int | None = None):
    """`distillation_loss` from the last hidden states and head weights of both models,
    never holding either model's logits for the whole batch."""
    target = labels[:, 1:]
    mask = target != -100
    rows = hidden[:, :-1][mask]
    teacher_rows = teacher_hidden[:, :-1][mask]
    chunk = chunk or chunk_tokens(weight.shape[0], hidden.device)
    loss, kl, nll = _ChunkedDistillation.apply(rows, weight, teacher_rows, teacher_weight, target[mask], float(alpha),
                                               float(temperature), softcap, teacher_softcap, chunk)
    return loss, kl.detach(), nll.detach(), mask.sum()


class DeferredHead(nn.Module):
    """Stands in for the student's lm_head while it trains: keeps the last hidden states
    and returns no logits, so the loss can compute them a chunk at a time. Its `weight` is
    the head's own parameter (tied to the embeddings where they are tied)."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.weight = head.weight
        self.hidden = None

    def forward(self, hidden):
        self.hidden = hidden
        return hidden[..., :0]

    def take(self):
        hidden, self.hidden = self.hidden, None
        return hidden


def causal_lm(model):
    """The transformers causal LM inside a PEFT or accelerate wrapper."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def softcap_of(model) -> float | None:
    return getattr(model.config.get_text_config(), "final_logit_softcapping", None)


class DistillSFTTrainer(SFTTrainer):
    """SFTTrainer with a teacher: the loss is KL to the teacher's token distributions,
    optionally mixed with SFT's NLL (see the module docstring).

    Where the models are whole in this process (one process or DDP), neither model's
    logits for the batch are ever formed: both stop at their last hidden states and
    `chunked_distillation_loss` applies the heads a chunk of tokens at a time; the
    teacher may start from the student's hidden state (`shared`, dus.heal.teacher).
    Under FSDP or DeepSpeed (weights sharded, forwards owned by the engine), or with
    `distill.logits: whole`, the loss takes whole logits from both models' forwards."""

    _tag_names = ["trl", "sft", "dus", "distill"]

    def __init__(self, *args, teacher_model, alpha: float = 1.0, temperature: float = 1.0, shared=None,
                 chunked: bool = True, **kwargs):
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
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        from dus.heal.distributed import sharded_launch

        self.chunked = chunked and not sharded_launch()
        if not self.chunked:
            if self.is_deepspeed_enabled:
                # An inference engine of its own: under ZeRO-3 the teacher was loaded partitioned
                # (deepspeed.zero.Init) and only an engine gathers its weights for each forward.
                from trl.models.utils import prepare_deepspeed

                self.teacher_model = prepare_deepspeed(teacher_model, self.accelerator)
            else:
                self.teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)
            return
        from dus.heal.teacher import share_with_student

        self.teacher_model = teacher_model.to(self.accelerator.device)
        student = causal_lm(self.model)
        self.shared = shared or share_with_student(teacher_model, student, 0)
        self.teacher_head = teacher_model.get_output_embeddings()
        self.original_head = student.get_output_embeddings()
        for head in (self.teacher_head, self.original_head):
            if getattr(head, "bias", None) is not None:
                raise DusError("dus distils from models whose lm_head has no bias; this one has one")
        self.student_head = DeferredHead(self.original_head)
        student.set_output_embeddings(self.student_head)
        self.softcaps = (softcap_of(student), softcap_of(teacher_model))

    def restore_head(self) -> None:
        """Put the student's own lm_head back (before saving it as a model)."""
        if self.chunked:
            causal_lm(self.model).set_output_embeddings(self.original_head)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        labels = inputs["labels"]
        forward = {k: v for k, v in inputs.items() if k != "labels"}
        forward["use_cache"] = False
        outputs = model(**forward)
        if self.chunked:
            with torch.no_grad():
                teacher_hidden = self.shared.decoder(**forward).last_hidden_state
            loss_sum, kl_sum, nll_sum, count = chunked_distillation_loss(
                self.student_head.take(), self.student_head.weight, teacher_hidden, self.teacher_head.weight, labels,
                self.alpha, self.temperature, *self.softcaps)
        else:
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

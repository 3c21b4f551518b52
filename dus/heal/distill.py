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

import torch
import torch.nn as nn
import torch.nn.functional as F
from trl import SFTTrainer

from dus.errors import DusError
from dus.heal.mix import TeacherLogits, mix_log_probs_, mixed_log_probs
from dus.heal.mix import log_softmax_ as _log_softmax_
from dus.heal.routes import ROUTE_COLUMN, prepare_routed


def _loss_terms(student, teacher, target, alpha: float, temperature: float):
    """Summed loss, KL and NLL over rows of float logits `student`/`teacher` (tokens x
    vocabulary) whose next tokens are `target`."""
    scaled_student, scaled_teacher = student, teacher
    if temperature != 1.0:  # a division over the whole vocabulary, forward and backward: only when needed
        scaled_student, scaled_teacher = student / temperature, teacher / temperature
    log_p = F.log_softmax(scaled_teacher, dim=-1)
    return _terms_from_log_p(student, scaled_student, log_p, target, alpha, temperature)


def _terms_from_log_p(student, scaled_student, log_p, target, alpha: float, temperature: float):
    """`_loss_terms` given the target's log-probabilities `log_p` (one teacher's, or several
    combined by dus.heal.mix) at the temperature."""
    log_q = F.log_softmax(scaled_student, dim=-1)
    kl_sum = (log_p.exp() * (log_p - log_q)).sum() * temperature**2
    if alpha < 1.0 or temperature != 1.0:
        nll_sum = F.cross_entropy(student, target, reduction="sum")
    else:  # only logged: log_q already holds the student's log-probabilities (a second softmax costs ~2% of a step)
        nll_sum = -log_q.detach().gather(1, target.unsqueeze(1)).sum()
    loss_sum = alpha * kl_sum + (1.0 - alpha) * nll_sum if alpha < 1.0 else kl_sum
    return loss_sum, kl_sum.detach(), nll_sum.detach()


def _mixed_loss_terms(student, teachers: list, target, route, mix, alpha: float, temperature: float):
    """`_loss_terms` against several teachers' float logits, combined by `mix`."""
    with torch.no_grad():
        log_p = mixed_log_probs(mix, teachers, target, route, temperature)
    scaled_student = student / temperature if temperature != 1.0 else student
    return _terms_from_log_p(student, scaled_student, log_p, target, alpha, temperature)


def _several(teacher) -> bool:
    return isinstance(teacher, (list, tuple)) and len(teacher) > 1


def _one(teacher):
    return teacher[0] if isinstance(teacher, (list, tuple)) else teacher


def distillation_loss(student_logits, teacher_logits, labels, alpha: float, temperature: float, mix=None,
                      route=None):
    """Summed (not averaged) KL and NLL over positions whose next token has a label, from
    whole logits (batch x sequence x vocabulary). Returns (loss_sum, kl_sum, nll_sum, count);
    the caller divides by the token count of the whole (accumulated, multi-rank) batch, as
    Trainer expects. `chunked_distillation_loss` gives the same values without the logits.
    `teacher_logits` may be a list (several teachers, combined by `mix`; `route` gives each
    position's teacher index for the route rule)."""
    target = labels[:, 1:]
    mask = target != -100
    student = student_logits[:, :-1][mask].float()
    if _several(teacher_logits):
        teachers = [logits[:, :-1][mask].float() for logits in teacher_logits]
        rows_route = route[:, 1:][mask] if route is not None else None
        terms = _mixed_loss_terms(student, teachers, target[mask], rows_route, mix, alpha, temperature)
        return (*terms, mask.sum())
    teacher = _one(teacher_logits)[:, :-1][mask].float()
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


class _ChunkBuffers:
    """The three float32 (tokens x vocabulary) tensors a fused chunk works in, made once per
    loss and reused by every chunk, plus one in the head's dtype when that is not float32."""

    def __init__(self, chunk: int, vocab: int, like: torch.Tensor, count: int = 3):
        self.float = [torch.empty(chunk, vocab, dtype=torch.float32, device=like.device) for _ in range(count)]
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
    return _fused_kl_and_gradient(log_q, log_p, p, nll, target, weight, alpha, buffers, grad_hidden)


def _fused_kl_and_gradient(log_q, log_p, p, nll, target, weight, alpha, buffers, grad_hidden):
    """The KL from the student's log-probabilities (`log_q`) and the target's (`log_p`, `p`),
    in place in their buffers, and the gradient for the hidden states written into
    `grad_hidden` (None: none wanted, evaluation); returns (loss, kl, nll)."""
    rows = log_q.shape[0]
    kl = log_p.sub_(log_q).mul_(p).sum()  # p (log p - log q); the teacher buffer is free after this
    if grad_hidden is not None:
        grad = log_q.exp_().sub_(p, alpha=alpha)
        if alpha < 1.0:
            grad[torch.arange(rows, device=grad.device), target] -= 1.0 - alpha
        if buffers.native is None:
            torch.mm(grad, weight, out=grad_hidden)
        else:
            grad_hidden.copy_(torch.mm(buffers.native[:rows].copy_(grad), weight))
    loss = alpha * kl + (1.0 - alpha) * nll if alpha < 1.0 else kl
    return loss, kl, nll


def _fused_mixed_chunk(hidden, weight, teacher_hiddens, teacher_weights, target, route, mix, alpha, buffers,
                       grad_hidden):
    """`_fused_chunk` against several teachers combined by `mix` (dus.heal.mix), in four
    reused buffers however many teachers there are: each teacher's logits exist in turn."""
    rows = hidden.shape[0]
    student, work, scratch, acc = (buffer[:rows] for buffer in buffers.float)
    log_q = _log_softmax_(buffers.head(hidden, weight, out=student), scratch)
    nll = -log_q.gather(1, target.unsqueeze(1)).sum()

    def teacher_logits(k, out):
        return buffers.head(teacher_hiddens[k], teacher_weights[k], out=out)

    log_p = mix_log_probs_(mix, TeacherLogits(teacher_logits, len(teacher_hiddens)), target, route, acc, work, scratch)
    return _fused_kl_and_gradient(log_q, log_p, scratch, nll, target, weight, alpha, buffers, grad_hidden)


class _MixedChunkedDistillation(torch.autograd.Function):
    """`_ChunkedDistillation` against several teachers (tuples of hidden states, head weights
    and softcaps), their distributions combined by a `TeacherMix` chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher_hiddens, teacher_weights, target, route, mix, alpha, temperature,
                softcap, teacher_softcaps, chunk):
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        totals = torch.zeros(3, dtype=torch.float32, device=hidden.device)
        fused = temperature == 1.0 and not softcap and not any(teacher_softcaps) and grad_weight is None
        buffers = _ChunkBuffers(min(chunk, hidden.shape[0]), weight.shape[0], hidden, count=4) if fused else None
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            chunk_route = route[rows] if route is not None else None
            chunk_teachers = [h[rows] for h in teacher_hiddens]
            if fused:
                out = None if grad_hidden is None else grad_hidden[rows]
                loss, kl, nll = _fused_mixed_chunk(hidden[rows], weight, chunk_teachers, teacher_weights, target[rows],
                                                   chunk_route, mix, alpha, buffers, out)
                totals += torch.stack([loss, kl, nll])
                continue
            with torch.no_grad():
                teachers = [head_logits(h, w, cap) for h, w, cap in zip(chunk_teachers, teacher_weights,
                                                                         teacher_softcaps)]
            terms = lambda logits: _mixed_loss_terms(logits, teachers, target[rows], chunk_route, mix,  # noqa: E731
                                                     alpha, temperature)
            totals += _autograd_chunk(hidden, weight, softcap, rows, terms, grad_hidden, grad_weight)
        return _keep_gradients(ctx, totals, hidden, weight, grad_hidden, grad_weight)

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_nll):
        return (*_scaled_grads(ctx, grad_loss), *([None] * 10))


def _autograd_chunk(hidden, weight, softcap, rows, terms, grad_hidden, grad_weight) -> torch.Tensor:
    """One chunk differentiated by autograd (a softcap, T != 1, a trained head): `terms` maps
    the chunk's student logits to (loss, kl, nll); the gradients for the chunk's hidden states
    and the head go into `grad_hidden[rows]` / `grad_weight`. Returns the three sums."""
    with torch.enable_grad():
        h = hidden[rows].detach().requires_grad_(grad_hidden is not None)
        w = weight.detach().requires_grad_(grad_weight is not None)
        loss, kl, nll = terms(head_logits(h, w, softcap))
        wanted = [t for t, g in ((h, grad_hidden), (w, grad_weight)) if g is not None]
        grads = list(torch.autograd.grad(loss, wanted) if wanted else ())
    if grad_hidden is not None:
        grad_hidden[rows] = grads.pop(0)
    if grad_weight is not None:
        grad_weight += grads.pop(0)
    return torch.stack([loss.detach(), kl, nll])


def _keep_gradients(ctx, totals, hidden, weight, grad_hidden, grad_weight):
    """Save the summed gradients for backward; return the loss, KL and NLL sums."""
    ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight) if g is not None))
    ctx.has = (grad_hidden is not None, grad_weight is not None)
    ctx.dtypes = (hidden.dtype, weight.dtype)
    return totals[0], totals[1], totals[2]


def _scaled_grads(ctx, grad_loss) -> list:
    """The gradients summed in forward, scaled by the loss's incoming gradient."""
    saved = iter(ctx.saved_tensors)
    return [next(saved) * grad_loss.to(dtype) if has else None for has, dtype in zip(ctx.has, ctx.dtypes)]


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
            terms = lambda logits: _loss_terms(logits, teacher, target[rows], alpha, temperature)  # noqa: E731
            totals += _autograd_chunk(hidden, weight, softcap, rows, terms, grad_hidden, grad_weight)
        return _keep_gradients(ctx, totals, hidden, weight, grad_hidden, grad_weight)

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_nll):
        return (*_scaled_grads(ctx, grad_loss), None, None, None, None, None, None, None, None)


def chunked_distillation_loss(hidden, weight, teacher_hidden, teacher_weight, labels, alpha: float,
                              temperature: float, softcap: float | None = None, teacher_softcap=None,
                              chunk: int | None = None, mix=None, route=None):
    """`distillation_loss` from the last hidden states and head weights of both models,
    never holding either model's logits for the whole batch. Several teachers: lists of
    hidden states, head weights and softcaps, combined by `mix` (dus.heal.mix)."""
    target = labels[:, 1:]
    mask = target != -100
    rows = hidden[:, :-1][mask]
    chunk = chunk or chunk_tokens(weight.shape[0], hidden.device)
    if _several(teacher_hidden):
        count = len(teacher_hidden)
        caps = tuple(teacher_softcap) if isinstance(teacher_softcap, (list, tuple)) else (teacher_softcap,) * count
        teacher_rows = tuple(h[:, :-1][mask] for h in teacher_hidden)
        rows_route = route[:, 1:][mask] if route is not None else None
        loss, kl, nll = _MixedChunkedDistillation.apply(rows, weight, teacher_rows, tuple(teacher_weight),
                                                        target[mask], rows_route, mix, float(alpha),
                                                        float(temperature), softcap, caps, chunk)
        return loss, kl.detach(), nll.detach(), mask.sum()
    teacher_rows = _one(teacher_hidden)[:, :-1][mask]
    loss, kl, nll = _ChunkedDistillation.apply(rows, weight, teacher_rows, _one(teacher_weight), target[mask],
                                               float(alpha), float(temperature), softcap, _one(teacher_softcap), chunk)
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
                 chunked: bool = True, mix=None, hidden_match=None, **kwargs):
        super().__init__(*args, **kwargs)
        teachers = list(teacher_model) if isinstance(teacher_model, (list, tuple)) else [teacher_model]
        shareds = list(shared) if isinstance(shared, (list, tuple)) else [shared] * len(teachers)
        student_vocab = self.model.config.get_text_config().vocab_size
        for teacher in teachers:
            teacher_vocab = teacher.config.get_text_config().vocab_size
            if student_vocab != teacher_vocab:
                raise DusError(
                    f"the teacher's vocabulary ({teacher_vocab}) differs from the student's ({student_vocab}); "
                    "distillation compares token distributions, so the teacher must share the tokenizer"
                )
            teacher.eval()
            teacher.requires_grad_(False)
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.mix = mix
        self.hidden_match = hidden_match
        from dus.heal.distributed import sharded_launch

        self.chunked = chunked and not sharded_launch()
        if hidden_match is not None and not self.chunked:
            raise DusError("distill.hidden (activation matching) needs the chunked loss in one process or DDP "
                           "(distill.logits: chunked, no FSDP or DeepSpeed)")
        if not self.chunked:
            if self.is_deepspeed_enabled:
                # An inference engine of its own: under ZeRO-3 the teacher was loaded partitioned
                # (deepspeed.zero.Init) and only an engine gathers its weights for each forward.
                from trl.models.utils import prepare_deepspeed

                self.teacher_models = [prepare_deepspeed(t, self.accelerator) for t in teachers]
            else:
                self.teacher_models = [self.accelerator.prepare_model(t, evaluation_mode=True) for t in teachers]
            self.teacher_model = self.teacher_models[0]
            return
        from dus.heal.teacher import share_with_student

        self.teacher_models = [t.to(self.accelerator.device) for t in teachers]
        self.teacher_model = self.teacher_models[0]
        student = causal_lm(self.model)
        self.shareds = [s or share_with_student(t, student, 0) for s, t in zip(shareds, teachers)]
        self.shared = self.shareds[0]
        self.teacher_heads = [t.get_output_embeddings() for t in teachers]
        self.teacher_head = self.teacher_heads[0]
        self.original_head = student.get_output_embeddings()
        for head in (*self.teacher_heads, self.original_head):
            if getattr(head, "bias", None) is not None:
                raise DusError("dus distils from models whose lm_head has no bias; this one has one")
        self.student_head = DeferredHead(self.original_head)
        student.set_output_embeddings(self.student_head)
        self.softcaps = (softcap_of(student), [softcap_of(t) for t in teachers])
        if hidden_match is not None:
            hidden_match.attach(student, self.shareds)

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        """Routed data (a `dus_teacher` column) is prepared one teacher at a time, so a packed
        sequence holds one teacher's tokens; each sequence keeps its teacher's index."""
        names = getattr(dataset, "column_names", None) or []
        if ROUTE_COLUMN not in names:
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        return prepare_routed(dataset, lambda part: super(DistillSFTTrainer, self)._prepare_dataset(
            part, processing_class, args, packing, formatting_func, dataset_name), args.seed)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if ROUTE_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, ROUTE_COLUMN]

    def restore_head(self) -> None:
        """Put the student's own lm_head back (before saving it as a model)."""
        if self.chunked:
            causal_lm(self.model).set_output_embeddings(self.original_head)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        labels = inputs["labels"]
        route = inputs.get(ROUTE_COLUMN)
        forward = {k: v for k, v in inputs.items() if k not in ("labels", ROUTE_COLUMN)}
        forward["use_cache"] = False
        if self.hidden_match is not None:
            self.hidden_match.begin("student")
        outputs = model(**forward)
        if self.chunked:
            teacher_hidden = []
            with torch.no_grad():
                for index, shared in enumerate(self.shareds):
                    if self.hidden_match is not None:
                        self.hidden_match.begin(index)
                    teacher_hidden.append(shared.decoder(**forward).last_hidden_state)
            if self.hidden_match is not None:
                self.hidden_match.begin(None)
            student_softcap, teacher_softcaps = self.softcaps
            loss_sum, kl_sum, nll_sum, count = chunked_distillation_loss(
                self.student_head.take(), self.student_head.weight, teacher_hidden,
                [head.weight for head in self.teacher_heads], labels, self.alpha, self.temperature, student_softcap,
                teacher_softcaps, mix=self.mix, route=route)
        else:
            with torch.no_grad():
                teacher_logits = [teacher(**forward).logits for teacher in self.teacher_models]
            loss_sum, kl_sum, nll_sum, count = distillation_loss(
                outputs.logits, teacher_logits, labels, self.alpha, self.temperature, mix=self.mix, route=route
            )
        hidden_sum = None
        if self.hidden_match is not None:
            hidden_sum = self.hidden_match.loss_sum(labels)
            loss_sum = loss_sum + self.hidden_match.weight * hidden_sum
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
            if hidden_sum is not None:
                hidden = self.accelerator.gather_for_metrics(hidden_sum.detach().reshape(1)).sum()
                self._metrics[mode]["hidden_mse"].append((hidden / tokens).item())
        if mode == "train":
            if "attention_mask" in inputs:
                seen = inputs["attention_mask"].sum()
            else:
                seen = torch.tensor(inputs["input_ids"].numel(), device=inputs["input_ids"].device)
            self._total_train_tokens += self.accelerator.gather_for_metrics(seen.reshape(1)).sum().item()
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return (loss, outputs) if return_outputs else loss

"""Several teachers, one target: how the parents' next-token distributions are combined.

A stack of two fine-tunes has two parents, each the better teacher on what it was tuned
for. Each rule turns the teachers' log-probabilities (at the distillation temperature)
into one target distribution per token:

- `ensemble`, `average: prob`: p = sum_k w_k p_k (a mixture: every parent's likely tokens
  stay likely);
- `ensemble`, `average: logprob`: p proportional to exp(sum_k w_k log p_k) (a product of
  experts: tokens every parent finds likely);
- `route`: each token is taught by the teacher its data names (the file or the example);
- `best`: each token is taught by the teacher that gives the label the higher probability.

The weights `w` are `distill.teacher_weights` normalised to sum to 1 (equal by default).
One teacher is the plain single-teacher loss, computed by the original code path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RULES = ("ensemble", "route", "best")
AVERAGES = ("prob", "logprob")
# log of a probability that underflowed to 0: finite, so 0 * (log p - log q) stays 0
LOG_ZERO = torch.finfo(torch.float32).min / 2


@dataclass(frozen=True)
class TeacherMix:
    """The rule and its weights (normalised), as the heal config says."""

    rule: str = "ensemble"
    average: str = "prob"
    weights: tuple[float, ...] = ()

    def weights_for(self, count: int) -> tuple[float, ...]:
        raw = self.weights or (1.0,) * count
        total = sum(raw)
        return tuple(w / total for w in raw)

    def to_dict(self) -> dict:
        return {"rule": self.rule, "average": self.average, "weights": list(self.weights) or None}


def log_softmax_(logits: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Rows of `logits` made their log-softmax in place; `scratch` ends holding the probabilities."""
    logits.sub_(logits.amax(dim=-1, keepdim=True))
    torch.exp(logits, out=scratch)
    logits.sub_(scratch.sum(dim=-1, keepdim=True).log_())
    torch.exp(logits, out=scratch)
    return logits


def mix_log_probs_(mix: TeacherMix, teacher_logits, target: torch.Tensor, route: torch.Tensor | None,
                   acc: torch.Tensor, work: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """The combined target's log-probabilities written into `acc` (rows x vocabulary, float32),
    with `scratch` left holding its probabilities. `teacher_logits` (a TeacherLogits) writes
    teacher k's (temperature-scaled) logits into `out` and returns it; `work` is that buffer.
    Three buffers whatever the number of teachers: each teacher's logits exist in turn."""
    count = teacher_logits.count
    weights = mix.weights_for(count)
    best = None
    for k in range(count):
        log_p = log_softmax_(teacher_logits(k, work), scratch)  # scratch: p_k
        if mix.rule == "ensemble" and mix.average == "prob":
            if k == 0:
                torch.mul(scratch, weights[0], out=acc)
            else:
                acc.add_(scratch, alpha=weights[k])
        elif mix.rule == "ensemble":
            if k == 0:
                torch.mul(log_p, weights[0], out=acc)
            else:
                acc.add_(log_p, alpha=weights[k])
        elif mix.rule == "route":
            if k == 0:
                acc.copy_(log_p)
            else:
                rows = route == k
                acc[rows] = log_p[rows]
        else:  # best: the teacher whose label log-probability is highest, token by token
            label = log_p.gather(1, target.unsqueeze(1)).squeeze(1)
            if k == 0:
                acc.copy_(log_p)
                best = label
            else:
                rows = label > best
                acc[rows] = log_p[rows]
                best = torch.where(rows, label, best)
    if mix.rule == "ensemble" and mix.average == "prob":
        scratch.copy_(acc)
        torch.log(scratch, out=acc).clamp_(min=LOG_ZERO)
    elif mix.rule == "ensemble":
        log_softmax_(acc, scratch)
    else:
        torch.exp(acc, out=scratch)
    return acc


class TeacherLogits:
    """Teacher k's logits for a chunk of rows, made on demand into a given buffer."""

    def __init__(self, make, count: int):
        self.make, self.count = make, count

    def __call__(self, k: int, out: torch.Tensor) -> torch.Tensor:
        return self.make(k, out)


def mixed_log_probs(mix: TeacherMix, logits: list[torch.Tensor], target: torch.Tensor, route: torch.Tensor | None,
                    temperature: float = 1.0) -> torch.Tensor:
    """`mix_log_probs_` from whole float logits (one tensor per teacher, rows x vocabulary),
    in fresh tensors: for the autograd and whole-logits paths."""
    rows, vocab = logits[0].shape
    acc, work, scratch = (torch.empty(rows, vocab, dtype=torch.float32, device=logits[0].device) for _ in range(3))

    def make(k, out):
        out.copy_(logits[k])
        return out.div_(temperature) if temperature != 1.0 else out

    return mix_log_probs_(mix, TeacherLogits(make, len(logits)), target, route, acc, work, scratch)

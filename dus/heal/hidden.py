"""Activation matching: an optional loss term that keeps the child's hidden states near its
parents' at the points where the plan says they correspond.

Where they correspond: an output layer that is source layer l of a parent computes, in that
parent, the hidden state after l + 1 layers (depth l + 1). Inside a run of consecutive layers of
one source the child repeats its parent exactly, so the informative points are the ends of the
runs: just before each seam, where the next run starts from another depth or parent, and the
last layer, before the final norm. At each such point (output position i, depth d) the target
is the weighted average over the teachers of their hidden states at depth d (the teachers are
fine-tunes of one base, so depth d means the same place in each), and the term is the squared
distance relative to the target's own norm, per token:

    hidden = sum over points and tokens of |h_child - sum_k w_k h_k|^2 / |sum_k w_k h_k|^2 / points

added to the distillation loss as `distill.hidden` x that (per token, like the KL).
"""

from __future__ import annotations

import torch

from dus.errors import DusError
from dus.plan import LayerPlan


def run_ends(plan: LayerPlan) -> list[tuple[int, int]]:
    """(output position, depth in the source) at the end of each run of consecutive layers of
    one source, the last layer included."""
    points = []
    for index, layer in enumerate(plan.layers):
        following = plan.layers[index + 1] if index + 1 < len(plan.layers) else None
        if following is None or following.model != layer.model or following.layer != layer.layer + 1:
            points.append((index, layer.layer + 1))
    return points


def hidden_points(plan: LayerPlan | None, layers, num_layers: int) -> list[tuple[int, int]]:
    """The (output position, teacher depth) pairs `distill.hidden_layers` names: `auto` for
    the ends of the plan's runs, or a list of output positions (each at its source depth)."""
    if plan is None:
        raise DusError("distill.hidden (activation matching) needs the build plan (dus-manifest.json) to know which "
                       "of the teachers' layers each of the model's layers corresponds to; set distill.hidden: 0")
    if layers == "auto":
        return run_ends(plan)
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise DusError(f"distill.hidden_layers: layer {bad[0]} is outside the model's {num_layers} layers; use 0 .. "
                       f"{num_layers - 1}")
    return [(i, plan.layers[i].layer + 1) for i in sorted(set(layers))]


class HiddenMatch:
    """Records the hidden states at the matched points during the student's and each
    teacher's forward (one phase at a time), and turns them into the loss term."""

    def __init__(self, weight: float, points: list[tuple[int, int]], teacher_weights: tuple[float, ...]):
        self.weight = float(weight)
        self.points = points
        self.teacher_weights = teacher_weights
        self.phase = None
        self.calls = 0
        self.kept: dict = {}
        self.wanted: dict = {}
        self.starts: list[int] = []

    def attach(self, student, shareds) -> None:
        """Hooks on every decoder layer of the student and of each teacher's (shared) decoder."""
        from dus.assemble import decoder
        from dus.heal.teacher import RelayedHidden

        self.starts = [shared.start for shared in shareds]
        student_wanted = {position for position, _ in self.points}
        for k, start in enumerate(self.starts):
            teacher_wanted = set()
            for _, depth in self.points:
                if depth <= start:  # below the shared point the teacher's state is the student's own
                    student_wanted.add(depth - 1)
                else:
                    teacher_wanted.add(depth - start - 1)
            self.wanted[k] = teacher_wanted
        self.wanted["student"] = student_wanted
        modules = {id(m): m for m in decoder(student).layers}
        for shared in shareds:
            modules.update({id(m): m for m in shared.decoder.layers if not isinstance(m, RelayedHidden)})
        for module in modules.values():
            module.register_forward_hook(self._record)

    def begin(self, phase) -> None:
        """Which forward runs next: "student", a teacher's index, or None (record nothing)."""
        self.phase, self.calls = phase, 0
        if phase == "student":
            self.kept = {}

    def _record(self, _module, _args, output):
        if self.phase is None:
            return
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        if self.calls in self.wanted[self.phase]:
            self.kept[(self.phase, self.calls)] = hidden if self.phase == "student" else hidden.detach()
        self.calls += 1

    def _teacher_state(self, k: int, depth: int) -> torch.Tensor:
        start = self.starts[k]
        if depth <= start:
            return self.kept[("student", depth - 1)].detach()
        return self.kept[(k, depth - start - 1)]

    def loss_sum(self, labels) -> torch.Tensor:
        """The term summed over the labelled tokens (the KL's tokens) and averaged over points."""
        mask = labels[:, 1:] != -100
        total = None
        for position, depth in self.points:
            child = self.kept[("student", position)][:, :-1][mask].float()
            target = sum(w * self._teacher_state(k, depth)[:, :-1][mask].float()
                         for k, w in enumerate(self.teacher_weights))
            error = (child - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp(min=1e-12)
            total = error.sum() if total is None else total + error.sum()
        self.kept = {}
        return total / len(self.points)


def hidden_width(config: dict) -> int | None:
    """A model's hidden size from its (text) config: hidden_size, or GPT-2's n_embd."""
    for key in ("hidden_size", "n_embd", "d_model"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def check_hidden_sizes(model_dir, teachers, points: list[tuple[int, int]]) -> None:
    """Every pairing the term compares: the model's hidden state at each point against each
    teacher's at its depth (a teacher's states are all of its hidden size), in one line for the
    first teacher whose hidden size is not the model's, before anything is loaded."""
    from dus.checkpoint import ModelDir

    own = hidden_width(ModelDir(model_dir).text_config)
    for teacher in teachers:
        width = hidden_width(ModelDir(teacher.path).text_config)
        if own is not None and width is not None and width != own:
            position, depth = points[0]
            raise DusError(f"distill.hidden matches hidden states, and teacher {teacher.name} ({teacher.path}) has hidden "
                           f"size {width} where the model's is {own} (at layer {position} against the teacher's depth "
                           f"{depth}, and every other point); drop that teacher, or set distill.hidden: 0 "
                           "(--set distill.hidden=0) to distil the logits only")

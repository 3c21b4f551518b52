"""The teacher of a distillation heal, sharing what it can with the student.

In a DUS build the output layers below the trained band are the source's own first
layers, unchanged, on the same input: the teacher (that source) would compute exactly the
hidden state the student has already computed there. So the student hands its hidden
state at the first layer the teacher must run (a forward pre-hook keeps it) and the
teacher runs only from there upward: a view of the teacher whose first layer returns the
student's state, followed by the teacher's own layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from dus.assemble import decoder, shell_without_layers
from dus.plan import LayerPlan


class HiddenRelay:
    """The student's hidden state entering layer `index`, for the teacher (detached)."""

    def __init__(self, index: int):
        self.index = index
        self.hidden = None

    def keep(self, _module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.hidden = hidden.detach()


class RelayedHidden(nn.Module):
    """Stands for the teacher's layers below the shared point: returns the student's state."""

    def __init__(self, relay: HiddenRelay, attention_type=None):
        super().__init__()
        self.relay = relay
        if attention_type is not None:
            self.attention_type = attention_type  # the decoder picks a mask by it

    def forward(self, hidden_states, *args, **kwargs):
        if self.relay.hidden is None or self.relay.hidden.shape != hidden_states.shape:
            raise RuntimeError("the teacher ran before the student: no shared hidden state")
        hidden, self.relay.hidden = self.relay.hidden, None
        return hidden


def shared_prefix(plan: LayerPlan, teacher: str, trained: set[int]) -> int:
    """How many leading output layers are the teacher's own first layers, untransformed,
    below every trained layer, after the teacher's own embeddings (0: nothing shared)."""
    if plan.embeddings.model != teacher or plan.embeddings.scale:
        return 0
    count = 0
    for index, layer in enumerate(plan.layers):
        untouched = not (layer.scale or layer.zero_output or layer.blend)
        if index in trained or layer.model != teacher or layer.layer != index or not untouched:
            break
        count += 1
    return count


@dataclass
class SharedTeacher:
    """The teacher's decoder from layer `start` on, fed by the student's hidden state."""

    decoder: nn.Module
    relay: HiddenRelay | None
    start: int


def share_with_student(teacher_model, student_model, start: int) -> SharedTeacher:
    """The teacher's decoder that reuses the student's first `start` layers (see the
    module docstring); without a shared prefix, the teacher's own decoder."""
    if start == 0:
        return SharedTeacher(decoder(teacher_model), None, 0)
    relay = HiddenRelay(start)
    decoder(student_model).layers[start].register_forward_pre_hook(relay.keep, with_kwargs=True)
    teacher_decoder = decoder(teacher_model)
    view = shell_without_layers(teacher_decoder)
    first = teacher_decoder.layers[0]
    view.layers = nn.ModuleList([RelayedHidden(relay, getattr(first, "attention_type", None)),
                                 *teacher_decoder.layers[start:]])
    return SharedTeacher(view, relay, start)

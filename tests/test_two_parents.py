"""Several teachers: the combined loss against a naive whole-logit reference, routing of each
file's tokens to its teacher, activation matching, and a two-parent stack healed toward both."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tensors

from dus.build import build_model
from dus.errors import DusError
from dus.heal.config import load_config
from dus.heal.distill import chunked_distillation_loss, distillation_loss
from dus.heal.hidden import run_ends
from dus.heal.mix import TeacherMix
from dus.heal.routes import ROUTE_COLUMN, RoutedCollator, parse_data_spec
from dus.heal.run import heal

VOCAB, WIDTH = 37, 8


def naive_loss(hidden, weight, teachers, labels, route, mix, alpha, temperature):
    """Whole logits, written the obvious way: each teacher's softmax, combined, KL and NLL."""
    target = labels[:, 1:]
    mask = target != -100
    student = (hidden @ weight.t())[:, :-1][mask]
    probs = [F.softmax((h @ w.t())[:, :-1][mask] / temperature, dim=-1) for h, w in teachers]
    token_route = route[:, 1:][mask] if route is not None else None
    weights = torch.tensor(mix.weights_for(len(teachers)))
    if mix.rule == "ensemble" and mix.average == "prob":
        p = sum(w * q for w, q in zip(weights, probs))
    elif mix.rule == "ensemble":
        p = F.softmax(sum(w * q.log() for w, q in zip(weights, probs)), dim=-1)
    elif mix.rule == "route":
        p = torch.stack(probs)[token_route, torch.arange(student.shape[0])]
    else:
        labelled = torch.stack([q.gather(1, target[mask].unsqueeze(1)).squeeze(1) for q in probs])
        p = torch.stack(probs)[labelled.argmax(0), torch.arange(student.shape[0])]
    log_q = F.log_softmax(student / temperature, dim=-1)
    kl = (p * (p.log() - log_q)).sum() * temperature**2
    nll = F.cross_entropy(student, target[mask], reduction="sum")
    return alpha * kl + (1 - alpha) * nll, kl, nll


def batch(seed=0):
    torch.manual_seed(seed)
    hidden = torch.randn(2, 9, WIDTH, dtype=torch.float64).float()
    weight = torch.randn(VOCAB, WIDTH)
    teachers = [(torch.randn(2, 9, WIDTH), torch.randn(VOCAB, WIDTH)) for _ in range(2)]
    labels = torch.randint(0, VOCAB, (2, 9))
    labels[0, :3] = -100
    route = torch.zeros(2, 9, dtype=torch.long)
    route[1] = 1
    route[0, 6:] = 1
    return hidden, weight, teachers, labels, route


MIXES = [TeacherMix("ensemble", "prob"), TeacherMix("ensemble", "logprob"), TeacherMix("ensemble", "prob", (3.0, 1.0)),
         TeacherMix("route"), TeacherMix("best")]


@pytest.mark.parametrize("mix", MIXES, ids=lambda m: f"{m.rule}-{m.average}-{len(m.weights)}")
@pytest.mark.parametrize("temperature,alpha", [(1.0, 1.0), (2.0, 0.25), (1.0, 0.5)])
@pytest.mark.parametrize("path", ["chunked", "whole"])
def test_the_combined_loss_equals_a_naive_whole_logit_reference(mix, temperature, alpha, path):
    hidden, weight, teachers, labels, route = batch()
    reference_hidden = hidden.clone().requires_grad_(True)
    expected = naive_loss(reference_hidden, weight, teachers, labels, route, mix, alpha, temperature)
    expected[0].backward()
    h = hidden.clone().requires_grad_(True)
    if path == "chunked":  # chunk 5 of 13 labelled tokens: three chunks, the last one short
        loss, kl, nll, count = chunked_distillation_loss(
            h, weight, [t[0] for t in teachers], [t[1] for t in teachers], labels, alpha, temperature, chunk=5,
            mix=mix, route=route)
    else:
        loss, kl, nll, count = distillation_loss(h @ weight.t(), [t[0] @ t[1].t() for t in teachers], labels, alpha,
                                                 temperature, mix=mix, route=route)
    loss.backward()
    assert count == (labels[:, 1:] != -100).sum()
    for got, want in zip((loss, kl, nll), expected):
        assert torch.allclose(got, want.detach(), rtol=1e-4, atol=1e-4), (got, want)
    assert torch.allclose(h.grad, reference_hidden.grad, rtol=1e-4, atol=1e-5)


def test_a_trained_head_gets_the_combined_gradient_too():
    hidden, weight, teachers, labels, route = batch(3)
    mix = TeacherMix("ensemble", "logprob")
    w_ref = weight.clone().requires_grad_(True)
    naive_loss(hidden, w_ref, teachers, labels, None, mix, 0.5, 1.0)[0].backward()
    w = weight.clone().requires_grad_(True)
    chunked_distillation_loss(hidden, w, [t[0] for t in teachers], [t[1] for t in teachers], labels, 0.5, 1.0,
                              chunk=4, mix=mix)[0].backward()
    assert torch.allclose(w.grad, w_ref.grad, rtol=1e-4, atol=1e-5)


def test_one_teacher_in_a_list_is_the_single_teacher_loss_bit_for_bit():
    hidden, weight, teachers, labels, _ = batch(1)
    (th, tw), _ = teachers
    for temperature in (1.0, 2.0):
        h1, h2 = hidden.clone().requires_grad_(True), hidden.clone().requires_grad_(True)
        single = chunked_distillation_loss(h1, weight, th, tw, labels, 0.5, temperature, chunk=4)
        listed = chunked_distillation_loss(h2, weight, [th], [tw], labels, 0.5, temperature, None, [None], chunk=4)
        single[0].backward()
        listed[0].backward()
        assert all(torch.equal(a, b) for a, b in zip(single, listed))
        assert torch.equal(h1.grad, h2.grad)


def test_two_identical_teachers_teach_what_one_does():
    hidden, weight, teachers, labels, route = batch(2)
    (th, tw), _ = teachers
    one = chunked_distillation_loss(hidden, weight, th, tw, labels, 1.0, 1.0)
    for mix in MIXES:
        two = chunked_distillation_loss(hidden, weight, [th, th], [tw, tw], labels, 1.0, 1.0, mix=mix, route=route)
        assert torch.allclose(one[1], two[1], rtol=1e-4, atol=1e-5), mix


def test_data_specs_split_a_teacher_off_only_where_the_path_does_not_exist(tmp_path):
    (tmp_path / "odd:name.txt").write_text("x")
    assert parse_data_spec("code.jsonl:A").teacher == "A"
    assert parse_data_spec(str(tmp_path / "odd:name.txt")).teacher is None
    assert parse_data_spec("data/x.jsonl").teacher is None
    assert parse_data_spec("c:/dir/file").teacher is None


def test_the_collator_gives_each_token_its_examples_teacher():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = RoutedCollator(DataCollatorForLanguageModeling(pad_token_id=0))
    examples = [{"input_ids": [5, 6, 7], ROUTE_COLUMN: 1}, {"input_ids": [8, 9], ROUTE_COLUMN: 0}]
    out = collator([dict(e) for e in examples])
    assert out[ROUTE_COLUMN].tolist() == [[1, 1, 1], [0, 0, 0]]
    assert out["labels"][1, 2] == -100  # padding: no label, so its route is never read
    free = RoutedCollator(DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True))
    flat = free([dict(e) for e in examples])
    assert flat[ROUTE_COLUMN].tolist() == [[1, 1, 1, 0, 0]]


# --- a two-parent stack, end to end on tiny models -------------------------------------------

FAST = {
    "sft.report_to": "none", "sft.warmup_steps": 0, "sft.logging_steps": 1, "sft.learning_rate": 1e-2,
    "sft.per_device_train_batch_size": 2, "sft.max_length": 32, "sft.max_steps": 3, "seam.radius": 1,
    "calibrate.enabled": False,
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Two 'fine-tunes' (same tokenizer, different weights), their stack, and two kinds of text."""
    from dus.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("two-parents")
    a = make_tiny_model(root / "A", "llama", num_layers=4, seed=11)
    b = make_tiny_model(root / "B", "llama", num_layers=4, seed=12)
    build_model({"stack": {"models": [str(a), str(b)], "trim": 1}}, root / "stack")
    # byte-level tokens: the code has '#' and no letter, the prose has letters and no '#'
    (root / "code.txt").write_text("\n\n".join(f"# {i} + {i} = ({2 * i})" for i in range(120)) + "\n")
    (root / "prose.txt").write_text("\n\n".join("once upon a time there were dogs." for _ in range(120)) + "\n")
    return root


def stack_heal(family, out, teacher=None, **settings):
    cfg = load_config(None, {**FAST, "data.path": str(family / "prose.txt"), **settings})
    return heal(family / "stack", out, cfg, teacher=teacher)


def test_the_stack_preset_is_the_lower_layers_of_a_then_the_upper_of_b(family):
    plan = json.loads((family / "stack" / "dus-manifest.json").read_text())["plan"]
    layers = [(layer["model"].rsplit("/", 1)[-1], layer["layer"]) for layer in plan["layers"]]
    assert layers == [("A", 0), ("A", 1), ("A", 2), ("B", 1), ("B", 2), ("B", 3)]
    assert run_ends_of(plan) == [(2, 3), (5, 4)]


@pytest.mark.parametrize("stack, message", [
    ({"models": ["{A}"], "trim": 1}, "`stack.models` must list two model paths"),
    ({"models": ["{A}", "{B}", "{A}"], "trim": 1}, "`stack.models` must list two model paths"),
    ({"models": ["{A}", "{B}"], "trim": 4}, "stack trim 4 leaves no layers"),
    ({"models": ["{A}", "{short}"], "trim": 1}, "stack needs two models of equal depth"),
    ({"models": ["{A}", "{B}"]}, "`stack` needs `trim`"),
])
def test_a_stack_that_cannot_be_built_is_one_line(family, tmp_path, stack, message):
    from dus.tiny import make_tiny_model

    short = make_tiny_model(tmp_path / "short", "llama", num_layers=3, seed=1)
    paths = {"A": family / "A", "B": family / "B", "short": short}
    spec = {**stack, "models": [m.format(**paths) for m in stack["models"]]}
    with pytest.raises(DusError, match=message.replace("(", r"\(").replace("`", ".")):
        build_model({"stack": spec}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def run_ends_of(plan_dict):
    from dus.plan import LayerPlan

    return run_ends(LayerPlan.from_dict(plan_dict))


def test_a_stack_of_two_parents_is_taught_by_both(family, tmp_path):
    result = stack_heal(family, tmp_path / "ensemble")
    record = result.record
    assert [t["name"].rsplit("/", 1)[-1] for t in record["teachers"]] == ["A", "B"]
    assert record["teacher_rule"] == {"rule": "ensemble", "average": "logprob", "weights": None}
    assert record["in_memory"] is True and math.isfinite(result.final_loss)
    one = stack_heal(family, tmp_path / "one", teacher=[str(family / "A")])
    assert [t["name"].rsplit("/", 1)[-1] for t in one.record["teachers"]] == ["A"]
    assert one.record["teacher_rule"] == {"rule": "single"}
    # taught by both, the child moves elsewhere than when taught by A alone
    healed, alone = tensors(tmp_path / "ensemble"), tensors(tmp_path / "one")
    assert any(not torch.equal(healed[name], alone[name]) for name in healed)
    card = (tmp_path / "ensemble" / "README.md").read_text()
    manifest = json.loads((tmp_path / "ensemble" / "dus-manifest.json").read_text())
    assert manifest["history"][-1]["teacher_rule"]["rule"] == "ensemble"
    assert "ensemble" in card and str(family / "B") in card


def test_routing_sends_each_files_tokens_to_its_teacher(family, tmp_path, monkeypatch):
    from dus.heal import distill

    seen = []
    original = distill.chunked_distillation_loss

    def spy(hidden, weight, teacher_hidden, teacher_weight, labels, *args, route=None, **kwargs):
        tokens = labels[:, 1:]
        seen.append((tokens.clone(), route[:, 1:].clone()))
        return original(hidden, weight, teacher_hidden, teacher_weight, labels, *args, route=route, **kwargs)

    monkeypatch.setattr(distill, "chunked_distillation_loss", spy)
    result = stack_heal(family, tmp_path / "route", **{
        "data.path": [f"{family / 'code.txt'}:A", f"{family / 'prose.txt'}:B"], "distill.combine": "route"})
    assert result.record["teacher_rule"]["rule"] == "route"
    from dus.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    code_id = tokenizer.convert_tokens_to_ids(tokenizer.tokenize("#")[0])
    prose_id = tokenizer.convert_tokens_to_ids(tokenizer.tokenize("o")[0])
    routes_seen = set()
    for tokens, route in seen:
        for row in range(tokens.shape[0]):
            row_routes = set(route[row].tolist())
            assert len(row_routes) == 1, "a packed sequence mixed two teachers' files"
            row_tokens = set(tokens[row].tolist())
            teacher = row_routes.pop()
            routes_seen.add(teacher)
            if teacher == 0:
                assert prose_id not in row_tokens and code_id in row_tokens
            else:
                assert code_id not in row_tokens and prose_id in row_tokens
    assert routes_seen == {0, 1}


def test_activation_matching_adds_its_term_and_is_recorded(family, tmp_path):
    result = stack_heal(family, tmp_path / "hidden", **{"distill.hidden": 1.0})
    matching = result.record["activation_matching"]
    assert matching["weight"] == 1.0 and [tuple(p) for p in matching["points"]] == [(2, 3), (5, 4)]
    terms = [entry["hidden_mse"] for entry in result.record["loss_curve"] if "hidden_mse" in entry]
    assert len(terms) == 3 and all(term > 0 for term in terms)


@pytest.mark.parametrize("settings,teacher,message", [
    ({"distill.combine": "route", "data.path": "{prose}:C"}, None, "routes to teacher 'C'"),
    ({"distill.teacher_weights": [1.0, -1.0]}, None, "teacher_weights must be a list of finite numbers >= 0"),
    ({"distill.teacher_weights": [1.0, float("nan")]}, None, "teacher_weights must be a list of finite numbers"),
    ({"distill.teacher_weights": [1.0]}, None, "1 weights for 2 teachers"),
    ({}, ["{root}/missing"], "not a model directory"),
    ({"distill.combine": "route"}, ["{root}/A"], "this heal has one teacher"),
    ({"data.path": "{prose}:A"}, None, "add --set distill.combine=route"),
    ({"distill.combine": "route"}, None, "lacks; add it, or name the file's teacher"),
    ({"distill.hidden": -1}, None, "distill.hidden"),
])
def test_bad_teacher_settings_get_one_line_and_no_output(family, tmp_path, settings, teacher, message):
    settings = {key: (value.format(prose=family / "prose.txt") if isinstance(value, str) else value)
                for key, value in settings.items()}
    teacher = [t.format(root=family) for t in teacher] if teacher else None
    with pytest.raises(DusError, match=message.replace("(", r"\(").replace(")", r"\)")):
        stack_heal(family, tmp_path / "out", teacher=teacher, **settings)
    assert not (tmp_path / "out").exists()


def test_a_teacher_with_another_vocabulary_is_refused_before_output(family, tmp_path):
    from dus.tiny import make_tiny_model

    other = make_tiny_model(tmp_path / "other", "llama", num_layers=4, seed=3, vocab_size=400)
    with pytest.raises(DusError, match="does not tokenize as"):
        stack_heal(family, tmp_path / "out", teacher=[str(family / "A"), str(other)])
    assert not (tmp_path / "out").exists()


def test_a_single_source_build_asked_to_route_is_refused(tmp_path):
    from dus.tiny import make_tiny_model

    source = make_tiny_model(tmp_path / "source", "llama", num_layers=4, seed=1)
    build_model({"solar": {"model": str(source), "trim": 1}}, tmp_path / "solar")
    (tmp_path / "t.txt").write_text("some text here\n\nand more text\n")
    cfg = load_config(None, {**FAST, "data.path": str(tmp_path / "t.txt"), "distill.combine": "route"})
    with pytest.raises(DusError, match="this heal has one teacher"):
        heal(tmp_path / "solar", tmp_path / "out", cfg)
    assert not (tmp_path / "out").exists()


def test_routed_evaluation_data_is_scored_against_its_own_teacher(family, tmp_path):
    result = stack_heal(family, tmp_path / "route-eval", **{
        "data.path": [f"{family / 'code.txt'}:A", f"{family / 'prose.txt'}:B"], "distill.combine": "route",
        "data.eval_path": f"{family / 'prose.txt'}:B", "data.eval_max_samples": 8, "sft.eval_steps": 3})
    evals = [entry["eval_loss"] for entry in result.record["loss_curve"] if "eval_loss" in entry]
    assert evals and all(math.isfinite(value) for value in evals)


def test_the_cli_takes_several_data_files_and_teachers_and_prints_them(family, tmp_path, run_cli):
    args = ["heal", family / "stack", "-o", tmp_path / "out", "--steps", "2", "--batch-size", "2", "--max-length", "32",
            "--report-to", "none", "--set", "calibrate.enabled=false", "--radius", "1"]
    result = run_cli(*args, "--data", f"{family / 'code.txt'}:A", "--data", f"{family / 'prose.txt'}:B",
                     "--set", "distill.combine=route")
    assert result.code == 0, result.stderr[-2000:]
    assert "each data file or example taught by the teacher it names" in result.stderr
    named = run_cli(*args, "--force", "--data", family / "prose.txt", "--teacher", family / "B", "--teacher",
                    family / "A", "--set", "distill.teacher_weights=[1,3]")
    assert named.code == 0, named.stderr[-2000:]
    record = json.loads((tmp_path / "out" / "dus-manifest.json").read_text())["history"][-1]
    assert [t["path"] for t in record["teachers"]] == [str(family / "B"), str(family / "A")]
    assert record["teacher_rule"]["weights"] == [1, 3]

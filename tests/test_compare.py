"""dus compare: perplexity against direct computations, per-layer diagnostics, the
report files, and the ways a comparison is refused or degrades."""

from __future__ import annotations

import json
import math
import shutil
import sys
import types

import pytest

TEXT = (
    "Depth up-scaling stacks two copies of a model and removes the layers around the join. "
    "The new model is deeper, but the layers on either side of the seam never met in training, "
    "so it needs a little continued training before it is as fluent as its source. "
    "Perplexity on held-out text shows how much was lost, and how much healing won back.\n\n"
    "A good report puts numbers next to pictures: a table says how much, a curve says where. "
)




@pytest.fixture
def heldout(tmp_path):
    path = tmp_path / "heldout.txt"
    path.write_text(TEXT * 3)
    return path


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Say hello."}\n{"prompt": "Count to three."}\n')
    return path


def _load(path, dtype="float32"):
    import torch

    from dus.checkpoint import ModelDir

    model = ModelDir(path)
    return model.load_model(getattr(torch, dtype), torch.device("cpu")).eval(), model.tokenizer()


def _ids(tokenizer, text=TEXT):
    from dus.measure.text import tokenize_stream

    return tokenize_stream(tokenizer, text)


def with_manifest(source, target, seams, new_layers=()):
    """A copy of `source` that looks like a dus build output with the given seams: its
    plan repeats one source layer at each seam (and zero-inits the new layers)."""
    from dus.manifest import Manifest, write_manifest
    from dus.plan import LayerPlan, NonLayerSource, OutputLayer

    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    layers, source_layer = [], 0
    for index in range(config["num_hidden_layers"]):
        if index in seams:
            source_layer -= 1  # not the successor of the previous layer: a seam
        layers.append(OutputLayer("m", source_layer, zero_output=index in new_layers))
        source_layer += 1
    plan = LayerPlan({"m": str(source)}, layers, NonLayerSource("m"), NonLayerSource("m"), "m", "m", recipe_kind="solar")
    assert plan.seams == list(seams) and plan.new_layers == list(new_layers)
    write_manifest(Manifest(plan, recipe={}, architecture="LlamaForCausalLM", sources={"m": {"path": str(source)}}), target)
    return target


@pytest.mark.parametrize("num_tokens,window,stride", [(2, 2, 1), (10, 4, 4), (37, 8, 3), (100, 16, 16), (50, 64, 32)])
def test_windows_score_every_token_after_the_first_exactly_once(num_tokens, window, stride):
    from dus.measure.perplexity import sliding_windows

    windows = sliding_windows(num_tokens, window, stride)
    scored = [t for w in windows for t in range(w.first, w.end)]
    if stride < window:
        assert scored == list(range(1, num_tokens))
    else:  # no overlap: a window's first token has no context (as in the transformers docs)
        assert scored == [t for t in range(num_tokens) if t % window]
    for w in windows:
        assert w.end - w.begin <= window and w.begin < w.first and w.begin % stride == 0


def test_bad_window_settings_are_refused():
    from dus.measure.perplexity import sliding_windows
    from dus.errors import DusError

    with pytest.raises(DusError, match="--stride"):
        sliding_windows(100, 8, 9)
    with pytest.raises(DusError, match="--window"):
        sliding_windows(100, 1, 1)


def test_perplexity_equals_direct_computation(tiny_models):
    """One window over the whole text equals the model's own loss; strided windows equal
    a token-by-token computation with the context the strided method promises."""
    import torch
    import torch.nn.functional as F

    from dus.measure.perplexity import evaluate_stream

    model, tokenizer = _load(tiny_models("llama", 4))
    ids = _ids(tokenizer)
    n = len(ids)
    assert n > 300

    with torch.no_grad():
        direct = model(ids[None, :], labels=ids[None, :]).loss.item()
    whole = evaluate_stream(model, ids, window=512, stride=512)
    assert whole.tokens == n - 1
    assert math.isclose(whole.mean_nll, direct, rel_tol=1e-5)
    assert math.isclose(whole.perplexity, math.exp(direct), rel_tol=1e-5)

    window, stride = 64, 24
    strided = evaluate_stream(model, ids, window=window, stride=stride)
    # The window that scores `target` is the first one (windows begin at multiples of
    # the stride) whose end lies beyond it; score each target from that window's logits.
    by_begin = {}
    for target in range(1, n):
        begin = max(0, math.ceil((target - window + 1) / stride)) * stride
        by_begin.setdefault(begin, []).append(target)
    total = 0.0
    with torch.no_grad():
        for begin, targets in by_begin.items():
            logits = model(ids[None, begin : begin + window]).logits[0]
            for target in targets:
                total += F.cross_entropy(logits[target - begin - 1][None], ids[target : target + 1]).item()
        # the causal model gives the same logits when fed only the context (spot checks)
        for target in by_begin[stride * 3][::20]:
            alone = model(ids[None, stride * 3 : target]).logits[0, -1]
            full = model(ids[None, stride * 3 : stride * 3 + window]).logits[0, target - stride * 3 - 1]
            torch.testing.assert_close(alone, full, rtol=1e-4, atol=1e-5)
    assert strided.tokens == n - 1
    assert math.isclose(strided.nll_sum, total, rel_tol=1e-5)
    # more context helps even a random model a little, and never by much here
    assert strided.perplexity != whole.perplexity


def test_layer_states_are_the_inputs_of_each_layer_and_the_last_is_before_the_final_norm(tiny_models):
    import torch

    from dus.measure.layerwise import capture_layer_states
    from dus.tiny import ARCHITECTURES

    for arch in ARCHITECTURES:
        model, tokenizer = _load(tiny_models(arch, 4))
        ids = _ids(tokenizer)[None, :40]
        with torch.no_grad(), capture_layer_states(model) as states:
            reference = model(ids, output_hidden_states=True).hidden_states
        assert len(states) == len(reference) == 5
        for index in range(4):
            torch.testing.assert_close(states[index], reference[index])
        # transformers' last hidden state has the final norm applied; ours is the raw output
        torch.testing.assert_close(model.model.norm(states[4]), reference[4])
        assert not torch.allclose(states[4], reference[4])


def test_compare_report_plots_and_json(tiny_models, tmp_path, heldout, prompts, run_cli):
    """Base (4 layers) vs a 6-layer 'built' model with a seam: report, PNGs and JSON."""
    from PIL import Image

    base = tiny_models("llama", 4)
    built = with_manifest(tiny_models("llama", 6), tmp_path / "built", seams=[3])
    out = tmp_path / "report"
    result = run_cli("compare", base, built, "--data", heldout, "-o", out, "--prompts", prompts,
                     "--window", 128, "--stride", 64, "--max-new-tokens", 6, "--device", "cpu")
    assert result.code == 0, result
    assert "perplexity" in result.stdout and "report.md" in result.stdout

    metrics = json.loads((out / "metrics.json").read_text())
    base_m, built_m = metrics["models"]
    assert (base_m["num_layers"], built_m["num_layers"]) == (4, 6)
    assert base_m["seams"] == [] and built_m["seams"] == [3]
    assert built_m["seam_layers"][0]["seam"] == 3
    for m in (base_m, built_m):
        assert m["perplexity"]["tokens_scored"] == m["tokens"] - 1
        assert 1 < m["perplexity"]["perplexity"] < 1e4
        assert len(m["layers"]["angular_distance"]) == len(m["layers"]["output_norm"]) == m["num_layers"]
        assert all(0 <= d <= 1 for d in m["layers"]["angular_distance"])
        assert [g["prompt"] for g in m["generations"]] == ["Say hello.", "Count to three."]
        assert all(g["chat_template"] and g["new_tokens"] <= 6 for g in m["generations"])

    for name in ("angular_distance", "angular_distance_relative", "hidden_norm", "perplexity"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(png) as image:
            image.verify()
        assert metrics["plots"][name] == png.name

    report = (out / "report.md").read_text()
    for heading in ("## Perplexity", "## Per-layer diagnostics", "### Seams", "## Greedy generations", "## Time"):
        assert heading in report
    for png in ("perplexity.png", "angular_distance.png", "hidden_norm.png"):
        assert f"]({png})" in report
    assert f"{base_m['perplexity']['perplexity']:.3f}" in report
    assert "Say hello." in report


def test_identical_models_give_identical_metrics(tiny_models, tmp_path, heldout, prompts, run_cli):
    source = tiny_models("llama", 4)
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    out = tmp_path / "out"
    result = run_cli("compare", source, copy, "--data", heldout, "-o", out, "--prompts", prompts,
                     "--window", 96, "--max-new-tokens", 5, "--label", "first", "--label", "second")
    assert result.code == 0, result
    first, second = json.loads((out / "metrics.json").read_text())["models"]
    assert (first["label"], second["label"]) == ("first", "second")
    for key in ("perplexity", "layers", "generations", "tokens", "num_layers"):
        assert first[key] == second[key], key
    assert "+0.0%" in (out / "report.md").read_text()


def test_bfloat16_is_close_to_float32(tiny_models, tmp_path, heldout, run_cli):
    model = tiny_models("llama", 4)
    values = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        result = run_cli("compare", model, "--data", heldout, "-o", out, "--no-generate", "--window", 128, "--dtype", dtype)
        assert result.code == 0, result
        measured = json.loads((out / "metrics.json").read_text())["models"][0]
        assert measured["dtype"] == dtype
        values[dtype] = measured["perplexity"]["perplexity"]
    assert values["float32"] != values["bfloat16"]
    assert math.isclose(values["float32"], values["bfloat16"], rel_tol=0.05)


def test_different_tokenizers_are_refused_for_perplexity(tiny_models, tmp_path, heldout, run_cli):
    base = tiny_models("llama", 4)
    other = tmp_path / "other-tokenizer"
    shutil.copytree(base, other)
    tokenizer_file = other / "tokenizer.json"
    data = json.loads(tokenizer_file.read_text())
    vocab = data["model"]["vocab"]
    swapped = sorted(vocab, key=vocab.get)[:2]
    vocab[swapped[0]], vocab[swapped[1]] = vocab[swapped[1]], vocab[swapped[0]]
    tokenizer_file.write_text(json.dumps(data))

    result = run_cli("compare", base, other, "--data", heldout, "-o", tmp_path / "out", "--no-generate")
    assert result.code == 2
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1
    assert "other-tokenizer" in message and repr(swapped[0]) in message and "--skip-perplexity" in message
    assert not (tmp_path / "out").exists()

    result = run_cli("compare", base, other, "--data", heldout, "-o", tmp_path / "out", "--no-generate", "--skip-perplexity", "--window", 64)
    assert result.code == 0, result
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert all(m["perplexity"] is None for m in metrics["models"])
    assert not (tmp_path / "out" / "perplexity.png").exists()


def test_bad_inputs_are_one_line_errors(tiny_models, tmp_path, heldout, run_cli):
    model = tiny_models("llama", 4)
    cases = [
        (("compare", model, "--data", tmp_path / "missing.txt", "-o", tmp_path / "o"), "missing.txt"),
        (("compare", tmp_path, "--data", heldout, "-o", tmp_path / "o"), "config.json"),
        (("compare", model, "--data", heldout, "-o", tmp_path / "o", "--window", 4096), "max_position_embeddings"),
        (("compare", model, "--data", heldout, "-o", tmp_path / "o", "--dtype", "int8"), "unknown dtype"),
    ]
    for args, needle in cases:
        result = run_cli(*args)
        assert result.code == 2, (args, result)
        assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_text_formats(tmp_path):
    from dus.measure.text import read_text
    from dus.errors import DusError

    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert read_text(jsonl) == "one\n\ntwo"
    jsonl.write_text('{"text": "one"}\n{"body": "two"}\n')
    with pytest.raises(DusError, match=r"a\.jsonl:2: no string 'text'"):
        read_text(jsonl)
    parquet = tmp_path / "a.parquet"
    parquet.write_bytes(b"PAR1")
    with pytest.raises(DusError, match="unsupported"):
        read_text(parquet)


def test_generation_without_chat_template_falls_back_to_the_raw_prompt(tiny_models):
    from dus.compare.generate import encode_prompt, generate_greedy

    model, tokenizer = _load(tiny_models("llama", 4))
    templated, used = encode_prompt(tokenizer, "hi")
    assert used and templated.shape[1] > 3
    tokenizer.chat_template = None
    raw, used = encode_prompt(tokenizer, "hi")
    assert not used and tokenizer.decode(raw[0]) == "hi\n"
    first = generate_greedy(model, tokenizer, ["hi"], max_new_tokens=5)
    again = generate_greedy(model, tokenizer, ["hi"], max_new_tokens=5)
    assert first == again and not first[0].chat_template and first[0].new_tokens <= 5


def test_tasks_without_lm_eval_installed_say_how_to_install(tiny_models, tmp_path, heldout, run_cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import fails even where it is installed
    out = tmp_path / "out"
    result = run_cli("compare", tiny_models("llama", 4), "--data", heldout, "-o", out, "--no-generate", "--window", 64, "--tasks", "hellaswag")
    assert result.code == 0, result
    assert "pip install" in result.stderr and "lm-eval" in result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["models"][0]["lm_eval"]["status"] == "not-installed"
    assert "## lm-evaluation-harness" in (out / "report.md").read_text()


def test_lm_eval_hook_reports_scores_and_unreachable_datasets(monkeypatch):
    from dus.compare import lm_eval_hook

    calls = []

    def offline(**kwargs):
        calls.append(kwargs)
        raise ConnectionError("Couldn't reach 'hellaswag' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "lm_eval", types.SimpleNamespace(simple_evaluate=offline))
    result = lm_eval_hook.run_tasks("/models/x", ["hellaswag"], "cpu", "float32")
    assert result["status"] == "unreachable" and "hub" in result["message"].lower()
    assert calls[0]["model"] == "hf" and calls[0]["model_args"].startswith("pretrained=/models/x")
    assert "trust_remote_code=False" in calls[0]["model_args"]

    scores = {"results": {"hellaswag": {"acc,none": 0.25, "acc_stderr,none": 0.01, "alias": "hellaswag"}}}
    monkeypatch.setitem(sys.modules, "lm_eval", types.SimpleNamespace(simple_evaluate=lambda **kwargs: scores))
    result = lm_eval_hook.run_tasks("/models/x", ["hellaswag"], "cpu", "float32")
    assert result == {"status": "ok", "results": {"hellaswag": {"acc,none": 0.25, "acc_stderr,none": 0.01}},
                      "scores": {"hellaswag": {"acc,none": {"value": 0.25, "stderr": 0.01}}}}


def test_wandb_offline_run_is_written(tiny_models, tmp_path, heldout, run_cli, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    result = run_cli("compare", tiny_models("llama", 4), "--data", heldout, "-o", out, "--no-generate", "--window", 64, "--wandb")
    assert result.code == 0, result
    metrics = json.loads((out / "metrics.json").read_text())
    run_dir = metrics["wandb"]
    assert run_dir.startswith(str(out / "wandb" / "offline-run-"))
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert any(p.name.endswith(".png") for p in (out / "wandb").rglob("*.png"))


def test_missing_default_prompt_file_skips_generations_with_a_note(tiny_models, tmp_path, heldout, run_cli, monkeypatch):
    import dus.resources as resources

    monkeypatch.setattr(resources, "PACKAGE_COPY", tmp_path / "nowhere")
    monkeypatch.setattr(resources, "SOURCE_TREE", tmp_path / "nowhere")
    monkeypatch.chdir(tmp_path)
    result = run_cli("compare", tiny_models("llama", 4), "--data", heldout, "-o", tmp_path / "out", "--window", 64)
    assert result.code == 0, result
    assert "--prompts" in result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["models"][0]["generations"] == [] and metrics["settings"]["prompts"] is None
    assert "## Greedy generations" not in (tmp_path / "out" / "report.md").read_text()


def test_several_domains_and_recovery(tiny_models, tmp_path, run_cli):
    """One perplexity per held-out text, pooled `all` equal to the token-weighted mean NLL,
    and recovery = (unhealed - model) / (unhealed - base) per text from the measured values."""
    prose, code = tmp_path / "prose.txt", tmp_path / "code.txt"
    prose.write_text(TEXT * 2)
    code.write_text("def heal(model):\n    return model.train()\n\n" * 20)
    models = [tiny_models("llama", 4), tiny_models("llama", 6), tiny_models("llama", 6, seed=1)]
    out = tmp_path / "out"
    result = run_cli("compare", *models, "-l", "base", "-l", "unhealed", "-l", "healed", "--data", prose, "--data", code,
                     "-o", out, "--no-generate", "--window", 64)
    assert result.code == 0, result
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["data"]) == {"prose", "code"}
    by_label = {m["label"]: m["perplexity"] for m in metrics["models"]}
    for p in by_label.values():
        domains = p["domains"]
        assert set(domains) == {"prose", "code"}
        assert p["tokens_scored"] == sum(d["tokens_scored"] for d in domains.values())
        pooled = sum(d["mean_nll"] * d["tokens_scored"] for d in domains.values()) / p["tokens_scored"]
        assert math.isclose(p["mean_nll"], pooled, rel_tol=1e-9)
    recovery = metrics["recovery"]
    assert (recovery["base"], recovery["unhealed"], list(recovery["models"])) == ("base", "unhealed", ["healed"])
    for domain in ("prose", "code"):
        low, high, mid = (by_label[k]["domains"][domain]["perplexity"] for k in ("base", "unhealed", "healed"))
        assert math.isclose(recovery["models"]["healed"][domain], (high - mid) / (high - low), rel_tol=1e-9)
    report = (out / "report.md").read_text()
    assert "Recovery per text" in report and "| model | prose | code |" in report

    swapped = run_cli("compare", *models, "-l", "a", "-l", "b", "-l", "c", "--data", prose, "-o", tmp_path / "o2",
                      "--no-generate", "--window", 64, "--base", "nope")
    assert swapped.code == 2 and "--base nope" in swapped.stderr


def test_parents_best_parent_per_text_and_ratios(tiny_models, tmp_path, run_cli):
    """--parents: per text and pooled, the parent with the lowest perplexity, and each model's
    perplexity against it, from the metrics' own perplexities; report and terminal show it."""
    prose, code = tmp_path / "prose.txt", tmp_path / "code.txt"
    prose.write_text(TEXT * 2)
    code.write_text("def heal(model):\n    return model.train()\n\n" * 20)
    models = [tiny_models("llama", 4), tiny_models("llama", 6, seed=1), tiny_models("llama", 6)]
    out = tmp_path / "out"
    result = run_cli("compare", *models, "-l", "child", "-l", "A", "-l", "B", "--parents", "A,B", "--data", prose,
                     "--data", code, "-o", out, "--no-generate", "--window", 64)
    assert result.code == 0, result
    metrics = json.loads((out / "metrics.json").read_text())
    scores = {m["label"]: {**{d: v["perplexity"] for d, v in m["perplexity"]["domains"].items()}, "all": m["perplexity"]["perplexity"]}
              for m in metrics["models"]}
    vs = metrics["vs_parents"]
    assert vs["parents"] == ["A", "B"] and set(vs["best"]) == {"prose", "code", "all"}
    assert {vs["best"]["prose"], vs["best"]["code"]} == {"A", "B"}  # these seeded models: each parent wins one text
    for text, best in vs["best"].items():
        assert scores[best][text] == min(scores["A"][text], scores["B"][text])
        for label in ("A", "B", "child"):
            assert math.isclose(vs["models"][label][text], scores[label][text] / scores[best][text] - 1, rel_tol=1e-9)
        assert vs["models"][best][text] == 0
    report = (out / "report.md").read_text()
    assert "Against the best parent per text" in report and "| model | prose | code | all |" in report
    child = vs["models"]["child"]
    assert f"| child | {100 * child['prose']:+.1f}% ({vs['best']['prose']}) |" in report
    assert "vs parent" in result.stdout


def test_parents_are_checked_before_anything_is_measured(tiny_models, tmp_path, heldout, run_cli):
    model = tiny_models("llama", 4)
    out = tmp_path / "out"
    result = run_cli("compare", model, model, "-l", "A", "-l", "child", "--parents", "A", "--parents", "B",
                     "--data", heldout, "-o", out, "--no-generate")
    assert result.code == 2
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "--parents B" in message and "A, child" in message
    assert not out.exists()
    result = run_cli("compare", model, "-l", "A", "--parents", "A", "--skip-perplexity", "--data", heldout, "-o", out, "--no-generate")
    assert result.code == 2 and "--skip-perplexity" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_compare_and_heal_share_one_wandb_mode_policy(tmp_path, monkeypatch):
    """A user logged in with `wandb login` (a netrc entry, no WANDB_API_KEY) gets online runs
    from compare as from heal; nobody logged in gets offline runs from both."""
    import dus.compare.wandb_log as compare_log
    import dus.heal.tracking as heal_tracking
    from dus.wandb_mode import choose_mode

    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    assert choose_mode() == "offline"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    netrc.chmod(0o600)
    assert choose_mode() == "online"
    assert compare_log.choose_mode is heal_tracking.choose_mode is choose_mode

"""Issue 42, the next hostile inputs: each is refused in one line (exit 2), before anything
is at the output path, and a search's workers never outlive it. Each test covers the class,
not only the reported example: every bound on --workers, every way a search's parent can
go, every pairing of hidden states, every kind of a route field, every data file type left
empty, every option that takes a model directory, every value given with --set.
Also the decisions made with it: a model given twice, an output inside a model the command
reads, and --dry-run with an output the real run would refuse."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dus.errors import DusError

TEXT = "A search over layer paths scores each candidate on ordinary text. The best path keeps the early layers. " * 8
FAST = {
    "sft.report_to": "none", "sft.warmup_steps": 0, "sft.logging_steps": 1, "sft.learning_rate": 1e-2,
    "sft.per_device_train_batch_size": 2, "sft.max_length": 32, "sft.max_steps": 3, "seam.radius": 1,
    "calibrate.enabled": False,
}


def one_line(result, code=2) -> str:
    assert result.code == code, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dus: error: "), result
    return lines[0]


def gone(pid: int) -> bool:
    """The process is no more (a zombie nobody has reaped yet counts as gone: it runs nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False


def wait_until(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.fixture
def scored(tmp_path, tiny_models):
    model = tiny_models("llama", num_layers=6)
    (tmp_path / "text.txt").write_text(TEXT)
    return model, tmp_path / "text.txt"


def search_args(model, data, out, *more):
    return ["search", model, "--data", data, "--depth", "8", "--max-tokens", "64", "--window", "32", "-o", out, *more]


# --- 1. --workers is bounded by the evaluations, the cores or GPUs, and the memory ----------------

@pytest.mark.parametrize("case, workers, more, message", [
    ("evaluations", 100000, ["--evals", "4"], "the search has 4 evaluations (--evals), so at most 4 workers have one "
                                              "to run; give --workers 4 or fewer"),
    ("evaluations, dry run", 5, ["--evals", "4", "--dry-run"], "give --workers 4 or fewer"),
    ("cores", 3, ["--evals", "10", "--device", "cpu"], "this process may use 2 CPU cores and each worker is a process "
                                                       "needing at least one; give --workers 2 or fewer"),
    ("gpus", 2, ["--evals", "10"], "each worker scores on a GPU of its own and 1 are visible"),
    ("memory", 2, ["--evals", "10", "--device", "cpu"], "GB available; give --workers 1 or fewer"),
])
def test_workers_beyond_what_they_can_use_are_refused_before_anything_starts(case, workers, more, message, scored,
                                                                             tmp_path, run_cli, monkeypatch):
    from dus.search import workers as pool

    monkeypatch.setattr(pool, "cores", lambda: 2)
    monkeypatch.setattr(pool, "visible_gpus", lambda: ["0"] if case == "gpus" else [])
    if case == "memory":
        monkeypatch.setattr(pool, "available_memory", lambda: pool.WORKER_OVERHEAD_BYTES * 3 // 2)
    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(a))
    model, data = scored
    out = tmp_path / "out"
    line = one_line(run_cli(*search_args(model, data, out, "--workers", workers, *more)))
    assert f"--workers {workers}: " in line and message in line, line
    assert not out.exists() and not started


def test_workers_within_every_bound_pass_the_check(scored, monkeypatch):
    """The bounds are not refusals of everything: the largest count each names is accepted."""
    from dus.search import workers as pool

    monkeypatch.setattr(pool, "cores", lambda: 2)
    monkeypatch.setattr(pool, "visible_gpus", lambda: [])
    model, _ = scored
    pool.check_count(2, 2, "evaluations", [str(model)], "cpu")
    pool.check_count(1, 1, "evaluations", [str(model)], "cpu")
    monkeypatch.setattr(pool, "available_memory", lambda: None)  # unknown memory: not refused for it
    pool.check_count(2, 5, "evaluations", [str(model)], "cpu")


def test_graft_workers_are_bounded_by_the_grafts(tiny_models, tmp_path, run_cli):
    base, donor = tiny_models("llama", num_layers=4, seed=1), tiny_models("llama", num_layers=4, seed=2)
    (tmp_path / "text.txt").write_text(TEXT)
    out = tmp_path / "out"
    line = one_line(run_cli("search", "--graft", base, "--donor", donor, "--size", "3", "--data", tmp_path / "text.txt",
                            "--workers", "3", "-o", out))
    assert "the search has 2 grafts to score, so at most 2 workers" in line and not out.exists()


# --- 2. workers die with their parent ---------------------------------------------------------------

SLEEPY_SCORE = '''
import os, time
from pathlib import Path


def score(model, tokenizer):
    notes = Path(os.environ["DUS_TEST_NOTES"])
    (notes / f"worker-{os.getpid()}").write_text("")
    time.sleep(600)  # the parent is killed meanwhile
    return 0.0
'''


def test_workers_die_with_a_search_killed_by_sigkill(scored, tmp_path):
    """kill -9 of `dus search --workers 2` (no handler runs in it): both workers, each in the
    middle of an evaluation, are gone within seconds, not left to search on their own."""
    model, data = scored
    notes = tmp_path / "notes"
    notes.mkdir()
    (tmp_path / "sleepy.py").write_text(SLEEPY_SCORE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
           "DUS_TEST_NOTES": str(notes), "CUDA_VISIBLE_DEVICES": ""}  # two workers on one GPU are refused
    command = [sys.executable, "-m", "dus", "search", str(model), "--score", f"{tmp_path / 'sleepy.py'}:score",
               "--depth", "8", "--evals", "4", "--workers", "2", "--optimizer", "random", "-o", str(tmp_path / "out")]
    with open(tmp_path / "stderr", "wb") as stderr:
        parent = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    pids: list[int] = []
    try:
        def both_scoring():
            assert parent.poll() is None, (tmp_path / "stderr").read_text()
            pids[:] = [int(p.name.split("-")[1]) for p in notes.glob("worker-*")]
            return len(pids) == 2

        wait_until(both_scoring, 600, "the two workers never started scoring")  # a bound, for a loaded machine
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        # well within the 600 s each worker would otherwise sleep on (and then search on alone); a machine whose
        # cores others hold at a higher priority has taken over 30 s to let two Pythons exit
        wait_until(lambda: all(gone(pid) for pid in pids), 120, f"workers {pids} outlived their killed parent")
    finally:
        parent.kill()
        parent.wait()
        for pid in pids:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)


WATCHED = '''
import os, sys, time
sys.platform = "darwin"  # no prctl: only the portable watcher thread is left
from dus.search.workers import die_with_parent

die_with_parent(os.getppid())
print(os.getpid(), flush=True)
time.sleep(120)
'''

MIDDLE = '''
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=sys.stdout)
time.sleep(120)
'''


def test_the_portable_watcher_ends_a_worker_whose_parent_is_gone(tmp_path):
    """Where the kernel cannot be asked (macOS: no PR_SET_PDEATHSIG), the worker's own thread
    sees its parent's pid go and ends the worker."""
    middle = subprocess.Popen([sys.executable, "-c", MIDDLE, WATCHED], stdout=subprocess.PIPE)
    child = None
    try:
        child = int(middle.stdout.readline())
        assert not gone(child)
        middle.kill()
        middle.wait()
        wait_until(lambda: gone(child), 30, "the worker outlived its parent")  # it would sleep 120 s
    finally:
        middle.kill()
        middle.wait()
        if child is not None and not gone(child):
            os.kill(child, signal.SIGKILL)


# --- 3. hidden states of different sizes ------------------------------------------------------------

@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Two fine-tunes A and B of one width, a teacher W of another width (same tokenizer), the
    stack of A and B, and some text."""
    from dus.build import build_model
    from dus.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("hostile-family")
    a = make_tiny_model(root / "A", "llama", num_layers=4, seed=11)
    b = make_tiny_model(root / "B", "llama", num_layers=4, seed=12)
    make_tiny_model(root / "W", "llama", num_layers=4, seed=13, hidden_size=48)
    build_model({"stack": {"models": [str(a), str(b)], "trim": 1}}, root / "stack")
    (root / "prose.txt").write_text("\n\n".join("once upon a time there were dogs." for _ in range(40)) + "\n")
    return root


@pytest.mark.parametrize("teachers, points", [
    (["A", "W"], "auto"), (["W", "B"], "auto"), (["W"], "auto"), (["A", "B", "W"], [0, 4]),
])
def test_teachers_of_another_hidden_size_are_refused_before_out_with_hidden_matching(family, tmp_path, teachers,
                                                                                       points):
    from dus.heal.config import load_config
    from dus.heal.run import heal

    cfg = load_config(None, {**FAST, "data.path": str(family / "prose.txt"), "distill.hidden": 1.0,
                             "distill.hidden_layers": points})
    out = tmp_path / "out"
    with pytest.raises(DusError) as error:
        heal(family / "stack", out, cfg, teacher=[str(family / name) for name in teachers])
    line = str(error.value)
    assert f"teacher {family / 'W'}" in line and "hidden size 48 where the model's is 32" in line, line
    assert "distill.hidden=0" in line and "\n" not in line
    assert not out.exists()


def test_teachers_of_another_hidden_size_still_distil_their_logits(family):
    """Without activation matching a teacher's width does not matter: the check is of the term."""
    from dus.checkpoint import ModelDir
    from dus.heal.config import load_config
    from dus.heal.run import check_hidden
    from dus.heal.teachers import Teacher

    teachers = [Teacher("A", family / "A"), Teacher("W", family / "W")]
    check_hidden(ModelDir(family / "stack"), load_config(None, {"distill.hidden": 0}), teachers)
    with pytest.raises(DusError, match="hidden size 48"):
        check_hidden(ModelDir(family / "stack"), load_config(None, {"distill.hidden": 0.5}), teachers)


# --- 4. a route field of mixed kinds; 7. empty data files --------------------------------------------

@pytest.mark.parametrize("value, kind", [
    (["A", "B"], "a list (['A', 'B'])"), (3, "a number (3)"), (None, "null"), ({"name": "A"}, "an object"),
    ("", "an empty string"), (True, "a boolean"),
])
def test_a_route_field_that_is_not_a_teacher_name_names_the_file_and_row(tmp_path, value, kind):
    from dus.heal.data import load_data

    rows = [{"text": "some words", "teacher": "A"}, {"text": "more words", "teacher": "B"},
            {"text": "other words", "teacher": value}, {"text": "last words", "teacher": "A"}]
    path = tmp_path / "routed.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DusError) as error:
        load_data(str(path), keep="teacher")
    line = str(error.value)
    assert line.startswith(f"data {path}: row 2's `teacher` is {kind}"), line  # from 0, as every data row
    assert f"--data {path}:TEACHER" in line and "\n" not in line


def test_a_mixed_route_field_is_one_line_from_the_cli(family, tmp_path, run_cli):
    path = tmp_path / "routed.jsonl"
    path.write_text(json.dumps({"text": "a b c", "teacher": "A"}) + "\n" + json.dumps({"text": "d e", "teacher": ["A"]})
                    + "\n")
    out = tmp_path / "out"
    line = one_line(run_cli("heal", family / "stack", "-o", out, "--data", path, "--set", "distill.combine=route",
                            "--steps", "1"))
    assert f"data {path}: row 1's `teacher` is a list" in line and not out.exists()


@pytest.mark.parametrize("name, content", [
    ("empty.jsonl", b""), ("blank.jsonl", b"\n\n  \n"), ("empty.json", b""), ("empty.csv", b""),
    ("empty.txt", b""), ("empty.parquet", b""),
])
def test_an_empty_data_file_is_called_empty(tmp_path, name, content):
    from dus.heal.data import load_data

    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DusError) as error:
        load_data(str(path))
    line = str(error.value)
    assert line.startswith(f"data {path}: the file is empty") and "StopIteration" not in line, line
    assert ("only blank lines" in line) == bool(content)


def test_an_empty_routed_file_is_called_empty_from_the_cli(family, tmp_path, run_cli):
    (tmp_path / "code.jsonl").write_text("")
    out = tmp_path / "out"
    line = one_line(run_cli("heal", family / "stack", "-o", out, "--data", f"{tmp_path / 'code.jsonl'}:A", "--data",
                            f"{family / 'prose.txt'}:B", "--set", "distill.combine=route", "--steps", "1"))
    assert "code.jsonl: the file is empty" in line and not out.exists()


# --- 8. a file where a model directory is wanted ------------------------------------------------------

@pytest.mark.parametrize("command", ["build-solar", "build-recipe", "heal", "heal-teacher", "compare", "scan", "export",
                                     "search", "search-graft", "search-donor"])
def test_a_file_given_for_a_model_directory_names_its_directory(command, family, tmp_path, run_cli):
    config = family / "A" / "config.json"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"solar:\n  model: {config}\n  trim: 1\n")
    (tmp_path / "text.txt").write_text(TEXT)
    out = tmp_path / "out"
    args = {
        "build-solar": ["build", "--solar", config, "--trim", "1", "-o", out],
        "build-recipe": ["build", recipe, "-o", out],
        "heal": ["heal", config, "-o", out],
        "heal-teacher": ["heal", family / "stack", "-o", out, "--mode", "distill", "--teacher", config,
                         "--data", family / "prose.txt"],
        "compare": ["compare", family / "A", config, "-o", out, "--data", tmp_path / "text.txt"],
        "scan": ["scan", config, "-o", out, "--data", tmp_path / "text.txt"],
        "export": ["export", config, "-o", tmp_path / "out.gguf"],
        "search": ["search", config, "--data", tmp_path / "text.txt", "--depth", "6", "-o", out],
        "search-graft": ["search", "--graft", config, "--donor", family / "B", "--size", "1", "--data",
                         tmp_path / "text.txt", "-o", out],
        "search-donor": ["search", "--graft", family / "B", "--donor", config, "--size", "1", "--data",
                         tmp_path / "text.txt", "-o", out],
    }[command]
    line = one_line(run_cli(*args))
    assert f"{config} is a file, not a model directory; give its directory: {family / 'A'}" in line, line
    assert not out.exists() and not (tmp_path / "out.gguf").exists()


# --- 9. the plain build parser's errors point to dus build --help ---------------------------------------

@pytest.mark.parametrize("args", [
    ["-o"], ["--dry-run=1"], ["{recipe}", "-o"], ["--trim"], ["--solar"], ["--force=yes"], ["{recipe}", "--bogus"],
    ["{recipe}", "{recipe}"], ["--quiet=1"], ["--shard-size"],
])
def test_build_usage_errors_point_to_dus_build_help(args, tmp_path, run_cli):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("solar:\n  model: m\n  trim: 1\n")
    line = one_line(run_cli("build", *[a.format(recipe=recipe) for a in args]))
    assert line.endswith("(see dus build --help)"), line


# --- 10. a bad --set value names the --set option --------------------------------------------------------

@pytest.mark.parametrize("item", [
    "distill.teacher_weights=[-1,2]", "distill.teacher_weights=[.nan,1]", "distill.teacher_weights=[0,0]",
    "distill.combine=bogus", "distill.hidden=.nan", "distill.average=x", "distill.alpha=2", "distill.temperature=0",
    "distill.student=nope", "seam.radius=0", "sft.learning_rate=-1", "lora.r=0", "calibrate.tokens=1",
    "data.max_samples=0", "mode=bogus", "in_memory=3", "distill.logits=some", "distill.hidden_layers=x",
])
def test_a_bad_set_value_is_blamed_on_the_set_option(item, tmp_path, run_cli):
    from dus.heal.config import load_config, parse_set_option

    key, value = parse_set_option(item)
    with pytest.raises(DusError) as error:
        load_config(None, {key: value})
    line = str(error.value)
    assert line.startswith(f"--set {key}="), line
    assert "built-in defaults" not in line and "train/heal.yaml" not in line
    out = tmp_path / "out"
    cli = one_line(run_cli("heal", tmp_path / "missing-model", "-o", out, "--set", item))
    assert f"--set {item}: " in cli and "built-in defaults" not in cli and not out.exists(), cli


def test_a_bad_option_value_names_the_option_and_a_bad_file_value_its_line(tmp_path, run_cli):
    from dus.heal.config import load_config

    config = tmp_path / "mine.yaml"
    config.write_text("mode: distill\ndistill:\n  alpha: 0.5\n  hidden: .nan\n")
    with pytest.raises(DusError, match=rf"^{config}:4: distill.hidden \(the activation-matching weight\)"):
        load_config(config)
    with pytest.raises(DusError, match=r"^--set distill.hidden=1\.5e-300x: "):  # the override, not the file
        load_config(config, {"distill.hidden": "1.5e-300x"})
    out = tmp_path / "out"
    line = one_line(run_cli("heal", tmp_path / "m", "-o", out, "--radius", "0"))
    assert "--radius: seam.radius must be a whole number >= 1" in line, line


def test_a_bad_heal_set_value_of_a_search_names_the_heal_set_option(tiny_models, tmp_path, run_cli):
    (tmp_path / "text.txt").write_text(TEXT)
    out = tmp_path / "out"
    line = one_line(run_cli("search", tiny_models("llama", num_layers=6), "--data", tmp_path / "text.txt", "--depth", "8",
                            "-o", out, "--heal-steps", "2", "--heal-set", "distill.hidden=.nan"))
    assert "dus: error: --heal-set distill.hidden=.nan: distill.hidden (the activation-matching weight)" in line, line
    assert not out.exists()


def test_a_killed_worker_says_whether_anything_is_left():
    """Killed, with the others finishing every evaluation: nothing is left (no rerun asked);
    with evaluations left: how many, and to rerun."""
    from dus.search.workers import killed_note

    done = killed_note([(1, 9)], 40, 40)
    assert "worker 1 (signal 9) stopped" in done and "all 40 evaluations are done, nothing is left" in done
    assert "rerun" not in done
    left = killed_note([(0, 9), (1, 15)], 37, 40)
    assert "37 of 40 evaluations are done and 3 left: rerun the same command" in left


# --- decisions: a model given twice, an output inside a model, --dry-run with a refused output ------

def test_a_model_given_twice_is_refused_where_two_are_meant(family, tmp_path, run_cli):
    from dus.build import build_model
    from dus.heal.routes import data_specs

    out = tmp_path / "out"
    for second in (family / "A", f"{family}/B/../A"):
        with pytest.raises(DusError, match="stack names one model twice .* is the solar preset"):
            build_model({"stack": {"models": [str(family / "A"), str(second)], "trim": 1}}, out)
    (tmp_path / "text.txt").write_text(TEXT)
    line = one_line(run_cli("search", family / "A", f"{family}/B/../A", "--data", tmp_path / "text.txt", "--depth", "6",
                            "-o", out))
    assert "a source model is given twice" in line
    assert "are the same model" in one_line(run_cli("search", "--graft", family / "A", "--donor", family / "A",
                                                    "--size", "1", "--data", tmp_path / "text.txt", "-o", out))
    with pytest.raises(DusError, match=r"is given twice \(routed to A and to B\)"):
        data_specs([f"{family / 'prose.txt'}:A", f"{family / 'prose.txt'}:B"])
    with pytest.raises(DusError, match="is given twice; give each file once"):
        data_specs([str(family / "prose.txt"), str(family / "prose.txt")])
    line = one_line(run_cli("heal", family / "stack", "-o", out, "--data", f"{family / 'prose.txt'}:A", "--data",
                            f"{family / 'prose.txt'}:B", "--set", "distill.combine=route"))
    assert "routed to A and to B" in line
    assert "named twice" in one_line(run_cli("heal", family / "stack", "-o", out, "--mode", "distill", "--teacher",
                                             family / "A", "--teacher", f"{family}/B/../A"))
    assert not out.exists()


@pytest.mark.parametrize("command", ["build", "build-dry-run", "heal", "heal-teacher", "search", "search-dry-run",
                                     "compare", "scan", "export"])
def test_an_output_inside_a_model_the_command_reads_is_refused(command, family, tmp_path, run_cli):
    (tmp_path / "text.txt").write_text(TEXT)
    model = family / ("stack" if command == "heal" else "A")
    inside = model / "out"
    args = {
        "build": ["build", "--solar", family / "A", "--trim", "1", "-o", inside],
        "build-dry-run": ["build", "--solar", family / "A", "--trim", "1", "-o", inside, "--dry-run"],
        "heal": ["heal", family / "stack", "-o", inside],
        "heal-teacher": ["heal", family / "stack", "-o", inside, "--mode", "distill", "--teacher", family / "A",
                         "--data", family / "prose.txt"],
        "search": ["search", family / "A", "--data", tmp_path / "text.txt", "--depth", "6", "-o", inside],
        "search-dry-run": ["search", family / "A", "--data", tmp_path / "text.txt", "--depth", "6", "-o", inside,
                           "--dry-run"],
        "compare": ["compare", family / "A", "-o", inside, "--data", tmp_path / "text.txt"],
        "scan": ["scan", family / "A", "-o", inside, "--data", tmp_path / "text.txt"],
        "export": ["export", family / "A", "-o", family / "A" / "out.gguf"],
    }[command]
    before = sorted(p.name for p in model.iterdir())
    line = one_line(run_cli(*args))
    assert "inside the model" in line, line
    assert sorted(p.name for p in model.iterdir()) == before


def test_a_dry_run_refuses_the_output_the_real_run_refuses(family, tmp_path, run_cli):
    """A dry run with -o checks it as the run would: a clean dry run means the run may start."""
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    (tmp_path / "text.txt").write_text(TEXT)
    build = ["build", "--solar", family / "A", "--trim", "1", "-o", foreign]
    assert one_line(run_cli(*build, "--dry-run")) == one_line(run_cli(*build))
    assert "already exists" in one_line(run_cli(*build, "--dry-run"))
    assert "not written by dus" in one_line(run_cli(*build, "--dry-run", "--force"))
    search = ["search", family / "A", "--data", tmp_path / "text.txt", "--depth", "6", "-o", foreign]
    assert "is not a dus search directory" in one_line(run_cli(*search, "--dry-run"))
    assert one_line(run_cli(*search, "--dry-run")) == one_line(run_cli(*search))
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    assert run_cli("build", "--solar", family / "A", "--trim", "1", "--dry-run").code == 0  # no -o: nothing to check
    assert run_cli("build", "--solar", family / "A", "--trim", "1", "--dry-run", "-o", tmp_path / "new").code == 0
    assert not (tmp_path / "new").exists()

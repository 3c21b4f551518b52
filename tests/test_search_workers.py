"""dus search with many workers on one study: two worker processes on one journal search
what one would, each trial once; a worker killed mid-evaluation leaves its trial failed,
never a score, and the search resumes (or the other workers go on) and finishes; storages
that are malformed, unreachable, foreign or of another search, and two searches in one
directory, are refused in one line, with nothing written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from dus.errors import DusError

N = 6
TEXT = "A search over layer paths scores each candidate on ordinary text. The best path keeps the early layers. " * 8

# A --score function: the sum of the weights (cheap; the same for paths that differ only in scales), which
# leaves notes for the test in $DUS_TEST_NOTES: each worker's pid and threads, and, once,
# a sleep long enough for the test to kill the worker in the middle of an evaluation.
SCORE = '''
import os, time
from pathlib import Path

import torch


def score(model, tokenizer):
    notes = Path(os.environ["DUS_TEST_NOTES"])
    (notes / f"worker-{os.getpid()}").write_text(f"{torch.get_num_threads()} {os.environ.get('OMP_NUM_THREADS')}")
    wanted = int(os.environ.get("DUS_TEST_WORKERS", "1"))
    deadline = time.time() + 60
    while len(list(notes.glob("worker-*"))) < wanted and time.time() < deadline:
        time.sleep(0.02)  # every worker scores: none finishes the search before the others start
    calls = notes / f"calls-{os.getpid()}"
    calls.write_text(str(int(calls.read_text()) + 1 if calls.exists() else 1))
    if os.environ.get("DUS_TEST_SLEEP_AT") == calls.read_text() and not (notes / "slept").exists():
        (notes / "slept").write_text(str(os.getpid()))
        time.sleep(120)  # killed here
    return float(sum(p.double().sum() for p in model.parameters()))
'''


@pytest.fixture
def setting(tmp_path, tiny_models, monkeypatch):
    """(model, score spec, notes directory): the environment the score function reads is set;
    a study found without its settings is waited for 0.2 s, not 10."""
    from dus.search import journal

    monkeypatch.setattr(journal, "SETTINGS_WAIT", 0.2)
    # --workers 2 needs two GPUs where there are GPUs (one each): these searches run on the CPU, bounded by its cores
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    notes = tmp_path / "notes"
    notes.mkdir()
    (tmp_path / "weights.py").write_text(SCORE)
    monkeypatch.setenv("DUS_TEST_NOTES", str(notes))
    return tiny_models("llama", num_layers=N), f"{tmp_path / 'weights.py'}:score", notes


def args(model, score, out, evals=8, *more):
    return ["search", model, "--score", score, "--depth", "8", "--scale", "0.5:1", "--evals", str(evals), "-o", out, *more]


def trials(out, storage=None):
    from dus.search import journal

    return journal.study_trials(journal.open_storage(out, storage, create=False))


def states(out, storage=None) -> dict[str, int]:
    return dict(Counter(t.state.name for t in trials(out, storage)))


def one_line(result, code=2) -> str:
    assert result.code == code, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dus: error: "), result
    return lines[0]


def start(command: list, notes: Path, **env) -> subprocess.Popen:
    """`python -m dus COMMAND` in its own process, as a user would start it."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", **env}
    return subprocess.Popen([sys.executable, "-m", "dus", *map(str, command)], env=environment,
                            stdout=open(notes / "stdout", "wb"), stderr=open(notes / "stderr", "wb"))


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 90) -> str:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, (path.parent / "stderr").read_text()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    time.sleep(0.05)
    return path.read_text()


def test_two_workers_on_one_journal_search_what_one_worker_searches_even_when_one_is_killed(setting, tmp_path, run_cli,
                                                                                          monkeypatch):
    """`--workers 2`, one worker killed (SIGKILL) in the middle of its second evaluation: the
    other finds the trial's process dead, fails the trial (never a score) and scores its
    candidate again; the command warns and finishes. Random's trials are seeded by their
    slot, so the two workers searched exactly the candidates one worker searches, each
    once, every trial recorded; each worker had half the CPU threads."""
    model, score, notes = setting
    out = tmp_path / "two"
    process = start(args(model, score, out, 10, "--optimizer", "random", "--workers", "2"), notes,
                    DUS_TEST_SLEEP_AT="2", DUS_TEST_WORKERS="2")
    try:
        killed = int(wait_for(notes / "slept", process))
        os.kill(killed, signal.SIGKILL)
        assert process.wait(120) == 0, (notes / "stderr").read_text()
    finally:
        process.kill()
        process.wait()
    stderr = (notes / "stderr").read_text()
    assert "warning: worker" in stderr and "(signal 9) stopped" in stderr, stderr
    assert "all 10 evaluations are done, nothing is left to run" in stderr and "rerun" not in stderr, stderr
    found = trials(out)
    assert Counter(t.state.name for t in found) == {"COMPLETE": 10, "FAIL": 1}
    failed = next(t for t in found if t.state.name == "FAIL")
    assert failed.user_attrs["dus_worker"]["pid"] == killed and "dus" not in failed.user_attrs
    assert "worker is gone" in failed.user_attrs["dus_failed"]
    done = [t for t in found if t.state.name == "COMPLETE"]
    assert next(t for t in done if t.user_attrs.get("dus_queued") == "retry").params == failed.params
    workers = {t.user_attrs["dus_worker"]["pid"] for t in done}
    assert len(workers) == 2 and killed in workers and process.pid not in workers  # both scored, the command none
    threads = str(max(1, len(os.sched_getaffinity(0)) // 2))
    assert {(notes / f"worker-{pid}").read_text() for pid in workers} == {f"{threads} {threads}"}
    keys = [t.user_attrs["dus"]["key"] for t in done]
    assert len(set(keys)) == len(keys)  # each candidate once (the start point is trial 0, queued once)
    assert [t.number for t in found if t.user_attrs.get("dus_queued") == "start"] == [0]
    result = json.loads((out / "search.json").read_text())
    assert [c["trial"] for c in result["candidates"]] == [t.number for t in done] and result["model_runs"] == 10
    assert (out / "rank-1.yaml").is_file() and result["prefix_cache"] is None  # a --score function keeps none

    monkeypatch.setenv("DUS_TEST_WORKERS", "1")
    alone = run_cli(*args(model, score, tmp_path / "one", 10, "--optimizer", "random"))
    assert alone.code == 0, alone
    one = json.loads((tmp_path / "one" / "search.json").read_text())
    pairs = lambda data: sorted((json.dumps(c["candidate"], sort_keys=True), c["value"]) for c in data["candidates"])
    assert pairs(result) == pairs(one)


def test_a_worker_killed_mid_evaluation_leaves_its_trial_failed_and_the_search_resumes(setting, tmp_path, run_cli):
    """SIGKILL in the middle of the third evaluation: the trial stays running in the study
    (nothing can mark it), is found to belong to a dead process when the search is started
    again, failed (never a score) and its parameters queued again; the resumed search ends
    where an uninterrupted one ends. Meanwhile another search's settings on the directory
    are refused in one line."""
    model, score, notes = setting
    out = tmp_path / "out"
    process = start(args(model, score, out, 8), notes, DUS_TEST_SLEEP_AT="3")
    try:
        pid = int(wait_for(notes / "slept", process))
        assert pid == process.pid
        assert states(out) == {"COMPLETE": 2, "RUNNING": 1}
        other = one_line(run_cli(*args(model, score, out, 8, "--depth", "7")))  # a second search on the directory
        assert "other settings (space.depth" in other and states(out) == {"COMPLETE": 2, "RUNNING": 1}
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert not (out / "search.json").exists()

    resumed = run_cli(*args(model, score, out, 8))
    assert resumed.code == 0, resumed
    assert states(out) == {"COMPLETE": 8, "FAIL": 1}
    found = trials(out)
    failed = next(t for t in found if t.state.name == "FAIL")
    assert failed.number == 2 and "dus" not in failed.user_attrs and "worker is gone" in failed.user_attrs["dus_failed"]
    retry = next(t for t in found if t.user_attrs.get("dus_queued") == "retry")
    assert retry.params == failed.params and retry.state.name == "COMPLETE"

    whole = run_cli(*args(model, score, tmp_path / "whole", 8))
    assert whole.code == 0, whole
    trail = lambda folder: [(c["candidate"], c["value"]) for c in json.loads((folder / "search.json").read_text())["candidates"]]
    assert trail(out) == trail(tmp_path / "whole")


def test_a_storage_url_is_shared_and_a_study_of_other_settings_is_refused(setting, tmp_path, run_cli):
    """--storage sqlite:///: the same command with another -o joins the study (and writes
    its results there); other settings on that storage are refused in one line, as is a
    study dus did not make, and -o of a search whose study is a journal file."""
    import optuna

    model, score, notes = setting
    url = f"sqlite:///{tmp_path / 'search.db'}"
    first = run_cli(*args(model, score, tmp_path / "a", 3, "--storage", url))
    assert first.code == 0, first
    assert states(None, url) == {"COMPLETE": 3} and not (tmp_path / "a" / "optuna-journal.log").exists()
    joined = run_cli(*args(model, score, tmp_path / "b", 5, "--storage", url))
    assert joined.code == 0, joined
    assert json.loads((tmp_path / "b" / "search.json").read_text())["evaluations"] == 5

    other = one_line(run_cli(*args(model, score, tmp_path / "c", 5, "--storage", url, "--seed", "3")))
    assert f"--storage {url}: holds a search with other settings (seed differ)" in other
    assert not (tmp_path / "c").exists() and states(None, url) == {"COMPLETE": 5}
    results = one_line(run_cli(*args(model, score, tmp_path / "b", 5, "--storage", f"sqlite:///{tmp_path / 'new.db'}",
                                     "--seed", "3")))
    assert f"{tmp_path / 'b'}: holds a search with other settings (seed differ)" in results

    foreign = f"sqlite:///{tmp_path / 'foreign.db'}"
    optuna.create_study(storage=foreign, study_name="dus-search")
    assert "holds an Optuna study 'dus-search' that dus search did not make" in one_line(
        run_cli(*args(model, score, tmp_path / "d", 3, "--storage", foreign)))
    assert run_cli(*args(model, score, tmp_path / "e", 2)).code == 0
    assert "leave out --storage to continue it there" in one_line(run_cli(*args(model, score, tmp_path / "e", 2, "--storage", url)))
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("case, message", [
    ("malformed-url", "--storage 'not a url': not a database URL; give one like sqlite:///search.db"),
    ("unknown-kind", "--storage nosuchdb://host/db: cannot open the database (no database kind 'nosuchdb')"),
    ("unreachable-sqlite", "--storage sqlite:////nonexistent-dus-dir/x.db: cannot open the database (unable to open database file)"),
    ("unreachable-server", "--storage postgresql://user:***@127.0.0.1:9/db: "),
    ("cma-workers", "--optimizer cma runs in one worker (the cma package's CMA-ES is told each generation in order); "
                    "use --workers 1, or --optimizer tpe or random for --workers 2"),
    ("no-workers", "--workers 0: give at least 1 worker process"),
    ("earlier-journal", "holds the journal.jsonl of a search by an earlier dus (before searches were Optuna studies)"),
    ("results-elsewhere", "holds the results of a search whose study is in a database (--storage); give that --storage"),
])
def test_bad_storage_or_workers_get_one_line_and_write_nothing(case, message, setting, tmp_path, run_cli):
    model, score, _ = setting
    out = tmp_path / "out"
    more = {
        "malformed-url": ["--storage", "not a url"],
        "unknown-kind": ["--storage", "nosuchdb://host/db"],
        "unreachable-sqlite": ["--storage", "sqlite:////nonexistent-dus-dir/x.db"],
        "unreachable-server": ["--storage", "postgresql://user:secret@127.0.0.1:9/db"],
        "cma-workers": ["--optimizer", "cma", "--workers", "2"],
        "no-workers": ["--workers", "0"],
        "earlier-journal": [],
        "results-elsewhere": [],
    }[case]
    if case in ("earlier-journal", "results-elsewhere"):
        out.mkdir()
        (out / ("journal.jsonl" if case == "earlier-journal" else "search.json")).write_text("{}\n")
    before = sorted(p.name for p in out.iterdir()) if out.exists() else None
    line = one_line(run_cli(*args(model, score, out, 3, *more)))
    assert message in line and "secret" not in line  # a password is never printed
    if case == "unreachable-server":  # no driver here, or no server: either way one line saying which
        assert "driver is not installed" in line or "cannot open the database" in line
    assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == before


def test_a_foreign_journal_in_the_directory_is_refused(setting, tmp_path, run_cli):
    """An Optuna journal another program wrote in -o (a study named otherwise, or one named
    dus-search without dus's settings) is never joined."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    model, score, _ = setting
    out = tmp_path / "out"
    out.mkdir()
    storage = JournalStorage(JournalFileBackend(str(out / "optuna-journal.log")))
    optuna.create_study(storage=storage, study_name="dus-search").enqueue_trial({"x": 1.0})
    before = (out / "optuna-journal.log").read_bytes()
    line = one_line(run_cli(*args(model, score, out, 3)))
    assert "holds an Optuna study 'dus-search' that dus search did not make" in line
    assert (out / "optuna-journal.log").read_bytes() == before
    with pytest.raises(DusError, match="did not make"):
        from dus.search import journal

        journal.stored_settings(storage, "x", {}, wait=0.1)

"""The search's record: an Optuna study, in an Optuna storage.

Every evaluation is one trial of the study named `dus-search`: the genes are the
trial's parameters (`g0`, `g1`, ...; `graft` in graft mode), the score its value, and
what dus reports about it (vector, candidate, metrics, seconds, cached, feasible,
missing layers) its user attribute `dus`; the study's user attribute `dus` holds the
settings. The storage is, by default, Optuna's journal file `optuna-journal.log` in
the -o directory (`JournalStorage` over `JournalFileBackend`: appended under a lock
file, so several processes on one machine, or on machines sharing the filesystem, work
on one study), or the database that `--storage URL` names (`RDBStorage`:
`sqlite:///search.db`, `postgresql://user@host/db`) for machines that share nothing else.

**Why the study replaced dus's own JSONL journal (journal.jsonl) instead of sitting
beside it.** With several workers, on several machines, the storage is the one place
where every evaluation meets: the results are read from it whatever else is kept, so a
JSONL file per worker would be a second record of the same evaluations, to be kept
consistent with the first through every kill. With the study as the only record, resume
needs no replay of a log: tpe and random read the study (each trial's sampler is seeded
by the seed and the trial's place among the trials that did not fail, so one worker's
search, killed and resumed, asks what an uninterrupted one asks), and only cma, whose
state lives in the `cma` process, replays the study's completed trials through it, as it
replayed the journal, each vector checked. The tests stay as simple: a killed search
still resumes to the uninterrupted search's end, and what the old journal's reader
refused (a damaged line, a record dus did not write, a non-finite score) is refused in
one line here too. A directory holding an earlier dus's journal.jsonl is refused in one
line (finish it with that dus), never read into a study.

**Liveness.** A worker names itself on its trial (`dus_worker`: host and pid) and beats
(`dus_beat`, every 10 s) while it scores; Optuna's own heartbeat is RDBStorage's only,
and is made for `study.optimize`. A running trial is stale when its worker is a dead
process on this host, or when its last beat is older than 120 s (another host, or a
worker killed before it named itself): whoever sees a stale trial fails it (FAIL is never
a score) and, for tpe and random, puts its parameters back in the queue (at most twice),
so a kill costs one evaluation, not a candidate."""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from dus.checkpoint import process_alive
from dus.errors import DusError

STUDY_NAME = "dus-search"
FORMAT = "dus-search-study/1"
JOURNAL_NAME = "optuna-journal.log"
OLD_JOURNAL = "journal.jsonl"
RESULT_FILES = ("search.json", "search.png")
RECIPE_GLOB = "rank-*.yaml"
BEAT_SECONDS = 10.0
GRACE_SECONDS = 120.0
RETRIES = 2
SETTINGS_WAIT = 10.0  # seconds a joining worker waits for the creator to record the settings


# --- the -o directory -----------------------------------------------------------------


def check_output(output: Path, storage_url: str | None) -> None:
    """Refuse an -o that is not this kind of search's directory, before anything is loaded
    or written: a file, a path under a file, another program's files, an earlier dus's
    journal, or a study kept elsewhere than the storage given."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise DusError(f"{output}: is a file; give -o a directory for the search")
    existing = next((p for p in (output, *output.parents) if p.exists()), None)
    if existing is not None and existing != output and not existing.is_dir():
        raise DusError(f"{output}: {existing} is a file, not a directory; choose another -o directory")
    if not output.is_dir():
        return
    names = {p.name for p in output.iterdir()}
    if not names:
        return
    if JOURNAL_NAME in names:
        if storage_url is not None:
            raise DusError(f"{output}: holds a search whose study is {output / JOURNAL_NAME}; leave out --storage to "
                           "continue it there, or choose another -o directory")
        return
    if OLD_JOURNAL in names:
        raise DusError(f"{output}: holds the {OLD_JOURNAL} of a search by an earlier dus (before searches were Optuna "
                       "studies); finish it with that version, or choose a new -o directory")
    if "search.json" in names:
        if storage_url is None:
            raise DusError(f"{output}: holds the results of a search whose study is in a database (--storage); give "
                           "that --storage to continue it, or choose another -o directory")
        return
    raise DusError(f"{output}: exists and is not a dus search directory (no {JOURNAL_NAME}); "
                   "choose a new or empty -o directory")


def check_results(output: Path, settings: dict) -> None:
    """With --storage, -o holds results only: refuse those of a search with other settings."""
    path = Path(output) / "search.json"
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8")).get("settings")
    except (ValueError, UnicodeDecodeError, AttributeError):
        old = None
    if not isinstance(old, dict):
        raise DusError(f"{path}: not the results of a dus search; choose another -o directory")
    if old != settings:
        raise DusError(f"{output}: holds a search with other settings ({', '.join(_differences(old, settings))} differ); "
                       "rerun it with the same settings to continue it, or choose another -o directory")


def clear_results(output: Path) -> None:
    """The results of an earlier, shorter run go before new evaluations are made."""
    output = Path(output)
    if output.is_dir():
        for name in (*RESULT_FILES, *(p.name for p in output.glob(RECIPE_GLOB))):
            (output / name).unlink(missing_ok=True)


# --- the storage ----------------------------------------------------------------------


def describe_storage(output: Path, url: str | None) -> str:
    """How messages name the storage: the journal's path, or the URL without its password."""
    return str(Path(output) / JOURNAL_NAME) if url is None else f"--storage {_hide_password(url)}"


def _hide_password(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def open_storage(output: Path, url: str | None, create: bool):
    """The search's storage, or None for a default journal that does not exist yet (and
    `create` False). A database that cannot be reached, or a URL that is not one, is one line."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if url is not None:
        return _open_database(url)
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

    path = Path(output) / JOURNAL_NAME
    if not path.is_file():
        if not create:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
    lock = JournalFileSymlinkLock(str(path))
    backend = JournalFileBackend(str(path), lock_obj=lock)
    if create:
        _drop_torn_tail(path, lock)
    _check_lines(path)
    try:
        return JournalStorage(backend)
    except (ValueError, KeyError, TypeError, AttributeError, AssertionError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DusError(f"{path}: not an Optuna journal that dus search wrote ({type(error).__name__}: {first}); "
                       "choose a new -o directory") from None


class made_by_now:
    """What this command is about to make of the default storage (the -o directory, its
    journal), so that an error before any evaluation completes can take it away again."""

    def __init__(self, output: Path, url: str | None):
        output = Path(output)
        self.journal = output / JOURNAL_NAME if url is None and not (output / JOURNAL_NAME).exists() else None
        self.folders = [p for p in (output, *output.parents) if not p.exists()] if self.journal else []

    def undo(self, storage) -> None:
        if self.journal is None:
            return
        try:
            if any(t.state.name in ("COMPLETE", "PRUNED") for t in study_trials(storage)):
                return
        except KeyError:
            pass
        self.journal.unlink(missing_ok=True)
        for folder in self.folders:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                return


def _drop_torn_tail(path: Path, lock) -> None:
    """Cut a last line that a kill left without its newline (Optuna's reader skips it, but
    the next line appended would join it into a damaged one); under the journal's lock, so
    never a line another worker is writing."""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() == 0:
            return
        handle.seek(-1, os.SEEK_END)
        if handle.read(1) == b"\n":
            return
    lock.acquire()
    try:
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as handle:
                handle.truncate(data.rfind(b"\n") + 1)
    finally:
        lock.release()


def _check_lines(path: Path) -> None:
    """Every complete line is one JSON record of Optuna's journal, or one line names the
    first that is not. (Optuna's reader skips a damaged last line, and the next line
    appended would bury it; a line without its newline, torn by a kill or being written
    by another worker, is left to the reader, which skips it.)"""
    data = path.read_bytes()
    for number, line in enumerate(data.split(b"\n")[:-1], start=1):
        try:
            record = json.loads(line)
        except UnicodeDecodeError as bad:
            raise DusError(f"{path}:{number}: byte 0x{line[bad.start]:02x} is not UTF-8 text; this journal was not written "
                           "by dus search (or was damaged): choose a new or empty -o directory") from None
        except ValueError:
            raise DusError(f"{path}:{number}: damaged journal line; choose a new -o directory") from None
        if not isinstance(record, dict) or not isinstance(record.get("op_code"), int):
            raise DusError(f"{path}:{number}: damaged journal line (not a record of Optuna's journal); "
                           "choose a new -o directory")


def _open_database(url: str):
    import optuna

    label = f"--storage {_hide_password(url)}"
    try:
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
        backend = parsed.get_backend_name()
    except Exception:
        raise DusError(f"--storage {url!r}: not a database URL; give one like sqlite:///search.db or "
                       "postgresql://user@host/db (or leave --storage out: the study is then a journal file in -o)") from None
    engine = {"connect_args": {"timeout": 60}} if backend == "sqlite" else {"pool_pre_ping": True}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine)
    except ImportError as error:
        raise DusError(f"{label}: the {backend} driver is not installed ({error}); pip install it "
                       "(psycopg2-binary for postgresql://, pymysql for mysql+pymysql://)") from None
    except Exception as error:
        cause = getattr(error, "orig", None) or error
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        if type(error).__name__ == "NoSuchModuleError":
            first = f"no database kind {parsed.drivername!r}"
        raise DusError(f"{label}: cannot open the database ({first}); check the URL, that the server is up, "
                       "and the credentials") from None


# --- the study ------------------------------------------------------------------------


def stored_settings(storage, where: str, settings: dict | None, wait: float | None = None) -> bool:
    """Whether the storage holds the search's study; refuse one of other settings (or one
    dus did not make). A study found without its settings is waited for a moment: its
    creator records them right after creating it."""
    try:
        study_id = storage.get_study_id_from_name(STUDY_NAME)
    except KeyError:
        return False
    deadline = time.monotonic() + (SETTINGS_WAIT if wait is None else wait)
    while True:
        record = storage.get_study_user_attrs(study_id).get("dus")
        if record is not None or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("settings"), dict):
        raise DusError(f"{where}: holds an Optuna study {STUDY_NAME!r} that dus search did not make (or whose first run "
                       "was killed as it began); choose another -o directory or --storage")
    if settings is not None and record["settings"] != settings:
        changed = ", ".join(_differences(record["settings"], settings))
        again = "continue it" if where.endswith(JOURNAL_NAME) else "join it"
        place = "-o directory" if where.endswith(JOURNAL_NAME) else "--storage (or -o without --storage)"
        subject = str(Path(where).parent) if where.endswith(JOURNAL_NAME) else where
        raise DusError(f"{subject}: holds a search with other settings ({changed} differ); rerun it with the same "
                       f"settings to {again}, or choose another {place}")
    return True


def open_study(storage, settings: dict, where: str, sampler, first_trials=(), pruner=None):
    """(study, created): the search's study, made with its settings and `first_trials`
    queued (the start point), or joined when it is there with the same settings."""
    import optuna

    stored_settings(storage, where, settings)
    try:
        study = optuna.create_study(storage=storage, study_name=STUDY_NAME, direction="minimize", sampler=sampler,
                                    pruner=pruner)
    except optuna.exceptions.DuplicatedStudyError:  # made by another worker since the look above
        stored_settings(storage, where, settings)
        return optuna.load_study(study_name=STUDY_NAME, storage=storage, sampler=sampler, pruner=pruner), False
    for params, attrs in first_trials:  # queued before the settings, so a joining worker finds them
        study.enqueue_trial(params, user_attrs=attrs)
    study.set_user_attr("dus", {"format": FORMAT, "settings": settings})
    return study, True


def study_trials(storage) -> list:
    """Every trial of the search's study (which must exist)."""
    return storage.get_all_trials(storage.get_study_id_from_name(STUDY_NAME), deepcopy=False)


ENTRY_TYPES = {"key": str, "candidate": dict, "metrics": dict, "feasible": bool, "cached": bool, "missing": list}


def entries(trials, where: str) -> list[dict]:
    """The completed (and pruned: the healed fitness stopped them at a lower rung) trials as
    evaluations, in the order they were asked (trial number); a trial dus did not record or
    a score that is not a finite number is refused."""
    from optuna.trial import TrialState

    done = sorted((t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)), key=lambda t: t.number)
    found = []
    for index, trial in enumerate(done):
        record = trial.user_attrs.get("dus")
        if not isinstance(record, dict) or any(not isinstance(record.get(k), t) for k, t in ENTRY_TYPES.items()):
            raise DusError(f"{where}: trial {trial.number} is not an evaluation dus search recorded; "
                           "choose a new -o directory or --storage")
        seconds = record.get("seconds")
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
            raise DusError(f"{where}: trial {trial.number}: damaged record (seconds is not a finite number); "
                           "choose a new -o directory or --storage")
        value = trial.value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DusError(f"{where}: trial {trial.number}: damaged record (its score is not a number); "
                           "choose a new -o directory or --storage")
        if not math.isfinite(value):
            raise DusError(f"{where}: trial {trial.number}'s recorded score is {value}, not a finite number; a search "
                           "never ranks it: choose a new -o directory or --storage (the study was edited or damaged)")
        found.append({"i": index, "trial": trial.number, "x": record.get("x"), "key": record["key"],
                      "candidate": record["candidate"], "value": value, "metrics": record["metrics"], "seconds": seconds,
                      "cached": record["cached"], "feasible": record["feasible"], "missing": record["missing"],
                      **_rungs(record, value, trial, where)})
    return found


def _rungs(record: dict, value: float, trial, where: str) -> dict:
    """A healed-fitness evaluation's rungs: every rung's value (0: unhealed), the highest
    reached (`rung`), and whether the pruner stopped it there; nothing for other searches."""
    rungs = record.get("rungs")
    if rungs is None:
        return {}
    if not isinstance(rungs, list) or not rungs or rungs[-1] != value or \
            any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in rungs):
        raise DusError(f"{where}: trial {trial.number}: damaged record (its rungs do not end at its score); "
                       "choose a new -o directory or --storage")
    return {"rungs": rungs, "rung": len(rungs) - 1, "rung_metrics": record.get("rung_metrics"),
            "pruned": trial.state.name == "PRUNED"}


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the settings that differ (`space.depth`, `seed`)."""
    names = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            names += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            names.append(f"{prefix}{key}")
    return names


# --- workers: who runs a trial, and whether it is still alive --------------------------


def me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def stale(trial, now: float) -> bool:
    """A running trial whose worker is gone: a dead process on this host (or this process,
    which asks only when it holds no trial), or no beat for GRACE_SECONDS (its last beat,
    else its start)."""
    owner = trial.user_attrs.get("dus_worker")
    if isinstance(owner, dict) and owner.get("host") == socket.gethostname():
        if owner.get("pid") == os.getpid():
            return True  # asked by an earlier search of this process, which stopped (a worker syncs between its trials only)
        if isinstance(owner.get("pid"), int) and not process_alive(owner["pid"]):
            return True
    beat = trial.user_attrs.get("dus_beat")
    if not isinstance(beat, (int, float)):
        beat = trial.datetime_start.timestamp() if trial.datetime_start else now
    return now - beat > GRACE_SECONDS


def fail_trial(study, trial, retry: bool, reason: str) -> bool:
    """Mark a running trial failed (never a score); with `retry`, queue its parameters again
    (RETRIES times at most). False when another worker finished or failed it first."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    number = trial.number
    reason = f"{reason} (failed by {socket.gethostname()} pid {os.getpid()} at {time.time():.3f})"  # this worker's own words
    try:
        study._storage.set_trial_user_attr(trial._trial_id, "dus_failed", reason)
        frozen = study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
    except (UpdateFinishedTrialError, ValueError, RuntimeError):
        return False
    if frozen.state != TrialState.FAIL or frozen.user_attrs.get("dus_failed") != reason:
        return False
    tries = frozen.user_attrs.get("dus_retry", 0)
    if retry and frozen.params and isinstance(tries, int) and tries < RETRIES:
        study.enqueue_trial(frozen.params, user_attrs={"dus_queued": "retry", "dus_retry": tries + 1})
    return True


@contextmanager
def heartbeat(trial):
    """Beat on `trial` every BEAT_SECONDS while the block runs."""
    stop = threading.Event()

    def beat():
        while not stop.wait(BEAT_SECONDS):
            try:
                trial.set_user_attr("dus_beat", time.time())
            except Exception:  # the trial was finished (or failed by another worker): stop beating
                return

    thread = threading.Thread(target=beat, name="dus-search-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()

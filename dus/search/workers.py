"""`dus search --workers N`: N worker processes on this machine, one study.

Each worker is `python -m dus.search.workers`, handed the search's options on its
standard input: it checks and loads as `dus search` does, joins the study and searches
(run.work_alone). Each gets its share of the CPU threads (max(1, cores // N), through
OMP_NUM_THREADS and torch.set_num_threads) and, where there are GPUs and --device is
auto or cuda, one GPU of its own (CUDA_VISIBLE_DEVICES, round robin when N exceeds the
GPUs). This process shows the study's progress, and writes the results once its workers
are done. A worker's one-line error stops the others and is this command's error; a
worker killed by a signal leaves its trial to the others (failed, and queued again)."""

from __future__ import annotations

import dataclasses
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dus.errors import DusError
from dus.search import journal

POLL_SECONDS = 0.5


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them."""
    named = os.environ.get("CUDA_VISIBLE_DEVICES")
    if named is not None:
        return [d.strip() for d in named.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


def run(models: list, options, storage, where: str, total: int, tick, console) -> dict | None:
    """Start the workers, show the study's progress until they end; the prefix-cache
    counts of the workers, summed (None when none kept one)."""
    count = options.workers
    threads = max(1, cores() // count)
    gpus = visible_gpus() if options.device in ("auto", "cuda") else []
    child = dataclasses.replace(options, workers=1, progress=False, wandb=False, dry_run=False)
    shown: set[int] = set()
    with tempfile.TemporaryDirectory(prefix="dus-search-workers-") as folder:
        folder = Path(folder)
        workers = []
        try:
            for k in range(count):
                env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
                if gpus:
                    env["CUDA_VISIBLE_DEVICES"] = gpus[k % len(gpus)]
                with open(folder / f"{k}.stderr", "wb") as stderr:
                    process = subprocess.Popen([sys.executable, "-m", "dus.search.workers"], stdin=subprocess.PIPE,
                                               stdout=subprocess.DEVNULL, stderr=stderr, env=env)
                process.stdin.write(pickle.dumps({"models": models, "options": child, "threads": threads,
                                                  "error": str(folder / f"{k}.error")}))
                process.stdin.close()
                workers.append(process)
            while True:
                codes = [p.poll() for p in workers]
                _show(storage, where, shown, tick)
                failed = next((k for k, code in enumerate(codes) if code is not None and code > 0), None)
                if failed is not None:
                    _stop(workers)
                    raise DusError(_failure(folder, failed, codes[failed], count))
                if all(code is not None for code in codes):
                    break
                time.sleep(POLL_SECONDS)
        except BaseException:
            _stop(workers)
            raise
    _show(storage, where, shown, tick)
    killed = [(k, -code) for k, code in enumerate(codes) if code < 0]
    if killed:
        which = ", ".join(f"worker {k} (signal {number})" for k, number in killed)
        console.print(f"[yellow]warning:[/] {which} stopped; its trial was failed and queued again for the others. "
                      f"{len(shown)} of {total} evaluations are done: rerun the same command to finish", soft_wrap=True)
    return _prefix_counts(storage, [p.pid for p in workers])


def _show(storage, where: str, shown: set[int], tick) -> None:
    try:
        trials = journal.study_trials(storage)
    except KeyError:  # no worker has made the study yet
        return
    for entry in journal.entries(trials, where):
        if entry["trial"] not in shown:
            shown.add(entry["trial"])
            if tick:
                tick(entry)


def _stop(workers: list) -> None:
    """SIGTERM (a worker fails its trial and queues it again), then SIGKILL after 20 s."""
    for process in workers:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    for process in workers:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _failure(folder: Path, k: int, code: int, count: int) -> str:
    error = folder / f"{k}.error"
    if error.is_file():
        return error.read_text(encoding="utf-8").strip()
    lines = [line for line in (folder / f"{k}.stderr").read_text(errors="replace").splitlines() if line.strip()]
    last = lines[-1].strip() if lines else "no output"
    return (f"worker {k} of {count} failed (exit status {code}): {last}; rerun with --workers 1 --debug "
            "for the traceback")


def _prefix_counts(storage, pids: list[int]) -> dict | None:
    import socket

    study_id = storage.get_study_id_from_name(journal.STUDY_NAME)
    attrs = storage.get_study_user_attrs(study_id)
    host = socket.gethostname()
    counts = [attrs.get(f"dus_prefix_cache:{host}:{pid}") for pid in pids]
    counts = [c for c in counts if isinstance(c, dict)]
    if not counts:
        return None
    return {key: sum(c.get(key, 0) for c in counts) for key in counts[0]}


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main() -> None:
    payload = pickle.load(sys.stdin.buffer)
    signal.signal(signal.SIGTERM, _interrupt)  # the trial in hand is failed and queued again, as on Ctrl-C
    import torch

    torch.set_num_threads(payload["threads"])
    from dus.search.run import work_alone

    try:
        work_alone(payload["models"], payload["options"])
    except DusError as error:
        Path(payload["error"]).write_text(str(error), encoding="utf-8")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()

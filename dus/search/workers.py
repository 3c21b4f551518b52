"""`dus search --workers N`: N worker processes on this machine, one study.

Each worker is `python -m dus.search.workers`, handed the search's options on its
standard input: it checks and loads as `dus search` does, joins the study and searches
(run.work_alone). Each gets its share of the CPU threads (max(1, cores // N), through
OMP_NUM_THREADS and torch.set_num_threads) and, where there are GPUs and --device is
auto or cuda, one GPU of its own (CUDA_VISIBLE_DEVICES). This process shows the study's progress, and writes the results once its workers
are done. A worker's one-line error stops the others and is this command's error; a
worker killed by a signal leaves its trial to the others (failed, and queued again).

N is bounded before anything starts (check_count): by the evaluations, the CPU cores (on
GPUs: the GPUs, one each) and the memory N copies of the sources need. Workers never
outlive this process, even killed with SIGKILL (die_with_parent)."""

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


# What one worker process costs besides the sources' weights: Python, torch and the
# libraries it imports, the scorer's activations (measured about 350 MB on the CPU).
WORKER_OVERHEAD_BYTES = 400 * 2**20


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (Linux's MemAvailable; elsewhere the free
    pages), or None when it cannot be known."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def weights_bytes(paths: list[str]) -> int:
    """The sources' safetensors bytes: what each worker loads (at least; more when --dtype widens them)."""
    return sum(f.stat().st_size for path in paths for f in Path(path).glob("*.safetensors"))


def check_count(count: int, evaluations: int, what: str, paths: list[str], device: str) -> None:
    """`--workers N` bounded by what the workers can use: no more than the evaluations (a
    worker with none to run would only load the sources), the CPU cores (or, on GPUs, the
    GPUs: one each), and the memory that N copies of the sources need. One line each, with
    the largest count that would run; nothing is started."""
    if count <= 1:
        return
    if count > evaluations:
        raise DusError(f"--workers {count}: the search has {evaluations} {what}, so at most {evaluations} workers have "
                       f"one to run; give --workers {evaluations} or fewer")
    gpus = visible_gpus() if device in ("auto", "cuda") else []
    if gpus and count > len(gpus):
        raise DusError(f"--workers {count}: each worker scores on a GPU of its own and {len(gpus)} are visible "
                       f"(CUDA_VISIBLE_DEVICES); give --workers {len(gpus)} or fewer")
    if not gpus and count > cores():
        raise DusError(f"--workers {count}: this process may use {cores()} CPU cores and each worker is a process "
                       f"needing at least one; give --workers {cores()} or fewer")
    available = available_memory()
    each = weights_bytes(paths) + WORKER_OVERHEAD_BYTES
    if available is not None and count * each > available:
        fits = max(1, available // each)
        raise DusError(f"--workers {count}: each worker loads the sources (about {each / 2**30:.1f} GB with its Python "
                       f"and torch) and this machine has {available / 2**30:.1f} GB available; give --workers {fits} "
                       "or fewer")


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
                                                  "error": str(folder / f"{k}.error"), "parent": os.getpid()}))
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
        console.print(f"[yellow]warning:[/] {killed_note(killed, _done(storage, where), total)}", soft_wrap=True)
    return _prefix_counts(storage, [p.pid for p in workers])


def killed_note(killed: list[tuple[int, int]], done: int, total: int) -> str:
    """What a worker killed by a signal left: nothing, when the others finished the study's
    evaluations (its trial was run again by them), or how many are still to run."""
    which = ", ".join(f"worker {k} (signal {number})" for k, number in killed)
    stopped = f"{which} stopped"
    if done >= total:
        return (f"{stopped}; its trial was failed and run again by the other workers: all {total} evaluations are "
                "done, nothing is left to run")
    return (f"{stopped}; its trial was failed and queued again: {done} of {total} evaluations are done and "
            f"{total - done} left: rerun the same command to finish them")


def _done(storage, where: str) -> int:
    try:
        return len(journal.entries(journal.study_trials(storage), where))
    except KeyError:  # no worker made the study
        return 0


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
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: a second SIGTERM must not cut the trial's failing short
    raise KeyboardInterrupt


PR_SET_PDEATHSIG = 1  # linux/prctl.h
PARENT_POLL_SECONDS = 0.5
PARENT_GONE_GRACE_SECONDS = 5.0


def die_with_parent(parent: int) -> None:
    """A worker ends when the `dus search` that started it is gone, however it went (kill -9
    included): on Linux the kernel sends SIGTERM at the parent's death (prctl
    PR_SET_PDEATHSIG); everywhere (macOS has no such call) a thread polls the parent's pid
    and sends the same SIGTERM. SIGTERM fails the trial in hand (queued again, as on
    Ctrl-C); a worker that has not ended PARENT_GONE_GRACE_SECONDS later exits at once."""
    import threading

    if sys.platform.startswith("linux"):
        import ctypes
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):  # no prctl (musl without it): the thread below still watches
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_SECONDS)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(PARENT_GONE_GRACE_SECONDS)
        os._exit(1)

    if os.getppid() != parent:  # gone before the call above took effect
        os._exit(1)
    threading.Thread(target=watch, name="dus-parent-watch", daemon=True).start()


def main() -> None:
    payload = pickle.load(sys.stdin.buffer)
    signal.signal(signal.SIGTERM, _interrupt)  # the trial in hand is failed and queued again, as on Ctrl-C
    die_with_parent(payload.get("parent", os.getppid()))
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

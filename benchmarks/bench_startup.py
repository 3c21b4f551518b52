"""Benchmark a small `dus build` as a whole process against `cp -r` of the same output.

A small build is mostly start-up: the interpreter, the command line, the imports, the
checks. This times `python -m dus build --solar MODEL --trim T -o OUT` (SmolLM2-135M:
30 -> 44 layers, 0.7 GB written) as a child process, wall clock from fork to exit, against
`cp -r` of an output of the same build, in N pairs whose order alternates (build first in
even pairs, cp first in odd ones), each run after a `sync` (not timed) into a new
directory. The sha256 cache of the sources is warm (an untimed build fills it first, in a
scratch DUS_CACHE), as it is for anyone building from a model twice, and dus's bytecode is
compiled first (`python -m compileall dus`, as `pip install` does; --no-compile leaves
it as found). Then `python -X importtime` on the same build lists the imports that cost
the most.

    python benchmarks/bench_startup.py                       # 7 pairs on models/SmolLM2-135M-Instruct
    python benchmarks/bench_startup.py --model DIR --trim 8 --pairs 11

Prints the medians and their ratio and writes benchmarks/results/startup.json. On a
shared machine single runs swing; the medians of the pairs are the figure to read.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "models" / "SmolLM2-135M-Instruct"
DEFAULT_RESULTS = REPO / "benchmarks" / "results" / "startup.json"


def child_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    env["DUS_CACHE"] = str(cache)
    return env


def timed(command: list[str], env: dict[str, str]) -> float:
    subprocess.run(["sync"], check=True)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return seconds


QUIET: list[str] = []  # ["-q"] with --quiet: no progress bar and no summary line


def build_command(model: Path, trim: int, output: Path, *python_flags: str) -> list[str]:
    return [sys.executable, *python_flags, "-m", "dus", "build", "--solar", str(model), "--trim", str(trim),
            "-o", str(output), *QUIET]


def import_times(model: Path, trim: int, output: Path, env: dict[str, str], top: int) -> dict:
    """`python -X importtime` of the build: the total, and the costliest imports by their
    cumulative time (each with its nesting depth, so a reader sees what pulls in what)."""
    done = subprocess.run(build_command(model, trim, output, "-X", "importtime"), env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=True)
    rows = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative_us, name = line[len("import time:"):].split("|")
        depth = (len(name) - len(name.lstrip(" "))) // 2
        rows.append({"module": name.strip(), "depth": depth, "self_s": int(self_us) / 1e6,
                     "cumulative_s": int(cumulative_us) / 1e6})
    top_level = sorted((r for r in rows if r["depth"] == 0), key=lambda r: -r["cumulative_s"])
    return {
        "total_s": round(sum(r["self_s"] for r in rows), 4),
        "modules": len(rows),
        "top_level": [{**r, "self_s": round(r["self_s"], 4), "cumulative_s": round(r["cumulative_s"], 4)}
                      for r in top_level[:top]],
        "costliest": [{**r, "self_s": round(r["self_s"], 4), "cumulative_s": round(r["cumulative_s"], 4)}
                      for r in sorted(rows, key=lambda r: -r["cumulative_s"])[:top]],
        "imports_torch": any(r["module"] == "torch" for r in rows),
        "imports_transformers": any(r["module"] == "transformers" for r in rows),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="source model directory")
    parser.add_argument("--trim", type=int, default=8, help="SOLAR trim (8: SmolLM2's 30 layers -> 44)")
    parser.add_argument("--pairs", type=int, default=7, help="build/cp pairs, order alternating")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/dus-bench-startup"))
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--top", type=int, default=15, help="imports listed")
    parser.add_argument("--quiet", action="store_true", help="time `dus build -q` (no progress bar, no summary)")
    parser.add_argument("--no-compile", action="store_true",
                        help="leave dus's bytecode as it is (by default `python -m compileall dus` runs first, as pip "
                             "install does: with PYTHONDONTWRITEBYTECODE=1 set, nothing else writes it)")
    args = parser.parse_args(argv)
    QUIET[:] = ["-q"] if args.quiet else []
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"{args.model}: no model there; pass --model DIR (a local SmolLM2-135M-Instruct, say)")

    bytecode = "as found (--no-compile)"
    if not args.no_compile:
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "dus")], check=True,
                       stdout=subprocess.DEVNULL)
        bytecode = "compiled first (python -m compileall dus), as pip install does"
    scratch = args.scratch
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    env = child_env(scratch / "cache")
    reference = scratch / "reference"
    warmup = timed(build_command(args.model, args.trim, reference), env)  # fills the sha256 cache, warms caches
    written = sum(p.stat().st_size for p in reference.iterdir() if p.is_file())
    python_alone = statistics.median(timed([sys.executable, "-c", "pass"], env) for _ in range(3))
    cli_import = statistics.median(timed([sys.executable, "-c", "import dus.cli"], env) for _ in range(3))

    builds, copies, load = [], [], [os.getloadavg()[0]]
    for pair in range(args.pairs):
        out, copy = scratch / f"build-{pair}", scratch / f"cp-{pair}"
        steps = [("build", lambda: builds.append(timed(build_command(args.model, args.trim, out), env))),
                 ("cp", lambda: copies.append(timed(["cp", "-r", str(reference), str(copy)], env)))]
        for _name, step in (steps if pair % 2 == 0 else steps[::-1]):
            step()
        shutil.rmtree(out)
        shutil.rmtree(copy)
        load.append(os.getloadavg()[0])
        print(f"pair {pair}: build {builds[-1]:.2f} s, cp -r {copies[-1]:.2f} s ({builds[-1] / copies[-1]:.2f}x)",
              flush=True)
    imports = import_times(args.model, args.trim, scratch / "importtime", env, args.top)

    build_s, cp_s = statistics.median(builds), statistics.median(copies)
    ratio = build_s / cp_s
    result = {
        "what": f"python -m dus build --solar {args.model.name} --trim {args.trim}{' -q' if args.quiet else ''}, "
                "whole process (its output to pipes), against "
                "cp -r of the same output; sha256 cache warm; pairs alternate their order",
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_1min_during": [round(x, 2) for x in load],
                    "note": "shared machine: other jobs ran beside these runs (see the load averages)"},
        "model": str(args.model), "trim": args.trim, "bytes_written": written, "pairs": args.pairs,
        "dus_bytecode": bytecode, "PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE"),
        "warmup_build_s": round(warmup, 3),
        "python_alone_s": round(python_alone, 3), "import_dus_cli_s": round(cli_import, 3),
        "build_s": [round(x, 3) for x in builds], "cp_r_s": [round(x, 3) for x in copies],
        "pair_ratios": [round(b / c, 3) for b, c in zip(builds, copies)],
        "median_build_s": round(build_s, 3), "median_cp_r_s": round(cp_s, 3), "ratio": round(ratio, 3),
        "aim": "a small build within 1.5x cp -r", "aim_met": ratio <= 1.5,
        "importtime": imports,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(scratch, ignore_errors=True)

    print(f"\n{written / 1e9:.2f} GB written; python alone {python_alone:.3f} s, `import dus.cli` {cli_import:.3f} s")
    print(f"dus build: median {build_s:.2f} s   cp -r: median {cp_s:.2f} s   ratio {ratio:.2f}x "
          f"(aim 1.5x: {'met' if ratio <= 1.5 else 'missed'}; pair ratios {min(result['pair_ratios']):.2f}-"
          f"{max(result['pair_ratios']):.2f}x)")
    print(f"imports: {imports['total_s']:.3f} s over {imports['modules']} modules "
          f"(torch {'imported' if imports['imports_torch'] else 'not imported'}, transformers "
          f"{'imported' if imports['imports_transformers'] else 'not imported'}); costliest top-level:")
    for row in imports["top_level"][:8]:
        print(f"  {row['cumulative_s']:.3f} s  {row['module']}")
    print(f"results: {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark `dus build` against `cp -r` of the same bytes and mergekit's passthrough.

Makes (once, cached) a random Llama checkpoint written straight to sharded bf16
safetensors, never instantiated in torch, then times in one run, each contender in its
own subprocess: a SOLAR build by dus (with a cold and a warm sha256 cache, and a first
build from the same files laid out as the Hugging Face hub cache lays them), two copies
of the same number of bytes (`cp -r` of that build's output, and `cp` of the source's
files until as many bytes are written), and `mergekit-yaml` on the equivalent
passthrough recipe when mergekit is installed. Peak RSS
comes from the kernel's accounting of each child (wait4), set against a baseline child
that does everything dus build does except move bytes. Prints a table and the ratios,
and records them in benchmarks/results/build.json.

    python benchmarks/bench_build.py                    # ~1.5B params, 30 -> 44 layers
    python benchmarks/bench_build.py --size 350m --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = REPO / "benchmarks" / "results" / "build.json"
SHARD_BYTES = 1_000_000_000  # source shards of ~1 GB, as on the hub

# name -> (hidden, intermediate, layers, heads, kv heads, vocab, trim)
SIZES = {
    "1.5b": (2048, 5632, 30, 16, 4, 32000, 8),  # 1.48B params, 2.97 GB; SOLAR 30 -> 44 layers
    "350m": (1024, 2816, 24, 16, 4, 32000, 6),  # 0.34B params, 0.67 GB; 24 -> 36 layers
    "tiny": (256, 688, 8, 4, 2, 32000, 2),  # for a smoke test of this script
}
WRITER_ONLY = "dus writer only (shards)"  # the data path alone: plan + shards, nothing else
SPEC_FILE = "bench-model.json"  # written last: its presence marks a complete cached model


# ---------------------------------------------------------------------------
# The random source model: config, bf16 safetensors shards, index, tokenizer
# ---------------------------------------------------------------------------


def model_spec(size: str) -> dict:
    hidden, intermediate, layers, heads, kv_heads, vocab, _trim = SIZES[size]
    return {
        "size": size, "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab, "dtype": "bfloat16",
        "seed": 0, "shard_bytes": SHARD_BYTES, "data_order": "by name within a shard, as safetensors writes it",
    }


def tensor_shapes(spec: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a Llama checkpoint with an untied lm_head, in save_pretrained order."""
    hidden, inter = spec["hidden_size"], spec["intermediate_size"]
    head_dim = hidden // spec["num_attention_heads"]
    kv = spec["num_key_value_heads"] * head_dim
    shapes = [("model.embed_tokens.weight", (spec["vocab_size"], hidden))]
    for i in range(spec["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes += [
            (f"{p}.input_layernorm.weight", (hidden,)),
            (f"{p}.self_attn.q_proj.weight", (hidden, hidden)),
            (f"{p}.self_attn.k_proj.weight", (kv, hidden)),
            (f"{p}.self_attn.v_proj.weight", (kv, hidden)),
            (f"{p}.self_attn.o_proj.weight", (hidden, hidden)),
            (f"{p}.post_attention_layernorm.weight", (hidden,)),
            (f"{p}.mlp.gate_proj.weight", (inter, hidden)),
            (f"{p}.mlp.up_proj.weight", (inter, hidden)),
            (f"{p}.mlp.down_proj.weight", (hidden, inter)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (spec["vocab_size"], hidden))]
    return shapes


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _random_bf16(rng, shape, is_norm: bool):
    """bf16 bit patterns of N(0, 0.02) (norms: 1 + N(0, 0.1)), by truncating float32."""
    import numpy as np

    values = rng.standard_normal(_numel(shape), dtype=np.float32)
    if is_norm:
        values = values * np.float32(0.1) + np.float32(1.0)
    else:
        values *= np.float32(0.02)
    return (values.view(np.uint32) >> 16).astype("<u2")


def _header(entries: list[tuple[str, tuple[int, ...]]]) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in entries:
        nbytes = 2 * _numel(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body


def _llama_config(spec: dict) -> dict:
    from dus.tiny import BYTE_VOCAB

    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": spec["hidden_size"], "intermediate_size": spec["intermediate_size"],
        "num_hidden_layers": spec["num_hidden_layers"], "num_attention_heads": spec["num_attention_heads"],
        "num_key_value_heads": spec["num_key_value_heads"], "head_dim": spec["hidden_size"] // spec["num_attention_heads"],
        "vocab_size": spec["vocab_size"], "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0,
        "mlp_bias": False, "initializer_range": 0.02, "tie_word_embeddings": False, "use_cache": True,
        "dtype": "bfloat16",
        "bos_token_id": BYTE_VOCAB + 1, "eos_token_id": BYTE_VOCAB + 2, "pad_token_id": BYTE_VOCAB + 3,
    }


def make_model(directory: Path, spec: dict) -> None:
    """Write the random checkpoint into `directory` (via a temporary, renamed at the end)."""
    import numpy as np
    from rich.progress import Progress

    from dus.tiny import tiny_tokenizer

    shapes = tensor_shapes(spec)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = 2 * _numel(shape)
        if shards[-1] and size + nbytes > spec["shard_bytes"]:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    # Like save_pretrained: tensors go to shards in module order, and within a file the
    # safetensors library stores them sorted by name.
    shards = [sorted(group) for group in shards]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    temporary = directory.parent / f".{directory.name}.partial"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    rng = np.random.default_rng(spec["seed"])
    total = sum(2 * _numel(shape) for _, shape in shapes)
    with Progress(transient=True) as progress:
        task = progress.add_task(f"random {spec['size']} model", total=total)
        for file_name, group in zip(names, shards):
            with open(temporary / file_name, "wb") as handle:
                handle.write(_header(group))
                for name, shape in group:
                    handle.write(_random_bf16(rng, shape, "norm" in name).tobytes())
                    progress.advance(task, 2 * _numel(shape))
    index = {
        "metadata": {"total_size": total},
        "weight_map": {name: file_name for file_name, group in zip(names, shards) for name, _ in group},
    }
    (temporary / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (temporary / "config.json").write_text(json.dumps(_llama_config(spec), indent=2) + "\n")
    tiny_tokenizer().save_pretrained(temporary)
    (temporary / "README.md").write_text(
        f"---\nlicense: apache-2.0\n---\n# dus benchmark model ({spec['size']})\n"
        "Random bf16 weights written by benchmarks/bench_build.py; not a trained model.\n"
    )
    _check_loadable(temporary, names)
    (temporary / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    shutil.rmtree(directory, ignore_errors=True)
    temporary.rename(directory)


def _check_loadable(directory: Path, names: list[str]) -> None:
    """The shards parse with the safetensors library and hold finite values."""
    import torch
    from safetensors import safe_open

    for file_name in names:
        with safe_open(directory / file_name, "pt") as handle:
            last = list(handle.keys())[-1]
            value = handle.get_tensor(last)
            assert value.dtype == torch.bfloat16 and torch.isfinite(value).all(), (file_name, last)


def ensure_model(directory: Path, size: str) -> Path:
    spec = model_spec(size)
    marker = directory / SPEC_FILE
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        print(f"using cached model {directory}")
        return directory
    print(f"writing a random {size} Llama (bf16) into {directory} (cached for later runs)")
    started = time.perf_counter()
    make_model(directory, spec)
    print(f"  done in {time.perf_counter() - started:.1f} s")
    return directory


HUB_MARKER = "dus-bench-hub.json"


def ensure_hub_layout(model: Path, root: Path) -> Path:
    """`model` laid out as huggingface_hub lays a download (cached for later runs): the files
    are blobs in `models--dus-bench--NAME/blobs/`, hard links to the model's own files (the
    same bytes and page cache; a copy where links cannot be made), the safetensors named by
    their sha256 (the others by their git blob sha1, as the hub names files not in LFS), and
    `snapshots/REV/FILE` are relative symlinks to them. Returns the snapshot directory."""
    import hashlib

    repo = root / f"models--dus-bench--{model.name}"
    snapshot = repo / "snapshots" / ("0" * 40)
    marker = repo / HUB_MARKER
    stamp = {file.name: [file.stat().st_size, file.stat().st_mtime_ns] for file in sorted(model.iterdir()) if file.is_file()}
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return snapshot
    print(f"laying {model} out as the hub cache does, in {repo} (sha256 of its shards, once)")
    shutil.rmtree(repo, ignore_errors=True)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for file in sorted(model.iterdir()):
        if not file.is_file():
            continue
        if file.suffix == ".safetensors":
            digest, buffer = hashlib.sha256(), bytearray(1 << 20)
            with open(file, "rb", buffering=0) as handle:
                while count := handle.readinto(buffer):
                    digest.update(memoryview(buffer)[:count])
            name = digest.hexdigest()
        else:
            data = file.read_bytes()
            name = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        blob = repo / "blobs" / name
        try:
            os.link(file, blob)
        except OSError:
            shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / name)
    marker.write_text(json.dumps(stamp, indent=1) + "\n")
    return snapshot


# ---------------------------------------------------------------------------
# Running contenders
# ---------------------------------------------------------------------------


@dataclass
class Run:
    name: str
    wall_s: float
    sync_s: float  # flushing the dirty pages it left, timed separately after it exits
    peak_rss_mb: float
    user_s: float
    sys_s: float
    bytes: int  # size of what it wrote (0 for baselines)
    repeat: int
    command: list[str] = field(default_factory=list)

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / self.wall_s if self.bytes else 0.0


# A small interpreter starts each contender and reports its rusage. The benchmark's own
# process (which has torch and numpy loaded) cannot: a child's ru_maxrss includes the
# memory of the process it was forked from, up to its exec.
LAUNCHER = """
import json, os, sys, time
report, command = sys.argv[1], sys.argv[2:]
started = time.perf_counter()
pid = os.posix_spawnp(command[0], command, os.environ)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - started
with open(report, "w") as handle:
    json.dump({"wall": wall, "code": os.waitstatus_to_exitcode(status), "maxrss_kb": usage.ru_maxrss,
               "user": usage.ru_utime, "sys": usage.ru_stime}, handle)
"""


def timed(name: str, command: list[str], output: Path | None, repeat: int, env: dict | None = None) -> Run:
    """Run `command` as a child; wall time, the child's own peak RSS and CPU time."""
    _sync()
    slug = "".join(c if c.isalnum() else "-" for c in name)
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"dus-bench-{slug}.log"
    report = log_path.with_suffix(".json")
    with open(log_path, "wb") as log:
        subprocess.run([sys.executable, "-S", "-c", LAUNCHER, str(report), *command],
                       stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, check=True)
    result = json.loads(report.read_text())
    report.unlink()
    if result["code"] != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{name} failed (exit {result['code']}): {' '.join(command)}\n{tail}")
    log_path.unlink()
    flush_started = time.perf_counter()
    _sync()
    sync_s = time.perf_counter() - flush_started
    written = _dir_bytes(output) if output is not None else 0
    run = Run(name, result["wall"], sync_s, result["maxrss_kb"] / 1024, result["user"], result["sys"], written, repeat, command)
    rate = f", {run.gb_per_s:.2f} GB/s" if written else ""
    print(f"  {name:<28} {run.wall_s:7.2f} s (+{sync_s:.2f} s sync), peak RSS {run.peak_rss_mb:7.0f} MB{rate}")
    return run


def _sync() -> None:
    os.sync()


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _remove(*paths: Path) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
    _sync()


def warm_page_cache(model: Path) -> None:
    """Read every source file once so that no contender pays for the first disk read."""
    for path in sorted(model.iterdir()):
        if path.is_file():
            with open(path, "rb", buffering=0) as handle:
                while handle.read(64 << 20):
                    pass


def same_bytes_copy_command(model: Path, output: Path, target_bytes: int) -> list[str]:
    """`cp -r` of the source, then whole source shards (the last one cut with `head -c`)
    until exactly `target_bytes` are written: the bytes of a dus build, read from the same
    cached files dus reads, so both leave the same footprint in the page cache."""
    shards = sorted(model.glob("*.safetensors"))
    steps = [f"cp -r {shlex.quote(str(model))} {shlex.quote(str(output))}"]
    missing = target_bytes - _dir_bytes(model)
    index = 0
    while missing > 0:
        shard = shards[index % len(shards)]
        size = shard.stat().st_size
        target = shlex.quote(str(output / f"extra-{index}.bin"))
        if size <= missing:
            steps.append(f"cp {shlex.quote(str(shard))} {target}")
        else:
            steps.append(f"head -c {missing} {shlex.quote(str(shard))} > {target}")
        missing -= min(size, missing)
        index += 1
    return ["sh", "-c", " && ".join(steps)]


def mergekit_command() -> str | None:
    return shutil.which("mergekit-yaml")


def write_mergekit_recipe(path: Path, model: Path, layers: int, trim: int) -> Path:
    import yaml

    recipe = {
        "slices": [
            {"sources": [{"model": str(model), "layer_range": [0, layers - trim]}]},
            {"sources": [{"model": str(model), "layer_range": [trim, layers]}]},
        ],
        "merge_method": "passthrough",
        "dtype": "bfloat16",
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def python_env(hash_cache: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["DUS_CACHE"] = str(hash_cache)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


BASELINE_CODE = """
import sys
from dus.build import build_model
from dus.recipe import load_recipe
from transformers import AutoConfig
# Everything `dus build` does except writing: imports, recipe, plan, config read.
result = build_model(load_recipe({"solar": {"model": sys.argv[1], "trim": int(sys.argv[2])}}), None, dry_run=True)
AutoConfig.from_pretrained(sys.argv[1])
"""

WRITER_CODE = """
import sys
from pathlib import Path
from dus.recipe import load_recipe
from dus.resolve import resolve
from dus.writer import layout, write_shards
# Only the data path of `dus build`: plan, then the shards; no config rewrite (which
# imports transformers and torch), no hashes, no tokenizer or manifest.
resolved = resolve(load_recipe({"solar": {"model": sys.argv[1], "trim": int(sys.argv[2])}}))
output = Path(sys.argv[3])
output.mkdir()
write_shards(layout(resolved.plan, resolved.sources), output, 5 * 10**9)
"""

HASH_CODE = """
import sys
from pathlib import Path
from dus.hashing import sha256_file
for path in sorted(Path(sys.argv[1]).iterdir()):
    if path.is_file():
        sha256_file(path)
"""


def run_round(
    repeat: int, model: Path, work: Path, layers: int, trim: int, with_mergekit: bool, order: list[str],
    mergekit_variant: list[str] | None = None, dus_bytes: int = 0, hub_snapshot: Path | None = None,
) -> list[Run]:
    py = sys.executable
    hash_cache = work / "hash-cache"
    env = python_env(hash_cache)
    out_dus, out_cp, out_cp_src, out_mk = work / "dus-out", work / "cp-out", work / "cp-src", work / "mergekit-out"
    _remove(out_dus, out_cp, out_cp_src, out_mk)
    warm_page_cache(model)
    runs: list[Run] = []
    runs.append(timed("baseline: python", [py, "-c", "pass"], None, repeat, env))
    runs.append(timed("baseline: dus w/o writing", [py, "-c", BASELINE_CODE, str(model), str(trim)], None, repeat, env))
    dus_command = [py, "-m", "dus", "build", "--solar", str(model), "--trim", str(trim), "-o", str(out_dus), "-q"]
    for step in order:
        if step == "dus":
            shutil.rmtree(hash_cache, ignore_errors=True)
            runs.append(timed("dus build (cold hash)", dus_command, out_dus, repeat, env))
            _remove(out_dus)
            runs.append(timed("dus build (cached hash)", dus_command, out_dus, repeat, env))
            # The reference: the same bytes, the same files, copied by cp.
            runs.append(timed("cp -r of dus output", ["cp", "-r", str(out_dus), str(out_cp)], out_cp, repeat))
            _remove(out_cp, out_dus)
            runs.append(timed(WRITER_ONLY, [py, "-c", WRITER_CODE, str(model), str(trim), str(out_dus)], out_dus, repeat, env))
            _remove(out_dus)
            if hub_snapshot is not None:
                # A first build (its own empty sha256 cache) from the same bytes in the hub
                # cache's layout: the shards' digests are their blobs' names.
                hub_cache = work / "hash-cache-hub"
                shutil.rmtree(hub_cache, ignore_errors=True)
                command = [py, "-m", "dus", "build", "--solar", str(hub_snapshot), "--trim", str(trim), "-o", str(out_dus), "-q"]
                runs.append(timed(HUB_FIRST, command, out_dus, repeat, python_env(hub_cache)))
                sources = json.loads((out_dus / "dus-manifest.json").read_text())["sources"]
                origins = {origin for record in sources.values() for name, origin in record["sha256_from"].items()
                           if name.endswith(".safetensors")}
                assert origins == {"hub-cache"}, origins
                shutil.rmtree(hub_cache, ignore_errors=True)
                _remove(out_dus)
        elif step == "cp-source":
            command = same_bytes_copy_command(model, out_cp_src, dus_bytes)
            runs.append(timed("cp of source, same bytes", command, out_cp_src, repeat))
            assert runs[-1].bytes == dus_bytes, (runs[-1].bytes, dus_bytes)
            _remove(out_cp_src)
        elif step == "mergekit" and with_mergekit:
            recipe = write_mergekit_recipe(work / "mergekit-solar.yaml", model, layers, trim)
            command = [mergekit_command(), str(recipe), str(out_mk), "--copy-tokenizer", "--quiet"]
            runs.append(timed("mergekit-yaml passthrough", command, out_mk, repeat, env))
            _remove(out_mk)
            if mergekit_variant:
                label = "mergekit-yaml " + " ".join(mergekit_variant)
                runs.append(timed(label, command + mergekit_variant, out_mk, repeat, env))
                _remove(out_mk)
    shutil.rmtree(hash_cache, ignore_errors=True)
    runs.append(timed("sha256 of source (alone)", [py, "-c", HASH_CODE, str(model)], None, repeat, env))
    shutil.rmtree(hash_cache, ignore_errors=True)
    _remove(out_dus)
    return runs


# ---------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------


def medians(runs: list[Run]) -> dict[str, dict]:
    by_name: dict[str, list[Run]] = {}
    for run in runs:
        by_name.setdefault(run.name, []).append(run)
    summary = {}
    for name, group in by_name.items():
        wall = statistics.median(r.wall_s for r in group)
        nbytes = group[0].bytes
        summary[name] = {
            "wall_s": round(wall, 3),
            "sync_s": round(statistics.median(r.sync_s for r in group), 3),
            "peak_rss_mb": round(statistics.median(r.peak_rss_mb for r in group), 1),
            "cpu_s": round(statistics.median(r.user_s + r.sys_s for r in group), 3),
            "bytes": nbytes,
            "gb_per_s": round(nbytes / 1e9 / wall, 3) if nbytes else None,
            "runs": len(group),
        }
    return summary


REFERENCES = ("cp -r of dus output", "cp of source, same bytes")
HUB_FIRST = "dus build (hub cache, first)"
# issue 35: with the sha256 cache warm at least the faster cp's throughput; a first build,
# which also hashes every source file, at least 0.85x of it; issue 44: a first build from
# the hub cache (digests from the blobs' names) at least the faster cp's
BUILDS = {"dus build (cold hash)": "cold", "dus build (cached hash)": "cached", HUB_FIRST: "hub_cache"}
THROUGHPUT_AIMS = {"cached": 1.0, "cold": 0.85, "hub_cache": 1.0}


def ratios(runs: list[Run], summary: dict) -> dict:
    """Ratios paired within each round (contenders of one round ran minutes apart, under
    the same load), then the median over rounds, with the range."""
    rounds: dict[int, dict[str, Run]] = {}
    for run in runs:
        rounds.setdefault(run.repeat, {})[run.name] = run

    def paired(numerator, denominator) -> dict | None:
        values = []
        for named in rounds.values():
            a, b = numerator(named), denominator(named)
            if a is not None and b is not None:
                values.append(a / b)
        if not values:
            return None
        return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
                "max": round(max(values), 3), "rounds": len(values)}

    def wall(name):
        return lambda named: named[name].wall_s if name in named else None

    def rate(name):
        return lambda named: named[name].gb_per_s if name in named else None

    def rss(name):
        return lambda named: named[name].peak_rss_mb if name in named else None

    out: dict = {}
    base, bare = summary.get("baseline: dus w/o writing"), summary.get("baseline: python")
    if WRITER_ONLY in summary:
        out["writer_only"] = {
            f"throughput_vs[{reference}]": paired(rate(WRITER_ONLY), rate(reference)) for reference in REFERENCES
        }
    for label, key in BUILDS.items():
        if label not in summary:
            continue
        entry: dict = {}
        for reference in REFERENCES:
            ratio = paired(rate(label), rate(reference))  # GB/s over GB/s (the same bytes)
            if ratio:
                entry[f"throughput_vs[{reference}]"] = ratio
        entry["rss_above_baseline_mb"] = round(summary[label]["peak_rss_mb"] - base["peak_rss_mb"], 1)
        entry["rss_above_bare_python_mb"] = round(summary[label]["peak_rss_mb"] - bare["peak_rss_mb"], 1)
        mergekit = paired(wall("mergekit-yaml passthrough"), wall(label))
        if mergekit:
            entry["mergekit_wall_over_dus"] = mergekit
            entry["mergekit_rss_over_dus"] = paired(rss("mergekit-yaml passthrough"), rss(label))
        worst_cp = min((v["median"] for k, v in entry.items() if k.startswith("throughput_vs")), default=0)
        aim = THROUGHPUT_AIMS[key]
        entry["aims_met"] = {
            f"throughput >= {aim}x cp (the faster cp)": worst_cp >= aim,
            "rss < 1 GB above baseline": entry["rss_above_baseline_mb"] < 1000,
            "faster than mergekit": (mergekit["median"] > 1) if mergekit else None,
        }
        out[key] = entry
    cold, cached = summary.get("dus build (cold hash)"), summary.get("dus build (cached hash)")
    if cold and cached:
        out["hashing_cost_s"] = round(cold["wall_s"] - cached["wall_s"], 3)
        out["hashing_cost_cpu_s"] = round(cold["cpu_s"] - cached["cpu_s"], 3)
    if base and bare:
        out["fixed_cost_s"] = round(base["wall_s"] - bare["wall_s"], 3)  # imports, plan, config
    return out


def print_table(summary: dict, extra: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="dus build vs cp -r vs mergekit (median of runs)")
    for column in ("contender", "wall s", "+sync s", "GB written", "GB/s", "peak RSS MB", "CPU s"):
        table.add_column(column, justify="left" if column == "contender" else "right")
    for name, row in summary.items():
        table.add_row(
            name, f"{row['wall_s']:.2f}", f"{row['sync_s']:.2f}",
            f"{row['bytes'] / 1e9:.2f}" if row["bytes"] else "-",
            f"{row['gb_per_s']:.2f}" if row["gb_per_s"] else "-",
            f"{row['peak_rss_mb']:.0f}", f"{row['cpu_s']:.2f}",
        )
    console = Console(width=130)
    console.print(table)
    def span(value: dict) -> str:
        return f"{value['median']:.2f}x (rounds: {value['min']:.2f}-{value['max']:.2f})"

    titles = {"cold": "dus build, cold hash cache", "cached": "dus build, cached hash cache",
              "hub_cache": "dus build from the hub cache's layout, first build (cold hash cache)"}
    for key, title in titles.items():
        entry = extra.get(key)
        if not entry:
            continue
        console.print(f"[bold]{title}[/] (ratios paired within each round, median):")
        for name, value in entry.items():
            if name.startswith("throughput_vs"):
                console.print(f"  throughput vs {name[len('throughput_vs['):-1]}: {span(value)}")
        console.print(
            f"  peak RSS {entry['rss_above_baseline_mb']:.0f} MB above the no-write baseline "
            f"({entry['rss_above_bare_python_mb']:.0f} MB above bare python)"
        )
        if "mergekit_wall_over_dus" in entry:
            console.print(
                f"  mergekit takes {span(entry['mergekit_wall_over_dus'])} the time and "
                f"{span(entry['mergekit_rss_over_dus'])} the peak RSS"
            )
        console.print("  aims: " + ", ".join(f"{k}: {'yes' if v else ('n/a' if v is None else 'NO')}" for k, v in entry["aims_met"].items()))
    if "writer_only" in extra:
        console.print("[bold]dus writer alone[/] (plan + shards; no config rewrite, hashes or manifest):")
        for name, value in extra["writer_only"].items():
            if value:
                console.print(f"  throughput vs {name[len('throughput_vs['):-1]}: {span(value)}")
    if "hashing_cost_s" in extra:
        console.print(
            f"hashing the sources (cold cache) adds {extra['hashing_cost_s']:.2f} s wall "
            f"({extra['hashing_cost_cpu_s']:.2f} s CPU, in a thread beside the copy) to a build"
        )
    if "fixed_cost_s" in extra:
        console.print(
            f"the no-write baseline (imports of dus, torch and transformers; plan; config) takes {extra['fixed_cost_s']:.2f} s "
            "more than bare python; in a build it runs beside the copy"
        )


def machine() -> dict:
    def version(module: str) -> str | None:
        try:
            from importlib.metadata import version as v

            return v(module)
        except Exception:
            return None

    meminfo = Path("/proc/meminfo").read_text().split("\n")[0] if Path("/proc/meminfo").exists() else ""
    fs = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", "/tmp"], capture_output=True, text=True).stdout.strip()
    return {
        "cpus": os.cpu_count(), "memory": meminfo.split(":")[-1].strip(), "kernel": platform.release(),
        "python": platform.python_version(), "torch": version("torch"), "transformers": version("transformers"),
        "mergekit": version("mergekit"), "cp": subprocess.run(["cp", "--version"], capture_output=True, text=True).stdout.split("\n")[0],
        "filesystem": fs or None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1.5b", help="model size preset (default 1.5b)")
    parser.add_argument("--model-dir", type=Path, help="cached random model (default /tmp/dus-bench/llama-SIZE)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/dus-bench/runs"), help="outputs, removed after each run")
    parser.add_argument("--trim", type=int, help="layers dropped from each copy (default: 30 -> 44 for 1.5b)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds; medians are reported")
    parser.add_argument("--no-mergekit", action="store_true", help="skip mergekit even when installed")
    parser.add_argument("--no-hub", action="store_true", help="skip the first build from the hub cache's layout")
    parser.add_argument("--mergekit-variant", default="", help='also run mergekit with these extra options, e.g. "--out-shard-size 1B"')
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="JSON to update (one entry per size)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))
    model = ensure_model(args.model_dir or Path(f"/tmp/dus-bench/llama-{args.size}"), args.size)
    hub_snapshot = None if args.no_hub else ensure_hub_layout(model, model.parent / "hub")
    layers = SIZES[args.size][2]
    trim = args.trim if args.trim is not None else SIZES[args.size][6]
    with_mergekit = not args.no_mergekit and mergekit_command() is not None
    if not args.no_mergekit and not with_mergekit:
        print("mergekit-yaml not found: skipping mergekit (pip install mergekit==0.1.5 to compare)")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    # dus's bytecode compiled, as pip install does (with PYTHONDONTWRITEBYTECODE=1 set no
    # run writes it), then one untimed build: it learns the output size (for the
    # same-bytes copy) and warms the caches for every contender alike.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "dus")], check=True, stdout=subprocess.DEVNULL)
    print("untimed warm-up build ...")
    warm = timed("warm-up dus build", [sys.executable, "-m", "dus", "build", "--solar", str(model), "--trim", str(trim),
                                       "-o", str(args.work_dir / "dus-out"), "-q"],
                 args.work_dir / "dus-out", -1, python_env(args.work_dir / "hash-cache"))
    dus_bytes = warm.bytes
    _remove(args.work_dir / "dus-out", args.work_dir / "hash-cache")
    steps = ["dus", "cp-source", "mergekit"]
    runs: list[Run] = []
    for repeat in range(args.repeat):
        order = steps[repeat % 3:] + steps[: repeat % 3]  # rotate who goes first
        print(f"round {repeat + 1}/{args.repeat}: SOLAR {layers} -> {2 * (layers - trim)} layers, order {order}")
        runs += run_round(repeat, model, args.work_dir, layers, trim, with_mergekit, order, args.mergekit_variant.split(), dus_bytes,
                          hub_snapshot)
    summary = medians(runs)
    extra = ratios(runs, summary)
    print_table(summary, extra)

    spec = model_spec(args.size)
    params = sum(_numel(shape) for _, shape in tensor_shapes(spec))
    record = {
        "model": {**spec, "parameters": params, "source_bytes": _dir_bytes(model), "trim": trim,
                  "output_layers": 2 * (layers - trim)},
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "notes": [
            "each contender is a separate child process; peak RSS is that child's ru_maxrss (wait4)",
            "page cache warmed by reading the source once; `sync` before each run; sync_s is the flush after it",
            "dus's bytecode compiled first (python -m compileall dus), as pip install does",
            "references: 'cp -r of dus output' copies exactly the bytes and files dus wrote; 'cp of source, same bytes' "
            "writes the same number of bytes read from the source files only (cp -r of the source, whole shards again, "
            "the last cut with head -c), so its page-cache footprint is the same as the build's",
            "ratios are paired within each round, then the median over rounds; the machine is shared (see load average)",
            "baseline 'dus w/o writing' imports dus, torch and transformers, resolves the recipe and reads the config",
            "mergekit-yaml run with defaults plus --copy-tokenizer --quiet (out shard size 5B params: one shard, as dus's 5GB)",
            "'dus build (hub cache, first)': the source's files as hub-cache blobs (hard links to them: the same bytes and "
            "page cache) behind snapshot symlinks, the shards' blobs named by their sha256; an empty sha256 cache",
        ],
        "summary": summary,
        "ratios": extra,
        "runs": [{**asdict(run), "gb_per_s": round(run.gb_per_s, 3)} for run in runs],
    }
    results = json.loads(args.results.read_text()) if args.results.is_file() else {}
    results[args.size] = record
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {args.results} (entry {args.size!r})")


if __name__ == "__main__":
    main()

"""Benchmark `dus export` against `cp` of the same bytes, and the exported GGUF in llama.cpp
against the checkpoint in transformers.

Part 1, speed and memory (`--sizes`): for random Llama checkpoints of growing size (bf16
safetensors written straight to disk by bench_build.py, cached), each contender runs in
its own child process with the page cache warm: `dus export` to bf16 (a conversion of
layout only), f16 and q8_0, and `cp` of the source's weight files (as many bytes as a
bf16 export writes). Wall time until the bytes are on disk (the child, then `sync`) and
the child's own peak RSS (wait4), as ratios to cp.

Part 2, fidelity (`--model DIR`, e.g. the healed model of the main job): exports it to
q8_0 and f32 and scores the same held-out tokens with llama.cpp (llama-cpp-python) and
with transformers (float32), in non-overlapping windows, one thread each: perplexity and
tokens per second of each.

    python benchmarks/bench_export.py --sizes 350m,1.5b
    python benchmarks/bench_export.py --model runs/demo/solar-healed --sizes ""
Results: benchmarks/results/export.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_build  # noqa: E402 - the cached random checkpoints and the child-process timer

RESULTS = REPO / "benchmarks" / "results" / "export.json"


def speed(sizes: list[str], workdir: Path) -> list[dict]:
    rows = []
    env = bench_build.python_env(workdir / "hash-cache")
    for size in sizes:
        model = bench_build.ensure_model(workdir / f"llama-{size}", size)
        weights = sorted(model.glob("*.safetensors"))
        source_bytes = sum(p.stat().st_size for p in weights)
        bench_build.warm_page_cache(model)
        copy_dir = workdir / "copy"
        bench_build._remove(copy_dir)
        copy_dir.mkdir()
        cp = bench_build.timed(f"cp weights ({size})", ["cp", *map(str, weights), str(copy_dir)], copy_dir, 1)
        bench_build._remove(copy_dir)
        row = {"size": size, "source_bytes": source_bytes, "cp": cp.__dict__ | {"command": cp.command}}
        for type_name in ("bf16", "f16", "q8_0"):
            out_dir = workdir / "gguf"
            bench_build._remove(out_dir)
            out_dir.mkdir()
            command = [sys.executable, "-m", "dus", "export", str(model), "-o", str(out_dir / "m.gguf"), "--type", type_name]
            run = bench_build.timed(f"dus export {type_name} ({size})", command, out_dir, 1, env=env)
            row[type_name] = {"wall_s": run.wall_s, "sync_s": run.sync_s, "peak_rss_mb": run.peak_rss_mb,
                              "bytes": run.bytes,
                              # until the bytes are on disk: page-cache writes alone flatter cp on small models
                              "time_vs_cp": (run.wall_s + run.sync_s) / (cp.wall_s + cp.sync_s)}
            bench_build._remove(out_dir)
        rows.append(row)
    return rows


def fidelity(model_dir: Path, text_path: Path, tokens: int, window: int, workdir: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dus.export import llamacpp
    from dus.export.run import export_gguf
    from dus.measure.text import read_text

    torch.set_num_threads(1)
    ids = AutoTokenizer.from_pretrained(str(model_dir))(read_text(text_path))["input_ids"][:tokens]
    result = {"model": str(model_dir), "text": str(text_path), "tokens": len(ids), "window": window}
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    nll, count, seconds = 0.0, 0, 0.0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[start:start + window]])
            began = time.perf_counter()
            loss = model(chunk, labels=chunk).loss.item()
            seconds += time.perf_counter() - began
            nll += loss * (chunk.shape[1] - 1)
            count += chunk.shape[1] - 1
    result["transformers f32"] = {"perplexity": math.exp(nll / count), "tokens_per_s": len(ids) / seconds}
    del model
    for type_name in ("q8_0", "f32"):
        out = workdir / f"fidelity-{type_name}.gguf"
        exported = export_gguf(model_dir, out, type_name, force=True, progress=False)
        ppl, rate = llamacpp.perplexity(out, ids, window, threads=1)
        result[f"llama.cpp {type_name}"] = {"perplexity": ppl, "tokens_per_s": rate, "gguf_bytes": exported.bytes,
                                            "export_s": exported.seconds}
        out.unlink()
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="350m,1.5b", help="comma-separated sizes of bench_build.py ('' to skip)")
    parser.add_argument("--model", type=Path, help="also compare llama.cpp and transformers on this model directory")
    parser.add_argument("--text", type=Path, default=REPO / "data" / "heldout" / "fiction.txt")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "dus-bench")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.results.read_text()) if args.results.is_file() else {}
    results["machine"] = bench_build.machine()
    sizes = [s for s in args.sizes.split(",") if s]
    if sizes:
        results["speed"] = speed(sizes, args.workdir)
        for row in results["speed"]:
            print(f"{row['size']}: {row['source_bytes'] / 1e9:.2f} GB bf16; cp {row['cp']['wall_s']:.1f} s "
                  f"+ {row['cp']['sync_s']:.1f} s sync, "
                  f"peak RSS {row['cp']['peak_rss_mb']:.0f} MB")
            for type_name in ("bf16", "f16", "q8_0"):
                r = row[type_name]
                print(f"  export {type_name:5} {r['wall_s']:6.1f} s + {r['sync_s']:.1f} s sync = {r['time_vs_cp']:.2f}x cp, "
                      f"peak RSS {r['peak_rss_mb']:.0f} MB, {r['bytes'] / 1e9:.2f} GB")
    if args.model:
        results["fidelity"] = fidelity(args.model, args.text, args.tokens, args.window, args.workdir)
        for name, value in results["fidelity"].items():
            if isinstance(value, dict):
                print(f"  {name:18} perplexity {value['perplexity']:.3f}, {value['tokens_per_s']:.0f} tokens/s")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {args.results}")


if __name__ == "__main__":
    main()

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

Part 3, quantization (`--model DIR --quant`): f16, q8_0, q6_k, q5_k_m, q4_k_m and q3_k_m, the
llama.cpp types each without and with dus's importance matrix (computed once on the bundled
data/text/train.jsonl, as `dus export --imatrix default` does), scored by llama.cpp on every
bundled held-out text (data/heldout/*.txt): perplexity, file size, tokens/s. With
`--llama-cpp-bin DIR` holding llama.cpp's own `llama-imatrix` and `llama-quantize`, also
their importance matrix on the same calibration windows, and llama-quantize reading dus's
imatrix file, beside dus's, and how far the two matrices' per-column means differ
(`imatrix_comparison`); llama-imatrix's log is left in the workdir.

    python benchmarks/bench_export.py --sizes 350m,1.5b
    python benchmarks/bench_export.py --model runs/demo/solar-healed --sizes ""
    python benchmarks/bench_export.py --model runs/demo/solar-healed --sizes "" --quant --no-fidelity
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


QUANT_TYPES = ("q6_k", "q5_k_m", "q4_k_m", "q3_k_m")


def quantization(model_dir: Path, tokens: int, window: int, threads: int, workdir: Path, llama_bin: Path | None) -> dict:
    """Perplexity on every held-out text of each type, without and with an importance matrix."""
    import subprocess

    from transformers import AutoConfig, AutoTokenizer

    from dus.export import imatrix, llamacpp
    from dus.export.families import family_for
    from dus.export.quantize import quantize
    from dus.export.run import export_gguf
    from dus.measure.text import read_text

    texts = sorted((REPO / "data" / "heldout").glob("*.txt"))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    scored = {t.stem: tokenizer(read_text(t))["input_ids"][:tokens] for t in texts}
    config = AutoConfig.from_pretrained(str(model_dir))
    family = family_for(config.model_type, str(model_dir))
    calibration = REPO / imatrix.DEFAULT_TEXT
    began = time.perf_counter()
    matrix = imatrix.compute(model_dir, calibration, imatrix.DEFAULT_TEXT, config, family)
    result = {"model": str(model_dir), "tokens_per_text": tokens, "window": window, "threads": threads,
              "imatrix_s": time.perf_counter() - began, "imatrix_tokens": matrix.chunk_count * matrix.chunk_size,
              "rows": []}
    dus_imatrix = workdir / "dus.imatrix.gguf"
    imatrix.write(matrix, dus_imatrix)
    f16 = export_gguf(model_dir, workdir / "q-f16.gguf", "f16", force=True, progress=False).path
    files = [("f16", "-", f16), ("q8_0", "-", export_gguf(model_dir, workdir / "q-q8_0.gguf", "q8_0", force=True,
                                                            progress=False).path)]
    means = matrix.means()
    for type_name in QUANT_TYPES:
        for label, values in (("none", None), ("dus", means)):
            out = workdir / f"q-{type_name}-{label}.gguf"
            quantize(f16, out, type_name, values)
            files.append((type_name, label, out))
    if llama_bin is not None:
        # llama.cpp's own tools on the same calibration windows (as text), and dus's file read by llama-quantize
        windows = imatrix.calibration_windows(tokenizer, read_text(calibration), 8192, 512)
        text = workdir / "calibration.txt"
        text.write_text("".join(tokenizer.decode(w, skip_special_tokens=True) for w in windows))
        theirs = workdir / "llama.imatrix.gguf"
        version = subprocess.run([str(llama_bin / "llama-imatrix"), "--version"], capture_output=True, text=True)
        result["llama_cpp_version"] = next((line for line in (version.stdout + version.stderr).splitlines()
                                            if line.startswith("version")), "unknown")
        began = time.perf_counter()
        run = subprocess.run([str(llama_bin / "llama-imatrix"), "-m", str(f16), "-f", str(text), "-o", str(theirs),
                              "-c", "512", "--chunks", str(len(windows)), "-t", str(threads), "--no-ppl"],
                             capture_output=True, text=True)
        (workdir / "llama-imatrix.log").write_text(run.stdout + run.stderr)
        if run.returncode:
            raise SystemExit(f"llama-imatrix failed ({run.returncode}); log: {workdir / 'llama-imatrix.log'}")
        result["llama_imatrix_s"] = time.perf_counter() - began
        result["imatrix_comparison"] = compare_imatrices(dus_imatrix, theirs)
        for type_name in QUANT_TYPES:
            # distinct names: "dus" alone is the file dus's own quantizer call wrote above
            for label, source, tag in (("llama-imatrix", theirs, "llama"), ("dus file via llama-quantize", dus_imatrix,
                                                                             "dus-file")):
                out = workdir / f"q-{type_name}-{tag}.gguf"
                subprocess.run([str(llama_bin / "llama-quantize"), "--imatrix", str(source), str(f16), str(out),
                                type_name.upper(), str(threads)], check=True, capture_output=True)
                files.append((type_name, label, out))
    for type_name, label, path in files:
        from collections import Counter

        from gguf import GGUFReader

        kinds = Counter(t.tensor_type.name for t in GGUFReader(path).tensors if len(t.shape) > 1)
        row = {"type": type_name, "imatrix": label, "bytes": path.stat().st_size, "perplexity": {},
               "matrix_types": dict(sorted(kinds.items()))}  # llama.cpp falls back where rows are not 256-multiples
        rates = []
        for name, ids in scored.items():
            ppl, rate = llamacpp.perplexity(path, ids, window, threads=threads)
            row["perplexity"][name] = ppl
            rates.append(rate)
        row["tokens_per_s"] = sum(rates) / len(rates)
        result["rows"].append(row)
        print(f"  {type_name:7} imatrix {label:28} {row['bytes'] / 1e6:7.1f} MB  "
              + "  ".join(f"{k} {v:.3f}" for k, v in row["perplexity"].items()) + f"  {row['tokens_per_s']:.0f} tok/s",
              flush=True)
    base = result["rows"][0]["perplexity"]
    for row in result["rows"]:
        gaps = [row["perplexity"][k] / base[k] - 1 for k in base]
        row["mean_gap_to_f16"] = sum(gaps) / len(gaps)
    for path in workdir.glob("q-*.gguf"):
        path.unlink()
    return result


def compare_imatrices(ours: Path, theirs: Path) -> dict:
    """How far dus's per-column means are from llama-imatrix's, over the matrices both hold:
    per matrix the largest and the mean relative difference, and the token counts."""
    import numpy as np

    from dus.export import imatrix

    a, b = imatrix.read(ours), imatrix.read(theirs)
    mine, other = a.means(), b.means()
    shared = sorted(mine.keys() & other.keys())
    per = {}
    for name in shared:
        x, y = mine[name].astype(np.float64), other[name].astype(np.float64)
        rel = np.abs(x - y) / np.maximum(np.abs(y), 1e-12)
        per[name] = {"max_rel": float(rel.max()), "mean_rel": float(rel.mean()),
                     "corr": float(np.corrcoef(x, y)[0, 1]) if x.size > 1 else 1.0,
                     "counts": [float(a.counts[name].sum()), float(b.counts[name].sum())]}
    return {"matrices": [len(mine), len(other), len(shared)], "only_dus": sorted(mine.keys() - other.keys()),
            "only_llama": sorted(other.keys() - mine.keys()),
            "chunks": [a.chunk_count, b.chunk_count], "chunk_size": [a.chunk_size, b.chunk_size],
            "mean_rel_over_all": float(np.mean([v["mean_rel"] for v in per.values()])) if per else None,
            "max_rel_over_all": float(np.max([v["max_rel"] for v in per.values()])) if per else None,
            "min_corr": float(np.min([v["corr"] for v in per.values()])) if per else None,
            "per_matrix": per}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="350m,1.5b", help="comma-separated sizes of bench_build.py ('' to skip)")
    parser.add_argument("--model", type=Path, help="also compare llama.cpp and transformers on this model directory")
    parser.add_argument("--text", type=Path, default=REPO / "data" / "heldout" / "fiction.txt")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "dus-bench")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--quant", action="store_true", help="with --model: the quantized types, with and without imatrix")
    parser.add_argument("--no-fidelity", action="store_true", help="with --model: skip the f32/q8_0 vs transformers part")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads for --quant")
    parser.add_argument("--llama-cpp-bin", type=Path, help="a directory with llama.cpp's llama-imatrix and llama-quantize")
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
    if args.model and args.quant:
        results["quantization"] = quantization(args.model, args.tokens, args.window, args.threads, args.workdir,
                                               args.llama_cpp_bin)
    if args.model and not args.no_fidelity:
        results["fidelity"] = fidelity(args.model, args.text, args.tokens, args.window, args.workdir)
        for name, value in results["fidelity"].items():
            if isinstance(value, dict):
                print(f"  {name:18} perplexity {value['perplexity']:.3f}, {value['tokens_per_s']:.0f} tokens/s")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {args.results}")


if __name__ == "__main__":
    main()

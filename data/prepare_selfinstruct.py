"""Make data/selfinstruct/train.jsonl: chatterbot-corpus questions answered by SmolLM2 itself.

Healing a depth up-scaled model aims to give back what the source model could do, so the
source model's own answers are a fitting supervised target (self-distillation), and they
need no instruction data set that may not be redistributed. Prompts: the opening line of
each English conversation in PyPI `chatterbot-corpus==1.3.3` (BSD-3-Clause). Answers:
SmolLM2-135M-Instruct (Apache-2.0, imported by `dus import --smollm2`), greedy decoding.

    python data/prepare_selfinstruct.py                 # imports SmolLM2 into the dus cache if needed
    python data/prepare_selfinstruct.py --model DIR     # any imported SmolLM2 directory

Answers that hit the token limit (unfinished) or repeat themselves are dropped. Generated
answers are kept in a .partial file as they come, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))
from package_files import cache_folder, read_package_files  # noqa: E402

PACKAGE, VERSION = "chatterbot-corpus", "1.3.3"
SEED = 20241123
PROMPTS = 320
MAX_NEW_TOKENS = 128
BATCH = 16
OUTPUT = HERE / "selfinstruct" / "train.jsonl"
LETTER = re.compile(r"[A-Za-z]")
EXCLUDE = {"bend over", "i hope that you die"}  # read through the 735 prompts; these two only are crude


def load_prompts(allow_download: bool = True) -> list[tuple[str, str]]:
    """[(id, prompt)]: first line of every English conversation, deduplicated, seeded sample."""
    import yaml

    members = _english_members()
    found = read_package_files(PACKAGE, VERSION, members, allow_download=allow_download)
    if found is None:
        raise SystemExit(f"{PACKAGE}=={VERSION} is not available")
    files, _ = found
    seen, prompts = set(), []
    for member in members:
        topic = Path(member).stem
        for index, conversation in enumerate(yaml.safe_load(files[member])["conversations"]):
            text = " ".join(str(conversation[0]).split())
            key = text.lower().rstrip("?.! ")
            if len(text.split()) < 2 or not LETTER.search(text) or key in seen or key in EXCLUDE:
                continue
            seen.add(key)
            prompts.append((f"chatterbot:{topic}:{index}", text))
    random.Random(SEED).shuffle(prompts)
    return prompts[:PROMPTS]


def _english_members() -> list[str]:
    """The English topic files, listed from the wheel's own record of its contents."""
    record = f"chatterbot_corpus-{VERSION}.dist-info/RECORD"
    found = read_package_files(PACKAGE, VERSION, [record])
    if found is None:
        raise SystemExit(f"{PACKAGE}=={VERSION} is not available")
    lines = found[0][record].decode().splitlines()
    return sorted(
        line.split(",")[0] for line in lines
        if line.startswith("chatterbot_corpus/data/english/") and line.split(",")[0].endswith(".yml")
    )


def degenerate(answer: str) -> bool:
    """Loops like '# AWS Lambda' forty times: a line or a 4-word phrase that keeps coming back."""
    lines = [line.strip() for line in answer.splitlines() if line.strip()]
    if lines and max(lines.count(line) for line in set(lines)) >= 4:
        return True
    words = answer.split()
    grams = [" ".join(words[i:i + 4]) for i in range(len(words) - 3)]
    return bool(grams) and max(grams.count(g) for g in set(grams)) >= 4


def model_dir(given: str | None) -> Path:
    if given:
        return Path(given)
    target = cache_folder() / "smollm2-135m-instruct"
    if not (target / "config.json").exists():
        from dus.gguf_import import SMOLLM2, import_packaged

        import_packaged(SMOLLM2, target, force=True)
    return target


def generate(model_path: Path, prompts: list[tuple[str, str]], partial: Path, threads: int | None) -> dict[str, dict]:
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    done = {}
    if partial.exists():
        for line in partial.read_text().splitlines():
            row = json.loads(line)
            done[row["id"]] = row
    todo = [(pid, text) for pid, text in prompts if pid not in done]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    rendered = {
        pid: tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
        for pid, text in todo
    }
    todo.sort(key=lambda item: (len(tokenizer(rendered[item[0]])["input_ids"]), item[0]))  # less padding
    with open(partial, "a") as sink, tqdm(total=len(prompts), initial=len(done), desc="answering", unit="prompt") as bar:
        for start in range(0, len(todo), BATCH):
            batch = todo[start:start + BATCH]
            encoded = tokenizer([rendered[pid] for pid, _ in batch], return_tensors="pt", padding=True)
            with torch.no_grad():
                out = model.generate(**encoded, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
            for (pid, text), ids in zip(batch, out[:, encoded["input_ids"].shape[1]:]):
                ids = ids.tolist()
                finished = tokenizer.eos_token_id in ids
                answer = tokenizer.decode(ids, skip_special_tokens=True).strip()
                row = {"id": pid, "prompt": text, "answer": answer, "finished": finished}
                done[pid] = row
                sink.write(json.dumps(row, ensure_ascii=False) + "\n")
                sink.flush()
            bar.update(len(batch))
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="an imported SmolLM2-135M-Instruct directory (default: import it into the dus cache)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy machine)")
    args = parser.parse_args(argv)
    prompts = load_prompts()
    path = model_dir(args.model)
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    partial = OUTPUT.with_suffix(".partial")
    started = time.perf_counter()
    answers = generate(path, prompts, partial, args.threads)
    rows, dropped = [], {"unfinished": 0, "degenerate": 0, "empty": 0}
    for pid, text in prompts:
        row = answers[pid]
        reason = ("unfinished" if not row["finished"] else "empty" if not row["answer"]
                  else "degenerate" if degenerate(row["answer"]) else None)
        if reason:
            dropped[reason] += 1
            continue
        rows.append({"id": pid, "messages": [{"role": "user", "content": text}, {"role": "assistant", "content": row["answer"]}]})
    OUTPUT.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    partial.unlink()
    print(json.dumps({"prompts": len(prompts), "kept": len(rows), "dropped": dropped,
                      "seconds": round(time.perf_counter() - started), "model": str(path)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

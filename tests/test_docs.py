"""Docs that cannot drift (issue 41).

- the site builds with `mkdocs build --strict`: a broken link or anchor fails;
- every `dus ...` command line in a code block of README.md or a command guide names a real
  subcommand and only options that subcommand's --help lists;
- each guide's options table lists exactly the options of --help, with the same defaults;
- every default the heal guide states equals the shipped train/heal.yaml, and --help says the same;
- the first screen of every command's --help says what it is for and shows an example.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
COMMANDS = ("build", "heal", "compare", "scan", "search", "export", "import")
GUIDES = [DOCS / f"{name}.md" for name in COMMANDS] + [DOCS / "distributed.md", DOCS / "index.md"]
HELP_ONLY = {"--help", "--debug"}  # every command takes them (--debug is read by dus.cli.main)


# ---------------------------------------------------------------------------------------------
# the CLI, and what its --help prints


def _commands() -> dict:
    import typer

    from dus.cli import _app

    return dict(typer.main.get_command(_app()).commands)


@functools.lru_cache(maxsize=None)
def _help(name: str) -> str:
    """`dus NAME --help`, wide enough that no option's line wraps."""
    from typer.testing import CliRunner

    from dus.cli import _app

    result = CliRunner().invoke(_app(), [name, "--help"], prog_name="dus",
                                env={"COLUMNS": "2000", "TERMINAL_WIDTH": "2000"})
    assert result.exit_code == 0, result.output
    return result.output


@functools.lru_cache(maxsize=None)
def help_options(name: str) -> tuple[tuple[tuple[str, ...], str | None, bool, str], ...]:
    """The options `dus NAME --help` lists: (spellings, the default it shows or None, required,
    help text), in its order; --help itself left out."""
    rows, inside = [], False
    for line in _help(name).splitlines():
        if line.startswith("╭─"):
            inside = "Arguments" not in line
            continue
        if line.startswith("╰") or not inside or not line.startswith("│"):
            continue
        cells = re.split(r"\s{2,}", line.strip().strip("│").strip())
        required = cells[0] == "*"
        cells = cells[1:] if required else cells
        names: list[str] = []
        while cells and cells[0].startswith("-"):
            names += cells.pop(0).split(",")
        if cells and re.fullmatch(r"<.*>.*|[A-Z][A-Z0-9_.]*", cells[0]):
            cells.pop(0)  # the metavar
        text = "  ".join(cells)
        shown = re.search(r"\[default: (.*?)\]", text)
        text = re.sub(r"\s*\[default: .*?\]|\s*\[required\]", "", text).strip()
        if names and names != ["--help"]:
            rows.append((tuple(names), shown.group(1) if shown else None, required, text))
    return tuple(rows)


def _option_names(name: str) -> set[str]:
    return set(HELP_ONLY) | {spelling for names, *_ in help_options(name) for spelling in names}


# ---------------------------------------------------------------------------------------------
# command lines in the docs


def _code_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line inside a fenced code block, continuation lines
    (ending in a backslash) joined."""
    lines, inside, fence = [], False, ""
    pending, start = "", 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```") or stripped.startswith("~~~"):
            marker = stripped[:3]
            if not inside:
                inside, fence = True, marker
            elif marker == fence:
                inside = False
            continue
        if not inside:
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append((start, pending + stripped))
        pending = ""
    return lines


def dus_invocations(text: str) -> list[tuple[int, str, list[str]]]:
    """(line, subcommand, argument tokens) for each `dus ...` command line in a code block:
    at the start of a line (after VAR=value assignments) or after `-m` (`python -m dus`,
    `accelerate launch ... -m dus heal`)."""
    found = []
    for number, line in _code_blocks(text):
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            tokens = line.split()
        for index, token in enumerate(tokens):
            if token != "dus" or index + 1 >= len(tokens):
                continue
            before = tokens[:index]
            if before and before[-1] != "-m" and not all(re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", t) for t in before):
                continue
            found.append((number, tokens[index + 1], tokens[index + 2:]))
            break
    return found


def option_tokens(arguments: list[str]) -> list[str]:
    """The option names among a command line's tokens, synopsis brackets and `|` read through:
    `[--segments 3]` gives --segments, `--anchored | --free` both, `--opt=VALUE` --opt."""
    names = []
    for token in arguments:
        for part in token.split("|"):
            part = part.strip("[]()")
            if not part.startswith("-") or part == "-" or re.fullmatch(r"-[\d.]+(e-?\d+)?", part):
                continue
            names.append(part.split("=", 1)[0])
    return names


def _doc_files() -> list[Path]:
    return [ROOT / "README.md", *GUIDES]


def test_every_dus_command_line_in_the_docs_is_real():
    commands = _commands()
    checked, problems = 0, []
    for path in _doc_files():
        for line, name, arguments in dus_invocations(path.read_text(encoding="utf-8")):
            where = f"{path.relative_to(ROOT)}:{line}"
            if name not in commands:
                problems.append(f"{where}: `dus {name}` is not a dus command ({', '.join(sorted(commands))})")
                continue
            known = _option_names(name)
            for option in option_tokens(arguments):
                if option not in known:
                    problems.append(f"{where}: `dus {name}` has no option {option}")
            checked += 1
    assert not problems, "\n".join(problems)
    assert checked >= 40, f"only {checked} dus command lines found in README.md and the guides"


def test_the_help_reader_finds_every_option():
    """What help_options reads from --help is every option click has (hidden ones aside)."""
    for name, command in _commands().items():
        declared = {spelling for param in command.params if param.param_type_name == "option"
                    and not getattr(param, "hidden", False) for spelling in (*param.opts, *param.secondary_opts)}
        assert declared - {"--help"} == _option_names(name) - HELP_ONLY, name


def test_the_fast_build_parser_takes_only_options_typer_knows():
    """dus.cli reads a plain `dus build` itself: its options must be `dus build --help`'s."""
    from dus.cli import _BUILD_OPTIONS

    assert set(_BUILD_OPTIONS) <= _option_names("build")


def test_the_command_line_reader_finds_what_it_should():
    text = "```bash\nOMP_NUM_THREADS=1 dus search m --depth 44 \\\n    --scale=0.5:1 [--anchored | --free] -o x  # c\n" \
           "accelerate launch --config_file launch/ddp.yaml -m dus heal m -o o\ndus: error: x\necho dus build\n```\n" \
           "dus build outside a block\n"
    found = dus_invocations(text)
    assert [(name, option_tokens(arguments)) for _, name, arguments in found] == [
        ("search", ["--depth", "--scale", "--anchored", "--free", "-o"]), ("heal", ["-o"])]


# ---------------------------------------------------------------------------------------------
# options tables in the guides


def _section(text: str, heading: str) -> str:
    match = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"no '## {heading}' section"
    return match.group(1)


def _table_rows(section: str) -> list[list[str]]:
    rows = []
    for line in section.splitlines():
        if not line.startswith("|") or re.fullmatch(r"\|[\s:|-]+\|?", line.strip()):
            continue
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        rows.append(cells)
    return rows[1:]  # without the header


def _code_spans(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def options_table(page: Path) -> dict[str, str]:
    """The guide's `## Options` table: each option name (every spelling in its first cell)
    -> its default cell."""
    table = {}
    for cells in _table_rows(_section(page.read_text(encoding="utf-8"), "Options")):
        spellings = [s for span in _code_spans(cells[0]) for s in re.split(r"[,/ ]+", span) if s.startswith("-")]
        for spelling in spellings:
            table[spelling] = cells[1]
    return table


def _cell_value(cell: str) -> str | None:
    spans = _code_spans(cell)
    return spans[0].lstrip("-") if spans else None


@pytest.mark.parametrize("name", [c for c in COMMANDS if c != "heal"])
def test_each_guide_lists_every_option_with_the_default_help_shows(name):
    table = options_table(DOCS / f"{name}.md")
    problems = []
    for names, shown, _, _ in help_options(name):
        listed = [s for s in names if s in table]
        if not listed:
            problems.append(f"docs/{name}.md: the options table lacks {'/'.join(names)} (dus {name} --help lists it)")
            continue
        written = _cell_value(table[listed[0]])
        if written != shown:
            problems.append(f"docs/{name}.md: {listed[0]}'s default is {written!r} in the guide, {shown!r} in --help")
    known = _option_names(name)
    problems += [f"docs/{name}.md: the options table lists {s}, which dus {name} --help does not"
                 for s in table if s not in known]
    assert not problems, "\n".join(problems)


def test_defaults_the_guides_state_in_words_are_the_help_s():
    """`--max-tokens` (default 2048) in a guide's prose says what --help shows."""
    problems, checked = [], 0
    for name in COMMANDS:
        shown = {spelling: default for names, default, _, _ in help_options(name) for spelling in names}
        text = " ".join((DOCS / f"{name}.md").read_text(encoding="utf-8").split())
        for option, value in re.findall(r"`(--[\w-]+)[^`]*`[^.;`|]{0,20}?\(default:? `?([\w./*-]+)`?[),:; ]", text):
            if option not in shown or shown[option] is None:
                continue  # an option of another command, or a default --help states in words
            checked += 1
            if value != shown[option].lstrip("-"):
                problems.append(f"docs/{name}.md: {option} (default {value}), dus {name} --help: {shown[option]}")
    assert not problems, "\n".join(problems)
    assert checked >= 3


# ---------------------------------------------------------------------------------------------
# heal: the defaults are train/heal.yaml's


def _heal_yaml() -> dict:
    return yaml.safe_load((ROOT / "train" / "heal.yaml").read_text(encoding="utf-8"))


def _dotted(config: dict, key: str):
    value = config
    for part in key.split("."):
        assert isinstance(value, dict) and part in value, f"train/heal.yaml has no key {key}"
        value = value[part]
    return value


def heal_defaults() -> list[tuple[str, object, list[str]]]:
    """docs/heal.md's `## Defaults` table: (dotted key, value as YAML reads it, the options
    that set it)."""
    rows = []
    for cells in _table_rows(_section((DOCS / "heal.md").read_text(encoding="utf-8"), "Defaults")):
        key, value = _code_spans(cells[0])[0], _code_spans(cells[1])[0]
        options = [s for span in _code_spans(cells[2]) for s in re.split(r"[,/ ]+", span) if s.startswith("--")]
        rows.append((key, yaml.safe_load(value), options))
    return rows


def test_the_heal_guide_states_the_shipped_defaults():
    shipped = _heal_yaml()
    rows = heal_defaults()
    keys = {key for key, _, _ in rows}
    # the defaults the README and the guide's prose rely on must be in the table
    assert {"mode", "seam.radius", "sft.learning_rate", "sft.max_steps", "data.path", "distill.student",
            "calibrate.factors", "distill.combine", "sft.seed"} <= keys
    problems = [f"docs/heal.md Defaults: {key} is {value!r}, train/heal.yaml says {_dotted(shipped, key)!r}"
                for key, value, _ in rows if value != _dotted(shipped, key)]
    assert not problems, "\n".join(problems)


def test_the_heal_prose_agrees_with_the_shipped_defaults():
    """Numbers the README and the heal guide state in words: the steps, the band, the lr."""
    shipped = _heal_yaml()
    steps, radius = shipped["sft"]["max_steps"], shipped["seam"]["radius"]
    lr = float(shipped["sft"]["learning_rate"])
    for path in (ROOT / "README.md", DOCS / "heal.md"):
        text = " ".join(path.read_text(encoding="utf-8").split())
        for found in re.findall(r"(\d+) distillation steps", text):
            assert int(found) == steps, f"{path.name}: '{found} distillation steps', heal.yaml: {steps}"
        for found in re.findall(r"the (\d+) layers around the seam", text):
            assert int(found) == 2 * radius, f"{path.name}: '{found} layers around the seam', radius {radius}"
        for found in re.findall(r"learning rate (\d(?:\.\d+)?e-\d+)", text):
            assert float(found) == lr, f"{path.name}: 'learning rate {found}', heal.yaml: {lr}"


def test_heal_help_states_the_guide_s_defaults():
    """Every heal option the Defaults table names says the same default in --help."""
    by_option = {spelling: text for names, _, _, text in help_options("heal") for spelling in names}
    problems, checked = [], 0
    for key, value, options in heal_defaults():
        for option in options:
            assert option in by_option, f"docs/heal.md Defaults: dus heal has no option {option}"
            match = re.search(r"default:? `?([^,;()`]+?)`?(?:[,;)]| \(| in | from |\.?$)", by_option[option], re.I)
            if match is None:
                problems.append(f"dus heal {option}: its help states no default (the guide: {key} = {value!r})")
            elif yaml.safe_load(match.group(1).strip()) != value:
                problems.append(f"dus heal {option}: --help says default {match.group(1)!r}, the guide {value!r}")
            checked += 1
    assert not problems, "\n".join(problems)
    assert checked >= 8


def test_the_heal_guide_lists_every_option():
    """Every option of dus heal --help is in the guide's table, its default the Defaults table's."""
    table = options_table(DOCS / "heal.md")
    missing = ["/".join(names) for names, *_ in help_options("heal") if not any(s in table for s in names)]
    assert not missing, f"docs/heal.md's options table lacks {missing}"
    assert not [s for s in table if s not in _option_names("heal")]
    defaults = {option: value for _, value, options in heal_defaults() for option in options}
    for names, *_ in help_options("heal"):
        cell = next(table[s] for s in names if s in table)
        written = _code_spans(cell)
        expected = [defaults[s] for s in names if s in defaults]
        if expected:
            assert written and yaml.safe_load(written[0]) == expected[0], f"docs/heal.md options: {names} {cell}"
        else:
            assert not written, f"docs/heal.md options: {names} state default {cell}, the Defaults table none"


# ---------------------------------------------------------------------------------------------
# --help: what the command is for, and an example


def _help_at_80_columns(*args: str) -> list[str]:
    from typer.testing import CliRunner

    from dus.cli import _app

    result = CliRunner().invoke(_app(), list(args), prog_name="dus", env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
    return [line.strip() for line in result.output.splitlines()]


@pytest.mark.parametrize("name", ("",) + COMMANDS)
def test_help_opens_with_the_purpose_and_an_example(name):
    """On an 80-column terminal, the first screen of `dus [NAME] --help`: the usage line, then one
    line saying what the command is for, then `Example: dus ...` on one line of its own."""
    args = [name, "--help"] if name else ["--help"]
    lines = [line for line in _help_at_80_columns(*args) if line]
    assert lines[0].startswith("Usage: dus"), lines[:3]
    purpose, example = lines[1], lines[2]
    assert purpose.endswith(".") and not purpose.startswith(("Example", "╭")), \
        f"dus {name} --help: the purpose should be one line ending in a full stop, then the example: {lines[1:4]}"
    assert example.startswith(f"Example: dus {name}".rstrip()), f"dus {name} --help: no example after the purpose: {lines[1:4]}"
    command = shlex.split(example.removeprefix("Example: "))
    sub = command[1] if name == "" else name
    assert sub in _commands(), example
    known = _option_names(sub)
    for option in option_tokens(command[2:]):
        assert option in known, f"dus {name} --help's example uses {option}, which dus {sub} does not take"


# ---------------------------------------------------------------------------------------------
# the site


def test_the_site_builds_strictly(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs and mkdocs-material are not installed (pip install 'dus[test]')")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "index.html").is_file()


def test_the_site_s_link_checks_are_failures():
    """mkdocs.yml turns every link and anchor problem into a warning, which --strict fails."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    assert config["strict"] is True
    assert config["validation"]["links"] == {"not_found": "warn", "anchors": "warn", "absolute_links": "warn",
                                             "unrecognized_links": "warn"}
    listed = set()

    def walk(items):
        for item in items:
            for value in (item.values() if isinstance(item, dict) else [item]):
                walk(value) if isinstance(value, list) else listed.add(value)

    walk(config["nav"])
    pages = {str(path.relative_to(DOCS)) for path in DOCS.rglob("*.md")}
    assert pages == listed, f"pages not in mkdocs.yml's nav: {sorted(pages - listed)}; missing: {sorted(listed - pages)}"


def test_the_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text) <= 15_000, f"README.md is {len(text):,} characters; the front door is at most 15,000"
    # .ci/run runs the README's test command; the main job is the README's other command
    assert "bash scripts/demo.sh    # the main job" in text and "bash scripts/test.sh    # the test suite" in text
    for page in ("docs/build.md", "docs/heal.md", "docs/compare.md", "docs/search.md", "docs/export.md",
                 "docs/import.md", "docs/index.md", "docs/development.md", "docs/two-parents.md", "LICENSE"):
        assert f"]({page}" in text, f"README.md does not link {page}"
    # every relative link of the README (which the site does not build) reaches a file, and a heading
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        assert (ROOT / path).exists(), f"README.md links {target}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", (ROOT / path).read_text(encoding="utf-8"), re.M)
            slugs = {re.sub(r"[\s]+", "-", re.sub(r"[^\w\s-]", "", heading.lower()).strip()) for heading in headings}
            assert anchor in slugs, f"README.md links {target}: {path} has no heading #{anchor}"

"""`dus build`: recipe -> plan -> a complete checkpoint directory, atomically.

Everything is written into a hidden temporary directory beside the output and renamed
into place only when complete, so an interrupted or failed build never leaves
something at the output path that looks like a valid checkpoint.
"""

from __future__ import annotations

import os

import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dus.checkpoint import atomic_directory, replace_only_dus_outputs
from dus.config_rewrite import has_layer_fields, output_config, write_config
from dus.errors import DusError
from dus.hashing import checked_before, file_digest, remember_checked
from dus.plan import LayerPlan
from dus.recipe import Recipe, load_recipe
from dus.resolve import resolve
from dus.safetensors_io import parse_size
from dus.sources import SourceModel, read_license
from dus.tokenizer_check import check_tokenizer_file, check_tokenizer_files
from dus.writer import layout, write_shards

if TYPE_CHECKING:
    from dus.manifest import Manifest

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


@dataclass
class BuildResult:
    plan: LayerPlan
    output: Path | None
    warnings: list[str] = field(default_factory=list)
    manifest: Manifest | None = None
    bytes_written: int = 0


def build_model(
    recipe: str | Path | dict | Recipe,
    output: str | Path | None,
    force: bool = False,
    shard_size: str | int = "5GB",
    dry_run: bool = False,
    show_progress: bool = False,
    beside_copy: tuple = (),
    verify_hashes: bool | None = None,
) -> BuildResult:
    """Resolve `recipe` and, unless `dry_run`, write the model into `output`.
    `beside_copy`: functions (of no arguments) the caller needs run later, run by the
    helper threads while the kernel copies (the CLI imports its printer there).
    `verify_hashes`: hash every source file's bytes, even those the hub cache names by
    their sha256 (default: DUS_VERIFY_HASHES, dus.hashing)."""
    try:
        max_shard = parse_size(shard_size)
    except ValueError as error:
        raise DusError(f"--shard-size: {error}") from None
    parsed = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    resolved = resolve(parsed)
    plan, sources = resolved.plan, resolved.sources
    # tokenizer.json (megabytes of JSON) is parsed beside the copy, which it stops if damaged
    later = () if dry_run else ("tokenizer.json",)
    resolved.warnings.extend(check_tokenizer_files(sources[plan.tokenizer_from].path, skip=later))
    sources_read = [source.path for source in sources.values()]
    if output is not None:  # a dry run with -o refuses the -o the build would refuse
        check_build_output(Path(output), force, sources_read)
    if dry_run:
        return BuildResult(plan=plan, output=None, warnings=resolved.warnings)
    if output is None:
        raise DusError("no output directory given; add -o DIR")
    output = Path(output)
    with atomic_directory(output, replace_only_dus_outputs(force, sources_read)) as temporary:
        manifest, written = _write(parsed, plan, sources, resolved.warnings, temporary, max_shard, show_progress,
                                   beside_copy, verify_hashes)
    return BuildResult(plan=plan, output=output, warnings=resolved.warnings, manifest=manifest, bytes_written=written)


def check_build_output(output: Path, force: bool, sources_read: list) -> None:
    """What the build refuses of -o, checked before any work (and by --dry-run): a path
    that is, is inside or holds a source, and an existing path it may not replace."""
    from dus.checkpoint import check_outside_models

    if output.exists() or output.is_symlink():
        why_not = replace_only_dus_outputs(force, sources_read)(output)
        if why_not:
            raise DusError(why_not)
    check_outside_models(output, sources_read, "-o")


def _write(recipe, plan, sources, warnings, directory: Path, max_shard: int, show_progress: bool, beside_copy=(),
           verify_hashes: bool | None = None):
    tensors = layout(plan, sources)
    total = sum(tensor.nbytes for tensor in tensors)
    used = _files_read(plan, sources)
    with ThreadPoolExecutor(max_workers=2) as helpers:
        # While the kernel copies: the config is rewritten, tokenizer.json is parsed (a
        # damaged one stops the build before anything is at the output) and copied with
        # the other tokenizer files, the sources' records for the manifest are gathered
        # (licenses: model cards' YAML), and the sources are hashed.
        config_future = helpers.submit(output_config, plan, sources)
        tokenizer_json = sources[plan.tokenizer_from].path / "tokenizer.json"
        checks = [config_future]
        if tokenizer_json.is_file():
            checks.append(helpers.submit(_check_tokenizer_json, tokenizer_json))
        checks.append(helpers.submit(_copy_tokenizer, sources[plan.tokenizer_from].path, directory))
        records_future = helpers.submit(_source_records, sources, directory)
        checks.append(records_future)
        checks += [helpers.submit(function) for function in beside_copy]
        hashes = _Hashes(used, verify_hashes)
        digests = hashes.futures
        try:
            with _progress_bar(total, show_progress) as advance, _switch_interval(SWITCH_INTERVAL):
                output_files = write_shards(tensors, directory, max_shard, progress=_stop_on_error(checks, advance))
            hashes.join_in()
            for check in checks[1:]:
                check.result()
            config, config_notes = config_future.result()
        except BaseException:
            hashes.stop()  # do not hash the rest of the sources for a failed build
            raise
        plan.notes.extend(config_notes)
        write_config(config, directory, validate=has_layer_fields(config, sources[plan.config_from]))
        source_records = records_future.result()
        for name, source in sources.items():
            mine = {str(path.relative_to(source.path)): digests[path].result() for path in used if path.parent == source.path}
            source_records[name]["files"] = {relative: digest for relative, (digest, _) in mine.items()}
            # which digests are the hub cache's blob names (not read) and which dus computed
            source_records[name]["sha256_from"] = {relative: origin for relative, (_, origin) in mine.items()}
    from dus.manifest import build_manifest, model_card, write_manifest

    manifest = build_manifest(
        recipe.raw, str(recipe.source_file) if recipe.source_file else None, plan, config, source_records,
        output_files, warnings,
    )
    write_manifest(manifest, directory)
    (directory / "README.md").write_text(model_card(manifest, plan))
    return manifest, total


class _Hashes:
    """sha256 of the files a build read (each as (digest, origin), dus.hashing.file_digest), largest first: one helper thread hashes while the
    kernel copies (the copy has the other core to itself), and the build's own thread
    takes the files still waiting once its copy is done. Two hashing threads beside the
    copy left three busy threads on two cores, each slowed by the others."""

    def __init__(self, paths: list[Path], verify: bool | None = None):
        def size(path: Path) -> int:
            try:
                return path.stat().st_size
            except OSError:
                return 0  # hashing it reports the error

        self._waiting = sorted(paths, key=size, reverse=True)
        self._verify = verify
        self._lock = threading.Lock()
        self.futures: dict[Path, Future] = {path: Future() for path in paths}
        self._thread = threading.Thread(target=self._hash_waiting, name="dus-sha256", daemon=True)
        self._thread.start()

    def _hash_waiting(self) -> None:
        while True:
            with self._lock:
                if not self._waiting:
                    return
                path = self._waiting.pop(0)
            future = self.futures[path]
            future.set_running_or_notify_cancel()
            try:
                future.set_result(file_digest(path, self._verify))
            except BaseException as error:  # noqa: BLE001 - handed to whoever asks for this digest
                future.set_exception(error)

    def join_in(self) -> None:
        """Hash what is still waiting in this thread too, then wait for the helper."""
        self._hash_waiting()
        self._thread.join()

    def stop(self) -> None:
        """Start no other file (the one being hashed is finished)."""
        with self._lock:
            for path in self._waiting:
                self.futures[path].cancel()
            self._waiting.clear()
        self._thread.join()


def _check_tokenizer_json(path: Path) -> None:
    """tokenizer.json parses as a JSON object (else the build stops), parsed once per
    version of the file: megabytes of JSON parsed in C hold the interpreter's lock for
    tens of milliseconds, stalling the copy thread beside it."""
    if checked_before(path, "tokenizer-json"):
        return
    check_tokenizer_file(path)
    remember_checked(path, "tokenizer-json")


def _source_records(sources: dict[str, SourceModel], directory: Path) -> dict[str, dict]:
    """What the manifest says of each source, but its files' sha256 (added after the copy)."""
    import dus.manifest  # noqa: F401  (imported here, beside the copy: it writes the manifest after it)

    return {
        name: {
            "path": str(source.path),
            # found again from the model's own place, wherever a later command runs
            "from_output": os.path.relpath(source.path.resolve(), directory.resolve()),
            "absolute": str(source.path.resolve()),
            "architecture": (source.config.get("architectures") or ["?"])[0],
            "model_type": source.model_type,
            "num_layers": source.num_layers,
            "license": read_license(source.path),
        }
        for name, source in sources.items()
    }


# The copy thread takes the GIL back after each kernel call (two per MiB spliced); while a
# helper runs Python code it would wait up to the interpreter's 5 ms switch interval each
# time, copying a MiB per 5 ms for as long as the helper has Python work.
SWITCH_INTERVAL = 0.0005


@contextmanager
def _switch_interval(seconds: float):
    import sys

    before = sys.getswitchinterval()
    sys.setswitchinterval(min(before, seconds))
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def _stop_on_error(futures, advance):
    """A progress callback that aborts the copy as soon as one of `futures` has failed, so
    a bad config or tokenizer is reported without waiting for the whole model to be written."""

    def callback(nbytes: int) -> None:
        for future in futures:
            if future.done() and future.exception() is not None:
                raise future.exception()
        if advance is not None:
            advance(nbytes)

    return callback


@contextmanager
def _progress_bar(total: int, show: bool):
    """tqdm's bar when shown (imported only then), else nothing."""
    if not show:
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, desc="writing", leave=False) as bar:
        yield bar.update


def _files_read(plan: LayerPlan, sources: dict[str, SourceModel]) -> list[Path]:
    files: list[Path] = []
    for source in sources.values():
        files += [source.path / "config.json", *source.weight_files]
        index = source.path / "model.safetensors.index.json"
        if index.is_file():
            files.append(index)
    tokenizer_dir = sources[plan.tokenizer_from].path
    files += [tokenizer_dir / name for name in TOKENIZER_FILES if (tokenizer_dir / name).is_file()]
    return sorted(set(files))


def _copy_tokenizer(source: Path, directory: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, directory / name)

"""`dus export --type q4_k_m ...` through llama.cpp's own quantizer, `--imatrix`, and
SentencePiece-style vocabularies, each checked by llama.cpp itself (llama-cpp-python).

The quantized model is a random Llama with hidden 256 and intermediate 512: K-quants
work in blocks of 256 values per row (QK_K), and llama.cpp falls back to another type for
rows that are not a multiple of it, so the 32-wide models of test_export.py would not
exercise them. A random model predicts almost uniformly (perplexity near the vocabulary
size whatever the weights), so its perplexity barely moves with quantization and is only
checked loosely; what is measured tightly is the error of the logits against the f16
file, relative to the spread of the f16 logits, bounded per type at about 1.5x what
llama.cpp 0.3.36's quantizer gives here (it grows as bits fall: 0.04 at q6_k, 0.15 at
q4_k_m, 0.24 at q3_k_m, 0.39 at q2_k); its perplexity moved by up to 1.4% either way at
4 bits, noise on a model that predicts nothing: the bound is 1% at 5-6 bits, 3% at 4, 4-5% below.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np
import pytest

from dus.errors import DusError
from dus.export import llamacpp
from dus.export.quantize import LLAMA_TYPES
from dus.tiny import make_tiny_model
from spm_tokenizer import make_sentencepiece_model

REPO = Path(__file__).resolve().parent.parent
CALIBRATION = REPO / "data" / "heldout" / "bible.txt"
SCORED = REPO / "data" / "heldout" / "fiction.txt"
SAMPLE = ("<|im_start|>user\nThe quick brown fox, 12 dogs and 3 cats: what's left?<|im_end|>\n"
          "<|im_start|>assistant\nÜber 40 Tiere sind übrig — naïve café.")
needs_llama_cpp = pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python is not installed (pip install 'dus[llama]')")

# type -> (the type of the layers' matrices in the file, bound on the relative logit error, on |ppl ratio - 1|)
EXPECTED = {
    "q6_k": ("Q6_K", 0.08, 0.01), "q5_k_m": ("Q5_K", 0.15, 0.01), "q5_k_s": ("Q5_K", 0.15, 0.01),
    "q5_1": ("Q5_1", 0.15, 0.01), "q5_0": ("Q5_0", 0.15, 0.01), "q4_k_m": ("Q4_K", 0.25, 0.03),
    "q4_k_s": ("Q4_K", 0.25, 0.03), "q4_1": ("Q4_1", 0.3, 0.03), "q4_0": ("Q4_0", 0.3, 0.03),
    "iq4_xs": ("IQ4_XS", 0.25, 0.03), "iq4_nl": ("IQ4_NL", 0.25, 0.03), "q3_k_l": ("Q3_K", 0.32, 0.04),
    "q3_k_m": ("Q3_K", 0.36, 0.04), "q3_k_s": ("Q3_K", 0.5, 0.04), "q2_k": ("Q2_K", 0.6, 0.05),
}


def export(model_dir: Path, out: Path, type_name: str, **kwargs):
    from dus.export.run import export_gguf

    return export_gguf(model_dir, out, type_name, progress=False, **kwargs)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """The K-quant-sized model, its f16 GGUF, transformers' tokens of a text and llama.cpp's f16 logits."""
    from transformers import AutoTokenizer

    from dus.measure.text import read_text

    root = tmp_path_factory.mktemp("wide")
    model = make_tiny_model(root / "model", "llama", num_layers=2, hidden_size=256, intermediate_size=512,
                            num_heads=4, num_kv_heads=2)
    ids = AutoTokenizer.from_pretrained(str(model))(read_text(SCORED)[:2000])["input_ids"][:384]
    f16 = export(model, root / "f16.gguf", "f16").path if llamacpp.available() else None
    reference = _logits(f16, ids) if f16 else None
    return model, ids, reference


def _logits(path: Path, ids: list[int]) -> np.ndarray:
    with llamacpp.open_gguf(path, n_ctx=512, threads=1) as llm:
        return llamacpp.logits(llm, ids)


def _relative_error(got: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(got - reference) / np.linalg.norm(reference - reference.mean(-1, keepdims=True)))


def _nll(logits: np.ndarray, ids: list[int]) -> float:
    shifted = logits[:-1] - logits[:-1].max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return float(-log_probs[np.arange(len(ids) - 1), ids[1:]].mean())


def test_every_offered_type_has_a_stated_tolerance():
    assert set(EXPECTED) == set(LLAMA_TYPES)


@needs_llama_cpp
@pytest.mark.parametrize("type_name", list(LLAMA_TYPES))
def test_every_type_round_trips_through_llama_cpp(wide, tmp_path, type_name):
    from gguf import GGUFReader

    model, ids, reference = wide
    layer_type, max_error, max_ppl = EXPECTED[type_name]
    result = export(model, tmp_path / f"m.{type_name}.gguf", type_name)
    out = result.path
    assert result.notes == []  # every row a multiple of 256: no fallback types
    kinds = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    assert kinds["blk.0.attn_q.weight"] == layer_type and kinds["blk.1.ffn_up.weight"] == layer_type
    assert kinds["blk.0.attn_norm.weight"] == "F32"
    with llamacpp.open_gguf(out, n_ctx=512, threads=1) as llm:
        assert llm.tokenize(SAMPLE.encode(), add_bos=False, special=True) == _hf_tokens(model, SAMPLE)
        got = llamacpp.logits(llm, ids)
    assert _relative_error(got, reference) < max_error
    assert abs(np.exp(_nll(got, ids) - _nll(reference, ids)) - 1) < max_ppl
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporaries left


def _hf_tokens(model_dir: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))(text)["input_ids"]


@needs_llama_cpp
def test_imatrix_is_llama_cpps_definition_saved_in_its_format_and_narrows_the_error(wide, tmp_path, run_cli):
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dus.export import imatrix

    model, ids, reference = wide
    out = tmp_path / "m.q3_k_m.gguf"
    result = run_cli("export", model, "-o", out, "--type", "q3_k_m", "--imatrix", CALIBRATION, "--imatrix-tokens", "1024")
    assert result.code == 0, result
    saved = imatrix.read(tmp_path / "m.q3_k_m.imatrix.gguf")
    fields = {n: f.contents() for n, f in GGUFReader(tmp_path / "m.q3_k_m.imatrix.gguf").fields.items()}
    assert fields["general.type"] == "imatrix" and fields["imatrix.chunk_size"] == 512
    assert saved.chunk_count == 2 and saved.datasets == [str(CALIBRATION)]
    assert sorted(saved.sums) == sorted(f"blk.{b}.{n}.weight" for b in range(2) for n in
                                        ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"))
    assert all(list(counts) == [1024] for counts in saved.counts.values())
    # The definition, computed independently: q/k/v of layer 0 see input_layernorm(embeddings).
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    windows = imatrix.calibration_windows(tokenizer, CALIBRATION.read_text(), 1024, 512)
    hf = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    with torch.no_grad():
        x = hf.model.layers[0].input_layernorm(hf.model.embed_tokens(torch.tensor(windows)))
    expected = x.double().square().reshape(-1, 256).sum(0).numpy()
    for name in ("attn_q", "attn_k", "attn_v"):
        np.testing.assert_allclose(saved.sums[f"blk.0.{name}.weight"][0], expected, rtol=1e-4)
    means = saved.means()
    np.testing.assert_allclose(means["blk.0.attn_q.weight"], expected / 1024, rtol=1e-4)
    quantized = {n: f.contents() for n, f in GGUFReader(out).fields.items()}
    assert quantized["quantize.imatrix.entries_count"] == 14 and quantized["quantize.imatrix.file"] == "m.q3_k_m.imatrix.gguf"
    # On this model and text, the importance matrix lowers the 3-bit logit error (0.24 -> 0.18 when measured).
    plain = export(model, tmp_path / "plain.gguf", "q3_k_m").path
    assert _relative_error(_logits(out, ids), reference) < _relative_error(_logits(plain, ids), reference)


def test_imatrix_file_round_trips_with_experts(tmp_path):
    from dus.export import imatrix

    matrix = imatrix.Imatrix(datasets=["text.txt"], chunk_count=3, chunk_size=512)
    matrix.sums["blk.0.ffn_down_exps.weight"] = np.arange(12, dtype=np.float32).reshape(3, 4)
    matrix.counts["blk.0.ffn_down_exps.weight"] = np.asarray([2, 0, 4], dtype=np.float32)
    imatrix.write(matrix, tmp_path / "x.imatrix.gguf")
    back = imatrix.read(tmp_path / "x.imatrix.gguf")
    np.testing.assert_array_equal(back.sums["blk.0.ffn_down_exps.weight"], matrix.sums["blk.0.ffn_down_exps.weight"])
    assert (back.datasets, back.chunk_count, back.chunk_size) == (["text.txt"], 3, 512)
    mean = back.means()["blk.0.ffn_down_exps.weight"]
    np.testing.assert_allclose(mean, [0, 0.5, 1, 1.5, 1, 1, 1, 1, 2, 2.25, 2.5, 2.75])  # an unused expert: ones


def test_without_llama_cpp_python_the_quantized_types_fail_in_one_line(wide, tmp_path, run_cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp -> ImportError
    result = run_cli("export", wide[0], "-o", tmp_path / "m.gguf", "--type", "q4_k_m")
    assert result.code == 2 and "pip install 'dus[llama]'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert list(tmp_path.iterdir()) == []
    assert run_cli("export", wide[0], "-o", tmp_path / "m.gguf", "--type", "q8_0").code == 0  # dus's own types work


@needs_llama_cpp
def test_an_incompatible_binding_is_refused_in_one_line(wide, tmp_path, monkeypatch):
    import llama_cpp

    class OldParams(ctypes.Structure):  # 0.3.0-0.3.19: an opaque imatrix pointer
        _fields_ = [("nthread", ctypes.c_int32), ("imatrix", ctypes.c_void_p)]

    monkeypatch.setattr(llama_cpp, "llama_model_quantize_params", OldParams)
    with pytest.raises(DusError, match="imatrix field is not a pointer to llama_model_imatrix_data") as error:
        export(wide[0], tmp_path / "m.gguf", "q4_k_m")
    assert "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


@needs_llama_cpp
@pytest.mark.parametrize("case, fragment", [
    ("unknown type", "through llama.cpp's quantizer"),
    ("imatrix on f16", "--imatrix applies to the types llama.cpp quantizes"),
    ("existing output", "already exists; pass --force"),
    ("existing imatrix", "m.imatrix.gguf: already exists; pass --force"),
    ("imatrix of the user's, --force", "m.imatrix.gguf was not written by dus export"),
    ("missing text", "no such calibration text"),
])
def test_refusals_are_one_line_and_leave_files_as_they_were(wide, tmp_path, run_cli, case, fragment):
    out, args = tmp_path / "m.gguf", ["--type", "q4_k_m"]
    if case == "unknown type":
        args = ["--type", "q9_k"]
    elif case == "imatrix on f16":
        args = ["--type", "f16", "--imatrix", "default"]
    elif case == "existing output":
        out.write_text("precious")
    elif case == "existing imatrix":
        (tmp_path / "m.imatrix.gguf").write_text("precious")
        args += ["--imatrix", "default"]
    elif case == "imatrix of the user's, --force":
        (tmp_path / "m.imatrix.gguf").write_text("precious")
        args += ["--imatrix", "default", "--force"]
    elif case == "missing text":
        args += ["--imatrix", str(tmp_path / "nowhere.txt")]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    result = run_cli("export", wide[0], "-o", out, *args)
    assert result.code == 2 and fragment in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@needs_llama_cpp
def test_force_replaces_a_previous_quantized_export_and_its_imatrix(wide, tmp_path):
    """llama.cpp's quantizer keeps the metadata, so a quantized export says dus wrote it;
    so does the importance matrix saved beside it."""
    from dus.export.run import written_by_dus_export

    out = tmp_path / "m.gguf"
    export(wide[0], out, "q4_k_m", imatrix_text=CALIBRATION, imatrix_tokens=512)
    assert written_by_dus_export(out) and written_by_dus_export(tmp_path / "m.imatrix.gguf")
    export(wide[0], out, "q4_0", force=True, imatrix_text=CALIBRATION, imatrix_tokens=512)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "m.imatrix.gguf"]


@needs_llama_cpp
def test_a_failing_quantizer_leaves_nothing(wide, tmp_path, monkeypatch):
    from dus.export import quantize

    def broken(source, output, type_name, imatrix=None, threads=None):
        Path(output).write_bytes(b"GGUF half")
        raise DusError("llama.cpp's quantizer failed")

    monkeypatch.setattr(quantize, "quantize", broken)
    with pytest.raises(DusError):
        export(wide[0], tmp_path / "m.gguf", "q4_k_m", imatrix_text=CALIBRATION, imatrix_tokens=512)
    assert list(tmp_path.iterdir()) == []


@needs_llama_cpp
def test_quantizer_errors_and_fallbacks_are_reported_in_one_line(tmp_path):
    from dus.export.quantize import quantize

    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(DusError, match="llama.cpp's quantizer failed on broken.gguf -> q4_k_m: ") as error:
        quantize(tmp_path / "broken.gguf", tmp_path / "out.gguf", "q4_k_m", threads=1)
    assert "\n" not in str(error.value)
    narrow = make_tiny_model(tmp_path / "narrow", "llama", num_layers=2)  # hidden 32: no K-quant block fits
    result = export(narrow, tmp_path / "narrow.gguf", "q4_k_m")
    assert result.notes and "of 21 tensors with another type" in result.notes[0]


@needs_llama_cpp
def test_quantized_export_is_deterministic(wide, tmp_path):
    a = export(wide[0], tmp_path / "a.gguf", "q4_k_m", imatrix_text=CALIBRATION, imatrix_tokens=512).path
    b = export(wide[0], tmp_path / "b.gguf", "q4_k_m", imatrix_text=CALIBRATION, imatrix_tokens=512).path
    assert a.read_bytes().replace(b"a.imatrix.gguf", b"b.imatrix.gguf") == b.read_bytes()
    assert (tmp_path / "a.imatrix.gguf").read_bytes() == (tmp_path / "b.imatrix.gguf").read_bytes()


# SentencePiece-style vocabularies: llama.cpp's `llama` tokenizer model.

@needs_llama_cpp
@pytest.mark.parametrize("arch, style", [("llama", "llama"), ("mistral", "llama"), ("gemma3_text", "gemma")])
def test_sentencepiece_vocabulary_tokenizes_and_computes_like_transformers(tmp_path, arch, style):
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    overrides = {"sliding_window": None} if arch == "mistral" else {}
    model = make_sentencepiece_model(tmp_path / "model", arch, style, **overrides)
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    out = export(model, tmp_path / "m.gguf", "f32").path
    fields = {n: f.contents() for n, f in GGUFReader(out).fields.items()}
    assert fields["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in fields
    assert fields["tokenizer.ggml.add_space_prefix"] == (style == "llama")
    types = fields["tokenizer.ggml.token_type"]
    assert types[tokenizer.convert_tokens_to_ids("<0x0A>")] == 6 and types[0] == 2  # byte, unknown
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What's 12 + 3? Ünïcödé ✓ 漢字"},
                                          {"role": "assistant", "content": "fifteen dogs"}], tokenize=False)
    for text in (SAMPLE, chat, "  two  spaces\tand a tab\n\nnew lines"):
        ids = tokenizer(text)["input_ids"]
        assert any(tokenizer.convert_ids_to_tokens(i).startswith("<0x") for i in ids)  # byte fallback is exercised
        with llamacpp.open_gguf(out, n_ctx=256, threads=1) as llm:
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids, text
            got = llamacpp.logits(llm, ids)
        with torch.no_grad():
            expected = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)(torch.tensor([ids])).logits[0].numpy()
        assert np.abs(got - expected).max() < 2e-3 * np.abs(expected).max()


@needs_llama_cpp
def test_sentencepiece_space_only_at_the_start_is_written_with_a_warning(tmp_path, run_cli):
    """transformers 5's Llama tokenizer: "▁" at the start of the text only. llama.cpp also puts
    one after each special token; everywhere else the two agree."""
    model = make_sentencepiece_model(tmp_path / "model", "llama", "first")
    result = export(model, tmp_path / "m.gguf", "f32")
    assert any("after every special token" in w for w in result.warnings)
    tokenizer_ids = _hf_tokens(model, SAMPLE.replace("|>", "|> "))  # the "▁" llama.cpp adds, spelled out
    with llamacpp.open_gguf(result.path, n_ctx=256, threads=1) as llm:
        assert llm.tokenize(SAMPLE.encode(), add_bos=True, special=True) == tokenizer_ids
        plain = "Über 40 Tiere sind übrig — naïve café, 12 dogs."
        assert llm.tokenize(plain.encode(), add_bos=True, special=True) == _hf_tokens(model, plain)


@needs_llama_cpp
def test_a_real_sentencepiece_model_converted_by_transformers(tmp_path):
    """A SentencePiece BPE model trained here (byte fallback, split digits, as Llama 2's), converted
    to tokenizer.json by transformers' own LlamaTokenizer: llama.cpp, transformers and
    SentencePiece itself split text the same way."""
    spm = pytest.importorskip("sentencepiece")
    import json

    from transformers import AutoTokenizer

    from dus.tiny import CHAT_TEMPLATE

    source = tmp_path / "spm"
    source.mkdir()
    (tmp_path / "corpus.txt").write_text(SCORED.read_text(encoding="utf-8")[:100_000], encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(source / "tokenizer"),
                                   vocab_size=600, model_type="bpe", byte_fallback=True, split_digits=True,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    (source / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "legacy": True, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    model = make_tiny_model(tmp_path / "model", "llama", vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2,
                            pad_token_id=0)
    for stale in ("tokenizer.json", "tokenizer_config.json"):
        (model / stale).unlink(missing_ok=True)
    tokenizer.save_pretrained(model)
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    result = export(model, tmp_path / "m.gguf", "f16")
    out = result.path
    assert any("after every special token" in w for w in result.warnings)
    processor = spm.SentencePieceProcessor(model_file=str(source / "tokenizer.model"))
    plain = "Alice was 7 years, 12 days old: “Curiouser!” — naïve café, 漢字 and\ttabs\n\nnew lines."
    assert tokenizer(plain, add_special_tokens=False)["input_ids"] == processor.encode(plain)
    with llamacpp.open_gguf(out, n_ctx=256, threads=1) as llm:
        ids = tokenizer(plain)["input_ids"]
        assert any(tokenizer.convert_ids_to_tokens(i).startswith("<0x") for i in ids)
        assert llm.tokenize(plain.encode(), add_bos=True, special=True) == ids
        # transformers 5 loads it with a "▁" at the start only (see the warning test above)
        expected = tokenizer(SAMPLE.replace("|>", "|> "))["input_ids"]
        assert llm.tokenize(SAMPLE.encode(), add_bos=True, special=True) == expected

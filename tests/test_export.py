"""`dus export`: tiny models of every family -> GGUF, read back by gguf's reader, run by
llama.cpp (llama-cpp-python, where it is installed) against transformers, and imported back.

Models here are saved under neutral names: llama.cpp gives any model whose *name* contains
"phi3" Phi-3's special-token handling, which the tiny byte-level tokenizer cannot satisfy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import tensors
from dus.errors import DusError
from dus.export import llamacpp
from dus.tiny import ARCHITECTURES, make_tiny_model

needs_llama_cpp = pytest.mark.skipif(
    not llamacpp.available(),
    reason="llama-cpp-python is not installed (the test extra builds it from source: "
           "CMAKE_ARGS=-DGGML_NATIVE=OFF pip install llama-cpp-python)",
)
# Without a sliding window in transformers: llama.cpp runs these families with full
# attention only, so a window would make outputs differ past its length (see test_sliding_window_warning).
FULL_ATTENTION = {"mistral": {"sliding_window": None}, "qwen2": {"use_sliding_window": False}}
SAMPLE = ("<|im_start|>user\nThe quick brown fox, 12 dogs and 3 cats: what's left?<|im_end|>\n"
          "<|im_start|>assistant\nÜber 40 Tiere sind übrig — naïve café.")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-models")
    made: dict[tuple, Path] = {}

    def make(arch: str, **kwargs) -> Path:
        key = (arch, tuple(sorted(kwargs.items())))
        if key not in made:
            overrides = {**FULL_ATTENTION.get(arch, {}), **kwargs}
            made[key] = make_tiny_model(root / f"model-{len(made)}", arch, **overrides)
        return made[key]

    return make


def export(model_dir: Path, out: Path, type_name: str = "f32", **kwargs):
    from dus.export.run import export_gguf

    return export_gguf(model_dir, out, type_name, progress=False, **kwargs)


def transformers_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def hf_tokens(model_dir: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))(text)["input_ids"]


def mean_nll(logits: np.ndarray, ids: list[int]) -> float:
    shifted = logits[:-1] - logits[:-1].max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return float(-log_probs[np.arange(len(ids) - 1), ids[1:]].mean())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_gguf_has_every_tensor_and_the_hyperparameters(models, tmp_path, arch):
    from gguf import GGUFReader

    from dus.export.families import FAMILIES

    model = models(arch)
    out = export(model, tmp_path / "m.gguf", "q8_0").path
    reader = GGUFReader(out)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    family = FAMILIES[arch]
    assert fields["general.architecture"] == family.arch_name
    assert fields[f"{family.arch_name}.block_count"] == 4
    assert fields[f"{family.arch_name}.embedding_length"] == 32
    assert len(fields["tokenizer.ggml.tokens"]) == 260
    assert "{% generation %}" not in fields["tokenizer.chat_template"]  # HF training markers stripped
    assert "<|im_start|>assistant" in fields["tokenizer.chat_template"]
    names = {t.name for t in reader.tensors}
    for layer in range(4):
        assert f"blk.{layer}.attn_norm.weight" in names
        assert f"blk.{layer}.ffn_down{'_exps' if arch == 'mixtral' else ''}.weight" in names
    assert ("output.weight" in names) == ("lm_head.weight" in tensors(model))
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_norm.weight"] == "F32"  # norms stay float32
    assert kinds["token_embd.weight"] == "Q8_0"  # rows of 32 values: one q8_0 block each
    if family.swa:  # the per-layer pattern of sliding layers, as transformers has it
        from transformers import AutoConfig

        expected = [kind == "sliding_attention" for kind in AutoConfig.from_pretrained(model).layer_types]
        assert fields[f"{family.arch_name}.attention.sliding_window_pattern"] == expected


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_q8_0_stores_exactly_the_q8_0_rounding_of_the_checkpoint(models, tmp_path, arch):
    """Every Q8_0 tensor is ggml's q8_0 of the checkpoint's own weight (q/k rows in llama.cpp's
    order, Gemma's tied embedding included): what q8_0 costs is its rounding, nothing the
    conversion adds (benchmarks/bench_q8_agreement.py, docs/export.md)."""
    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dus.export.families import FAMILIES
    from dus.export.tensors import permute_rotary

    model = models(arch)
    config, family = AutoConfig.from_pretrained(model), FAMILIES[arch]
    names = gguf.get_tensor_name_map(family.arch, config.num_hidden_layers)
    stored = {t.name: t for t in gguf.GGUFReader(export(model, tmp_path / "m.gguf", "q8_0").path).tensors}
    weights = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).state_dict()
    checked = 0
    for name, weight in weights.items():
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target not in stored or stored[target].tensor_type != gguf.GGMLQuantizationType.Q8_0:
            continue
        expected = weight.numpy()
        if family.permute_qk and ".q_proj." in name:
            expected = permute_rotary(expected, config.num_attention_heads)
        if family.permute_qk and ".k_proj." in name:
            expected = permute_rotary(expected, config.num_key_value_heads)
        quantized = gguf.quants.quantize(np.ascontiguousarray(expected), gguf.GGMLQuantizationType.Q8_0)
        assert np.array_equal(np.asarray(stored[target].data).reshape(quantized.shape), quantized), name
        checked += 1
    assert checked == 2 + 7 * 4 - (arch == "gemma3_text")  # embeddings, head (tied in Gemma), 7 matrices a layer


@needs_llama_cpp
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_llama_cpp_tokenizes_and_computes_like_transformers(models, tmp_path, arch):
    model = models(arch)
    ids = hf_tokens(model, SAMPLE)
    expected = transformers_logits(model, ids)
    for type_name in ("f32", "f16", "bf16", "q8_0"):
        out = export(model, tmp_path / f"m-{type_name}.gguf", type_name).path
        with llamacpp.open_gguf(out, n_ctx=128, threads=1) as llm:
            assert llamacpp.tokenize(llm, SAMPLE) == ids
            got = llamacpp.logits(llm, ids)
        if type_name == "f32":
            assert np.abs(got - expected).max() < 2e-3 * np.abs(expected).max(), type_name
        else:
            assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.9, type_name
            assert abs(mean_nll(got, ids) / mean_nll(expected, ids) - 1) < 0.03, type_name


@needs_llama_cpp
@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_a_depth_up_scaled_build_runs_in_llama_cpp(models, tmp_path, run_cli, arch):
    """Any depth: a SOLAR build (4 -> 6 layers, per-layer sliding pattern kept) exported."""
    from gguf import GGUFReader

    recipe = tmp_path / "solar.yaml"
    recipe.write_text(f"solar:\n  model: {models(arch)}\n  trim: 1\n")
    assert run_cli("build", recipe, "-o", tmp_path / "solar").code == 0
    result = run_cli("export", tmp_path / "solar", "-o", tmp_path / "solar.gguf", "--type", "f32")
    assert result.code == 0, result
    fields = {n: f.contents() for n, f in GGUFReader(tmp_path / "solar.gguf").fields.items()}
    assert json.loads(fields["dus.manifest"])["plan"]["layers"][3]["layer"] == 1  # provenance travels
    source = models(arch)
    assert fields["dus.layer_map"] == [f"0-2 <- {source} 0-2", f"3-5 <- {source} 1-3"]
    assert fields["general.license"] == "apache-2.0"
    ids = hf_tokens(tmp_path / "solar", SAMPLE)
    expected = transformers_logits(tmp_path / "solar", ids)
    with llamacpp.open_gguf(tmp_path / "solar.gguf", n_ctx=128, threads=1) as llm:
        got = llamacpp.logits(llm, ids)
    assert np.abs(got - expected).max() < 2e-3 * np.abs(expected).max()


@needs_llama_cpp
def test_tied_head_runs_in_llama_cpp(models, tmp_path):
    model = models("llama", tie_word_embeddings=True)
    assert "lm_head.weight" not in tensors(model)
    out = export(model, tmp_path / "tied.gguf").path
    ids = hf_tokens(model, SAMPLE)
    with llamacpp.open_gguf(out, n_ctx=128, threads=1) as llm:
        got = llamacpp.logits(llm, ids)
    expected = transformers_logits(model, ids)
    assert np.abs(got - expected).max() < 2e-3 * np.abs(expected).max()


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3", "gemma3_text"])
def test_f32_export_then_import_gives_the_weights_back(models, tmp_path, run_cli, arch):
    import torch
    from transformers import AutoModelForCausalLM

    model = models(arch)
    export(model, tmp_path / "m.gguf")
    assert run_cli("import", tmp_path / "m.gguf", "-o", tmp_path / "back").code == 0
    before = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).state_dict()
    after = AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"), dtype=torch.float32).state_dict()
    assert before.keys() == after.keys()
    for name in before:
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            # Stored as 1 + w (llama.cpp's form); w -> 1 + w -> w rounds once in float32.
            assert torch.allclose(before[name], after[name], atol=1.2e-7, rtol=0), name
        else:
            assert torch.equal(before[name], after[name]), name


def test_import_refuses_an_exported_mixture_of_experts(models, tmp_path, run_cli):
    """transformers reads a llama-architecture GGUF as a dense Llama: experts would vanish."""
    export(models("mixtral"), tmp_path / "m.gguf")
    result = run_cli("import", tmp_path / "m.gguf", "-o", tmp_path / "back")
    assert result.code == 2 and "mixture-of-experts" in result.stderr
    assert not (tmp_path / "back").exists()


def test_sliding_window_warning_where_llama_cpp_has_none(tmp_path):
    model = make_tiny_model(tmp_path / "windowed", "mistral")  # window 8 on every layer
    result = export(model, tmp_path / "m.gguf")
    assert any("full attention" in w and "first 8 tokens" in w for w in result.warnings)


def test_ollama_modelfile(models, tmp_path):
    result = export(models("qwen3"), tmp_path / "m.gguf", "q8_0", ollama=True)
    text = result.modelfile.read_text()
    assert text.splitlines()[0] == "FROM ./m.gguf"
    assert 'PARAMETER stop "<|im_end|>"' in text


def test_refuses_to_overwrite_without_force(models, tmp_path, run_cli):
    out = tmp_path / "m.gguf"
    assert run_cli("export", models("llama"), "-o", out).code == 0
    previous = out.read_bytes()
    result = run_cli("export", models("llama"), "-o", out, "--type", "q8_0")
    assert result.code == 2 and "--force" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert out.read_bytes() == previous
    assert run_cli("export", models("llama"), "-o", out, "--force", "--type", "q8_0").code == 0
    assert out.read_bytes()[:4] == b"GGUF" and out.read_bytes() != previous
    # a file of the user's is never replaced, --force or not: tests/test_export_overwrite.py


@pytest.mark.parametrize("case, fragment", [
    ("type", "writes f32, f16, bf16, q8_0 itself and q6_k"),
    ("architecture", "supported: gemma2, gemma3_text, llama, mistral, mixtral, phi3, qwen2, qwen3"),
    ("directory", "is a directory"),
    ("missing", "not a directory"),
])
def test_errors_are_one_line_and_leave_nothing(models, tmp_path, run_cli, case, fragment):
    model, out, extra = models("llama"), tmp_path / "m.gguf", []
    if case == "type":
        extra = ["--type", "q4_k"]  # llama-quantize says Q4_K_M; dus asks for the full name
    elif case == "architecture":
        import shutil

        model = Path(shutil.copytree(model, tmp_path / "other"))
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "model_type": "starcoder2"}))
    elif case == "directory":
        out = tmp_path
    elif case == "missing":
        model = tmp_path / "nowhere"
    result = run_cli("export", model, "-o", out, *extra)
    assert result.code == 2, result
    assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*partial"))


def test_a_failure_midway_leaves_no_file(models, tmp_path, monkeypatch):
    from dus.export import tensors as planned_tensors

    def broken(self):
        if self.name.startswith("blk.2."):
            raise OSError(28, "No space left on device")
        return original(self)

    original = planned_tensors.PlannedTensor.data
    monkeypatch.setattr(planned_tensors.PlannedTensor, "data", broken)
    with pytest.raises(DusError, match=f"{tmp_path / 'm.gguf'}: no space left on its disk"):
        export(models("llama"), tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_export_is_deterministic(models, tmp_path):
    a = export(models("qwen2"), tmp_path / "a.gguf", "q8_0").path.read_bytes()
    b = export(models("qwen2"), tmp_path / "b.gguf", "q8_0").path.read_bytes()
    assert a == b


def test_two_exports_to_one_path_never_share_a_temporary(models, tmp_path, monkeypatch):
    """A second export to the same path, run while the first is midway (as another process
    would), neither corrupts the first nor is corrupted by it; a partial file of another
    process under the old shared name is left alone."""
    from dus.export import run

    clean = export(models("llama"), tmp_path / "clean.gguf", "q8_0").path.read_bytes()
    out = tmp_path / "m.gguf"
    others = [tmp_path / ".m.gguf.dus-partial", tmp_path / ".m.Modelfile.dus-partial"]
    for other in others:
        other.write_text("another process's partial file")
    original, nested = run._write_tensors, []

    def write_tensors(writer, planned, progress):
        if not nested:
            nested.append(True)
            export(models("llama"), out, "q8_0", force=True, ollama=True)
        return original(writer, planned, progress)

    monkeypatch.setattr(run, "_write_tensors", write_tensors)
    export(models("llama"), out, "q8_0", force=True, ollama=True)
    assert nested and out.read_bytes() == clean
    assert all(other.read_text() == "another process's partial file" for other in others)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["clean.gguf", "m.gguf", "m.Modelfile", *(other.name for other in others)])

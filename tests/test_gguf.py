"""GGUF export on the tiny model with the real libraries: files written by the gguf package and read back by its
GGUFReader and by transformers' GGUF loader, the GGUF check in the release order, the Ollama Modelfile against
the training template, the Hub push with the GGUF, and each recipe family's layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from llmtune import release
from llmtune.artifacts import PreparedData
from llmtune.config import ExportConfig
from llmtune.release import gguf, gguf_check, gguf_vocab, ollama
from llmtune.release.weights import ExportError
from tests.test_export import FAKE_TOKEN, hub_reachable, random_adapter, release_inputs

__all__ = ["hub_reachable"]  # a fixture, used by name

TYPES = ["q8_0", "f16", "q4_0"]
CFG = ExportConfig(formats=["merged_16bit", "gguf"], gguf_types=TYPES, merge_check_prompts=4)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, quantized_dir: Path, prepared_dir: Path) -> dict:
    root = tmp_path_factory.mktemp("gguf")
    return {
        "root": root,
        "adapter": random_adapter(quantized_dir, root / "a1", seed=1),
        "tokenizer": AutoTokenizer.from_pretrained(prepared_dir / "tokenizer"),
        "prompts": [p["prompt"] for p in PreparedData(str(prepared_dir)).eval_prompts()],
    }


@pytest.fixture(scope="module")
def exported(work: dict, tiny_model_dir: Path, quantized_dir: Path, prepared_dir: Path) -> dict:
    cfg = CFG.model_copy(update={"output_dir": str(work["root"] / "local")})
    inputs = release_inputs(tiny_model_dir, quantized_dir, prepared_dir, work["adapter"], cfg)
    seen: list[dict] = []
    report = release.release(inputs, release.Destinations(run_name="run-1"), work["root"] / "out", seen.append)
    return {"report": report, "seen": seen, "folder": report.folders["gguf"]}


def test_gguf_check_passes_per_type_and_reaches_the_caller_before_anything_is_written(exported: dict) -> None:
    report, seen = exported["report"], exported["seen"]
    assert seen == [report.merge_check, report.gguf_check], "merge check, then GGUF check, both before writing"
    check = report.gguf_check
    assert check["gguf_check_passed"], check["gguf_check_failures"]
    for kind in TYPES:
        assert check[f"gguf_{kind}_max_logit_gap"] <= CFG.gguf_check_atol[kind]
        assert check[f"gguf_{kind}_greedy_mismatches"] == 0
        assert check[f"gguf_{kind}_tokenizer_matches"] and check[f"gguf_{kind}_chat_template_matches"]
    # the merged model is bf16, so the f16 file holds the same numbers; quantized files round, 4 bits more
    assert check["gguf_f16_max_logit_gap"] < 1e-3
    assert 0 < check["gguf_q8_0_max_logit_gap"] < check["gguf_q4_0_max_logit_gap"]
    assert check["gguf_q4_0_bytes"] < check["gguf_q8_0_bytes"] < check["gguf_f16_bytes"]
    card = (exported["folder"] / "README.md").read_text()
    assert "## GGUF check" in card and f"| q8_0 | {check['gguf_q8_0_max_logit_gap']} | 0.5 |" in card
    assert "ollama create my-model -f Modelfile" in card
    local = Path(report.local["gguf_path"])
    assert {p.name for p in local.iterdir()} >= {"model-q8_0.gguf", "Modelfile", "Modelfile.f16", "README.md"}


def test_gguf_file_carries_the_training_tokenizer_template_and_types(exported: dict, work: dict) -> None:
    tokenizer = work["tokenizer"]
    path = exported["folder"] / "model-q4_0.gguf"
    meta = gguf.read_metadata(path)
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "gpt-2"  # the demo's ByteLevel split is GPT-2's
    assert meta["tokenizer.ggml.tokens"] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert (
        meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    )
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in merges]
    types = dict(gguf.tensor_types(path))
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.ffn_down.weight"] == "Q4_0"
    assert types["token_embd.weight"] == "Q8_0" and "output.weight" not in types  # tied: llama.cpp reuses embd


def test_a_failed_gguf_check_refuses_to_export_or_publish(
    work: dict, tiny_model_dir: Path, quantized_dir: Path, prepared_dir: Path
) -> None:
    cfg = ExportConfig(
        formats=["merged_16bit", "gguf"],
        gguf_types=["q4_0"],
        gguf_check_atol={"q4_0": 1e-4},  # 4-bit rounding moves the logits by far more
        merge_check_prompts=2,
        output_dir=str(work["root"] / "refused"),
        hub_repo_id="me/tuned",
    )
    inputs = release_inputs(tiny_model_dir, quantized_dir, prepared_dir, work["adapter"], cfg)
    seen: list[dict] = []
    with pytest.raises(release.GgufCheckFailed, match=r"q4_0: logits differ .* \(allowed 0.0001\)"):
        release.release(inputs, release.Destinations(hub_token=FAKE_TOKEN), work["root"] / "w", seen.append)
    assert seen[-1]["gguf_check_passed"] is False
    assert not (work["root"] / "refused").exists(), "nothing copied locally, so nothing pushed either"


def test_modelfile_template_and_stops_render_as_the_training_template(exported: dict, work: dict) -> None:
    tokenizer = work["tokenizer"]
    parsed = ollama.parse_modelfile((exported["folder"] / "Modelfile").read_text())
    assert parsed["from"] == "./model-q8_0.gguf" and (exported["folder"] / "model-q8_0.gguf").is_file()
    assert parsed["stop"] == ["<|im_end|>", "<|im_start|>user"] and tokenizer.eos_token == "<|im_end|>"
    assert parsed["parameters"] == {"num_ctx": "1024", "temperature": "0.7"}
    template = ollama.parse_template(parsed["template"])
    chats = [
        [{"role": "user", "content": "Spell out each digit.\n\n4 2"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Count the words.\n\ncat dog"},
            {"role": "assistant", "content": "2"},
            {"role": "user", "content": "Reverse the order of the words.\n\ncat dog"},
        ],
    ]
    for chat in chats:
        assert template.render(chat) == tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    other = ollama.parse_modelfile((exported["folder"] / "Modelfile.q4_0").read_text())
    assert other["from"] == "./model-q4_0.gguf" and other["template"] == parsed["template"]


def test_hub_push_carries_the_gguf_folder_in_the_same_commit(exported: dict, hub_reachable: None) -> None:
    from tests.test_secrets import AcceptingHub, pushed_files, serve

    report = exported["report"]
    AcceptingHub.requests.clear()
    for endpoint in serve(AcceptingHub):
        url = release.publish.push_to_hub(
            report.folders["merged_16bit"], "me/tuned", FAKE_TOKEN, True, "msg", endpoint, {"gguf": exported["folder"]}
        )
    files = pushed_files(AcceptingHub.requests)
    assert url.endswith("/me/tuned/commit/" + "c" * 40)
    assert files["gguf/model-q8_0.gguf"] == (exported["folder"] / "model-q8_0.gguf").read_bytes()
    assert "gguf/Modelfile" in files and "model.safetensors" in files and "README.md" in files
    assert sum("/commit/" in r["path"] for r in AcceptingHub.requests) == 1


# --- the recipe families, on tiny random models of each architecture --------------------------------------------

FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        "rope_theta": 500000.0,
    },
    "mistral": {"tie_word_embeddings": False},
    "qwen2": {"tie_word_embeddings": True},
    "qwen3": {"head_dim": 32, "tie_word_embeddings": True},  # heads wider than hidden / heads, as in Qwen3
    "phi3": {"tie_word_embeddings": False},
}


def tiny_of(model_type: str, tokenizer: Any, out: Path, **extra: Any) -> Path:
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,  # Phi-3's default is past this vocab
        **extra,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    for param in model.parameters():
        param.data.normal_(0.0, 0.2)  # far from init, so a wrongly laid out tensor shows in the logits
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("model_type", sorted(FAMILY_CONFIGS))
def test_each_recipe_family_converts_and_reads_back(model_type: str, work: dict, tmp_path: Path) -> None:
    folder = tiny_of(model_type, work["tokenizer"], tmp_path / model_type, **FAMILY_CONFIGS[model_type])
    path = tmp_path / "f16.gguf"
    info = gguf.convert(folder, work["tokenizer"], path, "f16", f"tiny-{model_type}-test")
    cfg = ExportConfig(merge_check_prompts=2, merge_check_max_new_tokens=4)
    result = gguf_check.check_gguf_files({"f16": path}, folder, work["tokenizer"], work["prompts"], cfg)
    assert result["gguf_check_passed"], result["gguf_check_failures"]
    assert result["gguf_f16_max_logit_gap"] < 1e-3 and info["architecture"] == gguf.FAMILIES[model_type].gguf_arch
    names = {name for name, _ in gguf.tensor_types(path)}
    assert ("rope_freqs.weight" in names) == (model_type == "llama")
    tied = json.loads((folder / "config.json").read_text()).get("tie_word_embeddings", False)
    assert ("output.weight" in names) == (not tied), "an untied head is written; a tied one reuses token_embd"
    assert (not tied) == (model_type in ("llama", "mistral", "phi3"))


def test_llama_layout_needs_the_rope_permutation(work: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the Q/K permutation the file loads but computes something else: the check catches it."""
    folder = tiny_of("llama", work["tokenizer"], tmp_path / "llama")
    monkeypatch.setitem(gguf.FAMILIES, "llama", gguf.Family("llama", permute_qk=False))
    gguf.convert(folder, work["tokenizer"], tmp_path / "bad.gguf", "f16", "tiny")
    cfg = ExportConfig(merge_check_prompts=2, merge_check_max_new_tokens=4)
    result = gguf_check.check_gguf_files(
        {"f16": tmp_path / "bad.gguf"}, folder, work["tokenizer"], work["prompts"], cfg
    )
    assert not result["gguf_check_passed"] and result["gguf_f16_max_logit_gap"] > 0.05


def test_unsupported_architecture_and_rope_are_refused_by_name(work: dict, tmp_path: Path) -> None:
    folder = tiny_of("llama", work["tokenizer"], tmp_path / "llama")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(
        json.dumps({**config, "model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"]})
    )
    with pytest.raises(ExportError, match=r"does not convert gemma2 \(Gemma2ForCausalLM\)"):
        gguf.convert(folder, work["tokenizer"], tmp_path / "x.gguf", "q8_0", "x")
    yarn = {**config, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    (folder / "config.json").write_text(json.dumps(yarn))
    with pytest.raises(ExportError, match="does not write RoPE scaling 'yarn'"):
        gguf.convert(folder, work["tokenizer"], tmp_path / "y.gguf", "q8_0", "y")


# --- tokenizers of the recipe families ----------------------------------------------------------------------------


def bpe_tokenizer(kind: str) -> Any:
    """A small tokenizer trained here in the layout of a family: byte-level with Llama-3's or Qwen2's split, or
    SentencePiece-style (Llama-2, Mistral, Phi-3) with byte fallback and a leading word mark."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = ["Spell out each digit: 4 2 7", "Count the words: cat dog owl", "Reverse: red blue green"] * 20
    specials = ["<unk>", "<s>", "</s>"]
    if kind == "spm":
        core = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        core.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        alphabet = [f"<0x{i:02X}>" for i in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials + alphabet, show_progress=False)
    else:
        split = gguf_vocab.LLAMA3_SPLIT if kind == "llama-bpe" else gguf_vocab.QWEN2_SPLIT
        core = Tokenizer(models.BPE())
        core.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), "isolated"), pre_tokenizers.ByteLevel(False, use_regex=False)]
        )
        core.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    core.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
    return tok


@pytest.mark.parametrize("kind", ["llama-bpe", "qwen2", "spm"])
def test_family_tokenizers_are_written_as_llama_cpp_reads_them(kind: str, tmp_path: Path) -> None:
    tok = bpe_tokenizer(kind)
    folder = tiny_of("llama", tok, tmp_path / "m")
    path = tmp_path / "t.gguf"
    info = gguf.convert(folder, tok, path, "f16", "t")
    meta = gguf.read_metadata(path)
    assert meta["tokenizer.ggml.model"] == ("llama" if kind == "spm" else "gpt2")
    assert meta["tokenizer.ggml.tokens"][: len(tok)] == tok.convert_ids_to_tokens(list(range(len(tok))))
    if kind == "spm":
        types = meta["tokenizer.ggml.token_type"]
        assert types[tok.convert_tokens_to_ids("<0x41>")] == gguf_vocab.TokenType.BYTE
        assert meta["tokenizer.ggml.add_space_prefix"] is True and len(meta["tokenizer.ggml.scores"]) == len(tok)
        # transformers rebuilds a SentencePiece tokenizer from the file's scores: it must split text as training did
        read = AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
        text = "Spell out each digit: 7 2 4, then count the words"
        assert read(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    else:
        assert info["pre_tokenizer"] == kind == meta["tokenizer.ggml.pre"]


def test_a_tokenizer_llama_cpp_cannot_split_the_same_way_is_refused() -> None:
    data = {
        "model": {"type": "BPE"},
        "decoder": {"type": "ByteLevel"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": r"\w+"}}]},
    }
    with pytest.raises(ExportError, match=r"pre-tokenizer llama\.cpp does not name"):
        gguf_vocab.pre_tokenizer_name(data)
    with pytest.raises(ExportError, match="is a Unigram model"):
        gguf_vocab.tokenizer_model({"model": {"type": "Unigram"}, "decoder": {"type": "Metaspace"}})

"""The architectures of the shipped recipes (Llama, Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3, Phi-3), each as a
tiny random model (2 layers, hidden 64) with the test tokenizer: 4-bit load -> LoRA -> a few TRL steps ->
streamed merge that passes the merge check, on the hf backend."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from llmtune import release
from llmtune.artifacts import PreparedData, TrainingReport
from llmtune.config import ExportConfig, LoraConfig, ModelConfig, RunConfig
from llmtune.model import hf
from tests.test_lora_variants import train_variant

SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": {"num_key_value_heads": 2},
    "qwen2": {"num_key_value_heads": 2},
    "qwen3": {"num_key_value_heads": 2, "head_dim": 16},
    "mistral": {"num_key_value_heads": 2, "sliding_window": None},
    "gemma2": {"num_key_value_heads": 2, "head_dim": 16},
    "gemma3_text": {"num_key_value_heads": 2, "head_dim": 16},
    "phi3": {"num_key_value_heads": 4, "pad_token_id": 0},
}


def tiny_model(model_type: str, tokenizer_dir: Path, out: Path) -> Path:
    """A random model of `model_type` with the test tokenizer's vocabulary, saved as safetensors."""
    import torch

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    specials = {
        k: tokenizer.convert_tokens_to_ids(v)
        for k, v in (("bos_token_id", tokenizer.bos_token), ("eos_token_id", tokenizer.eos_token))
        if v is not None
    }
    config = AutoConfig.for_model(
        model_type, **SHAPE, **ARCHITECTURES[model_type], vocab_size=len(tokenizer), **specials
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_architecture_loads_trains_and_merges(model_type: str, prepared_dir: Path, tmp_path: Path) -> None:
    base = tiny_model(model_type, prepared_dir / "tokenizer", tmp_path / "base")
    quantized = tmp_path / "q"
    hf.load_quantized(ModelConfig(name=str(base)), quantized)
    assert hf.quantization_report(hf.load_base(quantized))["linear4bit_layers"] > 0
    adapter, lora, report = train_variant(quantized, prepared_dir, LoraConfig(r=4, alpha=8), tmp_path)
    assert lora["trainable_params"] > 0
    assert report.steps == 3

    # random weights give small logits: a tighter tolerance than the trained demo's, still far above bf16 rounding
    export = ExportConfig(merge_check_prompts=3, merge_check_atol=0.02)
    config = RunConfig(model=ModelConfig(name=str(base)), export=export)
    trained = TrainingReport(first_loss=2.0, final_loss=1.0, train_seconds=1.0, steps=3)
    inputs = release.ReleaseInputs(config, quantized, adapter, prepared_dir, {}, trained, {})
    prompts = [p["prompt"] for p in PreparedData(str(prepared_dir)).eval_prompts()]
    _, check = release.merge_and_check(inputs, AutoTokenizer.from_pretrained(base), prompts, tmp_path / "merge")
    assert check["merge_check_passed"], (check["merge_check_failures"], check["merge_check_max_logit_gap"])
    assert check["merged_lora_modules"] == lora_modules(base)
    shutil.rmtree(tmp_path)


def lora_modules(base: Path) -> int:
    """Linear layers in the decoder layers (all-linear's targets)."""
    import torch

    model = AutoModelForCausalLM.from_pretrained(base)
    return sum(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if ".layers." in n)

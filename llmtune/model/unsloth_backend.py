"""The Unsloth backend (CUDA only): FastLanguageModel 4-bit loading, its LoRA, and its gradient checkpointing.

Same four functions as `llmtune.model.hf`, and the same artifacts: a bitsandbytes 4-bit checkpoint
in save_pretrained format and a PEFT adapter folder, so either backend can read what the other wrote.
Training itself is `llmtune.train.sft.train`, whose TRL trainer is Unsloth's when unsloth was imported
first; `llmtune.model.import_unsloth_if_used` is the one place that orders that import.

What makes it fast sits in `load_trainable`: the adapter goes onto the base through PEFT and is then
handed to Unsloth's `patch_peft_model`, which swaps in its fused LoRA kernels (attention QKV/O and the
MLP) and its offloaded gradient checkpointing, the same as `FastLanguageModel.get_peft_model` does
for a fresh adapter. `load_for_inference` puts the model on Unsloth's inference path (its fused
single-token decoding with the KV cache), which the evaluate step's greedy generation then uses.

Example (the settings that need no GPU; loading needs CUDA):
    >>> lora_kwargs(LoraConfig(r=8, alpha=16))["target_modules"]
    ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']
    >>> checkpointing_mode(True), checkpointing_mode(False)
    ('unsloth', False)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmtune.config import LoraConfig, ModelConfig
from llmtune.model import hf, lora_variants

NAME = "unsloth"

# What "all-linear" means for the decoder architectures Unsloth accelerates (the LM head stays frozen).
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Unsloth sizes its RoPE caches and masks from max_seq_length; asking for more than the model supports
# would make it apply RoPE scaling, which changes the model. So we never ask for more than the config has.
DEFAULT_MAX_SEQ_LENGTH = 2048


def fast_language_model() -> Any:
    """Unsloth's FastLanguageModel; importing unsloth here is a no-op when the CLI already did it first."""
    from unsloth import FastLanguageModel

    return FastLanguageModel


def checkpointing_mode(enabled: bool) -> str | bool:
    """training.gradient_checkpointing as Unsloth spells it: its offloaded checkpointing, or none."""
    return "unsloth" if enabled else False


def lora_kwargs(cfg: LoraConfig) -> dict[str, Any]:
    """Arguments of `FastLanguageModel.get_peft_model` for a lora section (its variant options too: Unsloth
    passes use_dora on to PEFT, and takes use_rslora, init_lora_weights and modules_to_save itself)."""
    targets = ALL_LINEAR if cfg.target_modules == "all-linear" else list(cfg.target_modules)
    return {
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": targets,
        "bias": "none",
        "random_state": cfg.seed,
        **lora_variants.settings(cfg),
    }


def cannot_run(adapter: dict[str, Any], stage: str) -> str:
    """Why Unsloth cannot run this adapter (PEFT adapter_config keys) at `stage` (inject, train, evaluate), or "".

    From Unsloth 2026.10's get_peft_model: its PiSSA init needs float weights (`validate_init_lora_weights`),
    and it trains only lm_head, embed_tokens and norm layers in full. Training a PiSSA adapter is ours on either
    backend (`lora_variants`), so only its init is refused.

    >>> cannot_run({"init_lora_weights": "pissa"}, "inject")
    "Unsloth's get_peft_model refuses lora.init=pissa on a 4-bit base (it needs float weights)"
    >>> cannot_run({"init_lora_weights": "pissa"}, "train"), cannot_run({"modules_to_save": ["lm_head"]}, "train")
    ('', '')
    >>> cannot_run({"modules_to_save": ["model.embed_tokens", "score"]}, "evaluate")
    "Unsloth trains only lm_head, embed_tokens and norm layers in full, not lora.modules_to_save ['score']"
    """
    init = str(adapter.get("init_lora_weights", True))
    if stage == "inject" and init.startswith("pissa"):
        return f"Unsloth's get_peft_model refuses lora.init={init} on a 4-bit base (it needs float weights)"
    others = [m for m in adapter.get("modules_to_save") or [] if not _unsloth_trains_in_full(m)]
    if others:
        return f"Unsloth trains only lm_head, embed_tokens and norm layers in full, not lora.modules_to_save {others}"
    return ""


def _unsloth_trains_in_full(module: str) -> bool:
    leaf = module.rsplit(".", 1)[-1]
    return leaf in ("lm_head", "embed_tokens") or "norm" in leaf


def native_max_length(model_dir: str | Path, wanted: int | None = None) -> int:
    """The sequence length to give Unsloth: `wanted` (default 2048) capped at the model's position limit."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    limit = int(config.get("max_position_embeddings") or DEFAULT_MAX_SEQ_LENGTH)
    return min(wanted or DEFAULT_MAX_SEQ_LENGTH, limit)


def _load(model_dir: str | Path, max_seq_length: int, gradient_checkpointing: str | bool, **extra: Any) -> Any:
    hf.require_safetensors(model_dir)  # a local folder with only pickle weights is refused before Unsloth sees it
    model, _tokenizer = fast_language_model().from_pretrained(
        str(model_dir),
        max_seq_length=max_seq_length,
        load_in_4bit=True,
        use_gradient_checkpointing=gradient_checkpointing,
        use_exact_model_name=True,  # a local folder or hub id as given, never remapped to another repo
        **extra,
    )
    return model


def load_quantized(cfg: ModelConfig, out_dir: str | Path) -> dict[str, Any]:
    """Load `cfg.name` in 4-bit through Unsloth and save the quantized checkpoint + tokenizer to `out_dir`."""
    from transformers import AutoTokenizer

    common = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    model = _load(
        cfg.name,
        DEFAULT_MAX_SEQ_LENGTH,
        False,
        quantization_config=hf.bnb_config(cfg),  # the configured NF4/FP4 and double quant, not Unsloth's default
        dtype=hf.compute_dtype(cfg.compute_dtype),
        **common,
    )
    # The model's own tokenizer, untouched: Unsloth's loader may add tokens or change padding, and the
    # data step tokenizes with the tokenizer of `cfg.name`.
    tokenizer = AutoTokenizer.from_pretrained(cfg.name, **common)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return hf.quantization_report(model)


def add_lora(base_dir: str | Path, cfg: LoraConfig, out_dir: str | Path) -> dict[str, Any]:
    """Attach a fresh adapter with Unsloth's get_peft_model and save the adapter alone (PEFT format)."""
    model = _load(base_dir, native_max_length(base_dir), False)
    model = fast_language_model().get_peft_model(model, use_gradient_checkpointing=False, **lora_kwargs(cfg))
    model.save_pretrained(str(out_dir))
    return hf.lora_report(model)


def load_trainable(
    base_dir: str | Path, adapter_dir: str | Path, gradient_checkpointing: bool, max_seq_length: int | None = None
) -> Any:
    """4-bit base + the saved adapter, trainable, with Unsloth's fused LoRA kernels and gradient checkpointing.

    DoRA layers and saved modules keep PEFT's own forward: Unsloth's fused kernels skip them.
    """
    fast = fast_language_model()
    mode = checkpointing_mode(gradient_checkpointing)
    hf.require_adapter_safetensors(adapter_dir)
    base = _load(base_dir, native_max_length(base_dir, max_seq_length), mode)
    model = lora_variants.load_trainable_adapter(base, adapter_dir)  # a PiSSA/OLoRA base becomes its residual
    return fast.patch_peft_model(model, use_gradient_checkpointing=mode)


def load_for_inference(base_dir: str | Path, adapter_dir: str | Path) -> Any:
    """4-bit base + adapter on Unsloth's fast inference path (`FastLanguageModel.for_inference`), for evaluation.

    Its kernels read each LoRA layer's adapters-disabled flag, so `with model.disable_adapter():` still
    gives the base alone: base and tuned are scored by the same model, as with the hf backend.
    """
    hf.require_adapter_safetensors(adapter_dir)
    base = _load(base_dir, native_max_length(base_dir), False)
    model = lora_variants.load_adapter_for_inference(base, adapter_dir)
    return fast_language_model().for_inference(model)

"""The Unsloth backend (CUDA only): FastLanguageModel 4-bit loading and its LoRA with its gradient checkpointing.

Same four functions as `llmtune.backends.hf`. Unsloth must be imported before transformers, peft
and trl in the process; `import_unsloth_first()` is the one place that does it. Throughput work and
its GPU tests belong to the Unsloth issue; this module keeps the slot and the interface.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmtune.backends import hf
from llmtune.config import LoraConfig, ModelConfig

NAME = "unsloth"


def import_unsloth_first() -> Any:
    import unsloth  # noqa: F401  (patches transformers/peft/trl on import)
    from unsloth import FastLanguageModel

    return FastLanguageModel


def load_quantized(cfg: ModelConfig, out_dir: str | Path) -> dict[str, Any]:
    fast = import_unsloth_first()
    model, tokenizer = fast.from_pretrained(
        cfg.name, load_in_4bit=True, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return hf.quantization_report(model)


def add_lora(base_dir: str | Path, cfg: LoraConfig, out_dir: str | Path) -> dict[str, Any]:
    model = _with_lora(base_dir, cfg)
    model.save_pretrained(str(out_dir))
    return hf.lora_report(model)


def _with_lora(base_dir: str | Path, cfg: LoraConfig) -> Any:
    fast = import_unsloth_first()
    model, _ = fast.from_pretrained(str(base_dir), load_in_4bit=True)
    targets = (
        cfg.target_modules
        if cfg.target_modules != "all-linear"
        else ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    return fast.get_peft_model(
        model,
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        bias="none",
        random_state=cfg.seed,
        use_gradient_checkpointing="unsloth",
    )


def load_trainable(base_dir: str | Path, adapter_dir: str | Path, gradient_checkpointing: bool) -> Any:
    fast = import_unsloth_first()
    from peft import PeftModel

    model, _ = fast.from_pretrained(
        str(base_dir), load_in_4bit=True, use_gradient_checkpointing="unsloth" if gradient_checkpointing else False
    )
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)


def load_for_inference(base_dir: str | Path, adapter_dir: str | Path) -> Any:
    return hf.load_for_inference(base_dir, adapter_dir)

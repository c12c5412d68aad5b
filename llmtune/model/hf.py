"""The transformers + bitsandbytes + PEFT backend: NF4 4-bit base, LoRA adapter; runs on CPU and GPU.

Example (a tiny base built in a temp folder):
    >>> import tempfile
    >>> from llmtune.config import ModelConfig
    >>> from llmtune.demo import build_demo_model
    >>> src = build_demo_model(tempfile.mkdtemp() + "/base", shape="tiny")
    >>> info = load_quantized(ModelConfig(name=str(src)), tempfile.mkdtemp())
    >>> info["linear4bit_layers"] > 0
    True
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from llmtune.config import LoraConfig, ModelConfig
from llmtune.errors import LlmtuneError
from llmtune.model import lora_variants

NAME = "hf"
# Weights are read from safetensors only: a pickle file (.bin, .pt, ...) can run code when it is loaded.
SAFE_BASE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
SAFE_ADAPTER_WEIGHTS = ("adapter_model.safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class PickleWeightsRefused(LlmtuneError, ValueError):
    """A model or adapter folder offers no safetensors weights; llmtune never unpickles weights."""


def require_safetensors(folder: str | Path, accepted: tuple[str, ...] = SAFE_BASE_WEIGHTS) -> None:
    """Refuse the local `folder` unless it holds one of the `accepted` safetensors files.

    A name that is not a local folder (a Hub id) is left to `use_safetensors=True` in the loader.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "pytorch_model.bin").write_bytes(b"")
    >>> require_safetensors(folder)
    Traceback (most recent call last):
    ...
    llmtune.model.hf.PickleWeightsRefused: ... has no model.safetensors ... (it has pytorch_model.bin) ...
    """
    path = Path(folder)
    if not path.is_dir() or any((path / name).is_file() for name in accepted):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    found = f" (it has {', '.join(pickles)})" if pickles else ""
    raise PickleWeightsRefused(
        f"'{folder}' has no {' or '.join(accepted)}{found}. llmtune reads weights from safetensors only, since "
        f"loading a pickle file can run arbitrary code. Re-save the weights as safetensors "
        f"(save_pretrained(..., safe_serialization=True)) and point the config at that folder."
    )


def compute_dtype(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def device_map() -> Any:
    """The whole model on this process's GPU (LOCAL_RANK's under a data-parallel launch, else GPU 0), or the CPU."""
    import torch

    return {"": int(os.environ.get("LOCAL_RANK", "0"))} if torch.cuda.is_available() else "cpu"


def bnb_config(cfg: ModelConfig) -> Any:
    """The bitsandbytes 4-bit config for a model section (NF4 + double quant by default)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(cfg.compute_dtype),
        bnb_4bit_quant_storage=quant_storage_dtype(cfg),
    )


def quant_storage_dtype(cfg: ModelConfig) -> Any:
    """What the packed 4-bit weights are stored as: uint8, or the compute dtype (what FSDP can shard).

    >>> quant_storage_dtype(ModelConfig(quant_storage="compute_dtype", compute_dtype="bfloat16"))
    torch.bfloat16
    >>> quant_storage_dtype(ModelConfig())  # auto outside a RunConfig, which resolves it from the parallelism
    torch.uint8
    """
    import torch

    return compute_dtype(cfg.compute_dtype) if cfg.quant_storage == "compute_dtype" else torch.uint8


def peft_config(cfg: LoraConfig) -> Any:
    """The PEFT LoRA config for a lora section, its variant options included (`lora_variants.settings`).

    >>> c = peft_config(LoraConfig(use_dora=True, use_rslora=True, init="gaussian", modules_to_save=["lm_head"]))
    >>> c.use_dora, c.use_rslora, c.init_lora_weights, sorted(c.modules_to_save), c.ensure_weight_tying
    (True, True, 'gaussian', ['lm_head'], True)
    """
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        bias="none",
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
        **lora_variants.settings(cfg),
    )


def load_quantized(cfg: ModelConfig, out_dir: str | Path) -> dict[str, Any]:
    """Load `cfg.name` in 4-bit and save the quantized checkpoint + tokenizer to `out_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_safetensors(cfg.name)
    common = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    model = AutoModelForCausalLM.from_pretrained(
        cfg.name,
        quantization_config=bnb_config(cfg),
        device_map=device_map(),
        use_safetensors=True,
        dtype=compute_dtype(cfg.compute_dtype),
        **common,
    )
    tokenizer = AutoTokenizer.from_pretrained(cfg.name, **common)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return quantization_report(model)


def quantization_report(model: Any) -> dict[str, Any]:
    """How many layers are 4-bit, and the in-memory footprint against a 16-bit copy."""
    import bitsandbytes as bnb

    # A 4-bit weight is stored packed, two values a byte, in uint8 or (for FSDP) wider elements.
    n_params = sum(
        p.numel() * p.element_size() * 2 if isinstance(p, bnb.nn.Params4bit) else p.numel() for p in model.parameters()
    )
    return {
        "linear4bit_layers": sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()),
        "footprint_bytes": int(model.get_memory_footprint()),
        "bf16_bytes_estimate": int(2 * n_params),
    }


def load_base(base_dir: str | Path) -> Any:
    """The saved 4-bit base, its quantization config read back from config.json."""
    from transformers import AutoModelForCausalLM

    require_safetensors(base_dir)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), device_map=device_map(), use_safetensors=True)
    return keep_cpu_compute_dtype(model)


def keep_cpu_compute_dtype(model: Any) -> Any:
    """On the CPU, 4-bit layers compute in the model's compute dtype in every mode.

    bitsandbytes 0.50 repacks a 4-bit weight for a bf16 kernel on its first no-grad CPU forward when the CPU
    has AVX512-BF16, and unpacks it whenever a state dict is read (as PEFT's load_adapter does): scores then
    depend on what ran before, at bf16 precision (the same adapter, scored before and after a second adapter
    was loaded, differed by 6e-4 in eval loss, enough to fail a promotion gate against itself). Turning the
    repacking off keeps the float32 path that training uses.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def add_lora(base_dir: str | Path, cfg: LoraConfig, out_dir: str | Path) -> dict[str, Any]:
    """Attach a fresh LoRA adapter to the 4-bit base and save the adapter alone (PEFT format)."""
    import torch
    from peft import get_peft_model

    torch.manual_seed(cfg.seed)
    base = load_base(base_dir)
    if cfg.init.startswith("pissa"):
        # PEFT's PiSSA takes an SVD of float weights and refuses 4-bit ones: it gets the dequantized 4-bit
        # weights, whose residual the train step then quantizes again (`lora_variants`).
        base = base.dequantize()
    model = get_peft_model(base, peft_config(cfg))
    model.save_pretrained(str(out_dir))
    return lora_report(model)


def lora_report(model: Any) -> dict[str, Any]:
    """Trainable vs total parameters, the kinds of module that got an adapter (q_proj, ...), the variant options."""
    trainable, total = model.get_nb_trainable_parameters()
    config = model.peft_config["default"]
    targets = {name.split(".")[-1] for name in config.target_modules}
    return {
        "trainable_params": int(trainable),
        "total_params": int(total),
        "target_modules": sorted(targets),
        "use_dora": bool(config.use_dora),
        "use_rslora": bool(config.use_rslora),
        "init": str(config.init_lora_weights),
        "modules_to_save": sorted(config.modules_to_save or []),
    }


def load_trainable(
    base_dir: str | Path, adapter_dir: str | Path, gradient_checkpointing: bool, max_seq_length: int | None = None
) -> Any:
    """4-bit base prepared for k-bit training + the adapter with only its weights trainable.

    `max_seq_length` is for backends that size buffers ahead (Unsloth); plain transformers needs none.
    """
    from peft import prepare_model_for_kbit_training

    require_adapter_safetensors(adapter_dir)
    # Non-reentrant checkpointing: what DistributedDataParallel supports, and what the Trainer asks for too.
    base = prepare_model_for_kbit_training(
        load_base(base_dir),
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    return lora_variants.load_trainable_adapter(base, adapter_dir)


def load_for_inference(base_dir: str | Path, adapter_dir: str | Path) -> Any:
    """4-bit base + adapter in eval mode; `with model.disable_adapter():` gives the base alone."""
    require_adapter_safetensors(adapter_dir)
    return lora_variants.load_adapter_for_inference(load_base(base_dir), adapter_dir)


def require_adapter_safetensors(adapter_dir: str | Path) -> None:
    """Refuse an adapter folder without adapter_model.safetensors (PEFT would fall back to unpickling a .bin)."""
    if not Path(adapter_dir).is_dir():
        raise PickleWeightsRefused(
            f"Adapter folder '{adapter_dir}' does not exist; adapters are read from local folders."
        )
    require_safetensors(adapter_dir, SAFE_ADAPTER_WEIGHTS)

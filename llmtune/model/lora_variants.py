"""LoRA variants beyond plain LoRA, the same on both backends: what PEFT is told, and the PiSSA/OLoRA residual.

DoRA, rsLoRA, the gaussian init and modules_to_save are PEFT LoraConfig options and travel as such in the
adapter's config. PiSSA and OLoRA (`lora.init`) take the adapter's starting point out of each weight: with
A0, B0 the initial factors and s the scale, the model trains as W_res + s·B·A, where W_res = W - s·B0·A0. Here:

1. the inject step saves the initial adapter (A0, B0; its config keeps init_lora_weights=pissa|olora);
2. `load_trainable_adapter` loads it without re-running the init and replaces each target's 4-bit weight
   with the 4-bit residual (dequantize, subtract s·B0·A0, quantize again), so the base trains as W_res;
3. `save_trained` writes the trained adapter converted to a plain LoRA on the unchanged base, PEFT's own
   conversion (`save_pretrained(path_initial_model_for_weight_conversion=...)`): ΔW = s·(B·A - B0·A0)
   = s·[B | -B0]·[A ; A0], rank 2r with alpha doubled (times √2 with rsLoRA) so the scale stays s.

So evaluation, the merge and the merge check only ever see plain LoRA (+ DoRA magnitudes, + saved modules).

Example:
    >>> from llmtune.config import LoraConfig
    >>> settings(LoraConfig(init="olora", use_rslora=True))["init_lora_weights"]
    'olora'
    >>> is_residual({"init_lora_weights": "pissa_niter_4"}), is_residual({"init_lora_weights": True})
    (True, False)
    >>> converted_config({"r": 8, "lora_alpha": 16, "use_rslora": False, "init_lora_weights": "pissa"})
    {'r': 16, 'lora_alpha': 32, 'use_rslora': False, 'init_lora_weights': True}
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from llmtune.config import RESIDUAL_INITS, LoraConfig
from llmtune.errors import LlmtuneError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class UnconvertedAdapter(LlmtuneError, ValueError):
    """A PiSSA/OLoRA adapter that was never converted to a plain LoRA cannot be put on the unchanged base."""


def init_weights(init: str) -> bool | str:
    """`lora.init` as PEFT's init_lora_weights: True for the default, else the name."""
    return True if init == "default" else init


def settings(cfg: LoraConfig) -> dict[str, Any]:
    """The variant options of a lora section in PEFT's LoraConfig names (as adapter_config.json has them).

    Tied input/output embeddings stay tied when one of them is in modules_to_save (PEFT's ensure_weight_tying),
    so the trained embedding is the output layer too, as in the model being tuned.
    """
    return {
        "use_dora": cfg.use_dora,
        "use_rslora": cfg.use_rslora,
        "init_lora_weights": init_weights(cfg.init),
        "modules_to_save": list(cfg.modules_to_save) or None,
        "ensure_weight_tying": bool(cfg.modules_to_save),
    }


def is_residual(adapter_config: dict[str, Any]) -> bool:
    """Whether an adapter's config says its init was taken out of the base weights (PiSSA, OLoRA)."""
    return str(adapter_config.get("init_lora_weights", True)).startswith(RESIDUAL_INITS)


def read_config(adapter_dir: str | Path) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())
    return config


def load_trainable_adapter(base: Any, adapter_dir: str | Path, is_trainable: bool = True) -> Any:
    """`PeftModel.from_pretrained` for an initial adapter; a PiSSA/OLoRA one makes the base its residual.

    PEFT would re-run a PiSSA/OLoRA init when loading (PiSSA refuses a 4-bit base); the init is already in
    the saved factors, so it is loaded as a plain LoRA and the residual is taken from those factors.
    """
    from peft import PeftConfig, PeftModel

    config = PeftConfig.from_pretrained(str(adapter_dir))
    residual = is_residual(config.to_dict())
    if residual:
        config.init_lora_weights = True
    model = PeftModel.from_pretrained(base, str(adapter_dir), config=config, is_trainable=is_trainable)
    if residual:
        subtract_initial_adapter(model)
    return model


def load_adapter_for_inference(base: Any, adapter_dir: str | Path) -> Any:
    """`PeftModel.from_pretrained` in eval mode, refusing a PiSSA/OLoRA adapter that still needs its residual base."""
    from peft import PeftModel

    config = read_config(adapter_dir)
    if is_residual(config):
        raise UnconvertedAdapter(
            f"The adapter in '{adapter_dir}' was initialised with {config['init_lora_weights']} and trained on the "
            "residual of the base, so it does not apply to the base itself. Adapters trained here are saved "
            "converted to a plain LoRA; convert this one with PEFT's save_pretrained(..., "
            "path_initial_model_for_weight_conversion=<its initial adapter>) first."
        )
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def subtract_initial_adapter(model: Any, adapter_name: str = "default") -> int:
    """Replace each LoRA target's base weight W by W - s·B·A of its current (initial) factors; return how many.

    A bitsandbytes 4-bit weight is dequantized, changed in float32 and quantized again with its own settings
    (as PEFT's OLoRA init does on a 4-bit base); a float weight is changed in place.
    """
    import torch
    from peft.tuners.lora import LoraLayer

    changed = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        a: Any = module.lora_A[adapter_name].weight
        b: Any = module.lora_B[adapter_name].weight
        with torch.no_grad():
            delta = module.scaling[adapter_name] * (b.float() @ a.float())
            _set_weight(module.get_base_layer(), lambda w, d=delta: w - d.to(w.device))
        changed += 1
    return changed


def _set_weight(layer: Any, change: Any) -> None:
    from peft.utils.integrations import dequantize_module_weight

    weight = layer.weight
    if type(weight).__name__ != "Params4bit":
        weight.data = change(weight.data.float()).to(weight.dtype)
        return
    state = weight.quant_state
    new = change(dequantize_module_weight(layer).float()).to(state.dtype)
    layer.weight = type(weight)(
        new.cpu(),
        requires_grad=False,
        blocksize=state.blocksize,
        compress_statistics=weight.compress_statistics,
        quant_type=state.quant_type,
        quant_storage=weight.quant_storage,
        module=layer,
    ).to(weight.device)


def save_trained(
    model: Any, out_dir: str | Path, initial_adapter_dir: str | Path, state_dict: dict[str, Any] | None = None
) -> None:
    """Save the trained adapter; one trained from a PiSSA/OLoRA init is converted to a plain LoRA on the base.

    `state_dict`: the adapter's tensors when the model holds only shards of them (FSDP, gathered first).
    """
    model.save_pretrained(str(out_dir), state_dict=state_dict)
    if is_residual(read_config(initial_adapter_dir)):
        convert_to_plain_lora(out_dir, initial_adapter_dir)


def convert_to_plain_lora(adapter_dir: str | Path, initial_adapter_dir: str | Path) -> None:
    """Rewrite the adapter in `adapter_dir` (trained on the residual of `initial_adapter_dir`'s init) in place
    as a plain LoRA of rank 2r: A' = [A ; A0], B' = [B | -B0]. Other tensors (DoRA is refused with these
    inits; modules_to_save copies) are kept as they are."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = Path(adapter_dir)
    trained = load_file(str(folder / ADAPTER_WEIGHTS))
    initial = load_file(str(Path(initial_adapter_dir) / ADAPTER_WEIGHTS))
    converted = {}
    for name, tensor in trained.items():
        if ".lora_A." in name:
            converted[name] = torch.cat([tensor, initial[name].to(tensor.dtype)], dim=0).contiguous()
        elif ".lora_B." in name:
            converted[name] = torch.cat([tensor, -initial[name].to(tensor.dtype)], dim=1).contiguous()
        else:
            converted[name] = tensor
    save_file(converted, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = read_config(folder)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(converted_config(config), indent=2, sort_keys=True))


def converted_config(config: dict[str, Any]) -> dict[str, Any]:
    """The adapter config of the converted adapter: rank doubled, alpha such that the scale is unchanged."""
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise UnconvertedAdapter("A PiSSA/OLoRA adapter with rank_pattern or alpha_pattern cannot be converted here.")
    factor = math.sqrt(2) if config.get("use_rslora") else 2
    alpha = config["lora_alpha"] * factor
    return {
        **config,
        "r": 2 * config["r"],
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "init_lora_weights": True,
    }

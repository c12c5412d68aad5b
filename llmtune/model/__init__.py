"""Two backends behind one interface: `hf` (transformers + bitsandbytes + PEFT, CPU or GPU) and `unsloth` (CUDA).

`resolve_backend("auto")` picks unsloth when CUDA and unsloth are present, else hf; this module is
the one place that knows what is installed. Each backend module exposes the same four functions:
`load_quantized`, `add_lora`, `load_trainable`, `load_for_inference`.

Example:
    >>> resolve_backend("hf").NAME
    'hf'
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType
from typing import Any

from llmtune.errors import LlmtuneError


class BackendUnavailable(LlmtuneError, RuntimeError):
    """The configured backend cannot run here; the message says what is missing and what to set."""


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def unsloth_installed() -> bool:
    return importlib.util.find_spec("unsloth") is not None


def import_unsloth_if_used(backend: str) -> bool:
    """Import unsloth first when this process will use it, so its patches to transformers, peft and trl apply.

    This is the one place that orders the imports; the CLI calls it before anything imports
    transformers. Returns whether unsloth was imported. With backend 'hf' it is never imported,
    so the hf path stays plain transformers + PEFT even where unsloth is installed.
    """
    if backend not in ("auto", "unsloth") or not unsloth_installed() or not cuda_available():
        return False
    # Unsloth otherwise fetches a README from the Hub on each model load to count environments.
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    import unsloth  # noqa: F401

    return True


def resolve_backend(name: str) -> ModuleType:
    """The backend module for 'auto', 'hf' or 'unsloth'."""
    if name == "auto":
        name = "unsloth" if cuda_available() and unsloth_installed() else "hf"
    if name == "hf":
        from llmtune.model import hf

        return hf
    if name == "unsloth":
        if not cuda_available():
            raise BackendUnavailable(
                "model.backend=unsloth needs a CUDA GPU and none is visible. "
                "Use --set model.backend=hf (runs on the CPU) or auto."
            )
        if not unsloth_installed():
            raise BackendUnavailable(
                "model.backend=unsloth needs the unsloth package: pip install -e '.[gpu]'. "
                "Or use --set model.backend=hf."
            )
        from llmtune.model import unsloth_backend

        return unsloth_backend
    raise BackendUnavailable(f"Unknown backend '{name}'; use auto, hf or unsloth.")


def backend_for(name: str, adapter: dict[str, Any], stage: str) -> tuple[ModuleType, str]:
    """The backend for `name` that can run this adapter at `stage` (inject, train, evaluate), and a note when
    it is not the one `name` resolves to.

    `adapter` holds PEFT adapter_config keys (use_dora, init_lora_weights, modules_to_save, ...). Where
    Unsloth cannot run a LoRA variant (`unsloth_backend.cannot_run`), the hf backend runs that step; both
    read and write the same artifacts.

    >>> backend_for("hf", {"init_lora_weights": "pissa"}, "inject")[0].NAME
    'hf'
    """
    chosen = resolve_backend(name)
    if chosen.NAME != "unsloth":
        return chosen, ""
    reason = str(chosen.cannot_run(adapter, stage))
    if not reason:
        return chosen, ""
    from llmtune.model import hf

    note = f"{reason}, so this step used the hf backend (transformers + PEFT) instead of unsloth"
    print(f"Backend: {note}", flush=True)
    return hf, note

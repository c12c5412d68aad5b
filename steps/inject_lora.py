"""Step 3: attach a fresh LoRA adapter to the 4-bit base and save the adapter (PEFT format)."""

import tempfile
from typing import Annotated

from zenml import step

from llmtune.artifacts import Adapter, QuantizedBase
from llmtune.config import LoraConfig
from llmtune.model import resolve_backend
from steps import tracking


@step(experiment_tracker=True)
def inject_lora(base: QuantizedBase, cfg: LoraConfig, backend: str) -> Annotated[Adapter, "initial_adapter"]:
    chosen = resolve_backend(backend)
    out = tempfile.mkdtemp(prefix="llmtune-adapter-")
    report = chosen.add_lora(base.path, cfg, out)
    tracking.record(
        metadata={"backend": chosen.NAME, **report},
        params={**tracking.section_params("lora", cfg), "lora.backend_used": chosen.NAME},
        metrics={"trainable_params": report["trainable_params"], "total_params": report["total_params"]},
    )
    return Adapter(out)

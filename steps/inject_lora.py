"""Step 3: attach a fresh LoRA adapter to the 4-bit base and save the adapter (PEFT format).

A LoRA variant that Unsloth cannot initialise (PiSSA on a 4-bit base, modules it does not train in full) is
initialised by the hf backend instead; the step's metadata and log say so.
"""

import tempfile
from typing import Annotated

from zenml import step

from llmtune.artifacts import Adapter, QuantizedBase
from llmtune.config import LoraConfig
from llmtune.model import backend_for, lora_variants
from steps import tracking


@step(experiment_tracker=True)
def inject_lora(base: QuantizedBase, cfg: LoraConfig, backend: str) -> Annotated[Adapter, "initial_adapter"]:
    chosen, note = backend_for(backend, lora_variants.settings(cfg), "inject")
    out = tempfile.mkdtemp(prefix="llmtune-adapter-")
    report = chosen.add_lora(base.path, cfg, out)
    tracking.record(
        metadata={"backend": chosen.NAME, **({"backend_note": note} if note else {}), **report},
        params={**tracking.section_params("lora", cfg), "lora.backend_used": chosen.NAME},
        metrics={"trainable_params": report["trainable_params"], "total_params": report["total_params"]},
    )
    return Adapter(out)

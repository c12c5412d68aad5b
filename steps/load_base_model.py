"""Step 2: load the base model in 4-bit (NF4, double quant) and save the quantized checkpoint."""

import tempfile
from typing import Annotated

from zenml import step

from llmtune.artifacts import QuantizedBase
from llmtune.config import ModelConfig
from llmtune.model import resolve_backend
from steps import tracking


@step(experiment_tracker=True)
def load_base_model(cfg: ModelConfig) -> Annotated[QuantizedBase, "quantized_base"]:
    backend = resolve_backend(cfg.backend)
    out = tempfile.mkdtemp(prefix="llmtune-base-")
    report = backend.load_quantized(cfg, out)
    tracking.record(
        metadata={"backend": backend.NAME, **report},
        params={**tracking.section_params("model", cfg), "model.backend_used": backend.NAME},
    )
    return QuantizedBase(out)

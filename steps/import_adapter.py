"""Bring a PEFT adapter folder from outside the pipeline (e.g. outputs/<run>/adapter) into the artifact store."""

from typing import Annotated

from zenml import step

from llmtune.artifacts import Adapter
from steps import tracking


@step
def import_adapter(path: str, fingerprint: str) -> Annotated[Adapter, "adapter"]:
    """`fingerprint` (a hash of the folder's bytes) is only there so that an edited folder is not a cache hit."""
    config = Adapter(path).config()
    tracking.record(
        metadata={"adapter_source": path, "adapter_fingerprint": fingerprint, "lora_r": config.get("r", "")}
    )
    return Adapter(path)

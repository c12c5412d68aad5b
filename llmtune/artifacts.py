"""The folders that travel between steps. Each is a plain path wrapper; a ZenML materializer copies the
folder into the artifact store, so steps can run in different processes or containers.

Example:
    >>> Adapter("/tmp/adapter").path
    '/tmp/adapter'
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ArtifactDir:
    path: str


@dataclass(frozen=True)
class PreparedData(ArtifactDir):
    """train/ and eval/ (datasets.save_to_disk), eval_prompts.jsonl, tokenizer/, stats.json."""


@dataclass(frozen=True)
class QuantizedBase(ArtifactDir):
    """A 4-bit (bitsandbytes) checkpoint in save_pretrained format, with the model's tokenizer."""


@dataclass(frozen=True)
class Adapter(ArtifactDir):
    """A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors)."""


@dataclass(frozen=True)
class MergedModel(ArtifactDir):
    """A plain 16-bit transformers model folder with its tokenizer."""


def check_adapter_dir(path: str | Path) -> dict[str, Any]:
    """The adapter_config.json of a PEFT adapter folder, after checking its weights are safetensors.

    >>> import tempfile
    >>> check_adapter_dir(tempfile.mkdtemp())
    Traceback (most recent call last):
    ...
    llmtune.backends.hf.PickleWeightsRefused: ... has no adapter_model.safetensors...
    """
    from llmtune.backends.hf import PickleWeightsRefused, require_adapter_safetensors

    require_adapter_safetensors(path)
    config_file = Path(path) / "adapter_config.json"
    if not config_file.is_file():
        raise PickleWeightsRefused(
            f"'{path}' has no adapter_config.json; a PEFT adapter folder (save_pretrained) has one."
        )
    config: dict[str, Any] = json.loads(config_file.read_text())
    return config

"""The folders that travel between steps. Each is a plain path wrapper; a ZenML materializer copies the
folder into the artifact store, so steps can run in different processes or containers.

Example:
    >>> Adapter("/tmp/adapter").path
    '/tmp/adapter'
"""

from __future__ import annotations

from dataclasses import dataclass


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

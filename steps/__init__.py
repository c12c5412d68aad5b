"""One thin ZenML step per module: unpack config, call the llmtune library, return artifacts, log metadata."""

import steps.materializers  # noqa: F401  (registers the folder materializers)
from steps.evaluate import evaluate
from steps.import_adapter import import_adapter
from steps.inject_lora import inject_lora
from steps.load_base_model import load_base_model
from steps.merge_and_push import merge_and_push
from steps.prepare_dataset import prepare_dataset
from steps.promotion_gate import promotion_gate
from steps.train_sft import train_sft

__all__ = [
    "evaluate",
    "import_adapter",
    "inject_lora",
    "load_base_model",
    "merge_and_push",
    "prepare_dataset",
    "promotion_gate",
    "train_sft",
]

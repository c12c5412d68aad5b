"""What travels between the steps: one class per artifact kind, each the only place that knows its files.

A folder artifact is a path wrapper whose properties name its parts; a ZenML materializer (steps/) copies
the folder into the artifact store and back, so steps can run in different processes or containers. The
training report is a typed record of its own, not a file inside the adapter folder.

Example:
    >>> data = PreparedData("/tmp/prepared")
    >>> str(data.train_dir), str(data.tokenizer_dir)
    ('/tmp/prepared/train', '/tmp/prepared/tokenizer')
    >>> Adapter("/tmp/adapter").weights_file.name
    'adapter_model.safetensors'
    >>> TrainingReport(final_loss=0.5, first_loss=2.0, train_seconds=9.5, steps=10).loss_fell
    True
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


@dataclass(frozen=True)
class ArtifactDir:
    path: str

    def file(self, name: str) -> Path:
        return Path(self.path) / name


@dataclass(frozen=True)
class PreparedData(ArtifactDir):
    """The prepare step's folder: the train and eval splits (datasets.save_to_disk), the rendered eval prompts
    with their references, the tokenizer with the chat template used, the statistics and their HTML report."""

    TRAIN = "train"
    EVAL = "eval"
    TOKENIZER = "tokenizer"
    EVAL_PROMPTS = "eval_prompts.jsonl"
    STATS = "stats.json"
    REPORT = "report.html"

    @property
    def train_dir(self) -> Path:
        return self.file(self.TRAIN)

    @property
    def eval_dir(self) -> Path:
        return self.file(self.EVAL)

    @property
    def tokenizer_dir(self) -> Path:
        return self.file(self.TOKENIZER)

    @property
    def eval_prompts_file(self) -> Path:
        return self.file(self.EVAL_PROMPTS)

    @property
    def stats_file(self) -> Path:
        return self.file(self.STATS)

    @property
    def report_file(self) -> Path:
        return self.file(self.REPORT)

    def stats(self) -> dict[str, Any]:
        """What the prepare step did (counts, lengths, fingerprint, a marked example)."""
        return dict(json.loads(self.stats_file.read_text(encoding="utf-8")))

    def eval_prompts(self) -> list[dict[str, str]]:
        """The rendered eval prompts with their references."""
        lines = self.eval_prompts_file.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines]

    def tokenizer(self) -> Any:
        """The training tokenizer (its chat template is the one the data was rendered with)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.tokenizer_dir)

    def split(self, name: str) -> Any:
        """The `train` or `eval` split as a datasets.Dataset."""
        from datasets import load_from_disk

        return load_from_disk(str(self.file(name)))


@dataclass(frozen=True)
class QuantizedBase(ArtifactDir):
    """A 4-bit (bitsandbytes) checkpoint in save_pretrained format, with the model's tokenizer."""


@dataclass(frozen=True)
class Adapter(ArtifactDir):
    """A PEFT LoRA adapter folder (save_pretrained: its config and safetensors weights, nothing else)."""

    CONFIG = "adapter_config.json"
    WEIGHTS = "adapter_model.safetensors"

    @property
    def config_file(self) -> Path:
        return self.file(self.CONFIG)

    @property
    def weights_file(self) -> Path:
        return self.file(self.WEIGHTS)

    def config(self) -> dict[str, Any]:
        """The adapter_config.json, after checking the weights are safetensors (a pickle is never read).

        >>> import tempfile
        >>> Adapter(tempfile.mkdtemp()).config()
        Traceback (most recent call last):
        ...
        llmtune.model.hf.PickleWeightsRefused: ... has no adapter_model.safetensors...
        """
        from llmtune.model.hf import PickleWeightsRefused, require_adapter_safetensors

        require_adapter_safetensors(self.path)
        if not self.config_file.is_file():
            raise PickleWeightsRefused(
                f"'{self.path}' has no {self.CONFIG}; a PEFT adapter folder (save_pretrained) has one."
            )
        config: dict[str, Any] = json.loads(self.config_file.read_text())
        return config


@dataclass(frozen=True)
class MergedModel(ArtifactDir):
    """A plain 16-bit transformers model folder with its tokenizer."""


class EvalReport(dict[str, Any]):
    """The evaluate step's output: metrics of base, tuned (and production) plus `samples`, one row per prompt.

    A plain dict, typed so that ZenML stores it as `FILE` with the samples table as `PAGE` (its dashboard view).
    """

    FILE = "report.json"
    PAGE = "samples.html"


class TrainingReport(BaseModel):
    """What the train step did: the loss curve, speed, batching and attention path, and where it ran."""

    model_config = ConfigDict(extra="allow")

    loss_history: list[dict[str, float]] = Field(default_factory=list)
    first_loss: float
    final_loss: float
    train_seconds: float
    steps: int
    approx_tokens_per_second: float = 0.0
    resumed_from_step: int = 0
    packing: bool | None = None
    padding_free: bool = False
    attention: str = ""
    attention_reason: str = ""
    train_rows: int = 0
    rows_after_packing: int = 0
    epochs: float = 0.0
    length_by: str = Field("max_steps", description="What set the length: training.max_steps or num_train_epochs.")
    planned_steps: int = 0
    eval_history: list[dict[str, float]] = Field(default_factory=list, description="eval_loss by step.")
    best_eval_loss: float | None = None
    best_eval_step: int | None = None
    final_eval_loss: float | None = None
    stopped_early: bool = False
    adapter_kept: str = Field("last", description="last = the adapter of the last step; best = of the best eval.")
    adapter_step: int = 0
    data_parallel_processes: int = 1
    backend: str = ""
    backend_note: str = Field("", description="Why another backend than the configured one trained, if so.")
    peak_gpu_memory_gib: float = 0.0
    hardware: str = Field("", description="The machine that trained (GPU or CPU, torch version).")

    @property
    def loss_fell(self) -> bool:
        return self.final_loss < self.first_loss

    def summary(self) -> dict[str, Any]:
        """Everything but the loss curves: step metadata and the model card."""
        return self.model_dump(exclude={"loss_history", "eval_history"})

    def length_line(self) -> str:
        """How long training ran and which adapter it kept, in one line (the run summary prints it).

        >>> TrainingReport(first_loss=2, final_loss=1, train_seconds=3, steps=40, epochs=1.6).length_line()
        '40 steps = 1.6 epochs (by training.max_steps); adapter of the last step'
        >>> TrainingReport(first_loss=2, final_loss=1, train_seconds=3, steps=60, epochs=2.4, planned_steps=75,
        ...     length_by="num_train_epochs", best_eval_loss=0.91, best_eval_step=40, final_eval_loss=0.95,
        ...     stopped_early=True, adapter_kept="best", adapter_step=40).length_line().split("; ")
        ['60 steps = 2.4 epochs (by training.num_train_epochs', 'stopped early of 75 planned)', \
'eval_loss best 0.91 at step 40, last 0.95', 'adapter of the best eval (step 40)']
        """
        why = f"by training.{self.length_by}"
        if self.stopped_early:
            why += f"; stopped early of {self.planned_steps} planned"
        parts = [f"{self.steps} steps = {self.epochs:g} epochs ({why})"]
        if self.best_eval_loss is not None:
            best, last = f"{self.best_eval_loss:.4g}", f"{self.final_eval_loss:.4g}"
            parts.append(f"eval_loss best {best} at step {self.best_eval_step}, last {last}")
        kept = f"the best eval (step {self.adapter_step})" if self.adapter_kept == "best" else "the last step"
        parts.append(f"adapter of {kept}")
        return "; ".join(parts)

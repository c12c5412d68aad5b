"""One typed run configuration, one section per concern, validated before any heavy work.

Defaults live here and nowhere else. A YAML file overrides them, and `--set section.key=value`
overrides the file. Every problem surfaces as a `ConfigError` whose message names the key or file
and what is allowed, so the CLI can print one paragraph and exit 2.

Example:
    >>> cfg = load_config(None, ["training.max_steps=5", "model.backend=hf"])
    >>> cfg.training.max_steps, cfg.model.backend
    (5, 'hf')
    >>> try:
    ...     load_config(None, ["training.max_stpes=5"])
    ... except ConfigError as err:
    ...     print(err)
    Unknown key 'training.max_stpes' (from --set 'training.max_stpes=5'). Did you mean 'max_steps'... Allowed keys ...
"""

from __future__ import annotations

import difflib
import json
import os
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from llmtune.errors import LlmtuneError
from llmtune.paths import PROJECT_DIR, PathKind, looks_like_hub_id, resolve

DEMO_MODEL_PATH = "assets/demo-base"
DEMO_DATASET_PATH = "data/demo/instructions.jsonl"
# Fields of our row formats that data.columns may rename (kept here so config has no data-layer import).
MAPPABLE_COLUMNS = (
    "instruction",
    "input",
    "output",
    "system",
    "history",
    "conversations",
    "messages",
    "text",
    "role",
    "content",
    "tools",
    "prompt",
    "completion",
    "chosen",
    "rejected",
    "label",
)
# What data.role_map may map a role name to; tool_call = an assistant turn whose value is the call (ShareGPT).
ROLE_TARGETS = ("system", "user", "assistant", "tool", "tool_call")
# The chat templates llmtune writes itself (llmtune/data/templates.py), for tokenizers that ship none.
CHAT_TEMPLATE_NAMES = ("chatml", "llama-3", "mistral", "gemma", "phi-3", "alpaca")


def looks_like_file_path(value: str) -> bool:
    """True for a value meant as a file: it names a folder or has a template suffix (not a bare template name).

    >>> looks_like_file_path("templates/gemma.jinja"), looks_like_file_path("my.j2"), looks_like_file_path("gemma")
    (True, True, False)
    """
    return "/" in value or "\\" in value or value.endswith((".jinja", ".jinja2", ".j2"))


class ConfigError(LlmtuneError, ValueError):
    """A configuration problem the user can fix; the message says what to change."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _known_roles(value: dict[str, str]) -> dict[str, str]:
    wrong = sorted(f"{k}: {v}" for k, v in value.items() if v not in ROLE_TARGETS)
    if wrong:
        raise ValueError(f"roles can only be mapped to {', '.join(ROLE_TARGETS)}, not {'; '.join(wrong)}")
    return value


def _known_columns(value: dict[str, str]) -> dict[str, str]:
    unknown = sorted(set(value) - set(MAPPABLE_COLUMNS))
    if unknown:
        raise ValueError(f"unknown keys {unknown}; map any of {', '.join(MAPPABLE_COLUMNS)} to your column names")
    return value


FormatName = Literal["auto", "alpaca", "sharegpt", "messages", "text"]


class DataSourceEntry(_Section):
    """One dataset of `data.sources`. A field left unset (null) takes the data section's value."""

    source: str = Field(
        description="A JSONL/JSON/CSV/Parquet/TXT file, a folder of them or from save_to_disk, or a Hub dataset id."
    )
    name: str | None = Field(
        None, description="Its name in the prepare report and MLflow; null = the file name or Hub id (and subset)."
    )
    weight: float | None = Field(
        None,
        gt=0.0,
        description="Its share of the mix, relative to the other entries' weights (3 and 1 = 75% and 25% of the "
        "rows). The mix is the largest these shares allow without repeating a row (the source that runs out "
        "first is used in full), at most data.max_rows. Set on every entry or on none (null: every row of each).",
    )
    fraction: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Use only this share of the source's own rows (a seeded sample), before any weights; null = all.",
    )
    format: FormatName | None = Field(None, description="Row format of this source; null = data.format.")
    columns: dict[str, str] | None = Field(None, description="Column names of this source; null = data.columns.")
    role_map: dict[str, str] | None = Field(None, description="Role names of this source; null = data.role_map.")
    subset: str | None = Field(None, description="Hub dataset subset; null = data.subset.")
    split: str | None = Field(None, description="Split to read; null = data.split.")
    revision: str | None = Field(None, description="Hub dataset revision; null = data.revision.")
    text_sample_by: Literal["line", "paragraph", "document"] | None = Field(
        None, description=".txt files of this source: documents per line, paragraph or file; null = data's."
    )
    preference: Literal["refuse", "chosen"] | None = Field(
        None, description="Preference files of this source: refuse or train the chosen answers; null = data's."
    )

    @field_validator("role_map")
    @classmethod
    def _known_roles(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return None if value is None else _known_roles(value)

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return None if value is None else _known_columns(value)


@dataclass(frozen=True)
class DataEntry:
    """One dataset to read, in full: `key` names it in messages, `cfg` is the data section as if it were the only
    one (source, format, columns, ... of the entry)."""

    key: str
    label: str
    weight: float | None
    fraction: float | None
    cfg: DataConfig


def _label(source: str, subset: str | None, name: str | None = None) -> str:
    if name:
        return name
    short = source if looks_like_hub_id(source) and not Path(source).exists() else Path(source).name
    return f"{short} ({subset})" if subset else short


def _unique(labels: list[str]) -> list[str]:
    """Labels made distinct by their entry's index where two are the same (the same file under two settings)."""
    return [f"{label} #{i}" if labels.count(label) > 1 else label for i, label in enumerate(labels)]


class DataConfig(_Section):
    """Where the instruction data comes from, how rows are read, templated, filtered and split."""

    source: str | None = Field(
        DEMO_DATASET_PATH,
        description="One dataset: a JSONL/JSON/CSV/Parquet/TXT file, a folder of them or from save_to_disk, or a Hub "
        "dataset id. null when data.sources lists several.",
    )
    sources: list[DataSourceEntry] | None = Field(
        None,
        description="Several datasets, mixed: a list of entries, each a source with optionally its own format, "
        "columns, role_map, subset, split, revision and a weight (share of the mix) or fraction (share of its "
        "rows); replaces data.source. A bare path is an entry with only a source.",
    )
    format: FormatName = Field(
        "auto",
        description="alpaca = instruction/input/output; sharegpt = conversations of from/value; messages = "
        "role/content turns; text = plain completion; auto = detect from the columns.",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Your column names for ours, e.g. {instruction: question, output: answer}; keys: "
        + ", ".join(MAPPABLE_COLUMNS)
        + ".",
    )
    role_map: dict[str, str] = Field(
        default_factory=dict,
        description="Extra role names mapped to " + "/".join(ROLE_TARGETS) + ", e.g. {narrator: system, "
        "observation: tool}; tool_call = an assistant turn whose value is a tool call.",
    )
    subset: str | None = Field(None, description="Hub dataset subset (configuration name).")
    split: str = Field("train", description="Split to read from a Hub dataset or a local dataset folder.")
    revision: str | None = Field(None, description="Hub dataset revision (branch, tag or commit).")
    eval_split: str | None = Field(
        None, description="Held-out split of the same source (e.g. test), or a file; null = eval_fraction of rows."
    )
    chat_template: str | None = Field(
        None,
        description="Chat template for tokenizers without one: a name ("
        + ", ".join(CHAT_TEMPLATE_NAMES)
        + ") or the path of a Jinja file (e.g. templates/my-model.jinja); null uses the tokenizer's own.",
    )
    pad_token: str | None = Field(
        None,
        description="Token to pad batches with, from the tokenizer's vocabulary (e.g. <|fim_pad|>); it must not be "
        "EOS or an end-of-turn token, which the model must learn. null = the tokenizer's pad when it is neither, "
        "else an unused special token chosen automatically (the report names it).",
    )
    template_date: str | None = Field(
        None,
        description="Date (YYYY-MM-DD) that chat templates print as today's (Llama-3.1's 'Today Date'), so the "
        "prepared data and its fingerprint do not change from day to day; null = the real date.",
    )
    train_on_responses_only: bool = Field(True, description="Loss on assistant turns only (prompt tokens masked).")
    max_seq_length: int = Field(256, ge=8, le=131072, description="Longest example in tokens.")
    overlength: Literal["drop", "truncate"] = Field(
        "drop", description="What to do with examples over max_seq_length (both are counted)."
    )
    dedupe: bool = Field(True, description="Drop exact duplicate examples.")
    eval_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="Share of rows held out for evaluation.")
    max_rows: int | None = Field(
        None,
        ge=2,
        description="Use at most this many rows (a seeded subsample; with weighted data.sources, of the mix).",
    )
    on_error: Literal["raise", "skip"] = Field(
        "raise",
        description="raise = stop at the first bad row; skip = skip bad rows, count them, report the first few.",
    )
    seed: int = Field(42, description="Seed for the subsample and the train/eval split.")
    non_text_parts: Literal["error", "drop"] = Field(
        "error",
        description="Message content given as typed parts: text parts are joined; image/audio/other parts are an "
        "error, or (drop) left out and counted.",
    )
    text_sample_by: Literal["line", "paragraph", "document"] = Field(
        "line",
        description=".txt files: one document per line, per blank-line-separated paragraph, or per file.",
    )
    preference: Literal["refuse", "chosen"] = Field(
        "refuse",
        description="Preference files (DPO chosen/rejected, KTO label): refuse = stop and say what the file is; "
        "chosen = train on the chosen answers (KTO: rows labelled true; false rows dropped and counted).",
    )
    max_dropped_fraction: float = Field(
        0.2,
        ge=0.0,
        le=1.0,
        description="Warn (or fail, see on_too_many_dropped) when more than this share of rows is dropped "
        "(empty, duplicate, too long, invalid...; max_rows and preference drops are not counted).",
    )
    on_too_many_dropped: Literal["warn", "raise"] = Field(
        "warn", description="warn = report it and go on; raise = stop the run with the same message."
    )

    @field_validator("role_map")
    @classmethod
    def _known_roles(cls, value: dict[str, str]) -> dict[str, str]:
        return _known_roles(value)

    @field_validator("chat_template")
    @classmethod
    def _template_name_or_file(cls, value: str | None) -> str | None:
        if value is None or value in CHAT_TEMPLATE_NAMES or looks_like_file_path(value):
            return value
        raise ValueError(
            f"'{value}' is not a template name; use one of {', '.join(CHAT_TEMPLATE_NAMES)}, the path of a Jinja "
            "file (ending in .jinja, or with a folder, e.g. ./my_template), or null for the tokenizer's own"
        )

    @field_validator("template_date", mode="before")
    @classmethod
    def _iso_date(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, date):  # YAML reads 2026-01-15 as a date
            return value.isoformat()
        try:
            return date.fromisoformat(str(value)).isoformat()
        except ValueError:
            raise ValueError(f"'{value}' is not a date; write it as YYYY-MM-DD, e.g. 2026-01-15") from None

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, value: dict[str, str]) -> dict[str, str]:
        return _known_columns(value)

    @model_validator(mode="before")
    @classmethod
    def _source_or_sources(cls, data: Any) -> Any:
        """data.sources replaces data.source (whose default is the demo file); entries may be bare paths."""
        if not isinstance(data, dict) or data.get("sources") is None:
            return data
        if data.get("source") is not None:
            raise ValueError(
                "data.source and data.sources are both set: use data.source for one dataset or data.sources for "
                "several (set the other to null)"
            )
        sources = data["sources"]
        if isinstance(sources, list):  # `sources: [a.jsonl, b.jsonl]` is short for entries with only a source
            sources = [{"source": entry} if isinstance(entry, str) else entry for entry in sources]
        return {**data, "source": None, "sources": sources}

    @model_validator(mode="after")
    def _sources_are_complete(self) -> DataConfig:
        if self.sources is None and self.source is None:
            raise ValueError("data.source and data.sources are both null: name one dataset, or list several")
        if self.sources is not None and not self.sources:
            raise ValueError("data.sources is an empty list: list at least one entry (or use data.source)")
        unweighted = [i for i, entry in enumerate(self.sources or []) if entry.weight is None]
        if self.sources and 0 < len(unweighted) < len(self.sources):
            missing = ", ".join(f"data.sources[{i}]" for i in unweighted)
            raise ValueError(
                f"{missing} has no weight while other entries have one: give every entry a weight (its share of "
                f"the mix) or none (every row of every source is used)"
            )
        return self

    def entries(self) -> list[DataEntry]:
        """Each dataset with its settings in full: the entry's own, else the data section's.

        >>> [(e.key, e.label, e.weight) for e in DataConfig(sources=["a.jsonl", "b.jsonl"]).entries()]
        [('data.sources[0]', 'a.jsonl', None), ('data.sources[1]', 'b.jsonl', None)]
        >>> DataConfig(source="rows.jsonl").entries()[0].key
        'data.source'
        """
        if self.sources is None:
            assert self.source is not None
            return [DataEntry("data.source", _label(self.source, self.subset), None, None, self)]
        labels = _unique([_label(e.source, e.subset or self.subset, e.name) for e in self.sources])
        return [
            DataEntry(f"data.sources[{i}]", label, entry.weight, entry.fraction, self._view(entry))
            for i, (entry, label) in enumerate(zip(self.sources, labels, strict=True))
        ]

    def describe(self) -> str:
        """The data in a few words: the source, or each entry's label (and weight).

        >>> DataConfig(sources=[{"source": "a.jsonl", "weight": 3}, {"source": "o/b", "weight": 1}]).describe()
        'a.jsonl (weight 3.0) + o/b (weight 1.0)'
        """
        if self.sources is None:
            return str(self.source)
        return " + ".join(e.label + (f" (weight {e.weight})" if e.weight else "") for e in self.entries())

    def _view(self, entry: DataSourceEntry) -> DataConfig:
        """This section as if it named only `entry` (its unset fields are the section's)."""
        own = {k: v for k, v in entry.model_dump(exclude={"name", "weight", "fraction"}).items() if v is not None}
        return self.model_copy(update={**own, "sources": None})


class ModelConfig(_Section):
    """The base model and how it is loaded in 4-bit."""

    name: str = Field(DEMO_MODEL_PATH, description="Hub model id or local directory in save_pretrained format.")
    revision: str | None = Field(None, description="Hub model revision (branch, tag or commit).")
    backend: Literal["auto", "hf", "unsloth"] = Field(
        "auto", description="auto = unsloth when CUDA and unsloth are present, else hf (transformers+bitsandbytes)."
    )
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="bitsandbytes 4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (QLoRA double quant).")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Dtype of 4-bit matmuls; auto = bfloat16 on CUDA, float32 on CPU."
    )
    trust_remote_code: bool = Field(False, description="Run model code shipped with the checkpoint (off: safer).")
    quant_storage: Literal["auto", "uint8", "compute_dtype"] = Field(
        "auto",
        description="Element type the packed 4-bit weights are stored in. FSDP shards only floating-point "
        "parameters, so training.parallelism=fsdp needs compute_dtype (bitsandbytes' bnb_4bit_quant_storage); "
        "uint8 is bitsandbytes' default. auto = compute_dtype with fsdp, else uint8.",
    )


# lora.init choices (PEFT init_lora_weights names that work on a 4-bit base); pissa_niter_N is accepted too.
LORA_INITS = ("default", "gaussian", "pissa", "olora")
# Inits that take the starting adapter out of the base weights (the base trains as the residual).
RESIDUAL_INITS = ("pissa", "olora")


class LoraConfig(_Section):
    """The LoRA adapter put on the 4-bit base."""

    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r; alpha / sqrt(r) with rslora).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt; all-linear = every linear projection but the LM head."
    )
    seed: int = Field(0, description="Seed for the adapter's initial weights.")
    use_dora: bool = Field(
        False,
        description="DoRA: a trained magnitude per output row on top of the LoRA direction update (PEFT use_dora); "
        "slower steps, often better at low rank.",
    )
    use_rslora: bool = Field(
        False, description="Rank-stabilized LoRA: scale = alpha / sqrt(r) instead of alpha / r (for high ranks)."
    )
    init: str = Field(
        "default",
        description="Initial adapter weights (PEFT init_lora_weights): default = random A, zero B; gaussian = "
        "Gaussian A, zero B; pissa (or pissa_niter_N, a faster randomized SVD) and olora = the top singular / "
        "QR directions of each weight, taken out of the 4-bit base while training (the exported adapter is "
        "converted back to a plain LoRA on the original base).",
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full and saved with the adapter, e.g. [lm_head, embed_tokens] (needed "
        "when new tokens must be learned); tied input/output embeddings stay tied.",
    )

    @field_validator("init")
    @classmethod
    def _known_init(cls, value: str, info: ValidationInfo) -> str:
        niter = value.removeprefix("pissa_niter_")
        if value not in LORA_INITS and not (niter != value and niter.isdigit()):
            raise ValueError(
                f"lora.init={value} is not one of {', '.join(LORA_INITS)} or pissa_niter_N (N iterations of a "
                "randomized SVD). LoftQ is not offered: see the README's Configuration section"
            )
        if info.data.get("use_dora") and value.startswith(RESIDUAL_INITS):
            raise ValueError(
                f"lora.init={value} moves part of each weight into the adapter, and lora.use_dora=true rescales "
                "the whole weight; use one of them"
            )
        return value

    @property
    def residual_init(self) -> bool:
        """Whether the init takes its starting adapter out of the base weights (PiSSA, OLoRA)."""
        return self.init.startswith(RESIDUAL_INITS)


class TrainingConfig(_Section):
    """Supervised fine-tuning with TRL's SFTTrainer."""

    max_steps: int | None = Field(
        300,
        ge=1,
        description="Optimizer steps to run; null when training.num_train_epochs decides (exactly one of the two).",
    )
    num_train_epochs: float | None = Field(
        None,
        gt=0.0,
        validate_default=True,
        description="Passes over the training rows (after packing), instead of max_steps; may be fractional. "
        "Setting it makes max_steps null unless max_steps is set too, which is an error.",
    )
    learning_rate: float = Field(2e-4, gt=0.0, lt=1.0, description="Peak learning rate.")
    per_device_train_batch_size: int = Field(8, ge=1, description="Examples per device per micro-batch.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up steps.")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="How the learning rate falls from its peak after warm-up."
    )
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay on the LoRA weights.")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Clip the gradient norm to this before each step.")
    optim: str = Field("adamw_torch", description="transformers optimizer name, e.g. adamw_8bit on GPU.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory (use on GPU for big models).")
    packing: bool | None = Field(
        None,
        description="Pack examples into max_seq_length rows without padding; position ids keep packed examples from "
        "attending to each other. A step then trains per_device_train_batch_size full rows (many examples each), "
        "so max_steps covers more examples. null = decided from the data: on when example lengths differ (the "
        "fast batching for instruction data), off when every example has the same length.",
    )
    padding_free: bool | None = Field(
        None,
        description="Flatten each batch into one row without padding (position ids keep examples apart). null = "
        "the backend's choice (unsloth: on, hf: off), or off when training.packing=null finds every example the "
        "same length: then Unsloth runs its compiled decoder blocks, ~5% faster (benchmarks/README.md).",
    )
    varlen_attention: bool = Field(
        True,
        description="Attend within each example of a flattened (packed or padding-free) batch with one "
        "variable-length FlashAttention call per layer (torch's varlen_attn, CUDA). false = the backend's own "
        "attention (transformers: a dense block-diagonal mask; Unsloth on torch < 2.12: one call per example).",
    )
    logging_steps: int = Field(10, ge=1, description="Log the training loss every N steps (to MLflow too).")
    eval_steps: int | None = Field(
        None,
        ge=1,
        description="Compute the loss on the prepared eval split every N steps (MLflow curve eval_loss, next to "
        "train_loss); null = off.",
    )
    early_stopping_patience: int | None = Field(
        None,
        ge=1,
        description="Stop once eval_loss has not improved for this many evaluations, and keep the adapter of the "
        "best one (needs eval_steps; a checkpoint is then written at every evaluation); null = off.",
    )
    save_steps: int = Field(
        50,
        ge=0,
        description="Checkpoint every N steps; a killed or retried run resumes from the last one. 0 = off. With "
        "early_stopping_patience, checkpoints follow eval_steps instead.",
    )
    checkpoint_dir: str | None = Field(
        None,
        description="Where checkpoints live; null = under the stack's artifact store when it is local. On cloud "
        "stacks set a path every retry can reach (e.g. a mounted bucket or volume).",
    )
    seed: int = Field(42, description="Seed for shuffling the training rows and dropout.")

    num_gpus: int = Field(
        1,
        ge=0,
        description="GPUs to train on: one process per GPU (accelerate launch), each with its own "
        "per_device_train_batch_size rows of every step. 1 = the step's own process; 0 = every visible GPU "
        "(the step's own process when there is none). How the model is spread: training.parallelism.",
    )
    parallelism: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="With several GPUs: ddp = every GPU holds the whole 4-bit model (fastest while it fits one "
        "GPU); fsdp = the 4-bit base and the adapter are sharded across the GPUs (FSDP2), for models larger "
        "than one GPU. fsdp trains with the hf backend and stores 4-bit weights in the compute dtype.",
    )
    fsdp_cpu_offload: bool = Field(
        False,
        description="With parallelism=fsdp: keep the sharded parameters and gradients in CPU memory between "
        "uses (less GPU memory, slower steps).",
    )

    @model_validator(mode="before")
    @classmethod
    def _epochs_replace_the_default_steps(cls, data: Any) -> Any:
        """num_train_epochs given without max_steps: the length is in epochs, not the default 300 steps."""
        if isinstance(data, dict) and data.get("num_train_epochs") is not None and "max_steps" not in data:
            return {**data, "max_steps": None}
        return data

    @field_validator("num_train_epochs")
    @classmethod
    def _one_length(cls, value: float | None, info: ValidationInfo) -> float | None:
        steps = info.data.get("max_steps", "invalid")
        if value is not None and steps not in (None, "invalid"):
            raise ValueError(
                f"training.max_steps={steps} and training.num_train_epochs={value} are both set; exactly one of "
                "them decides how long training runs: set the other to null (e.g. --set training.max_steps=null)"
            )
        if value is None and steps is None:
            raise ValueError("set training.max_steps or training.num_train_epochs (both are null)")
        return value

    @field_validator("early_stopping_patience")
    @classmethod
    def _stopping_needs_evaluation(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("eval_steps") is None:
            raise ValueError(
                f"training.early_stopping_patience={value} watches the eval loss, which training.eval_steps=null "
                "never computes; set training.eval_steps too (e.g. 50)"
            )
        return value

    @property
    def keeps_best(self) -> bool:
        """Whether training ends on the best evaluated adapter (early stopping on) instead of the last one."""
        return self.early_stopping_patience is not None

    @field_validator("checkpoint_dir")
    @classmethod
    def _checkpoints_on_a_filesystem(cls, value: str | None) -> str | None:
        if value and "://" in value:
            raise ValueError(
                f"training.checkpoint_dir={value} is a URL, but the trainer writes and resumes checkpoints on a "
                "file system; use a path every retry can reach (a mounted bucket, e.g. /gcs/my-bucket/ckpt, or a "
                "shared volume)"
            )
        return value


class EvaluationConfig(_Section):
    """Base against tuned on the held-out rows: loss, generated answers, an optional LLM judge."""

    max_eval_rows: int | None = Field(200, ge=1, description="Rows of the eval split scored for loss (null = all).")
    num_generation_prompts: int = Field(64, ge=0, description="Eval prompts answered by greedy generation.")
    max_new_tokens: int = Field(32, ge=1, description="Longest generated answer.")
    batch_size: int = Field(16, ge=1, description="Batch size for eval loss and generation.")
    score_final_answer: bool = Field(
        True,
        description="Score what follows a reasoning block (<think>...</think>, empty ones included, as Qwen3 and "
        "DeepSeek-R1 write) instead of the whole generation; the reasoning stays in the samples table "
        "(base_reasoning / tuned_reasoning). Answers without such a block are scored as they are.",
    )
    metrics: list[Literal["exact_match", "rouge_l", "chrf", "bleu"]] = Field(
        ["exact_match", "rouge_l", "chrf", "bleu"],
        description="Scores of the greedy answers against the references, each 0-1 (chrF and BLEU: sacrebleu / 100).",
    )
    judge_url: str | None = Field(
        None, description="OpenAI-compatible API base URL (e.g. http://localhost:8000/v1) for LLM-as-judge; null = off."
    )
    judge_model: str | None = Field(None, description="Model name sent to the judge endpoint (needed with judge_url).")
    judge_rubric: str = Field(
        "You grade answers to instructions. Compare the answer with the reference answer for correctness and "
        "completeness. Reply with one line 'Score: N', N an integer from 0 (wrong) to 10 (as good as the reference).",
        description="System message for the judge; it must ask for a reply containing 'Score: N'.",
    )
    judge_prompt: str = Field(
        "Instruction:\n{prompt}\n\nReference answer:\n{reference}\n\nAnswer to grade:\n{answer}",
        description="User message for the judge, with the placeholders {prompt}, {reference} and {answer}.",
    )
    judge_max_score: int = Field(10, ge=1, description="Top of the judge's scale; scores are divided by it (0-1).")
    judge_api_key_env: str = Field(
        "LLMTUNE_JUDGE_API_KEY", description="Environment variable holding the judge API key (unset = no key sent)."
    )
    judge_api_key_secret: str | None = Field(
        None, description="ZenML secret whose 'api_key' value is the judge key; used instead of judge_api_key_env."
    )
    judge_timeout_s: float = Field(60.0, gt=0.0, description="Timeout of one judge request in seconds.")

    @model_validator(mode="after")
    def _judge_is_complete(self) -> EvaluationConfig:
        if self.judge_url and not self.judge_model:
            raise ValueError("evaluation.judge_url is set but evaluation.judge_model is not; name the judge model")
        try:
            self.judge_prompt.format(prompt="", reference="", answer="")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(
                f"evaluation.judge_prompt may only use the placeholders {{prompt}}, {{reference}}, {{answer}} ({err})"
            ) from None
        return self


class ExportConfig(_Section):
    """Merge, check, export and publish the trained adapter."""

    output_dir: str | None = Field(
        "outputs",
        description="Local folder for adapter + merged model, one subfolder per run; null = artifact store only.",
    )
    dtype: Literal["bfloat16", "float16"] = Field("bfloat16", description="Dtype of the merged model.")
    merge_check_prompts: int = Field(8, ge=1, description="Eval prompts used to verify the merged model.")
    merge_check_atol: float = Field(
        0.25,
        gt=0.0,
        description="Largest allowed |logit| gap between the merged model and the 16-bit base + adapter "
        "(the rounding of the merged weights to dtype); the adapter must also move the logits by more than this.",
    )
    merge_check_max_new_tokens: int = Field(
        16, ge=1, description="Greedy tokens per check prompt; merged and base+adapter must generate the same ones."
    )
    formats: list[Literal["adapter", "merged_16bit", "merged_4bit", "gguf"]] = Field(
        ["adapter", "merged_16bit"],
        min_length=1,
        description="What to export: the PEFT adapter, the adapter merged into the original 16-bit base, "
        "that merged model re-quantized to 4-bit, and/or GGUF files of it for llama.cpp and Ollama "
        "(export.gguf_types; checked against the merged model before anything is published).",
    )
    gguf_types: list[Literal["f16", "bf16", "q8_0", "q4_0"]] = Field(
        ["q8_0"],
        min_length=1,
        description="GGUF files to write with formats=[..., gguf], one per type: f16/bf16 (16-bit, the merged "
        "weights as they are), q8_0 (8-bit, about half the size, near-lossless), q4_0 (4-bit, about a quarter; "
        "token embedding and output stay q8_0). The gguf package has no K-quant writer, so no q4_k_m. The first "
        "type is the one the Ollama Modelfile points at.",
    )
    gguf_check_atol: dict[str, float] = Field(
        {"f16": 0.05, "bf16": 0.05, "q8_0": 0.5, "q4_0": 2.0},
        description="Largest allowed |logit| gap per GGUF type between the GGUF file (read back by transformers' "
        "GGUF loader) and the merged 16-bit model on the merge-check prompts; greedy answers may part only at a "
        "near tie within this gap. A file over it is not published.",
    )
    gguf_modelfile_parameters: dict[str, float | int | str] = Field(
        {"temperature": 0.7},
        description="Extra PARAMETER lines of the Ollama Modelfile written beside the GGUF, e.g. {temperature: "
        "0.2, top_p: 0.9}; the stop tokens come from the training template and num_ctx from the model's context "
        "length (at most 4096).",
    )
    hub_include_gguf: bool = Field(
        True, description="With gguf in formats and hub_repo_id set, also upload the GGUF folder to the repo (gguf/)."
    )
    max_shard_size: str = Field(
        "2GB", pattern=r"^\s*\d+(\.\d+)?\s*([KMG]?B)?\s*$", description="Largest safetensors shard of the merged model."
    )
    publish_format: Literal["adapter", "merged_16bit", "merged_4bit"] = Field(
        "merged_16bit", description="Which exported folder goes to the Hub and the MLflow registry (one of formats)."
    )
    hub_repo_id: str | None = Field(
        None, description="Hugging Face Hub repo to push to (owner/name); null = no Hub push."
    )
    hub_private: bool = Field(True, description="Create the Hub repo as private.")
    hub_token_secret: str | None = Field(
        None,
        description="ZenML secret whose 'token' value is the Hub token; null = the HF_TOKEN environment variable.",
    )
    hub_endpoint: str | None = Field(None, description="Hub URL (a mirror or private Hub); null = huggingface.co.")
    mlflow_registered_model: str | None = Field(
        None, description="MLflow Model Registry name to register a version under; null = no registration."
    )
    zenml_model: str | None = Field(
        "llmtune", description="ZenML Model (Model Control Plane) that each run's artifacts join; null = none."
    )

    @model_validator(mode="after")
    def _publish_format_is_exported(self) -> ExportConfig:
        if self.publish_format not in self.formats:
            raise ValueError(f"export.publish_format={self.publish_format} is not in export.formats={self.formats}")
        missing = [t for t in self.gguf_types if t not in self.gguf_check_atol]
        if "gguf" in self.formats and missing:
            raise ValueError(
                f"export.gguf_check_atol has no tolerance for {missing}; give one per type in export.gguf_types, "
                "e.g. {q8_0: 0.5}"
            )
        if len(set(self.gguf_types)) != len(self.gguf_types):
            raise ValueError(f"export.gguf_types={self.gguf_types} names a type twice")
        return self


class PromotionConfig(_Section):
    """The gate between evaluate and merge/push: a run that fails it is not merged, published or promoted."""

    metric: Literal["eval_loss", "perplexity", "exact_match", "rouge_l", "chrf", "bleu", "judge_score"] = Field(
        "eval_loss",
        description="What the gate compares (loss and perplexity: lower is better; the rest: higher). A generation "
        "metric must be in evaluation.metrics (exact_match always is); judge_score needs evaluation.judge_url.",
    )
    min_improvement_over_base: float = Field(
        0.0, description="Tuned must beat base by at least this much, in the metric's units (0 = not worse)."
    )
    max_regression_vs_production: float = Field(
        0.0,
        ge=0.0,
        description="Tuned may fall behind the model's production version by at most this much (scored on the "
        "same held-out rows); 0 = at least as good.",
    )
    promote_to: Literal["staging", "production"] | None = Field(
        "staging",
        description="Stage a passing run's ZenML Model version moves to (and the MLflow registry alias, when "
        "registering); null = gate only, no promotion.",
    )


class SourceConfig(_Section):
    """What `--pipeline export` and `--pipeline evaluate` work on; the finetune pipeline ignores it."""

    run: str | None = Field(None, description="A finetune run (name or id); null = the latest completed one.")
    model_version: int | str | None = Field(
        None, description="A version of export.zenml_model: number, name, or stage (production, staging, latest)."
    )
    adapter: str | None = Field(
        None, description="--pipeline evaluate: a PEFT adapter folder (e.g. outputs/<run>/adapter) on model.name."
    )

    @model_validator(mode="after")
    def _one_source(self) -> SourceConfig:
        chosen = [k for k in ("run", "model_version", "adapter") if getattr(self, k) is not None]
        if len(chosen) > 1:
            raise ValueError(f"set only one of source.run, source.model_version, source.adapter (got {chosen})")
        return self


class RunConfig(_Section):
    """A whole run: one section per concern, each printed with its descriptions by `python run.py config`."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    export: ExportConfig = ExportConfig()
    promotion: PromotionConfig = PromotionConfig()
    source: SourceConfig = SourceConfig()

    @model_validator(mode="after")
    def _check_combinations(self) -> RunConfig:
        if self.lora.alpha > 64 * self.lora.r:
            raise ValueError(f"lora.alpha={self.lora.alpha} is over 64 x lora.r; training would diverge")
        self._gate_metric_is_scored()
        self._quant_storage_fits_parallelism()
        return self

    def _quant_storage_fits_parallelism(self) -> None:
        """Resolve model.quant_storage=auto from training.parallelism; refuse uint8 storage with fsdp."""
        fsdp = self.training.parallelism == "fsdp"
        if self.model.quant_storage == "uint8" and fsdp:
            raise ValueError(
                "training.parallelism=fsdp shards floating-point parameters only, but model.quant_storage=uint8 "
                "stores the 4-bit weights as integers; set model.quant_storage=compute_dtype (or auto)"
            )
        if self.training.fsdp_cpu_offload and not fsdp:
            raise ValueError("training.fsdp_cpu_offload=true needs training.parallelism=fsdp")
        if self.model.quant_storage == "auto":
            self.model.quant_storage = "compute_dtype" if fsdp else "uint8"

    def _gate_metric_is_scored(self) -> None:
        metric, evaluation = self.promotion.metric, self.evaluation
        if metric in ("eval_loss", "perplexity"):
            return
        if metric == "judge_score" and not evaluation.judge_url:
            raise ValueError("promotion.metric=judge_score needs evaluation.judge_url (the judge is off)")
        if metric != "judge_score" and metric != "exact_match" and metric not in evaluation.metrics:
            raise ValueError(f"promotion.metric={metric} is not in evaluation.metrics={evaluation.metrics}")
        if evaluation.num_generation_prompts == 0:
            raise ValueError(f"promotion.metric={metric} needs generated answers; evaluation.num_generation_prompts=0")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(), sort_keys=False)

    @classmethod
    def from_stored(cls, stored: dict[str, Any]) -> RunConfig:
        """The config an earlier run recorded, minus keys this version no longer has (they were renamed or removed).

        >>> RunConfig.from_stored({"export": {"require_improvement": True, "dtype": "float16"}}).export.dtype
        'float16'
        """
        known = {
            section: {k: v for k, v in values.items() if k in _section_class(section).model_fields}
            for section, values in stored.items()
            if section in cls.model_fields and isinstance(values, dict)
        }
        return cls.model_validate(known)


# One dataset or several: setting one of these with --set drops the other from the config file's values.
ONE_OR_SEVERAL = {"source": "sources", "sources": "source"}
# Config keys that hold paths, and what they name (see llmtune/paths.py for where a relative one points).
PATH_KEYS: dict[tuple[str, str], PathKind] = {
    ("data", "source"): "input",
    ("data", "eval_split"): "split",
    ("data", "chat_template"): "file",
    ("model", "name"): "input",
    ("training", "checkpoint_dir"): "output",
    ("export", "output_dir"): "output",
    ("source", "adapter"): "input",
}


def load_config(
    path: str | Path | None, overrides: list[str] | None = None, cwd: str | Path | None = None
) -> RunConfig:
    """Defaults <- YAML file <- `section.key=value` overrides, validated, paths made absolute; raises ConfigError.

    `cwd` is where the command was started (default: the current directory): `path` and the paths in
    `overrides` are relative to it. Paths in the file are relative to the file's folder when they are there,
    else to the project folder, and defaults to the project folder (`llmtune.paths`). A problem is blamed on
    where its value came from: the `--set` that gave it, else the file.

    >>> cfg = load_config(None, ["export.output_dir=my-runs"], cwd="/tmp")
    >>> cfg.export.output_dir, cfg.data.source == str(PROJECT_DIR / DEMO_DATASET_PATH)
    ('/tmp/my-runs', True)
    >>> try:
    ...     load_config(None, ["training.max_steps=many"])
    ... except ConfigError as err:
    ...     print(err)
    Invalid configuration: 'training.max_steps' = 'many' (from --set 'training.max_steps=many') is invalid: ...
    """
    started_in = Path(os.path.abspath(Path(cwd) if cwd is not None else Path.cwd()))
    raw: dict[str, Any] = {}
    if path:
        file = Path(os.path.abspath(started_in / Path(path).expanduser()))
        raw = _read_yaml(file, given=str(path))
        _resolve_paths(raw, [file.parent, PROJECT_DIR])
    given_by_set: dict[str, str] = {}  # "section.key" -> the --set that gave it
    for item in overrides or []:
        given_by_set[_apply_override(raw, item, started_in)] = item
    if "data.source" in given_by_set and "data.sources" in given_by_set:
        raise ConfigError("--set gives both data.source and data.sources; set one of them (they replace each other).")
    _resolve_defaults(raw)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        file_label = f"file '{path}'" if path else "the defaults"
        raise ConfigError(_explain(err, file_label, given_by_set)) from None


def annotated_yaml(cfg: RunConfig) -> str:
    """The config as YAML that loads back to it, each key preceded by its description and default, and marked
    where its value differs from the default (what `python run.py config` prints).

    >>> text = annotated_yaml(load_config(None, ["training.max_steps=5"]))
    >>> print(text[text.index("  # Peak"):][:80])  # doctest: +ELLIPSIS
      # Peak learning rate. (default: 0.0002)
      learning_rate: 0.0002
    ...
    >>> RunConfig.model_validate(yaml.safe_load(text)) == load_config(None, ["training.max_steps=5"])
    True
    """
    lines: list[str] = []
    for section in RunConfig.model_fields:
        section_class = _section_class(section)
        lines += [*_comment(section_class.__doc__ or "", indent=""), f"{section}:"]
        values = getattr(cfg, section).model_dump()
        for key, field in section_class.model_fields.items():
            default = field.get_default(call_default_factory=True)
            note = f"(default: {_inline_yaml(default)}{'; changed' if values[key] != default else ''})"
            lines += _comment(f"{field.description or ''} {note}".strip(), indent="  ")
            lines.append(f"  {key}: {_inline_yaml(values[key])}")
        lines.append("")
    return "\n".join(lines)


def _comment(text: str, indent: str) -> list[str]:
    width = 118 - len(indent)
    return [f"{indent}# {line}" for line in textwrap.wrap(" ".join(text.split()), width)]


def _inline_yaml(value: Any) -> str:
    """One value as a single line of YAML (flow style), e.g. `[a, b]`, `null`, `'1e-4'` stays a string.

    >>> _inline_yaml(["a", "b"]), _inline_yaml(None), _inline_yaml("two\\nlines")
    ('[a, b]', 'null', '"two\\\\nlines"')
    """
    if isinstance(value, str) and "\n" in value:
        return json.dumps(value)  # JSON is YAML, and keeps line breaks as \n on one line
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()


def did_you_mean(name: str, options: Iterable[str]) -> str:
    """' Did you mean ...?' with the closest options (difflib), or '' when none is close.

    >>> did_you_mean("max_stpes", ["max_steps", "warmup_steps", "seed"])
    " Did you mean 'max_steps'?"
    >>> did_you_mean("batch_size", ["per_device_train_batch_size", "seed"])
    " Did you mean 'per_device_train_batch_size'?"
    >>> did_you_mean("zzz", ["max_steps"])
    ''
    """
    options = list(dict.fromkeys(options))  # each once, in order
    close = difflib.get_close_matches(name, options, n=3, cutoff=0.6)
    close += [o for o in options if len(name) > 3 and name in o and o not in close]  # batch_size: per_device_...
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _resolve_paths(raw: dict[str, Any], bases: list[Path]) -> None:
    """Make the path values of a config file absolute, in place (values of the wrong type are left to validation)."""
    for (section, key), kind in PATH_KEYS.items():
        values = raw.get(section)
        if isinstance(values, dict) and key in values:
            values[key] = resolve(values[key], kind, bases, names=CHAT_TEMPLATE_NAMES)
    data = raw.get("data")
    if isinstance(data, dict) and "sources" in data:
        data["sources"] = _resolve_sources(data["sources"], bases)


def _resolve_sources(entries: Any, bases: list[Path]) -> Any:
    """data.sources with each entry's source made absolute (an entry may be a bare path)."""
    if not isinstance(entries, list):
        return entries
    return [
        resolve(entry, "input", bases)
        if isinstance(entry, str)
        else {**entry, "source": resolve(entry["source"], "input", bases)}
        if isinstance(entry, dict) and "source" in entry
        else entry
        for entry in entries
    ]


def _resolve_defaults(raw: dict[str, Any]) -> None:
    """Defaults that are paths (the demo data and model, outputs/) name places in the project folder."""
    for (section, key), kind in PATH_KEYS.items():
        values = raw.setdefault(section, {})
        default = _section_class(section).model_fields[key].default
        replaced = (section, key) == ("data", "source") and isinstance(values, dict) and "sources" in values
        if isinstance(values, dict) and key not in values and isinstance(default, str) and not replaced:
            values[key] = resolve(default, kind, [PROJECT_DIR], names=CHAT_TEMPLATE_NAMES)
    model = raw["model"]
    if isinstance(model, dict) and model.get("name") == DEMO_MODEL_PATH:  # built on first use, so not there yet
        model["name"] = str(PROJECT_DIR / DEMO_MODEL_PATH)  # and owner/name-shaped: never a Hub id


def _read_yaml(path: Path, given: str) -> dict[str, Any]:
    if not path.is_file():
        where = "" if given == str(path) else f" (looked for {path}: --config is read from the folder you run in)"
        raise ConfigError(
            f"Config file '{given}' does not exist{where}. Pass an existing YAML file with --config "
            f"(the shipped ones are under configs/)."
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"Config file '{path}' is not valid YAML: {err}".replace("\n", " ")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"Config file '{path}' must hold a mapping of sections "
            f"({', '.join(RunConfig.model_fields)}), not a {type(data).__name__}."
        )
    return data


def _apply_override(raw: dict[str, Any], item: str, started_in: Path) -> str:
    """Put one `section.key=value` into the raw config (a path read from `started_in`); returns `section.key`."""
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set '{item}' is not of the form section.key=value (e.g. --set training.max_steps=5).")
    section, field = parts
    if section not in RunConfig.model_fields:
        raise ConfigError(
            f"Unknown section '{section}' in --set '{item}'.{did_you_mean(section, RunConfig.model_fields)} "
            f"Allowed sections: {', '.join(RunConfig.model_fields)}."
        )
    if field not in _section_class(section).model_fields:
        raise ConfigError(f"Unknown key '{section}.{field}' (from --set '{item}').{_unknown_key_hint(section, field)}")
    raw.setdefault(section, {})
    if not isinstance(raw[section], dict):
        raise ConfigError(f"Section '{section}' must be a mapping.")
    # YAML parsing gives `5` -> int, `true` -> bool, `null` -> None, `[a, b]` -> list, like in the file.
    value = yaml.safe_load(text) if text.strip() else text
    if (section, field) in PATH_KEYS:  # a path typed on the command line is relative to where it was typed
        value = resolve(value, PATH_KEYS[section, field], [started_in], names=CHAT_TEMPLATE_NAMES)
    if (section, field) == ("data", "sources"):
        value = _resolve_sources(value, [started_in])
    if section == "data" and field in ONE_OR_SEVERAL:  # --set data.source=x replaces the file's data.sources
        raw[section].pop(ONE_OR_SEVERAL[field], None)
    raw[section][field] = value
    return f"{section}.{field}"


def _unknown_key_hint(section: str, field: str) -> str:
    """The closest keys of the section, the same key in other sections, and the section's allowed keys."""
    allowed = _section_class(section).model_fields
    elsewhere = [
        f"{s}.{field}" for s in RunConfig.model_fields if s != section and field in _section_class(s).model_fields
    ]
    hint = did_you_mean(field, allowed) or did_you_mean(field, elsewhere)  # this section's keys first
    return f"{hint} Allowed keys in '{section}': {', '.join(allowed)} (python run.py config lists them described)."


def _section_class(section: str) -> type[BaseModel]:
    annotation = RunConfig.model_fields[section].annotation
    assert isinstance(annotation, type) and issubclass(annotation, BaseModel)
    return annotation


def _explain(err: ValidationError, file_label: str, given_by_set: dict[str, str]) -> str:
    problems = []
    for e in err.errors():
        loc, message = _dotted(e["loc"]), e["msg"].removeprefix("Value error, ")
        origin = given_by_set.get(".".join(str(p) for p in e["loc"][:2]))
        source = f"from --set '{origin}'" if origin else f"from {file_label}"
        if e["type"] == "extra_forbidden":
            problems.append(_unknown_in_file(e["loc"], source))
        elif e["type"] == "missing":
            problems.append(f"'{loc}' is missing ({source}); it is required.")
        elif len(e["loc"]) <= 1:  # a check across keys: name every place the values may have come from
            sets = "".join(f", --set '{item}'" for item in given_by_set.values())
            problems.append(f"{message} (from {file_label}{sets}).")
        else:
            problems.append(f"'{loc}' = {e.get('input')!r} ({source}) is invalid: {message}.")
    return "Invalid configuration: " + " ".join(problems)


def _dotted(loc: tuple[int | str, ...]) -> str:
    """A validation error's location written as the user writes the key.

    >>> _dotted(("data", "sources", 1, "weight"))
    'data.sources[1].weight'
    """
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")


def _unknown_in_file(loc: tuple[int | str, ...], source: str) -> str:
    name = _dotted(loc)
    if loc[:2] == ("data", "sources") and len(loc) == 4:
        allowed = list(DataSourceEntry.model_fields)
        hint = did_you_mean(str(loc[3]), allowed)
        return f"Unknown key '{name}' ({source}).{hint} Allowed keys in a data.sources entry: {', '.join(allowed)}."
    if len(loc) > 1 and str(loc[0]) in RunConfig.model_fields:
        return f"Unknown key '{name}' ({source}).{_unknown_key_hint(str(loc[0]), str(loc[1]))}"
    sections = RunConfig.model_fields
    return (
        f"Unknown section '{name}' ({source}).{did_you_mean(name, sections)} Allowed sections: {', '.join(sections)}."
    )

"""One typed run configuration, one section per concern, validated before any heavy work.

Defaults live here and nowhere else. A YAML file overrides them, and `--set section.key=value`
overrides the file. Every problem surfaces as a `ConfigError` whose message names the key or file
and what is allowed, so the CLI can print one paragraph and exit 2.

Example:
    >>> cfg = load_config(None, ["training.max_steps=5", "model.backend=hf"])
    >>> cfg.training.max_steps, cfg.model.backend
    (5, 'hf')
    >>> load_config(None, ["training.max_stpes=5"])
    Traceback (most recent call last):
    ...
    llmtune.config.ConfigError: Unknown key 'training.max_stpes' (from --set). Allowed keys in 'training': ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from llmtune.errors import LlmtuneError

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


class ConfigError(LlmtuneError, ValueError):
    """A configuration problem the user can fix; the message says what to change."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    source: str = Field(
        DEMO_DATASET_PATH,
        description="A JSONL/JSON/CSV/Parquet/TXT file, a folder of them or from save_to_disk, or a Hub dataset id.",
    )
    format: Literal["auto", "alpaca", "sharegpt", "messages", "text"] = Field(
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
    chat_template: Literal["chatml", "llama-3", "alpaca"] | None = Field(
        None, description="Named template for tokenizers without one; null uses the tokenizer's own."
    )
    train_on_responses_only: bool = Field(True, description="Loss on assistant turns only (prompt tokens masked).")
    max_seq_length: int = Field(256, ge=8, le=131072, description="Longest example in tokens.")
    overlength: Literal["drop", "truncate"] = Field(
        "drop", description="What to do with examples over max_seq_length (both are counted)."
    )
    dedupe: bool = Field(True, description="Drop exact duplicate examples.")
    eval_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="Share of rows held out for evaluation.")
    max_rows: int | None = Field(None, ge=2, description="Use at most this many rows (a seeded subsample).")
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
        wrong = sorted(f"{k}: {v}" for k, v in value.items() if v not in ROLE_TARGETS)
        if wrong:
            raise ValueError(f"roles can only be mapped to {', '.join(ROLE_TARGETS)}, not {'; '.join(wrong)}")
        return value

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(MAPPABLE_COLUMNS))
        if unknown:
            raise ValueError(f"unknown keys {unknown}; map any of {', '.join(MAPPABLE_COLUMNS)} to your column names")
        return value


class ModelConfig(_Section):
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


# lora.init choices (PEFT init_lora_weights names that work on a 4-bit base); pissa_niter_N is accepted too.
LORA_INITS = ("default", "gaussian", "pissa", "olora")
# Inits that take the starting adapter out of the base weights (the base trains as the residual).
RESIDUAL_INITS = ("pissa", "olora")


class LoraConfig(_Section):
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
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
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
    seed: int = Field(42)

    num_gpus: int = Field(
        1,
        ge=0,
        description="GPUs to train on, data-parallel: one process per GPU (accelerate launch), each with the whole "
        "4-bit model and its own per_device_train_batch_size rows of every step. 1 = the step's own process; "
        "0 = every visible GPU (the step's own process when there is none).",
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
    max_eval_rows: int | None = Field(200, ge=1, description="Rows of the eval split scored for loss (null = all).")
    num_generation_prompts: int = Field(64, ge=0, description="Eval prompts answered by greedy generation.")
    max_new_tokens: int = Field(32, ge=1, description="Longest generated answer.")
    batch_size: int = Field(16, ge=1, description="Batch size for eval loss and generation.")
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
    formats: list[Literal["adapter", "merged_16bit", "merged_4bit"]] = Field(
        ["adapter", "merged_16bit"],
        min_length=1,
        description="What to export: the PEFT adapter, the adapter merged into the original 16-bit base, "
        "and/or that merged model re-quantized to 4-bit.",
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
        return self

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


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults <- YAML file <- `section.key=value` overrides, validated; raises ConfigError."""
    raw = _read_yaml(Path(path)) if path else {}
    for item in overrides or []:
        _apply_override(raw, item)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_explain(err, source=str(path) if path else "defaults and --set")) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(
            f"Config file '{path}' does not exist. Pass an existing YAML file with --config "
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


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set '{item}' is not of the form section.key=value (e.g. --set training.max_steps=5).")
    section, field = parts
    if section not in RunConfig.model_fields:
        raise ConfigError(
            f"Unknown section '{section}' in --set '{item}'. Allowed sections: {', '.join(RunConfig.model_fields)}."
        )
    allowed = _section_class(section).model_fields
    if field not in allowed:
        raise ConfigError(f"Unknown key '{key}' (from --set). Allowed keys in '{section}': {', '.join(allowed)}.")
    raw.setdefault(section, {})
    if not isinstance(raw[section], dict):
        raise ConfigError(f"Section '{section}' must be a mapping.")
    # YAML parsing gives `5` -> int, `true` -> bool, `null` -> None, `[a, b]` -> list, like in the file.
    raw[section][field] = yaml.safe_load(text) if text.strip() else text


def _section_class(section: str) -> type[BaseModel]:
    annotation = RunConfig.model_fields[section].annotation
    assert isinstance(annotation, type) and issubclass(annotation, BaseModel)
    return annotation


def _explain(err: ValidationError, source: str) -> str:
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            section = str(e["loc"][0]) if len(e["loc"]) > 1 else None
            allowed = (
                _section_class(section).model_fields if section in RunConfig.model_fields else RunConfig.model_fields
            )
            where = f"'{section}'" if section in RunConfig.model_fields else "the top level"
            problems.append(f"Unknown key '{loc}'. Allowed keys in {where}: {', '.join(allowed)}.")
        elif not loc:
            problems.append(e["msg"].removeprefix("Value error, ") + ".")
        else:
            problems.append(f"'{loc}' = {e.get('input')!r} is invalid: {e['msg']}.")
    return f"Invalid configuration (from {source}): " + " ".join(problems)

"""Checks that run before any model is loaded: do the data and model exist, are the data rows usable.

Example:
    >>> from llmtune.config import RunConfig
    >>> check_inputs(RunConfig.model_validate({"data": {"source": "no/such.jsonl"}}))
    Traceback (most recent call last):
    ...
    llmtune.preflight.PreflightError: data.source: 'no/such.jsonl' does not exist. ...
"""

from __future__ import annotations

import os
from pathlib import Path

from llmtune import data
from llmtune.config import DEMO_MODEL_PATH, RunConfig, did_you_mean
from llmtune.data.sources import SUPPORTED_SUFFIXES
from llmtune.errors import LlmtuneError
from llmtune.model.source import ModelSourceError, check_model_source
from llmtune.train import distributed

# transformers optimizer names accepted without importing transformers (tests check they are all valid).
COMMON_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "adafactor", "sgd")


class PreflightError(LlmtuneError, ValueError):
    """An input the run cannot use; the message names it and what to do."""


def check_inputs(cfg: RunConfig, build_demo: bool = True) -> None:
    """Validate data and model sources and the training settings a run would only trip on later; build the demo
    base model on first use."""
    _check_data(cfg)
    _check_eval_split(cfg)
    _check_model(cfg, build_demo)
    _check_training(cfg)


def _check_data(cfg: RunConfig) -> None:
    source = Path(cfg.data.source)
    if not source.exists() and not data.looks_like_hub_id(cfg.data.source):
        raise PreflightError(
            f"data.source: '{cfg.data.source}' does not exist. Point data.source at a JSONL, JSON, CSV, "
            f"Parquet or TXT file or a folder (relative to the project root), or a Hub dataset id like owner/name."
        )
    if source.is_file():  # cheap to read and convert here; folders and Hub ids are read by the step
        try:  # raises when no row is usable, naming the first problems
            data.load_examples(cfg.data, data.ErrorLog(cfg.data.on_error))
        except data.DataError as err:
            raise PreflightError(f"data.source: {err}") from None


def _check_eval_split(cfg: RunConfig) -> None:
    """data.eval_split is a file or folder, or a split name of a source that has splits (a folder or Hub id)."""
    split = cfg.data.eval_split
    if split is None:
        return
    if Path(split).is_file():
        try:
            data.load_examples(cfg.data, data.ErrorLog(cfg.data.on_error), split=split)
        except data.DataError as err:
            raise PreflightError(f"data.eval_split: {err}") from None
        return
    if Path(split).exists():
        return
    if "/" in split or split.endswith(SUPPORTED_SUFFIXES):
        raise PreflightError(
            f"data.eval_split: '{split}' does not exist. Name an existing file or folder of held-out rows "
            "(relative to the project root), a split of data.source (e.g. test), or null to hold out "
            "data.eval_fraction of the rows."
        )
    if Path(cfg.data.source).is_file():
        raise PreflightError(
            f"data.eval_split: '{split}' is not a file, and data.source '{cfg.data.source}' is a single file, which "
            "has no named splits. Name a file of held-out rows, or null to hold out data.eval_fraction of the rows."
        )


def _check_training(cfg: RunConfig) -> None:
    _check_optimizer(cfg.training.optim)
    if cfg.training.num_gpus != 1 and not os.environ.get("LLMTUNE_RECIPE"):  # a local run trains on these GPUs
        try:
            distributed.processes_for(cfg.training.num_gpus, distributed.visible_gpus())
        except distributed.DataParallelError as err:
            raise PreflightError(str(err)) from None


def _check_optimizer(optim: str) -> None:
    if optim in COMMON_OPTIMIZERS:
        return  # no need to import transformers (seconds) to know these
    from transformers.training_args import OptimizerNames

    known = [o.value for o in OptimizerNames]
    if optim not in known:
        raise PreflightError(
            f"training.optim: '{optim}' is not a transformers optimizer."
            f"{did_you_mean(optim, known)} Common ones: adamw_torch (CPU and GPU), adamw_8bit and "
            "paged_adamw_8bit (GPU, bitsandbytes), adafactor."
        )


def _check_model(cfg: RunConfig, build_demo: bool) -> None:
    if cfg.model.name == DEMO_MODEL_PATH and not Path(DEMO_MODEL_PATH).exists() and build_demo:
        from llmtune.demo import ensure_demo_model

        ensure_demo_model(Path(DEMO_MODEL_PATH))
    try:
        check_model_source(cfg.model.name, cfg.model.revision)
    except ModelSourceError as err:
        raise PreflightError(str(err)) from None

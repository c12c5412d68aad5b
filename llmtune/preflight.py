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

from llmtune import data, hub
from llmtune.config import CHAT_TEMPLATE_NAMES, DEMO_MODEL_PATH, DataEntry, RunConfig, did_you_mean
from llmtune.data.sources import SUPPORTED_SUFFIXES
from llmtune.errors import LlmtuneError
from llmtune.model.source import ModelSourceError, check_model_source
from llmtune.paths import PROJECT_DIR
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


# Appended to "does not exist" messages: where a relative path was looked for (llmtune/paths.py).
WHERE_PATHS_POINT = (
    "A relative path given with --config or --set is read from the folder you run the command in; one in a "
    "config file, next to that file, else in the project folder."
)


def _check_data(cfg: RunConfig) -> None:
    for entry in cfg.data.entries():
        _check_source(entry)
    template = cfg.data.chat_template
    if template and template not in CHAT_TEMPLATE_NAMES and not Path(template).is_file():
        raise PreflightError(
            f"data.chat_template: '{template}' does not exist. Give the path of a Jinja chat template file, or "
            f"one of the names {', '.join(CHAT_TEMPLATE_NAMES)}. {WHERE_PATHS_POINT}"
        )


def _check_source(entry: DataEntry) -> None:
    """One dataset (data.source, or an entry of data.sources) exists, and a local file has a usable row."""
    key, given = entry.key, str(entry.cfg.source)
    field = "data.source" if key == "data.source" else f"{key}.source"
    source = Path(given)
    if not source.exists() and not data.looks_like_hub_id(given):
        raise PreflightError(
            f"{field}: '{given}' does not exist. Point {field} at a JSONL, JSON, CSV, "
            f"Parquet or TXT file or a folder, or a Hub dataset id like owner/name. {WHERE_PATHS_POINT}"
        )
    if not source.exists():  # a Hub id: downloaded here before, or readable with this token
        try:
            hub.check_readable(hub.HubRepo(given, "dataset", field, entry.cfg.revision))
        except hub.HubAccessError as err:
            raise PreflightError(str(err)) from None
        return
    if source.is_file():  # cheap to read and convert here; folders and Hub ids are read by the step
        try:  # raises when no row is usable, naming the first problems
            data.load_examples(entry.cfg, data.ErrorLog(entry.cfg.on_error))
        except data.DataError as err:
            prefix = "data.source: " if key == "data.source" else ""  # an entry's message starts with its key
            raise PreflightError(prefix + data.in_entry(entry, str(err))) from None


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
            f"data.eval_split: '{split}' does not exist. Name an existing file or folder of held-out rows, "
            "a split of the data source (e.g. test), or null to hold out data.eval_fraction of the rows. "
            f"{WHERE_PATHS_POINT}"
        )
    single_files = [e for e in cfg.data.entries() if e.cfg.source and Path(e.cfg.source).is_file()]
    if single_files:
        raise PreflightError(
            f"data.eval_split: '{split}' is not a file, and {single_files[0].key} '{single_files[0].cfg.source}' is "
            "a single file, which has no named splits. Name a file of held-out rows, or null to hold out "
            "data.eval_fraction of the rows."
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
    path = Path(cfg.model.name)
    if _is_demo_model(path) and not path.exists() and build_demo:
        from llmtune.demo import ensure_demo_model

        ensure_demo_model(path)
    try:
        check_model_source(cfg.model.name, cfg.model.revision)
    except ModelSourceError as err:
        where = f" {WHERE_PATHS_POINT}" if "does not exist" in str(err) else ""
        raise PreflightError(f"{err}{where}") from None


def _is_demo_model(path: Path) -> bool:
    """The demo base, as the defaults name it (relative) or as load_config resolves it (in the project)."""
    return path == Path(DEMO_MODEL_PATH) or path == PROJECT_DIR / DEMO_MODEL_PATH

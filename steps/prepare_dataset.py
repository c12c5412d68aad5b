"""Step 1: read, template, tokenize, mask and split the instruction data; report what was done."""

import tempfile
from typing import Annotated

from transformers import AutoTokenizer
from zenml import step
from zenml.logger import get_logger

from llmtune import data
from llmtune.artifacts import PreparedData
from llmtune.config import DataConfig
from llmtune.data import report
from steps import tracking

logger = get_logger(__name__)


@step(experiment_tracker=True)
def prepare_dataset(
    cfg: DataConfig,
    tokenizer_source: str,
    trust_remote_code: bool = False,
    source_fingerprint: str = "",
    tokenizer_revision: str | None = None,
    tokenizer_key: str = "",
) -> Annotated[PreparedData, "prepared_data"]:
    """`source_fingerprint` (a hash of the local data's bytes) and `tokenizer_key` (the tokenizer's revision and a
    hash of its chat template's renderings, `templates.tokenizer_cache_key`) are only here to key the step cache
    on content: edited data or an edited chat_template.jinja at the same path prepares again."""
    out = tempfile.mkdtemp(prefix="llmtune-data-")
    tokenizer = AutoTokenizer.from_pretrained(
        tokenizer_source, revision=tokenizer_revision, trust_remote_code=trust_remote_code
    )
    stats = data.prepare(cfg, tokenizer, out)
    for line in report.warning_lines(stats):
        logger.warning(line)
    tracking.record(
        metadata={
            **{k: v for k, v in stats.items() if k not in ("example", "length_histogram")},
            "source_fingerprint": source_fingerprint,
            "tokenizer_key": tokenizer_key,
        },
        params={
            **tracking.section_params("data", cfg),
            "data.fingerprint": stats["fingerprint"],
            "data.format": stats["format"],
        },
        metrics=_metrics(stats),
    )
    prepared = PreparedData(out)
    plot = report.save_length_plot(stats, prepared.file("token_lengths.png"))
    tracking.log_files([prepared.report_file, prepared.stats_file, plot], "data")
    return prepared


def _metrics(stats: dict) -> dict[str, float]:
    lengths = stats["token_length"]
    return {
        "data_rows_in": stats["rows_in"],
        "data_rows_kept": stats["rows_kept"],
        "data_train_rows": stats["train_rows"],
        "data_eval_rows": stats["eval_rows"],
        "data_trained_tokens": stats["trained_tokens"],
        **{f"data_tokens_{k}": lengths[k] for k in ("p50", "p95", "max")},
        **{f"data_dropped_{reason}": n for reason, n in stats["dropped"].items()},
        **_source_metrics(stats.get("sources", [])),
    }


def _source_metrics(sources: list[dict]) -> dict[str, float]:
    """Rows kept, train rows and share of the mix of each entry of data.sources (`data_sources_1_rows_kept`)."""
    return {
        f"data_sources_{i}_{key}": source[key]
        for i, source in enumerate(sources)
        for key in ("rows_in", "rows_kept", "train_rows", "eval_rows", "share")
    }

"""Dataset preparation: read instruction data in the shape users have it, template, tokenize, mask, split.

Modules, in the order data flows through them: `sources` (files, folders, Hub ids), `preference`
(DPO/KTO files: refused, or their chosen answers as SFT rows), `formats` (alpaca, sharegpt, messages,
text, tool calls -> `Example`), `templates` (chat templates, pad token, tool support), `encode` (tokens
and loss labels), `mix` (how many rows each of several sources gives), `prepare` (cleaning, mixing, length,
split, warnings, the prepared folder) and `report` (what
it did, as text, HTML and a plot).

Example:
    >>> from llmtune.config import DataConfig
    >>> loaded = load_examples(DataConfig(max_rows=5), ErrorLog("raise"))
    >>> loaded.format, loaded.rows_read > 5, loaded.unused_columns
    ('alpaca', True, [])
"""

from __future__ import annotations

from llmtune.data.encode import Encoded, encode_examples, encode_kept
from llmtune.data.errors import DataError, ErrorLog
from llmtune.data.formats import Example, Turn, detect_format, to_example
from llmtune.data.preference import detect_preference
from llmtune.data.prepare import Loaded, in_entry, load_examples, prepare, sources_fingerprint
from llmtune.data.sources import looks_like_hub_id, read_records, source_fingerprint
from llmtune.data.templates import CHATML_TEMPLATE, TEMPLATE_NAMES, configure_tokenizer

__all__ = [
    "CHATML_TEMPLATE",
    "TEMPLATE_NAMES",
    "DataError",
    "Encoded",
    "ErrorLog",
    "Example",
    "Loaded",
    "Turn",
    "configure_tokenizer",
    "detect_format",
    "detect_preference",
    "encode_examples",
    "encode_kept",
    "in_entry",
    "load_examples",
    "looks_like_hub_id",
    "prepare",
    "read_records",
    "source_fingerprint",
    "sources_fingerprint",
    "to_example",
]

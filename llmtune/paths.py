"""Where a relative path in the run config points, decided once, when the config is loaded.

- On the command line (`--config`, `--set data.source=...`): the folder the command was started in.
- In a config file: next to the config file when it is there, otherwise the project folder (where run.py is):
  the shipped configs under configs/ name `data/demo/instructions.jsonl`, `assets/demo-base` and `outputs`
  that way, and a config of your own can sit beside its data.
- A default (the demo data and model, `outputs`): the project folder.

Resolved paths are absolute, so every step reads the same file whatever its working directory. A value that
exists nowhere stays a name where it may be one: a Hub id (`owner/name`) for data and models, a split name
(`test`) for `data.eval_split`, a template name for `data.chat_template`.

Example:
    >>> import tempfile
    >>> here = Path(tempfile.mkdtemp())
    >>> _ = (here / "rows.jsonl").write_text("{}")
    >>> resolve("rows.jsonl", "input", [here]) == str(here / "rows.jsonl")
    True
    >>> resolve("yahma/alpaca-cleaned", "input", [here]), resolve("test", "split", [here])
    ('yahma/alpaca-cleaned', 'test')
    >>> resolve("results", "output", [here, PROJECT_DIR]) == str(PROJECT_DIR / "results")  # not next to the file
    True
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, Literal

PROJECT_DIR = Path(__file__).resolve().parents[1]
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
TEMPLATE_FILE_SUFFIXES = (".jinja", ".jinja2", ".j2")

# input: a file or folder to read, or a Hub id; output: a folder to write; split: a split name or a file to
# read; file: a file to read, or one of the names passed as `names`.
PathKind = Literal["input", "output", "split", "file"]


def looks_like_hub_id(value: str) -> bool:
    """True for 'owner/name' strings that are not file names.

    >>> looks_like_hub_id("yahma/alpaca-cleaned"), looks_like_hub_id("data/rows.jsonl")
    (True, False)
    """
    parts = value.split("/")
    return len(parts) == 2 and all(parts) and not value.endswith(DATA_FILE_SUFFIXES)


def resolve(value: Any, kind: PathKind, bases: Sequence[Path], names: Collection[str] = ()) -> Any:
    """`value` as an absolute path: the first of `bases` that has it, else the last (see the module docstring).

    Values that are not strings are returned as they are, for validation to report.
    """
    if not isinstance(value, str) or not value.strip() or "://" in value or value in names:
        return value
    path = Path(value).expanduser()
    if path.is_absolute():
        return os.path.abspath(path)  # normalised; symlinks kept (a file's name decides how it is read)
    for base in bases:
        if (base / path).exists():
            return os.path.abspath(base / path)
    if kind == "input" and looks_like_hub_id(value):
        return value
    if kind in ("split", "file") and not _looks_like_a_path(value):  # a split or template name, checked later
        return value
    return os.path.abspath(bases[-1] / path)


def _looks_like_a_path(value: str) -> bool:
    """A value found nowhere is still meant as a path when it names a folder or has a data or template suffix.

    >>> _looks_like_a_path("gema"), _looks_like_a_path("my.jinja"), _looks_like_a_path("test")
    (False, True, False)
    """
    return "/" in value or os.sep in value or value.endswith((*DATA_FILE_SUFFIXES, *TEMPLATE_FILE_SUFFIXES))

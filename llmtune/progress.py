"""Progress bars for the long waits (demo build, evaluation, merge): a live tqdm bar on a terminal, and in a step
log or pipe a plain line at most every 30 seconds and at the end, so logs stay readable.

Example:
    >>> import io
    >>> out = io.StringIO()
    >>> with bar(total=4, desc="evaluate tuned: answers", unit="prompt", file=out) as shown:
    ...     shown.update(4)
    >>> "evaluate tuned: answers: 100%" in out.getvalue() and "4/4" in out.getvalue()
    True
"""

from __future__ import annotations

import sys
from typing import Any


def bar(total: int, desc: str, unit: str, disable: bool = False, **options: Any) -> Any:
    """A tqdm bar of `total` `unit`s, styled for where the output goes (see the module docstring)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=disable, **{**_style(), **options})


def _style() -> dict[str, Any]:
    if sys.stderr.isatty():
        return {"dynamic_ncols": True}
    return {"file": _Lines(sys.stdout), "mininterval": 30.0, "ascii": True, "ncols": 100}


class _Lines:
    """A stream for tqdm off a terminal: each refresh becomes its own line (tqdm redraws with carriage returns,
    which a log file or the ZenML step log would keep as one ever-growing line).

    >>> import io
    >>> out = io.StringIO(); lines = _Lines(out)
    >>> lines.write("\\rtrain:  50%| 1/2"); lines.write("\\rtrain: 100%| 2/2"); lines.write("\\n")
    >>> out.getvalue()
    'train:  50%| 1/2\\ntrain: 100%| 2/2\\n'
    """

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()

"""LLM-as-judge over any OpenAI-compatible chat completions endpoint (vLLM, llama.cpp server, OpenAI, ...).

Off unless `evaluation.judge_url` is set. The judge sees the rubric as the system message and the
instruction, reference and answer in the user message, and replies with 'Score: N'; scores are
divided by `judge_max_score` so they sit on 0-1 like the other metrics. Only the standard library
is used for HTTP. The API key is passed in by the caller and only ever goes into the request header.

Example:
    >>> parse_score("The answer is right. Score: 8", max_score=10)
    0.8
    >>> chat_completions_url("http://localhost:8000/v1/")
    'http://localhost:8000/v1/chat/completions'
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from llmtune.config import EvaluationConfig
from llmtune.errors import LlmtuneError

SCORE_PATTERN = re.compile(r"score\s*[:=]?\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


class JudgeError(LlmtuneError, RuntimeError):
    """The judge endpoint failed or replied with no usable score; the message says which and why."""


@dataclass(frozen=True)
class Judge:
    url: str
    model: str
    rubric: str
    prompt_template: str
    max_score: int
    timeout_s: float
    api_key: str | None = None

    def __repr__(self) -> str:  # never show the key in logs or tracebacks
        return f"Judge(url={self.url!r}, model={self.model!r})"


def judge_from_config(cfg: EvaluationConfig, api_key: str | None = None) -> Judge | None:
    """The judge configured in `cfg`, or None when it is off; the key defaults to `cfg.judge_api_key_env`."""
    if not cfg.judge_url or not cfg.judge_model:
        return None
    return Judge(
        url=chat_completions_url(cfg.judge_url),
        model=cfg.judge_model,
        rubric=cfg.judge_rubric,
        prompt_template=cfg.judge_prompt,
        max_score=cfg.judge_max_score,
        timeout_s=cfg.judge_timeout_s,
        api_key=api_key if api_key is not None else os.environ.get(cfg.judge_api_key_env),
    )


def chat_completions_url(base_url: str) -> str:
    """The chat completions endpoint under an API base URL (left as is when it already names it)."""
    base = base_url.rstrip("/")
    return base if base.endswith("/chat/completions") else f"{base}/chat/completions"


def score_answer(judge: Judge, prompt: str, reference: str, answer: str) -> float:
    """The judge's 0-1 score of `answer` to `prompt`, given the reference answer."""
    user = judge.prompt_template.format(prompt=prompt, reference=reference, answer=answer)
    messages = [{"role": "system", "content": judge.rubric}, {"role": "user", "content": user}]
    return parse_score(_complete(judge, messages), judge.max_score)


def parse_score(reply: str, max_score: int) -> float:
    """'Score: N' in the judge's reply, divided by `max_score` and clipped to 0-1."""
    match = SCORE_PATTERN.search(reply)
    if not match:
        raise JudgeError(
            f"The judge's reply has no 'Score: N' (reply: {reply[:200]!r}); adjust evaluation.judge_rubric."
        )
    return min(max(float(match.group(1)) / max_score, 0.0), 1.0)


def add_judge_scores(report: dict[str, Any], judge: Judge) -> None:
    """Per-sample `base_judge`/`tuned_judge` on report['samples'], and their means as `*_judge_score`.

    A `champion` column (the production version's answers, when the gate re-scored it) is judged too.
    """
    samples = report["samples"]
    present = ("base", "tuned", "champion") if samples and "champion" in samples[0] else ("base", "tuned")
    for name in present:
        for sample in samples:
            asked = sample.get("prompt") or sample["instruction"]  # the rendered prompt keeps earlier turns
            sample[f"{name}_judge"] = round(score_answer(judge, asked, sample["reference"], sample[name]), 4)
        mean = sum(s[f"{name}_judge"] for s in samples) / len(samples) if samples else 0.0
        report[f"{name}_judge_score"] = round(mean, 4)


def _complete(judge: Judge, messages: list[dict[str, str]]) -> str:
    body = json.dumps({"model": judge.model, "messages": messages, "temperature": 0.0, "max_tokens": 64})
    headers = {"Content-Type": "application/json"}
    if judge.api_key:
        headers["Authorization"] = f"Bearer {judge.api_key}"
    request = urllib.request.Request(judge.url, data=body.encode("utf-8"), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=judge.timeout_s) as response:
            payload = json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as err:
        detail = err.read().decode("utf-8", "replace")[:200]
        raise JudgeError(f"The judge at {judge.url} answered HTTP {err.code}: {detail}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise JudgeError(
            f"Could not reach the judge at {judge.url} ({reason}); check evaluation.judge_url or turn the judge off."
        ) from None
    except json.JSONDecodeError:
        raise JudgeError(f"The judge at {judge.url} did not answer with JSON.") from None
    return _reply_text(payload, judge.url)


def _reply_text(payload: Any, url: str) -> str:
    try:
        return str(payload["choices"][0]["message"]["content"])
    except (KeyError, IndexError, TypeError):
        raise JudgeError(
            f"The judge at {url} answered without choices[0].message.content: {str(payload)[:200]}"
        ) from None
